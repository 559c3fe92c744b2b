"""The one logging setup of every sdtune command (imports only the standard library)."""

from __future__ import annotations

import logging

_NOISY = ("httpx", "httpx2", "botocore", "boto3", "s3transfer", "urllib3", "filelock")


def setup_logging(level: int = logging.INFO) -> None:
    """INFO to stderr with time, level and logger name; third-party HTTP clients at WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
