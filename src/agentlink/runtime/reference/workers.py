"""Workers: small real work on the request's text, then a call to each dependency, so that
traffic flows through the dependency graph. `hops` bounds how far a request travels."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from agentlink.runtime.agent import BaseAgent

MAX_HOPS = 3


def _work(kind: str, text: str) -> Any:
    if kind == "digest":
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    if kind == "words":
        return Counter(text.split()).most_common(3)
    if kind == "sort":
        return sorted(set(text.split()))[:10]
    if kind == "stats":
        return {"chars": len(text), "words": len(text.split()), "lines": text.count("\n") + 1}
    raise ValueError(f"unknown worker kind {kind!r}")


class Worker(BaseAgent):
    def handle(self, request: dict[str, Any]) -> Any:
        text = str(request.get("text", ""))
        hops = min(int(request.get("hops", 0)), MAX_HOPS)
        result: dict[str, Any] = {"agent": self.name,
                                  "result": _work(self.options.get("kind", "digest"), text)}
        if hops > 0:
            result["calls"] = {dep: self.call(dep, {"text": text, "hops": hops - 1})
                               for dep in self.options.get("calls", [])}
        return result
