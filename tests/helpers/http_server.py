"""A real HTTP server on 127.0.0.1 that serves a folder like OpenAI's blob storage, with faults.

Supports `Range: bytes=N-` (206, or 416 past the end). Faults are queued per path and each is used
by one request: "503" answers 503; "404" answers 404; "drop:N" announces the full length but sends
only N bytes and closes; "norange" ignores the Range header and sends the whole file with 200.
`throttle` (seconds per 64 KiB, for every request while set) slows bodies down, so that a test
can act in the middle of a download.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FaultyServer:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.faults: dict[str, list[str]] = {}
        self.throttle = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                queue = server.faults.get(self.path) or []
                fault = queue.pop(0) if queue else ""
                file = server.root / self.path.lstrip("/")
                if fault in ("503", "404") or not file.is_file() or ".." in self.path:
                    code = 503 if fault == "503" else 404
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = file.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng and fault != "norange":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if fault.startswith("drop:"):
                    body = body[:int(fault.split(":")[1])]
                try:
                    for i in range(0, len(body), 65536):
                        self.wfile.write(body[i:i + 65536])
                        if server.throttle:
                            time.sleep(server.throttle)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed mid-body

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def ranges_for(self, suffix: str) -> list[str | None]:
        """The Range headers of the requests whose path ends with `suffix`, in order."""
        return [rng for path, rng in self.requests if path.endswith(suffix)]

    def __enter__(self) -> "FaultyServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
