"""The image templates and content tags of roles/images, without Docker."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from agentlink.deploy import images as plan

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
ROLE = ROOT / "roles" / "images"
TAG = re.compile(r"^0\.1\.0-[0-9a-f]{12}$")



VARIABLES = {
    "base_flavor": "debian",
    "pip_index_url": "https://pypi.org/simple",
    "install_dir": "/opt/agentlink",
    "config_dir": "/etc/agentlink",
    "state_dir": "/var/lib/agentlink",
    "runtime_user": "agentlink",
    "runtime_uid": 10001,
    "redis_packages": ["redis-server", "redis-sentinel"],
}


def _stages(dockerfile: str) -> list[str]:
    """Split a Dockerfile into its stages, each starting with its FROM line."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return ["\n".join(stage) for stage in stages]


def _render(template: str, **extra) -> str:
    return plan.render_dockerfile(IMAGES, template, {**VARIABLES, "version": "0.1.0", **extra})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A minimal project tree: pyproject, package source, templates, CA bundle."""
    (tmp_path / "src" / "agentlink" / "__pycache__").mkdir(parents=True)
    (tmp_path / "src" / "agentlink" / "__init__.py").write_text('"""agentlink."""\n')
    (tmp_path / "src" / "agentlink" / "agent.py").write_text("class BaseAgent: ...\n")
    (tmp_path / "src" / "agentlink" / "deploy").mkdir()
    (tmp_path / "src" / "agentlink" / "deploy" / "rollout.py").write_text("import docker\n")
    (tmp_path / "src" / "agentlink" / "__pycache__" / "agent.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "agentlink"\nversion = "0.1.0"\n')
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    shutil.copytree(IMAGES, tmp_path / "images")
    return tmp_path


def _specs(project: Path, packages=("python3",), constraints="markupsafe==3.0.4\n"):
    """The same shape of specs as roles/images/vars/main.yml builds."""
    return [
        {"name": "base",
         "inputs": {"source": "debootstrap", "suite": "bookworm", "packages": list(packages)},
         "files": [{"dest": "build-base.sh", "src": str(project / "images" / "build-base.sh")}]},
        {"name": "runtime", "template": "runtime.Dockerfile.j2", "parent": "base",
         "files": [
             {"dest": "pyproject.toml", "src": str(project / "pyproject.toml")},
             {"dest": "README.md", "src": str(project / "README.md"), "optional": True},
             {"dest": "src/agentlink", "src": str(project / "src" / "agentlink"),
              "exclude": ["deploy", "devtools"]},
             {"dest": "constraints.txt", "content": constraints},
             {"dest": "ca-certificates.crt", "src": str(project / "ca.crt"), "hash": False},
         ]},
        {"name": "mainpc", "template": "machine.Dockerfile.j2", "parent": "runtime"},
        {"name": "pc2", "template": "machine.Dockerfile.j2", "parent": "runtime"},
        {"name": "redis", "template": "redis.Dockerfile.j2", "parent": "base"},
    ]


def _tags(project: Path, **kwargs) -> dict[str, str]:
    planned = plan.plan_images(_specs(project, **kwargs), templates_dir=project / "images",
                               namespace="agentlink", version="0.1.0", variables=VARIABLES)
    return {name: image["tag"] for name, image in planned.items()}


# --- templates --------------------------------------------------------------------------

def test_runtime_is_multi_stage_with_a_builder_and_a_clean_runtime_stage():
    stages = _stages(_render("runtime.Dockerfile.j2", base_image="agentlink/base:0.1.0-abc"))
    assert len(stages) == 2
    builder, runtime = stages
    assert builder.splitlines()[0] == "FROM agentlink/base:0.1.0-abc AS builder"
    assert runtime.splitlines()[0] == "FROM agentlink/base:0.1.0-abc"
    assert "pip wheel --wheel-dir /wheelhouse" in builder
    assert "--no-index --find-links /wheelhouse --target /opt/agentlink/lib" in builder
    assert "ca-certificates.crt" in builder


def test_runtime_stage_has_no_pip_compilers_ca_bundle_or_apt():
    runtime = _stages(_render("runtime.Dockerfile.j2", base_image="agentlink/base:t"))[-1]
    lowered = runtime.lower()
    for word in ("pip", "gcc", "build-essential", "python3-dev", "apt-get", "ca-certificates",
                 "cert", "wheelhouse", "/src"):
        assert word not in lowered, word
    copies = [line for line in runtime.splitlines() if line.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=builder /opt/agentlink /opt/agentlink"]


def test_runtime_stage_runs_agentlink_as_a_non_root_user():
    runtime = _stages(_render("runtime.Dockerfile.j2", base_image="agentlink/base:t"))[-1]
    assert "USER agentlink" in runtime.splitlines()
    assert 'ENTRYPOINT ["python3", "-m", "agentlink"]' in runtime.splitlines()
    assert "PYTHONPATH=/opt/agentlink/lib" in runtime


def test_builder_installs_pip_only_on_a_debian_base():
    debian = _stages(_render("runtime.Dockerfile.j2", base_image="agentlink/base:t"))[0]
    slim = _stages(_render("runtime.Dockerfile.j2", base_image="agentlink/base:t",
                           base_flavor="python"))[0]
    assert "python3-pip" in debian
    assert "apt-get" not in slim


def test_machine_images_are_thin_and_bake_no_config():
    text = _render("machine.Dockerfile.j2", image_name="pc2",
                   runtime_image="agentlink/runtime:0.1.0-abc")
    (stage,) = _stages(text)
    assert stage.splitlines()[0] == "FROM agentlink/runtime:0.1.0-abc"
    assert "ENV AGENTLINK_MACHINE=pc2" in stage.splitlines()
    assert 'io.agentlink.machine="pc2"' in stage
    assert not re.search(r"^(COPY|ADD|RUN) ", stage, re.MULTILINE)


def test_redis_image_uses_debian_packages_on_the_base():
    (stage,) = _stages(_render("redis.Dockerfile.j2", base_image="agentlink/base:t"))
    assert stage.splitlines()[0] == "FROM agentlink/base:t"
    assert "apt-get install -y -q --no-install-recommends redis-server redis-sentinel" in stage
    assert "rm -rf /var/lib/apt/lists/*" in stage
    assert "USER redis" in stage.splitlines()


def test_an_undefined_template_variable_is_an_error():
    with pytest.raises(Exception, match="base_image"):
        plan.render_dockerfile(IMAGES, "redis.Dockerfile.j2", {"redis_packages": ["redis-server"]})


def test_no_template_or_default_names_latest():
    for path in [*IMAGES.iterdir(), ROLE / "defaults" / "main.yml", ROLE / "vars" / "main.yml"]:
        assert ":latest" not in path.read_text(), path


# --- content tags -------------------------------------------------------------------------

def test_tags_are_version_and_content_hash_never_latest(project):
    tags = _tags(project)
    assert set(tags) == {"base", "runtime", "mainpc", "pc2", "redis"}
    for tag in tags.values():
        assert TAG.match(tag), tag
    for version, digest in (("latest", ""), ("", "latest"), ("0.1.0", "latest")):
        with pytest.raises(plan.PlanError):
            plan.content_tag(version, digest)


def test_same_inputs_give_the_same_tags(project):
    assert _tags(project) == _tags(project)


def test_a_source_change_retags_runtime_and_machines_only(project):
    before = _tags(project)
    (project / "src" / "agentlink" / "agent.py").write_text("class BaseAgent: pass\n")
    after = _tags(project)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"runtime", "mainpc", "pc2"}


def test_a_new_source_file_retags_the_runtime(project):
    before = _tags(project)
    (project / "src" / "agentlink" / "extra.py").write_text("")
    assert _tags(project)["runtime"] != before["runtime"]


def test_the_runtime_image_carries_no_controller_code(project):
    staged = plan.plan_images(_specs(project), templates_dir=project / "images",
                              namespace="agentlink", version="0.1.0",
                              variables=VARIABLES)["runtime"]["files"]
    assert "src/agentlink/agent.py" in staged
    assert not [name for name in staged if "/deploy" in name]
    before = _tags(project)
    (project / "src" / "agentlink" / "deploy" / "rollout.py").write_text("import docker, yaml\n")
    assert _tags(project) == before


def test_the_role_stages_the_package_without_deploy_and_devtools():
    spec = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["_images_runtime_spec"]
    package = next(f for f in spec["files"] if f["dest"] == "src/agentlink")
    assert set(package["exclude"]) == {"deploy", "devtools"}


def test_caches_the_ca_bundle_and_readme_absence_do_not_matter_unless_real(project):
    before = _tags(project)
    (project / "src" / "agentlink" / "__pycache__" / "agent.cpython-311.pyc").write_bytes(b"y")
    (project / "ca.crt").write_text("another bundle\n")
    assert _tags(project) == before
    (project / "README.md").write_text("")
    assert _tags(project)["runtime"] != before["runtime"]


def test_a_base_package_change_retags_everything(project):
    before = _tags(project)
    after = _tags(project, packages=("python3", "tini"))
    assert all(before[name] != after[name] for name in before)


def test_a_pin_change_retags_runtime_not_redis(project):
    before = _tags(project)
    after = _tags(project, constraints="markupsafe==3.0.3\n")
    assert after["runtime"] != before["runtime"]
    assert after["redis"] == before["redis"]
    assert after["base"] == before["base"]


def test_parents_must_be_planned_first(project):
    specs = _specs(project)
    with pytest.raises(plan.PlanError, match="parent"):
        plan.plan_images(specs[1:], templates_dir=project / "images", namespace="agentlink",
                         version="0.1.0", variables=VARIABLES)


def test_the_child_dockerfile_names_the_parent_tag(project):
    planned = plan.plan_images(_specs(project), templates_dir=project / "images",
                               namespace="agentlink", version="0.1.0", variables=VARIABLES)
    assert f"FROM {planned['base']['ref']} AS builder" in planned["runtime"]["dockerfile"]
    assert f"FROM {planned['runtime']['ref']}\n" in planned["mainpc"]["dockerfile"]
    assert planned["mainpc"]["repository"] == "agentlink/mainpc"


def test_project_version_comes_from_pyproject():
    assert plan.project_version(ROOT / "pyproject.toml")


# --- build contexts -------------------------------------------------------------------------

def test_staging_is_exact_and_idempotent(project, tmp_path):
    planned = plan.plan_images(_specs(project), templates_dir=project / "images",
                               namespace="agentlink", version="0.1.0", variables=VARIABLES)
    runtime = planned["runtime"]
    context = tmp_path / "ctx"
    (context / "stale").mkdir(parents=True)
    (context / "stale" / "old.py").write_text("")

    assert plan.stage_context(context, runtime["dockerfile"], runtime["files"], dry_run=True)
    assert (context / "stale" / "old.py").exists()
    assert not (context / "Dockerfile").exists()

    changes = plan.stage_context(context, runtime["dockerfile"], runtime["files"])
    assert "write Dockerfile" in changes and "remove stale/" in changes
    assert not (context / "stale").exists()
    assert (context / "src" / "agentlink" / "agent.py").is_file()
    assert not (context / "src" / "agentlink" / "__pycache__").exists()
    assert (context / "README.md").read_bytes() == b""
    assert plan.stage_context(context, runtime["dockerfile"], runtime["files"]) == []


def test_the_manifest_names_every_planned_image_and_is_written_only_when_it_differs(
        project, tmp_path):
    planned = plan.plan_images(_specs(project), templates_dir=project / "images",
                               namespace="agentlink", version="0.1.0", variables=VARIABLES)
    manifest = tmp_path / "build" / "images.json"

    assert plan.write_manifest(manifest, "0.1.0", planned, dry_run=True)
    assert not manifest.exists()
    assert plan.write_manifest(manifest, "0.1.0", planned)
    written = json.loads(manifest.read_text())
    assert written["version"] == "0.1.0"
    assert written["images"] == {name: image["ref"] for name, image in planned.items()}
    assert written["details"]["runtime"]["parent"] == "base"
    assert "dockerfile" not in written["details"]["runtime"]
    assert not plan.write_manifest(manifest, "0.1.0", planned)
    assert plan.write_manifest(manifest, "0.2.0", planned, dry_run=True)


# --- the role's public interface ------------------------------------------------------------

def test_every_default_is_documented_in_the_argument_specs():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    for name, option in options.items():
        assert name.startswith("images_")
        assert option.get("type") and option.get("description"), name
