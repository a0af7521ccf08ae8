"""Workflow definitions: every problem reported at once with its line, and payload templates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentlink.runtime.workflow.definition import WorkflowError, load, parse
from tests.unit.conftest import ROOT

AGENTS = {"Executor", "NLUAgent", "MemoryOrchestratorService"}


def problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "wf.yml"
    path.write_text(text)
    with pytest.raises(WorkflowError) as err:
        load(path, AGENTS)
    return [p.format("wf.yml") for p in err.value.problems]


def test_the_example_workflow_is_valid_against_the_reference_topology() -> None:
    result = subprocess.run([sys.executable, "-m", "agentlink", "workflow", "validate",
                             "workflows/transcript.yml"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "ok (5 steps)" in result.stdout


def test_a_cycle_is_named_with_its_steps(tmp_path: Path) -> None:
    found = problems("steps:\n"
                     "  - {id: a, agent: Executor, depends_on: [c]}\n"
                     "  - {id: b, agent: Executor, depends_on: [a]}\n"
                     "  - {id: c, agent: Executor, depends_on: [b]}\n", tmp_path)
    assert found == ["wf.yml:2: dependency cycle: a -> c -> b -> a"]


def test_unknown_agents_steps_and_bad_fields_are_all_reported(tmp_path: Path) -> None:
    found = problems("steps:\n"
                     "  - {id: a, agent: Nobody}\n"
                     "  - {id: b, agent: Executor, depends_on: [zz], retries: -1}\n"
                     "  - {id: b, agent: Executor}\n"
                     "  - {id: c, agent: NLUAgent, timeout: 0, colour: red}\n", tmp_path)
    assert found == [
        "wf.yml:2: step 'a': unknown agent 'Nobody' (not in the topology)",
        "wf.yml:3: step 'b': retries must be a whole number from 0 to 10",
        "wf.yml:4: duplicate step id 'b'",
        "wf.yml:5: unknown key 'colour' in step 'c' (allowed: agent, depends_on, id, "
        "idempotency_key, payload, retries, timeout)",
        "wf.yml:5: step 'c': timeout must be a positive number of seconds",
        "wf.yml:3: step 'b' depends on unknown step 'zz'",
    ]


def test_a_template_may_read_only_steps_that_run_before_it(tmp_path: Path) -> None:
    found = problems("steps:\n"
                     "  - {id: a, agent: Executor}\n"
                     "  - id: b\n"
                     "    agent: Executor\n"
                     "    payload: {text: '{{ steps.a.result }} {{ steps.ghost.result }}'}\n"
                     "  - {id: c, agent: Executor, payload: '{{ steps.a.result ', "
                     "depends_on: [a]}\n", tmp_path)
    assert found == [
        "wf.yml:3: step 'b' uses steps.a but does not run after it (add 'a' to depends_on)",
        "wf.yml:3: step 'b' uses steps.ghost but does not run after it (no such step)",
        "wf.yml:6: step 'c': template '{{ steps.a.result ': unexpected end of template, "
        "expected 'end of print statement'.",
    ]


def test_a_file_that_is_not_yaml_names_its_line(tmp_path: Path) -> None:
    assert problems("steps: [\n  {id: a\n", tmp_path)[0].startswith("wf.yml:3: YAML syntax")


def test_one_expression_keeps_its_type_and_text_around_it_makes_a_string() -> None:
    workflow = parse({"steps": [
        {"id": "a", "agent": "Executor"},
        {"id": "b", "agent": "Executor", "depends_on": ["a"],
         "payload": {"all": "{{ steps.a.result }}", "first": "{{ steps.a.result.n[0] }}",
                     "text": "n={{ steps.a.result.n | length }}", "plain": "{ not a template }",
                     "nested": ["{{ input.x }}", {"id": "{{ workflow.id }}"}]},
         "idempotency_key": "{{ workflow.id }}-b"}]})
    context = {"input": {"x": "7"}, "workflow": {"id": "W", "name": "t"},
               "steps": {"a": {"result": {"n": [1, 2]}}}}
    step = workflow.steps["b"]
    assert step.render_payload(context) == {
        "all": {"n": [1, 2]}, "first": 1, "text": "n=2", "plain": "{ not a template }",
        "nested": ["7", {"id": "W"}]}  # "7" stays a string: no guessing at types
    assert step.render_key(context) == "W-b"


def test_templates_are_sandboxed() -> None:
    workflow = parse({"steps": [{"id": "a", "agent": "Executor",
                                 "payload": "{{ input.__class__.__mro__ }}"}]})
    with pytest.raises(Exception, match="unsafe"):
        workflow.steps["a"].render_payload({"input": {}})


def test_ready_steps_wait_for_every_dependency() -> None:
    workflow = parse({"steps": [{"id": "a", "agent": "X"}, {"id": "b", "agent": "X"},
                                {"id": "c", "agent": "X", "depends_on": ["a", "b"]}]})
    assert [s.id for s in workflow.ready(set(), set())] == ["a", "b"]
    assert [s.id for s in workflow.ready({"a"}, {"a", "b"})] == []
    assert [s.id for s in workflow.ready({"a", "b"}, {"a", "b"})] == ["c"]
