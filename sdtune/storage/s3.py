"""s3://bucket/key on AWS S3, Cloudflare R2 or any S3-compatible server, through boto3.

Settings that matter for R2 (all in `S3Settings`, defaults suit R2 and AWS alike):
- region `auto` unless AWS_REGION / AWS_DEFAULT_REGION say otherwise;
- request checksum calculation and response validation `when_required`: botocore >= 1.36 otherwise adds
  `x-amz-checksum-*` / `x-amz-trailer` headers to every upload, which R2 has answered with 501;
- `standard` retries with a bounded number of attempts (500/503/429 and throttling), connect/read timeouts;
- path-style addressing, which R2, MinIO and a loopback test server all accept.

The endpoint comes from `S3Settings.endpoint_url` (config key `s3.endpoint_url`), else boto3's own
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3. Credentials come only from boto3's lookup (environment variables,
~/.aws files); they never pass through sdtune's config.

Reads stream one GET per object through a read-ahead thread; a dropped connection or a body shorter than
its Content-Length re-opens the object at the byte where it stopped (Range + If-Match on the ETag, so a
replaced object is never stitched together), a bounded number of times in a row.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from sdtune.storage.settings import S3Settings

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def split_url(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: no bucket name (expected s3://bucket/prefix)")
    return bucket, key


def _transfer_config(s: S3Settings) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=s.multipart_threshold_mib * MiB,
        multipart_chunksize=s.multipart_chunk_mib * MiB,
        max_concurrency=s.max_concurrency,
    )


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _explain(err: Exception, url: str) -> Exception:
    """A clear error for the usual S3 mistakes, naming the URL and what to do."""
    if isinstance(err, NoCredentialsError):
        return PermissionError(
            f"{url}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment "
            "(for R2: an R2 API token's access key id and secret) and s3.endpoint_url or AWS_ENDPOINT_URL"
        )
    if isinstance(err, EndpointConnectionError):
        return ConnectionError(
            f"{url}: cannot reach the S3 endpoint ({err}); check s3.endpoint_url (or AWS_ENDPOINT_URL) and the network"
        )
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"{url}: no such object")
        if code == "NoSuchBucket":
            return FileNotFoundError(f"{url}: bucket does not exist (check the bucket name and s3.endpoint_url)")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return PermissionError(f"{url}: access denied ({code}); check the credentials' permissions and endpoint")
    return err


# Errors that `_explain` turns into a message naming the URL and what to do.
_USER_ERRORS = (ClientError, NoCredentialsError, EndpointConnectionError)
# Errors after which a read is re-opened at the byte where it stopped.
_TRANSIENT = (BotoCoreError, urllib3.exceptions.HTTPError, OSError)
_EOF = object()


class _ShortBody(OSError):
    pass


class S3Reader(io.RawIOBase):
    """A read-only stream of one object, fed by a read-ahead thread that re-opens on dropped connections.

    Opening returns at once: the GET runs in the thread, so opening the next shard early overlaps its
    request latency with reading the current one. Errors (a missing object, no credentials) are raised
    by the first read.
    """

    CHUNK = MiB

    def __init__(self, url: str, backend: S3Backend) -> None:
        super().__init__()
        self.url = url
        self._backend = backend
        self.bucket, self.key = split_url(url)
        self.reopens = 0
        self.size = -1
        self.etag = ""
        self._client = backend.client()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(2, backend.settings.read_ahead_mib * MiB // self.CHUNK))
        self._stop = threading.Event()
        self._buffer = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._start, name=f"s3-read {url}", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            first = self._client.get_object(Bucket=self.bucket, Key=self.key)
        except _USER_ERRORS as err:
            self._put(_explain(err, self.url))
            return
        except _TRANSIENT as err:  # already retried by botocore
            self._put(OSError(f"{self.url}: could not open: {err}"))
            return
        self.size, self.etag = first["ContentLength"], first["ETag"]
        self._pump(first)

    def _pump(self, response: dict | None) -> None:
        position, failures = 0, 0
        while position < self.size and not self._stop.is_set():
            try:
                if response is None:
                    response = self._client.get_object(
                        Bucket=self.bucket, Key=self.key, Range=f"bytes={position}-", IfMatch=self.etag
                    )
                body = response["Body"]
                try:
                    while position < self.size:
                        chunk = body.read(min(self.CHUNK, self.size - position))
                        if not chunk:
                            raise _ShortBody(f"connection ended at byte {position} of {self.size}")
                        position += len(chunk)
                        failures = 0
                        if not self._put(chunk):
                            return
                finally:
                    body.close()
            except (ClientError, *_TRANSIENT) as err:
                if isinstance(err, ClientError) and _status(err) < 500:
                    # Changed (412), deleted (404) or forbidden: re-opening will not help.
                    self._put(OSError(f"{self.url}: re-open at byte {position} failed: {_explain(err, self.url)}"))
                    return
                failures += 1
                if failures > self._backend.settings.reopen_attempts:
                    self._put(OSError(f"{self.url}: read failed {failures} times in a row at byte {position}: {err}"))
                    return
                self.reopens += 1
                self._backend.stats["reopens"] += 1
                log.debug("%s: re-opening at byte %d after %s", self.url, position, err)
                time.sleep(min(0.05 * 2**failures, 2.0))
                response = None
        self._put(_EOF)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buffer:
            if self._eof:
                return 0
            item = self._queue.get()
            if item is _EOF:
                self._eof = True
                return 0
            if isinstance(item, BaseException):
                raise item
            self._buffer = memoryview(item)
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


class S3Backend:
    """s3:// for one set of `S3Settings`: boto3 clients per process (thread-safe, not fork-safe) and counters.

    `stats` counts, in this process, botocore retries (`retries`) and mid-body re-opens (`reopens`).
    Pickles as its settings: a spawned DataLoader worker builds its own clients.
    """

    def __init__(self, settings: S3Settings | None = None) -> None:
        self.settings = settings or S3Settings()
        self.stats: Counter[str] = Counter()
        self._clients: dict[int, Any] = {}
        self._lock = threading.Lock()
        # One boto3 session for the process tree: forked DataLoader workers inherit its loaded service
        # models, which makes their (per-process) clients ~4x cheaper to create.
        self._session: boto3.session.Session | None = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    def _count_retries(self, parsed: dict | None = None, **_: Any) -> None:
        attempts = (parsed or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0)
        if attempts:
            self.stats["retries"] += attempts

    def client(self) -> Any:
        """The boto3 S3 client of this process (credentials are looked up when it is first built)."""
        with self._lock:
            pid = os.getpid()
            if pid not in self._clients:
                s = self.settings
                region = s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "auto"
                config = Config(
                    region_name=region,
                    signature_version="s3v4",
                    retries={"mode": "standard", "max_attempts": s.max_attempts},
                    connect_timeout=s.connect_timeout_s,
                    read_timeout=s.read_timeout_s,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    s3={"addressing_style": "path"},
                    max_pool_connections=max(10, 2 * s.max_concurrency),
                )
                if self._session is None:
                    self._session = boto3.session.Session()
                c = self._session.client("s3", endpoint_url=s.endpoint_url or None, config=config)
                c.meta.events.register("after-call.s3", self._count_retries)
                self._clients[pid] = c
            return self._clients[pid]

    def open_read(self, url: str) -> BinaryIO:
        return io.BufferedReader(S3Reader(url, self), buffer_size=S3Reader.CHUNK)

    def _objects(self, url: str, delimiter: str | None) -> list[dict]:
        bucket, key = split_url(url)
        pattern = key if any(ch in key for ch in "*?[") else None
        prefix = key.split("*")[0].split("?")[0].split("[")[0] if pattern else (key.rstrip("/") + "/" if key else "")
        kwargs = {"Bucket": bucket, "Prefix": prefix} | ({"Delimiter": delimiter} if delimiter and not pattern else {})
        objects: list[dict] = []
        try:
            for page in self.client().get_paginator("list_objects_v2").paginate(**kwargs):
                objects.extend(page.get("Contents", []))
        except _USER_ERRORS as err:
            raise _explain(err, url) from err
        if pattern:
            objects = [o for o in objects if fnmatch.fnmatchcase(o["Key"], pattern)]
        return objects

    def list(self, url: str, suffix: str) -> list[str]:
        bucket, _ = split_url(url)
        return sorted(f"s3://{bucket}/{o['Key']}" for o in self._objects(url, "/") if o["Key"].endswith(suffix))

    def walk(self, url: str) -> dict[str, int]:
        _, key = split_url(url)
        prefix = key.rstrip("/") + "/" if key else ""
        return {o["Key"][len(prefix) :]: o["Size"] for o in self._objects(url, None)}

    def head(self, url: str) -> dict[str, Any] | None:
        """Size, ETag and user metadata of an object, or None if there is none."""
        bucket, key = split_url(url)
        try:
            meta = self.client().head_object(Bucket=bucket, Key=key)
        except _USER_ERRORS as err:
            if isinstance(err, ClientError) and _status(err) == 404:
                return None
            raise _explain(err, url) from err
        return {"bytes": meta["ContentLength"], "etag": meta["ETag"], "metadata": meta.get("Metadata", {})}

    def fingerprint(self, url: str) -> str:
        head = self.head(url)
        if head is None:
            raise FileNotFoundError(f"{url}: no such object")
        return f"{head['bytes']}:{head['etag']}"

    def exists(self, url: str) -> bool:
        bucket, key = split_url(url)
        if key and not key.endswith("/") and self.head(url) is not None:
            return True
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            page = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except _USER_ERRORS as err:
            raise _explain(err, url) from err
        return bool(page.get("KeyCount"))

    def upload(self, local: Path, url: str, metadata: dict[str, str] | None = None) -> None:
        bucket, key = split_url(url)
        extra = {"Metadata": metadata} if metadata else None
        try:
            self.client().upload_file(str(local), bucket, key, ExtraArgs=extra, Config=_transfer_config(self.settings))
        except _USER_ERRORS as err:
            raise _explain(err, url) from err

    def download(self, url: str, local: Path) -> None:
        bucket, key = split_url(url)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        try:
            self.client().download_file(bucket, key, str(tmp), Config=_transfer_config(self.settings))
        except _USER_ERRORS as err:
            raise _explain(err, url) from err
        os.replace(tmp, local)

    def delete(self, urls: list[str]) -> None:
        # One DeleteObject per key, in parallel. Batch DeleteObjects always carries a checksum header
        # (botocore marks it required), which R2 and other S3-compatible servers have refused.
        def delete_one(url: str) -> None:
            bucket, key = split_url(url)
            try:
                self.client().delete_object(Bucket=bucket, Key=key)
            except ClientError as err:
                raise _explain(err, url) from err

        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            list(pool.map(delete_one, urls))

    def abort_multipart_uploads(self, url: str) -> int:
        """Abort unfinished multipart uploads under a prefix (left by a killed process); returns how many."""
        bucket, key = split_url(url)
        aborted = 0
        for page in self.client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key):
            for upload in page.get("Uploads", []):
                self.client().abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted
