"""`sdtune bench serve`: a bounded load test of `sdtune serve` on 127.0.0.1. N concurrent clients send a fixed
count of /v1/generate requests (each its own seed); the report gives throughput, p50/p95/p99 latency, the
server's batch-size histogram and counters (from /metrics, before and after), the 429s, and checks that every
accepted request got exactly one image, its own (the seed it asked for).

    sdtune bench serve runs/quickstart --clients 8 --requests 64 --steps 10 --max_batch 1,8   # starts each server
    sdtune bench serve --url http://127.0.0.1:8000 --clients 8 --requests 64                  # one running server
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "a photo of a large red circle on a blue background"


def scrape(url: str) -> dict[str, float]:
    """name{labels} -> value of every sample of the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def load(url: str, clients: int, requests: int, steps: int, prompt: str = PROMPT) -> dict[str, Any]:
    before = scrape(url)

    def one(seed: int) -> dict[str, Any]:
        started = time.perf_counter()
        answer = httpx.post(url + "/v1/generate", json={"prompt": prompt, "seed": seed, "steps": steps,
                                                        "format": "json"}, timeout=600)  # fmt: skip
        result = {"seed": seed, "status": answer.status_code, "seconds": time.perf_counter() - started}
        if answer.status_code == 200:
            body = answer.json()
            result |= {"images": len(body["images"]), "seeds": body["seeds"]}
        return result

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    after = scrape(url)
    accepted = [r for r in results if r["status"] == 200]
    latencies = np.array([r["seconds"] for r in accepted]) if accepted else np.zeros(1)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    buckets = {k.split("le=")[1].rstrip("}"): v for k, v in delta.items() if k.startswith("sdtune_batch_images_bucket")}
    return {
        "clients": clients, "requests": requests, "steps": steps, "seconds": round(wall, 2),
        "accepted": len(accepted), "rejected_429": sum(r["status"] == 429 for r in results),
        "other_status": sorted({r["status"] for r in results} - {200, 429}),
        "images_per_s": round(len(accepted) / wall, 3),
        "latency_s": {f"p{q}": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)},
        "one_image_each": all(r["images"] == 1 and r["seeds"] == [r["seed"]] for r in accepted),
        "batch_size_cumulative": buckets,
        "batches": delta.get("sdtune_batch_images_count{}", 0.0),
        "server_images": delta.get("sdtune_images_total{}", 0.0),
        "server_accepted": delta.get("sdtune_requests_total{endpoint=/v1/generate,status=200}", 0.0),
        "server_429": delta.get("sdtune_requests_total{endpoint=/v1/generate,status=429}", 0.0),
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_server(model: str, options: list[str], run: Any) -> dict[str, Any]:
    """Start `sdtune serve model` on a free loopback port, run(url), stop it with SIGTERM; its exit status joins
    the report (0: a graceful shutdown)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "sdtune", "serve", model, "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise ValueError(f"bench serve: `{' '.join(command)}` exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise ValueError("bench serve: the server did not answer /healthz in 300 s")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        report = run(url)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
    return report | {"server_exit": code}


def main(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sdtune bench serve", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("model", nargs="?", default=None, help="what to serve (as sdtune serve); or --url")
    p.add_argument("--url", default=None, help="a running server instead of starting one")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=64, help="requests in all (bounded)")
    p.add_argument("--steps", type=int, default=10, help="sampler steps per request")
    p.add_argument("--max_batch", default="1,8", help="server settings to compare (with a model): 1 = no batching")
    p.add_argument("--queue_size", type=int, default=32, help="the started servers' queue")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    o = p.parse_args(args)
    if (o.model is None) == (o.url is None):
        raise ValueError("bench serve: give a model to serve or --url of a running server, not both")
    if not 1 <= o.clients <= 256 or not 1 <= o.requests <= 100_000:
        raise ValueError("bench serve: --clients in 1..256 and --requests in 1..100000")
    rows = []
    if o.url:
        rows.append({"server": o.url} | load(o.url, o.clients, o.requests, o.steps))
    else:
        for batch in (int(b) for b in o.max_batch.split(",")):
            options = ["--max_batch", str(batch), "--queue_size", str(o.queue_size)]
            report = with_server(o.model, options, lambda url: load(url, o.clients, o.requests, o.steps))
            rows.append({"max_batch": batch} | report)
    for row in rows:
        print(f"bench serve: max_batch {row.get('max_batch', '?')}: {row['accepted']}/{row['requests']} accepted, "
              f"{row['rejected_429']} x 429, {row['images_per_s']} images/s, p50 {row['latency_s']['p50']} s, p95 "
              f"{row['latency_s']['p95']} s, p99 {row['latency_s']['p99']} s, {row['batches']:.0f} batches, one "
              f"image each: {row['one_image_each']}")  # fmt: skip
    if o.out:
        o.out.write_text(json.dumps(rows, indent=2) + "\n")
