"""A workflow definition: a small graph of steps, each a call to an agent.

```yaml
name: digest-and-keep
input: {text: "the quick brown fox"}     # defaults; `workflow run --input` overrides
steps:
  - id: words                            # unique, a word
    agent: Executor
    payload: {text: "{{ input.text }}"}
  - id: keep
    agent: MemoryOrchestratorService
    depends_on: [words]                  # runs once these succeeded; others run in parallel
    payload: {op: put, key: "{{ workflow.id }}", value: "{{ steps.words.result }}"}
    timeout: 5                           # seconds per attempt
    retries: 2                           # attempts after the first, with backoff
    idempotency_key: "{{ workflow.id }}-keep"   # at most one run, even across a takeover
```

Payload strings are Jinja templates, sandboxed, over `input`, `workflow` (`id`, `name`) and
`steps.<id>.result` of the steps it depends on. A string that is one `{{ expression }}` gives
the expression's value as it is (a list stays a list); any other template gives a string.
`load()` and `parse()` report every problem at once, like the topology.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agentlink.topology import (
    Problem,
    ProblemsError,
    check_dependencies,
    line_of,
    read_document,
)

TOP_KEYS = {"name", "input", "steps"}
STEP_KEYS = {"id", "agent", "payload", "depends_on", "timeout", "retries", "idempotency_key"}
WORD = re.compile(r"^[A-Za-z][\w-]*$")
ONE_EXPRESSION = re.compile(r"^\{\{(?P<expr>(?:(?!\{\{|\}\}).)*)\}\}$", re.DOTALL)
DEFAULT_TIMEOUT_S = 5.0
MAX_RETRIES = 10

_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)


class WorkflowError(ProblemsError, ValueError):
    """A definition that cannot run; a ValueError, so a host answers it as a bad request."""


@dataclass(frozen=True)
class Step:
    id: str
    agent: str
    payload: Any
    depends_on: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT_S
    retries: int = 0
    idempotency_key: str | None = None

    def render_payload(self, context: dict[str, Any]) -> Any:
        return render(self.payload, context)

    def render_key(self, context: dict[str, Any]) -> str | None:
        return None if self.idempotency_key is None else str(render(self.idempotency_key,
                                                                    context))


@dataclass(frozen=True)
class Workflow:
    name: str
    steps: dict[str, Step]
    input: dict[str, Any]
    document: str  # the definition as canonical JSON: what a workflow record keeps

    def ready(self, succeeded: Collection[str], started: Collection[str]) -> list[Step]:
        """Steps whose dependencies all succeeded and that have not started."""
        return [s for s in self.steps.values() if s.id not in started
                and all(d in succeeded for d in s.depends_on)]


# --- templates ----------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _compiled(text: str) -> Any:
    """A template compiled once per process: initializing a workflow is a cache hit."""
    match = ONE_EXPRESSION.match(text.strip())
    if match:
        return _ENV.compile_expression(match.group("expr"), undefined_to_none=False)
    return _ENV.from_string(text).render


def _is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def render(value: Any, context: dict[str, Any]) -> Any:
    """The payload with every template string rendered; raises jinja2 errors as they are."""
    if isinstance(value, str):
        return _compiled(value)(**context) if _is_template(value) else value
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def referenced_steps(text: str) -> set[str]:
    """Step ids a template reads as `steps.<id>` or `steps['<id>']`; raises on bad syntax."""
    found = set()
    for node in _ENV.parse(text).find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)  # what find_all looked for
        inner = node.node
        if not (isinstance(inner, nodes.Name) and inner.name == "steps"):
            continue
        if isinstance(node, nodes.Getattr):
            found.add(node.attr)
        elif isinstance(node.arg, nodes.Const):
            found.add(str(node.arg.value))
    return found


# --- loading and checking -----------------------------------------------------------------


def load(path: str | Path, agents: Collection[str] | None = None) -> Workflow:
    """A workflow from a YAML or JSON file; `agents`, when given, are the known agents."""
    source = str(path)
    doc = read_document(source, WorkflowError)
    return parse(doc, agents, source)


def parse(doc: Any, agents: Collection[str] | None = None,
          source: str = "workflow") -> Workflow:
    """A workflow from a parsed document (JSON from a request, YAML from a file). A document
    seen before is not checked again: initializing a known workflow is a dictionary hit."""
    document = json.dumps(doc, sort_keys=True, default=str)
    cache_key = (document, None if agents is None else frozenset(agents))
    cached = _PARSED.get(cache_key)
    if cached is not None:
        return cached
    checker = _Checker(cache_key[1])
    workflow = checker.workflow(doc, document)
    if checker.problems:
        raise WorkflowError(source, checker.problems)
    if len(_PARSED) >= PARSED_KEPT:
        _PARSED.clear()
    _PARSED[cache_key] = workflow
    return workflow


PARSED_KEPT = 256
_PARSED: dict[tuple[str, frozenset[str] | None], Workflow] = {}


class _Checker:
    def __init__(self, agents: frozenset[str] | None) -> None:
        self.agents = agents
        self.problems: list[Problem] = []

    def add(self, message: str, where: Any = None) -> None:
        self.problems.append(Problem(message, line_of(where)))

    def unknown_keys(self, mapping: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in sorted(set(mapping) - allowed):
            self.add(f"unknown key '{key}' in {where} (allowed: {', '.join(sorted(allowed))})",
                     mapping)

    def workflow(self, doc: Any, document: str) -> Workflow:
        if not isinstance(doc, dict):
            self.add("a workflow must be a mapping with 'steps'")
            return Workflow("", {}, {}, document)
        self.unknown_keys(doc, TOP_KEYS, "the workflow")
        name = doc.get("name", "workflow")
        if not isinstance(name, str) or not WORD.match(name):
            self.add(f"name must be a word, got {name!r}", doc)
        inputs = doc.get("input") or {}
        if not isinstance(inputs, dict):
            self.add("input must be a mapping of names to values", doc)
            inputs = {}
        raw_steps = doc.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            self.add("'steps' must be a non-empty list", doc)
            raw_steps = []
        steps: dict[str, Step] = {}
        for raw in raw_steps:
            step = self.step(raw)
            if step is None:
                continue
            if step.id in steps:
                self.add(f"duplicate step id '{step.id}'", raw)
                continue
            steps[step.id] = step
        raws: dict[Any, Any] = {}
        for raw in raw_steps:  # a duplicate id keeps its first step's line
            if isinstance(raw, dict):
                raws.setdefault(raw.get("id"), raw)
        self.graph(steps, raws)
        return Workflow(str(name), steps, dict(inputs), document)

    def step(self, raw: Any) -> Step | None:
        if not isinstance(raw, dict):
            self.add(f"a step must be a mapping, got {raw!r}")
            return None
        sid = raw.get("id")
        if not isinstance(sid, str) or not WORD.match(sid):
            self.add(f"step id must be a word, got {sid!r}", raw)
            return None
        self.unknown_keys(raw, STEP_KEYS, f"step '{sid}'")
        agent = raw.get("agent")
        if not isinstance(agent, str) or not agent:
            self.add(f"step '{sid}': agent must be the name of an agent", raw)
            agent = ""
        elif self.agents is not None and agent not in self.agents:
            self.add(f"step '{sid}': unknown agent '{agent}' (not in the topology)", raw)
        depends = raw.get("depends_on") or []
        if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
            self.add(f"step '{sid}': depends_on must be a list of step ids", raw)
            depends = []
        timeout = raw.get("timeout", DEFAULT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            self.add(f"step '{sid}': timeout must be a positive number of seconds", raw)
            timeout = DEFAULT_TIMEOUT_S
        retries = raw.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or \
                not 0 <= retries <= MAX_RETRIES:
            self.add(f"step '{sid}': retries must be a whole number from 0 to {MAX_RETRIES}",
                     raw)
            retries = 0
        key = raw.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key):
            self.add(f"step '{sid}': idempotency_key must be a string (a template)", raw)
            key = None
        return Step(sid, agent, raw.get("payload", {}), tuple(depends), float(timeout),
                    retries, key)

    def graph(self, steps: dict[str, Step], raws: dict[Any, Any]) -> None:
        graph, cycles = check_dependencies(
            {s.id: s.depends_on for s in steps.values()}, "step",
            lambda message, sid: self.add(message, raws.get(sid)))
        for step in steps.values():
            # With a cycle, what runs before what is undefined: only the syntax is checked.
            ancestors = None if cycles else _ancestors(step.id, graph)
            self.templates(step, ancestors, set(steps), raws.get(step.id))

    def templates(self, step: Step, ancestors: set[str] | None, known: set[str],
                  raw: Any) -> None:
        """Every template parses, and reads only steps that finish before this one."""
        texts = [*_strings(step.payload), *([step.idempotency_key] if step.idempotency_key
                                            else [])]
        for text in filter(_is_template, texts):
            try:
                used = referenced_steps(text)
                _compiled(text)
            except jinja2.TemplateSyntaxError as err:
                self.add(f"step '{step.id}': template {text!r}: {err.message}", raw)
                continue
            for other in sorted(used - ancestors) if ancestors is not None else ():
                hint = (f"add '{other}' to depends_on" if other in known - {step.id}
                        else "no such step")
                self.add(f"step '{step.id}' uses steps.{other} but does not run after it "
                         f"({hint})", raw)


def _ancestors(step: str, graph: dict[str, list[str]]) -> set[str]:
    """Every step that must succeed before `step` runs (the graph has no cycle)."""
    found: set[str] = set()
    todo = list(graph[step])
    while todo:
        dep = todo.pop()
        if dep not in found:
            found.add(dep)
            todo.extend(graph[dep])
    return found
