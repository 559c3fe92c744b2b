"""Loopback ports and test credentials for the servers tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sdtune-test-key", "AWS_SECRET_ACCESS_KEY": "sdtune-test-secret"}
