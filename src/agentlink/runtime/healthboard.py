"""The live health dashboard: one page and its JSON API, served by an agent on its host's
HTTP port (no port of its own).

A background thread polls every agent host's /health in parallel (the hosts come from the
startup config's system layout) and Alertmanager's firing alerts, keeps the latest state of
every instance and a bounded history of state changes. An agent's state is read from its
replicas: healthy when all of them are, degraded when some serve (healthy or degraded), and
when none serves the most hopeful of starting, unhealthy, unknown (not polled yet) and down
(no host answers for it).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from agentlink.runtime.agent import AgentContext, BaseAgent, Degraded, WebReply
from agentlink.runtime.status import fetch_health

SERVING = ("healthy", "degraded")
HISTORY = 200
MAX_ALERTS = 50  # the page lists them; past this many the count says enough
ALERTS_PATH = "/api/v2/alerts?active=true&silenced=false&inhibited=false"


def agent_state(states: list[str]) -> str:
    """One agent's state from its replicas' states."""
    if states and all(s == "healthy" for s in states):
        return "healthy"
    if any(s in SERVING for s in states):
        return "degraded"
    for state in ("starting", "unhealthy", "unknown"):
        if state in states:
            return state
    return "down"


def fetch_alerts(alertmanager: str, timeout: float = 1.0) -> dict[str, Any]:
    """Firing alerts from Alertmanager's v2 API, or why there are none to show."""
    if not alertmanager:
        return {"available": False, "note": "no Alertmanager configured", "total": 0,
                "firing": []}
    try:
        with urllib.request.urlopen(alertmanager + ALERTS_PATH, timeout=timeout) as response:
            alerts = json.load(response)
    except (OSError, ValueError) as err:
        return {"available": False, "note": f"alerts unavailable: {err}", "total": 0,
                "firing": []}
    firing = sorted(({"name": a["labels"].get("alertname", "?"),
                      "severity": a["labels"].get("severity", ""),
                      "summary": a.get("annotations", {}).get("summary", ""),
                      "since": a.get("startsAt", ""), "labels": a["labels"]} for a in alerts),
                    key=lambda a: (a["severity"] != "critical", a["name"]))
    return {"available": True, "note": "", "total": len(firing), "firing": firing[:MAX_ALERTS]}


class HealthDashboard(BaseAgent):
    """Serves `/dashboard` (the page) and `/api/dashboard` (its JSON).

    Polling starts at the first health check, so a subclass that overrides check_health()
    returns super().check_health() merged with its own checks."""

    def __init__(self, context: AgentContext) -> None:
        super().__init__(context)
        self.system = context.system
        self.interval = float(self.options.get("poll_interval", 1.0))
        self.states: dict[str, str] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.alerts: dict[str, Any] = fetch_alerts("")
        self.polled_at = 0.0
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None

    # --- polling -------------------------------------------------------------------------

    def check_health(self) -> dict[str, bool | Degraded]:
        # The host checks health from the moment it starts: the history begins with the
        # agent, not when someone first opens the page.
        self._ensure_polling()
        return {}

    def _ensure_polling(self) -> None:
        with self._lock:
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll_forever, daemon=True,
                                                name=f"{self.instance}-poller")
                self._poller.start()

    def _poll_forever(self) -> None:
        groups = self.system.get("groups", {})
        with ThreadPoolExecutor(max_workers=max(1, len(groups) + 1)) as pool:
            while True:
                try:
                    self.poll(pool)
                except Exception:  # one bad answer must not freeze the page for good
                    self.log.exception("dashboard poll failed")
                time.sleep(self.interval)

    def poll(self, pool: ThreadPoolExecutor) -> None:
        """One round: every host's /health and the alerts, in parallel."""
        groups = self.system.get("groups", {})
        alerts = pool.submit(fetch_alerts, self.system.get("monitoring", {}).get(
            "alertmanager", ""))
        reports = dict(zip(groups, pool.map(lambda g: fetch_health(g["http"]), groups.values()),
                           strict=True))
        states = {i["instance"]: self._instance_state(i, reports.get(i["group"]))
                  for i in self.system.get("instances", [])}
        with self._lock:
            self._record_changes(states)
            self.states, self.alerts, self.polled_at = states, alerts.result(), time.time()

    @staticmethod
    def _instance_state(instance: dict[str, Any], report: dict[str, Any] | None) -> str:
        if report is None:
            return "down"
        found = report.get("agents", {}).get(instance["instance"])
        return str(found["state"]) if found else "down"

    def _record_changes(self, states: dict[str, str]) -> None:
        if not self.states:
            return  # the first round is the starting point, not a change
        agents = {i["instance"]: i["agent"] for i in self.system.get("instances", [])}
        now = time.time()
        for instance, state in states.items():
            before = self.states.get(instance, "unknown")
            if state != before:
                self.history.appendleft({"at": now, "instance": instance,
                                         "agent": agents[instance], "from": before,
                                         "to": state})

    # --- answers -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's JSON: agents by machine and layer, instances, history, alerts."""
        with self._lock:
            states, history, alerts = dict(self.states), list(self.history), self.alerts
            polled_at = self.polled_at
        instances = [i | {"state": states.get(i["instance"], "unknown")}
                     for i in self.system.get("instances", [])]
        by_agent: dict[str, list[dict[str, Any]]] = {}
        for inst in instances:
            by_agent.setdefault(inst["agent"], []).append(inst)
        agents = [self._agent_doc(a, by_agent.get(a["name"], []))
                  for a in self.system.get("agents", [])]
        machines: dict[str, dict[str, list[str]]] = {}
        for agent in agents:
            layers = machines.setdefault(agent["machine"], {})
            layers.setdefault(str(agent["layer"]), []).append(agent["name"])
        counts = Counter(agent["state"] for agent in agents)
        return {"generated_at": time.time(), "polled_at": polled_at, "counts": dict(counts),
                "agents": agents, "machines": machines, "instances": instances,
                "history": history, "alerts": alerts}

    @staticmethod
    def _agent_doc(agent: dict[str, Any], replicas: list[dict[str, Any]]) -> dict[str, Any]:
        states = [r["state"] for r in replicas]
        return {"name": agent["name"], "layer": agent["layer"],
                # an agent is drawn once, on the machine of its first replica
                "machine": replicas[0]["machine"] if replicas else "?",
                "state": agent_state(states),
                "serving": sum(s in SERVING for s in states), "replicas": len(replicas),
                "instances": replicas}

    def web(self, path: str) -> WebReply | None:
        route = path.split("?", 1)[0].rstrip("/")
        if route not in ("", "/dashboard", "/api/dashboard"):
            return None
        self._ensure_polling()  # also where no host checks health (a test, a script)
        if route == "/api/dashboard":
            return WebReply(200, "application/json", json.dumps(self.snapshot()).encode())
        page = resources.files("agentlink.runtime").joinpath("healthboard.html").read_bytes()
        return WebReply(200, "text/html; charset=utf-8", page)
