"""Run a command against a local S3 server (moto, the dev extra) on 127.0.0.1; `{endpoint}` in the command
is replaced by the server's URL. Used by `make bench-remote`; not part of the package.

    python scripts/local_s3.py python -m sdtune.bench_remote --endpoint_url {endpoint} --bucket b --create_bucket true
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from moto.server import ThreadedMotoServer


def main(command: list[str]) -> int:
    if not command:
        print("usage: python scripts/local_s3.py COMMAND... ({endpoint} is replaced by the server URL)")
        return 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", **os.environ}
    try:
        return subprocess.run([arg.replace("{endpoint}", endpoint) for arg in command], env=env).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
