"""The host's HTTP port: /health, /metrics and the agents' own pages; read-only, bounded."""

from __future__ import annotations

import json
import logging
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from agentlink.runtime.agent import WebReply

if TYPE_CHECKING:
    from agentlink.runtime.host.server import AgentHost

log = logging.getLogger("agentlink.runtime.host")
HTTP_TIMEOUT_S = 5.0  # a client that sends nothing for this long is dropped
MAX_HTTP_CONNECTIONS = 32
MAX_HTTP_PATH = 1024


class BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, up to MAX_HTTP_CONNECTIONS; more are closed at once."""

    daemon_threads = True
    # The listen backlog (5 by default): a burst of scrapes and polls beyond it waits a second
    # for the client's SYN to be sent again.
    request_queue_size = MAX_HTTP_CONNECTIONS

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)

    def server_bind(self) -> None:
        """Bind without HTTPServer's lookup of its own name (socket.getfqdn): where DNS is
        slow or gone, that waited out the resolver (10 s) before every host could start."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else would free the slot
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def http_handler(host: AgentHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_TIMEOUT_S  # read-only and bounded: GET/HEAD, slow clients dropped

        def _refuse(self) -> None:
            self._send(WebReply(405, "application/json", b'{"error": "read-only: GET, HEAD"}'),
                       allow="GET, HEAD")

        # Methods made up by the client stay 501 (not implemented), as HTTP says.
        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

        def do_GET(self) -> None:
            self._send(self._page())

        def do_HEAD(self) -> None:
            self._send(self._page(), with_body=False)

        def _page(self) -> WebReply:
            if len(self.path) > MAX_HTTP_PATH:
                return WebReply(414, "application/json", b'{"error": "path too long"}')
            if self.path == "/metrics":
                return WebReply(200, "text/plain; version=0.0.4", host.metrics.render())
            if self.path.rstrip("/") == "/health" or self.path.startswith("/health/"):
                body, status = self._health(self.path[len("/health/"):])
                return WebReply(status, "application/json", body)
            return self._agent_page()

        def _send(self, reply: WebReply, with_body: bool = True, allow: str = "") -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            if allow:
                self.send_header("Allow", allow)
            self.end_headers()
            if with_body:
                self.wfile.write(reply.body)

        def _agent_page(self) -> WebReply:
            for slot in host.slots.values():
                try:
                    reply = slot.agent.web(self.path)
                except Exception as err:  # an agent's page must never take the port down
                    log.exception("%s failed to answer GET %s", slot.spec.instance, self.path)
                    body = json.dumps({"error": f"{type(err).__name__}: {err}"}).encode()
                    return WebReply(500, "application/json", body)
                if reply is not None:
                    return reply
            return WebReply(404, "application/json", b'{"error": "not found"}')

        def _health(self, name: str) -> tuple[bytes, int]:
            report = host.health()
            if name:
                match = [v | {"instance": k} for k, v in report["agents"].items()
                         if name in (k, v["agent"])]
                if not match:
                    return b'{"error": "unknown agent"}', 404
                report = match[0]
            status = 200 if report["state"] in ("healthy", "degraded") else 503
            return json.dumps(report).encode(), status

        def log_message(self, format: str, *args: Any) -> None:
            return  # health polls are frequent; access logs would drown the real ones

    return Handler
