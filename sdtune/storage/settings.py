"""Settings of the storage backends: plain dataclasses, importable without their client libraries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for s3:// URLs (no credentials here: boto3 reads them from the environment).

    Args:
        endpoint_url: e.g. `https://<account_id>.r2.cloudflarestorage.com` (default: AWS_ENDPOINT_URL or AWS).
        region: Signing region (default: AWS_REGION / AWS_DEFAULT_REGION, else `auto`, which R2 expects).
        max_attempts: Attempts per request, first included (botocore `standard` retry mode).
        connect_timeout_s: Seconds to wait for a connection.
        read_timeout_s: Seconds to wait for data on an open connection.
        reopen_attempts: Re-opens in a row of an object whose body stopped early, before giving up.
        read_ahead_mib: Bytes buffered ahead of the reader per open object.
        multipart_threshold_mib: Uploads at least this large go as multipart uploads.
        multipart_chunk_mib: Part size of multipart uploads.
        max_concurrency: Parallel connections per upload or download.
    """

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 6
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    reopen_attempts: int = 5
    read_ahead_mib: int = 16
    multipart_threshold_mib: int = 64
    multipart_chunk_mib: int = 16
    max_concurrency: int = 8
