"""What one server accepts: request sizes, the queue, timeouts and the per-key rate (`sdtune serve --help`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_steps: int = 50  # sampler steps per request
    max_size: int = 512  # image side in pixels
    max_images: int = 4  # images per request
    max_batch: int = 8  # images the worker runs together (batching compatible requests); 1: no batching
    queue_size: int = 32  # requests waiting; a full queue answers 429 with Retry-After
    timeout_s: float = 120.0  # per request, queueing included: 504 after it
    max_body_bytes: int = 1 << 20  # 413 above it (a /v1/denoise body holds two 77 x 768 float32 embeddings)
    rate_per_minute: int = 600  # requests per API key (or per client address without keys); 429 above it
    batch_wait_s: float = 0.01  # how long the worker waits for compatible requests to join a batch

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_size", "max_images", "max_batch", "queue_size", "max_body_bytes",
                     "rate_per_minute"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"serve --{name}: must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.batch_wait_s < 0:
            raise ValueError("serve --timeout_s must be > 0 and --batch_wait_s >= 0")
