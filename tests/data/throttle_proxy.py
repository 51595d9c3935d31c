"""An HTTP proxy in front of the moto S3 server that throttles GETs as S3 does: 503 SlowDown.

A thread of the test process listening on 127.0.0.1 (a free port). Every request is forwarded
to the S3 endpoint as it came (same method, path, headers and body, so the client's signature
stays valid), except GETs while throttling is on: those are answered 503 with the XML error
body S3 sends ("SlowDown", "Please reduce your request rate."), which botocore and s3fs parse
as the real thing. Throttling is on for a number of seconds, a number of GETs, or until
turned off. Every request is logged (method, path, status), so a test can count what reached
the store below the reader's retry layer.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message><RequestId>%s</RequestId></Error>')
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class ThrottleProxy:
    """`with ThrottleProxy(target) as proxy:` point clients at `proxy.endpoint`; `proxy.throttle(...)`."""

    def __init__(self, target: str):
        self.target = urlsplit(target)
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self._lock = threading.Lock()
        self._until = 0.0  # throttle GETs until this time.monotonic() ...
        self._left = 0  # ... or for this many more GETs
        self._forever = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="throttle-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ThrottleProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def throttle(self, *, seconds: float = 0.0, requests: int = 0, forever: bool = False) -> None:
        """Answer 503 SlowDown to GETs for the next `seconds`, the next `requests` GETs, or `forever`
        (until `throttle()` is called again with nothing)."""
        with self._lock:
            self._until = time.monotonic() + seconds
            self._left = requests
            self._forever = forever

    def count(self, method: str = "GET", status: int | None = None, path_contains: str = "") -> int:
        """How many requests with this method (and status, and a path containing this) came in."""
        with self._lock:
            return sum(1 for m, p, s in self.log if m == method and (status is None or s == status)
                       and path_contains in p)

    def _throttled(self, method: str) -> bool:
        with self._lock:
            if method != "GET":
                return False
            if self._forever or time.monotonic() < self._until:
                return True
            if self._left > 0:
                self._left -= 1
                return True
            return False

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 does: every reply carries Content-Length

            def log_message(self, *args):  # quiet
                pass

            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._throttled(self.command):
                    proxy._record(self.command, self.path, 503)
                    error = SLOW_DOWN % uuid.uuid4().hex.encode()
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                    proxy._record(self.command, self.path, reply.status)
                    self.send_response(reply.status, reply.reason)
                    for key, value in reply.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    # HEAD: the object's length, no body
                    length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _serve

        return Handler
