"""Read WebDataset tar shards as a stream of raw samples, without decoding anything.

A sample is the group of consecutive members sharing a key (`<key>.<ext>`, as webdataset defines it).
Only members with an expected extension are read; everything else (notably `.pyd`, `.pth`, `.pickle`)
is skipped unread, so nothing in a shard can run code. A shard cut short ends early and is counted.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

RawSample = dict[str, bytes | str]  # {"__key__": str, "__shard__": str, "<ext>": bytes, ...}

# Members larger than this are not read into memory (a 512px JPEG is ~50-200 KB).
MAX_MEMBER_BYTES = 64 << 20


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.jpg` -> (`dir/abc`, `jpg`); the extension is everything after the basename's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def iter_tar_samples(
    stream: BinaryIO, shard: str, wanted: frozenset[str], errors: dict[str, int]
) -> Iterator[RawSample]:
    """Yield raw samples of one tar stream; `errors` counts `truncated_shard` and `oversized_member`."""
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                if ext not in wanted:
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    errors["oversized_member"] = errors.get("oversized_member", 0) + 1
                    continue
                member_file = tar.extractfile(member)
                assert member_file is not None
                current[ext] = member_file.read()
    except (tarfile.ReadError, EOFError, OSError):
        # A shard cut short (interrupted upload, full disk): keep what was read completely.
        errors["truncated_shard"] = errors.get("truncated_shard", 0) + 1
        current = None  # the last sample may be missing members
    if current is not None:
        yield current
