"""`sdtune serve CHECKPOINT_OR_RUN [--host 127.0.0.1 --port 8000]`: the web app and the generation API on one model.

    sdtune serve runs/quickstart                       # the run's newest checkpoint, on http://127.0.0.1:8000
    SDTUNE_API_KEY=... sdtune serve s3://bucket/run --host 0.0.0.0 --max_steps 50

Off loopback the API key is required (from SDTUNE_API_KEY; never from a flag, never logged). SIGTERM (or Ctrl-C)
stops accepting connections, finishes the requests in flight and what is queued, and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from sdtune.serve.limits import Limits

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdtune serve", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("model", help="a run folder (its newest checkpoint), a checkpoint folder, s3:// or hf:// "
                   "checkpoints, or a base model (tiny-pretrained, a diffusers folder, a Hub id)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (off loopback: SDTUNE_API_KEY needed)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder whose runs the runs page shows")
    for item in fields(Limits):
        p.add_argument(f"--{item.name}", type=type(item.default), default=item.default, help=f"default {item.default}")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(args: list[str]) -> None:
    import uvicorn

    class _GracefulServer(uvicorn.Server):
        """SIGTERM/SIGINT ask the server to stop; once it has finished its requests the process exits 0 (uvicorn
        itself raises the signal again after its shutdown, so the exit status would say "killed")."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    from sdtune.serve.app import API_KEY_ENV, create_app
    from sdtune.serve.engine import Engine

    options = parser().parse_args(args)
    limits = Limits(**{item.name: getattr(options, item.name) for item in fields(Limits)})
    api_key = os.environ.get(API_KEY_ENV) or None
    if not is_loopback(options.host) and api_key is None:
        raise ValueError(f"serve --host {options.host}: off loopback, set {API_KEY_ENV} (clients send it as "
                         "'Authorization: Bearer KEY')")  # fmt: skip
    if api_key is not None and len(api_key) < 16:
        raise ValueError(f"{API_KEY_ENV}: use at least 16 characters")
    engine = Engine.load(options.model)
    app = create_app(engine, limits, api_key, options.runs)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=int(limits.timeout_s) + 5, access_log=False)  # fmt: skip
    server = _GracefulServer(config)
    log.info("serve: %s on %s:%d (API key %s)", engine.label, options.host, options.port,
             "required" if api_key else "off: loopback only")  # fmt: skip
    server.run()
