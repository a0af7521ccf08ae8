"""The wire format between a client and an agent host.

A request is two frames after the DEALER/ROUTER envelope: the target agent's name and a JSON
body, and optionally a third, an idempotency key: the agent host then runs the request at most
once for that key and answers repeats with the first reply (agentlink.runtime.idempotency).
A reply is one JSON frame: {"ok": true, "result": ...} or {"ok": false, "code", "error"}.
Codes tell the client whether another instance may be tried: only codes in RETRYABLE mean the
request was not processed. OVERLOADED: the host's queue is full (a flood); another replica, or
the same one a moment later, may take it.
"""

from __future__ import annotations

import json
from typing import Any

UNKNOWN_AGENT = "unknown_agent"
UNAVAILABLE = "unavailable"  # host stopping or instance draining: not processed, try another
BAD_REQUEST = "bad_request"
HANDLER_ERROR = "handler_error"
IN_PROGRESS = "in_progress"  # a request with this idempotency key is running: ask again later
OVERLOADED = "overloaded"
INTERNAL = "internal"  # the host itself failed on a message: counted, answered if it can be
RETRYABLE = frozenset({UNKNOWN_AGENT, UNAVAILABLE, OVERLOADED})


class RemoteError(Exception):
    """The agent answered with an error; `code` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode_request(agent: str, payload: Any, idempotency_key: str | None = None) -> list[bytes]:
    frames = [agent.encode(), json.dumps(payload, separators=(",", ":")).encode()]
    if idempotency_key is not None:
        frames.append(idempotency_key.encode())
    return frames


def ok(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}, separators=(",", ":")).encode()


def error(code: str, message: str) -> bytes:
    return json.dumps({"ok": False, "code": code, "error": message}).encode()


def decode_reply(frames: list[bytes]) -> Any:
    """The result of a reply, or RemoteError for an error reply or a malformed one."""
    try:
        reply = json.loads(frames[-1])
    except (IndexError, ValueError, RecursionError) as err:  # JSON nested past the stack
        raise RemoteError(BAD_REQUEST, f"malformed reply: {err}") from err
    if not isinstance(reply, dict) or "ok" not in reply:
        raise RemoteError(BAD_REQUEST, "malformed reply")
    if reply["ok"]:
        return reply.get("result")
    code, message = reply.get("code", HANDLER_ERROR), reply.get("error", "")
    # Only text is kept: str() of a deeply nested value could itself overflow the stack.
    raise RemoteError(code if isinstance(code, str) else HANDLER_ERROR,
                      message if isinstance(message, str) else "malformed error reply")
