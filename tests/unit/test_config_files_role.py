"""roles/config_files run by ansible-playbook on this machine: files written where they differ,
a second run changes nothing, files that hold secrets never reach the output, a file that
fails its check is not installed, and a write notifies the caller's handlers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

SECRET = "not-for-the-log-7f3a"


HANDLED = "the-files-were-written"


def run_role(tmp_path: Path, contents: dict[str, str], secret: bool,
             **more_vars: object) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "play.yml"
    role_vars = {"config_files_dir": str(tmp_path / "out"), "config_files_contents": contents,
                 "config_files_mode": "0440", "config_files_secret": secret, **more_vars}
    playbook.write_text(json.dumps([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {"ansible_python_interpreter": sys.executable},
        "tasks": [{"ansible.builtin.include_role": {"name": "config_files"}, "vars": role_vars}],
        "handlers": [{"name": "Files written", "ansible.builtin.debug": {"msg": HANDLED}}],
    }]))
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-v", "--diff",
                           "-i", "localhost,", str(playbook)],
                          cwd=ROOT, capture_output=True, text=True, check=False)


def changed(run: subprocess.CompletedProcess[str]) -> int:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    recap = run.stdout.rsplit("PLAY RECAP", 1)[1]
    return int(recap.split("changed=")[1].split()[0])


def test_secret_files_are_written_once_and_never_shown(tmp_path: Path) -> None:
    contents = {"auth.conf": f"requirepass {SECRET}\n", "sub/sentinel.conf": f"pass {SECRET}\n"}
    first = run_role(tmp_path, contents, secret=True)
    assert changed(first) > 0
    assert (tmp_path / "out" / "sub" / "sentinel.conf").read_text() == contents["sub/sentinel.conf"]
    assert oct((tmp_path / "out" / "auth.conf").stat().st_mode & 0o777) == "0o440"
    again = run_role(tmp_path, contents, secret=True)
    assert changed(again) == 0
    assert SECRET not in first.stdout + first.stderr + again.stdout + again.stderr


def test_plain_files_show_their_diff(tmp_path: Path) -> None:
    run_role(tmp_path, {"app.conf": "level 1\n"}, secret=False)
    run = run_role(tmp_path, {"app.conf": "level 2\n"}, secret=False)
    assert changed(run) == 1
    assert "-level 1" in run.stdout and "+level 2" in run.stdout


def test_a_file_that_fails_its_check_is_not_installed(tmp_path: Path) -> None:
    checks = {"checked.conf": "grep -q '^valid' %s"}
    refused = run_role(tmp_path, {"checked.conf": "broken\n", "plain.conf": "any\n"},
                       secret=False, config_files_validate=checks)
    assert refused.returncode != 0
    assert "failed to validate" in refused.stdout
    assert not (tmp_path / "out" / "checked.conf").exists()
    accepted = run_role(tmp_path, {"checked.conf": "valid\n", "plain.conf": "any\n"},
                        secret=False, config_files_validate=checks)
    assert changed(accepted) > 0
    assert (tmp_path / "out" / "checked.conf").read_text() == "valid\n"


def test_a_write_notifies_the_handlers_and_no_write_does_not(tmp_path: Path) -> None:
    notify = {"config_files_notify": ["Files written"]}
    first = run_role(tmp_path, {"app.conf": "level 1\n"}, secret=False, **notify)
    assert changed(first) > 0
    assert "RUNNING HANDLER [Files written]" in first.stdout and HANDLED in first.stdout
    again = run_role(tmp_path, {"app.conf": "level 1\n"}, secret=False, **notify)
    assert changed(again) == 0
    assert "RUNNING HANDLER" not in again.stdout
    assert "item=app.conf" not in again.stdout  # nothing to write: no file looped over


def test_a_file_whose_mode_drifted_is_written_again(tmp_path: Path) -> None:
    run_role(tmp_path, {"app.conf": "level 1\n"}, secret=False)
    (tmp_path / "out" / "app.conf").chmod(0o600)
    run = run_role(tmp_path, {"app.conf": "level 1\n"}, secret=False)
    assert changed(run) == 1
    assert oct((tmp_path / "out" / "app.conf").stat().st_mode & 0o777) == "0o440"
