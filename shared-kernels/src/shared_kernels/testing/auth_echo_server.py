"""A loopback HTTP server that refuses every request with 401 and echoes its Authorization header back.

Hostile-but-realistic: some proxies and API gateways put the request's headers in their error body. A client
that copies the body into an exception, a log line or an output file leaks the API key; tests run a client
against this server and check that the key appears nowhere (`shared_kernels.redaction`). Stdlib only.

    with auth_echo_server() as base_url:   # "http://127.0.0.1:PORT/v1"
        ...  # point the client at base_url with OPENAI_API_KEY set; every POST/GET answers 401
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["auth_echo_server"]


class _EchoAuth(BaseHTTPRequestHandler):
    def _refuse(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        auth = self.headers.get("authorization", "")
        body = json.dumps(
            {
                "error": {
                    "message": f"invalid credentials; you sent Authorization: {auth}",
                    "type": "invalid_request_error",
                    "echo": auth,
                }
            }
        ).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("www-authenticate", auth or "Bearer")  # echoed in a header too
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET = _refuse  # noqa: N815 - http.server's method names

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@contextlib.contextmanager
def auth_echo_server() -> Iterator[str]:
    """Run the server on a free loopback port in a thread; yields its base URL (ending in `/v1`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoAuth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
