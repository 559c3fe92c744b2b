"""The FastAPI app: `POST /v1/generate`, `POST /v1/denoise` (the hybrid split), `GET /healthz`, `GET /metrics`, and
the pages (sdtune.serve.pages). Safety by default: an API key (SDTUNE_API_KEY, constant-time compare) when one is
set, which `sdtune serve` requires off loopback; bodies above the limit get 413, fields out of range 422 naming
the field, a full queue or a key over its rate 429 with Retry-After. Requests name no file, path or model."""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from sdtune.models.sampling import encode_image
from sdtune.serve.engine import Engine, Job
from sdtune.serve.limits import Limits
from sdtune.serve.metrics import ServeMetrics
from sdtune.serve.queue import BatchQueue, Closing, QueueFull

log = logging.getLogger(__name__)
API_KEY_ENV = "SDTUNE_API_KEY"


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=1000)
    negative_prompt: str = Field(default="", max_length=1000)
    seed: int = Field(default=0, ge=0, lt=2**31)
    steps: int = Field(default=25, ge=1)
    guidance: float = Field(default=4.0, ge=1.0, le=30.0)
    size: int | None = Field(default=None, ge=8)
    num_images: int = Field(default=1, ge=1)
    format: Literal["png", "json"] = "png"


class InterpolateRequest(BaseModel):
    """Two prompts; `frames` images along the way between their embeddings, all from the same seed's noise."""

    model_config = ConfigDict(extra="forbid")
    prompt_a: str = Field(min_length=1, max_length=1000)
    prompt_b: str = Field(min_length=1, max_length=1000)
    frames: int = Field(default=5, ge=2)
    seed: int = Field(default=0, ge=0, lt=2**31)
    steps: int = Field(default=25, ge=1)
    guidance: float = Field(default=4.0, ge=1.0, le=30.0)
    size: int | None = Field(default=None, ge=8)


class DenoiseRequest(BaseModel):
    """Prompt embeddings from the client's own text encoder: base64 of little-endian float32, (tokens, dim) each."""

    model_config = ConfigDict(extra="forbid")
    prompt_embeds: str = Field(min_length=1)
    negative_prompt_embeds: str = Field(min_length=1)
    seed: int = Field(default=0, ge=0, lt=2**31)
    steps: int = Field(default=25, ge=1)
    guidance: float = Field(default=4.0, ge=1.0, le=30.0)
    size: int | None = Field(default=None, ge=8)


