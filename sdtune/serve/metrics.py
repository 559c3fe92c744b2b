"""The server's Prometheus metrics, in a registry of its own (`GET /metrics`). No label carries a key, a prompt
or a path: only endpoint names and status codes."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdtune_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram("sdtune_request_seconds", "Request latency (queueing included)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_length = Gauge("sdtune_queue_length", "Requests waiting for the model worker", registry=r)
        self.batch_size = Histogram("sdtune_batch_images", "Images per batch the worker ran",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)  # fmt: skip
        self.images = Counter("sdtune_images", "Images (or latents) rendered", registry=r)
        self.images_per_s = Gauge("sdtune_images_per_second", "Throughput of the last batch", registry=r)
        self.gpu_memory = Gauge("sdtune_gpu_memory_bytes", "CUDA memory allocated (0 without a GPU)", registry=r)

    def batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.images.inc(images)
        self.images_per_s.set(images / max(seconds, 1e-9))
        if torch.cuda.is_available():
            self.gpu_memory.set(torch.cuda.memory_allocated())

    def text(self) -> bytes:
        return generate_latest(self.registry)
