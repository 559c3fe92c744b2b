"""An HTTP proxy on 127.0.0.1 in front of the local S3 server that injects the faults R2 and S3 clients meet.

- `error_every`/`errors_first`: every k-th distinct request (method, path, query, Range) is answered
  500/503 for its first N attempts, then forwarded.
- `cut_first_get`: the first plain GET of each object gets its full Content-Length header but only half
  its body; `"drop"` then resets the connection, `"short"` closes it cleanly.
- `put_delay_s`: every PUT waits this long (to kill a process in the middle of an upload).
- `r2_mode`: any request carrying `x-amz-checksum-*` or `x-amz-trailer` headers is answered 501
  NotImplemented, as R2 did when botocore started sending them by default.

Every fault is counted in `counts`.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Faults:
    error_every: int = 0
    errors_first: int = 1
    cut_first_get: str | None = None  # "drop" or "short"
    cut_min_bytes: int = 2048
    r2_mode: bool = False
    put_delay_s: float = 0.0  # slows every PUT (uploads), so a test can kill a process mid-upload
    counts: Counter = field(default_factory=Counter)
    paths: list[str] = field(default_factory=list)  # "METHOD path" of every request
    authorizations: set[str] = field(default_factory=set)


def _error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {"Content-Type": "application/xml"}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        body = self._read_body()
        faults, counts = self.server.faults, self.server.faults.counts
        faults.paths.append(f"{self.command} {self.path}")
        faults.authorizations.add(self.headers.get("Authorization", ""))
        if faults.r2_mode and any(h.lower().startswith(("x-amz-checksum-", "x-amz-trailer")) for h in self.headers):
            counts["r2_rejected"] += 1
            self.close_connection = True
            self._reply(501, _error_xml("NotImplemented", "Header x-amz-checksum/x-amz-trailer not implemented"))
            return
        key = (self.command, self.path, self.headers.get("Range"))
        with self.server.lock:
            attempt = self.server.attempts[key]
            self.server.attempts[key] += 1
            if attempt == 0:
                self.server.distinct += 1
            index = self.server.distinct_index.setdefault(key, self.server.distinct)
        if faults.error_every and index % faults.error_every == 0 and attempt < faults.errors_first:
            status = 503 if attempt % 2 == 0 else 500
            counts[f"http_{status}"] += 1
            self._reply(status, _error_xml("SlowDown" if status == 503 else "InternalError", "injected"))
            return

        if self.command == "PUT" and faults.put_delay_s:
            time.sleep(faults.put_delay_s)
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        out_headers = {k: v for k, v in response.getheaders() if k.lower() not in _HOP | {"content-length"}}
        upstream.close()

        is_object_get = self.command == "GET" and "?" not in self.path and self.path.count("/") >= 2
        cut = faults.cut_first_get and is_object_get and not self.headers.get("Range") and attempt == 0
        if cut and response.status == 200 and len(data) >= faults.cut_min_bytes:
            counts[f"cut_{faults.cut_first_get}"] += 1
            self.send_response(200)
            for name, value in out_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if faults.cut_first_get == "drop":  # RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.send_response(response.status)
        for name, value in out_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", response.getheader("Content-Length") or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int, faults: Faults) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_port = upstream_port
        self.faults = faults
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()
        self.distinct = 0
        self.distinct_index: dict[tuple, int] = {}


class FaultProxy:
    def __init__(self, upstream_port: int, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.server = _ProxyServer(upstream_port, self.faults)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