def field_error(field: str, message: str) -> JSONResponse:
    """422 in FastAPI's own shape, naming the field."""
    detail = [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    return JSONResponse({"detail": detail}, status_code=422)


class RateLimiter:
    """At most `per_minute` requests per identity in any 60 s window."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.seen: dict[str, deque[float]] = defaultdict(deque)

    def retry_after(self, identity: str) -> int | None:
        now = time.monotonic()
        times = self.seen[identity]
        while times and now - times[0] >= 60:
            times.popleft()
        if len(times) >= self.per_minute:
            return max(1, int(60 - (now - times[0])) + 1)
        times.append(now)
        return None


def create_app(engine: Engine, limits: Limits, api_key: str | None, runs: Path | None = None) -> FastAPI:
    metrics = ServeMetrics()
    state: dict[str, Any] = {}
    rate = RateLimiter(limits.rate_per_minute)

    def run_batch(job: Job, items: list[Any]) -> list[Any]:
        if job.kind in ("latents", "embeds"):
            embeds = torch.stack([i[0] for i in items])
            negatives = torch.stack([i[1] for i in items])
            seeds = [i[2] for i in items]
            if job.kind == "latents":
                return list(engine.denoise(job, embeds, negatives, seeds))
            return [encode_image(image) for image in engine.images_from_embeds(job, embeds, negatives, seeds)]
        images = engine.images(job, [i[0] for i in items], [i[1] for i in items], [i[2] for i in items])
        return [encode_image(image) for image in images]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["queue"] = BatchQueue(run_batch, limits, metrics.batch)
        state["queue"].start()
        log.info("serve: %s ready (%d px native)", engine.label, engine.native_size)
        yield
        log.info("serve: shutting down; finishing %d queued requests", len(state["queue"]))
        await state["queue"].close()

    app = FastAPI(title="sdtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        endpoint = request.url.path if request.url.path.startswith("/v1/") else "other"
        started = time.perf_counter()
        response = await _guarded(request, call_next)
        if endpoint != "other":
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def _guarded(request: Request, call_next: Any) -> Response:
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse({"detail": "send a Content-Length"}, status_code=411)
            if int(length) > limits.max_body_bytes:
                return JSONResponse({"detail": f"body over {limits.max_body_bytes} bytes"}, status_code=413)
        if request.url.path.startswith("/v1/"):
            identity = request.client.host if request.client else "unknown"
            if api_key is not None:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    return JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer KEY)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                identity = "key"  # one key: one budget (several keys would each get their own)
            wait = rate.retry_after(identity)
            if wait is not None:
                return JSONResponse({"detail": "rate limit"}, status_code=429, headers={"Retry-After": str(wait)})
        return await call_next(request)

    def check_job(steps: int, size: int | None, guidance: float, kind: str) -> Job | JSONResponse:
        if steps > limits.max_steps:
            return field_error("steps", f"at most {limits.max_steps}")
        size = size or engine.native_size
        if size > limits.max_size or size % 8:
            return field_error("size", f"a multiple of 8, at most {limits.max_size}")
        return Job(size, steps, guidance, kind)

    async def queued(job: Job, items: list[Any]) -> list[Any] | JSONResponse:
        queue: BatchQueue = state["queue"]
        try:
            future = queue.submit(job, items)
        except QueueFull:
            return JSONResponse({"detail": "queue full"}, status_code=429,
                                headers={"Retry-After": str(queue.retry_after())})  # fmt: skip
        except Closing:
            return JSONResponse({"detail": "shutting down"}, status_code=503, headers={"Retry-After": "5"})
        finally:
            metrics.queue_length.set(len(queue))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=limits.timeout_s)
        except TimeoutError:
            future.cancel()  # dropped before it runs, if it has not started
            return JSONResponse({"detail": f"not done in {limits.timeout_s} s"}, status_code=504)

    @app.post("/v1/generate", response_model=None)
    async def generate(body: GenerateRequest) -> Response:
        if body.num_images > limits.max_images:
            return field_error("num_images", f"at most {limits.max_images}")
        if body.format == "png" and body.num_images > 1:
            return field_error("format", "png returns one image; use json for num_images > 1")
        job = check_job(body.steps, body.size, body.guidance, "images")
        if isinstance(job, JSONResponse):
            return job
        seeds = [body.seed + i for i in range(body.num_images)]
        result = await queued(job, [(body.prompt, body.negative_prompt, s) for s in seeds])
        if isinstance(result, JSONResponse):
            return result
        headers = {"X-Seeds": ",".join(map(str, seeds))}
        if body.format == "png":
            return Response(result[0], media_type="image/png", headers=headers)
        images = [base64.b64encode(png).decode() for png in result]
        return JSONResponse({"images": images, "seeds": seeds, "model": engine.label}, headers=headers)

    @app.post("/v1/interpolate", response_model=None)
    async def interpolate(body: InterpolateRequest) -> Response:
        if body.frames > max(limits.max_images, 2) * 2:
            return field_error("frames", f"at most {max(limits.max_images, 2) * 2}")
        job = check_job(body.steps, body.size, body.guidance, "embeds")
        if isinstance(job, JSONResponse):
            return job
        embeds, empty = await asyncio.get_running_loop().run_in_executor(
            None, engine.interpolated_embeds, body.prompt_a, body.prompt_b, body.frames
        )
        result = await queued(job, [(e, empty, body.seed) for e in embeds])
        if isinstance(result, JSONResponse):
            return result
        images = [base64.b64encode(png).decode() for png in result]
        alphas = [round(i / (body.frames - 1), 4) for i in range(body.frames)]
        return JSONResponse({"images": images, "alphas": alphas, "seed": body.seed, "model": engine.label})

    @app.post("/v1/denoise", response_model=None)
    async def denoise(body: DenoiseRequest) -> Response:
        job = check_job(body.steps, body.size, body.guidance, "latents")
        if isinstance(job, JSONResponse):
            return job
        expected = (engine.parts.tokenizer.model_max_length, int(engine.parts.text_encoder.config.hidden_size))
        tensors = []
        for field in ("prompt_embeds", "negative_prompt_embeds"):
            try:
                raw = np.frombuffer(base64.b64decode(getattr(body, field), validate=True), dtype="<f4")
            except ValueError:
                return field_error(field, "not base64")
            if raw.size != expected[0] * expected[1] or not np.isfinite(raw).all():
                return field_error(field, f"need {expected[0]} x {expected[1]} finite float32 values")
            tensors.append(torch.from_numpy(raw.copy()).view(*expected))
        result = await queued(job, [(tensors[0], tensors[1], body.seed)])
        if isinstance(result, JSONResponse):
            return result
        latents = result[0].numpy().astype("<f4")
        scaling = float(engine.parts.vae.config.scaling_factor)
        encoded = base64.b64encode(latents.tobytes()).decode()
        return JSONResponse({"latents": encoded, "shape": list(latents.shape), "scaling_factor": scaling,
                             "seed": body.seed})  # fmt: skip

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        queue: BatchQueue | None = state.get("queue")
        return {"status": "closing" if queue is None or queue.closing else "ok", "model": engine.label,
                "queue": len(queue) if queue else 0, "native_size": engine.native_size}  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_length.set(len(state["queue"]))
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    from sdtune.serve.pages import add_pages

    add_pages(app, engine, runs, api_key is not None)
    return app
