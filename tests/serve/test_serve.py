"""`sdtune serve` on a quickstart run's checkpoint, over real HTTP (uvicorn on 127.0.0.1): the same bytes as the
sample grids' pipeline for a seed, the hybrid split, the error codes, the queue, /metrics, the pages in headless
Chromium, and a graceful SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdtune.eval.render import unet_of
from sdtune.eval.targets import resolve_targets
from sdtune.models.components import load_components
from sdtune.models.sampling import encode_image, generate
from sdtune.storage import Storage
from tests.helpers.browser import find_chromium, inspect_page, type_and_click
from tests.helpers.ports import free_port
from tests.helpers.runs import QUICKSTART, REPO, run_train, train_env

pytestmark = pytest.mark.slow
PROMPT = "a photo of a large pink circle on a blue background"
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, pink_shards: Path) -> Path:
    """The quickstart config, 2 epochs, without the checker callback: a run folder with checkpoints, grids, steps."""
    root = tmp_path_factory.mktemp("serve_runs")
    config = yaml.safe_load(QUICKSTART.read_text())
    run = root / "quickstart"
    config["trainer"].update(default_root_dir=str(run), max_epochs=2, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if "CheckerScore" not in c["class_path"]]
    config["data"]["init_args"]["shards"] = str(pink_shards)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_train(path)
    return run


class Server:
    def __init__(self, model: Path, *options: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "sdtune", "serve", str(model), "--port", str(self.port), "--runs",
                   str(model.parent), *options]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=REPO, env=train_env(env), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.process.stdout.read() if self.process.stdout else ""
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)

    def post(self, path: str, body: dict, key: str | None = None, timeout: float = 120) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def server(quickstart_run: Path) -> Iterator[Server]:
    started = Server(quickstart_run, "--max_steps", "30", "--queue_size", "3", "--max_batch", "4")
    yield started
    assert started.stop() == 0


def test_a_seed_gives_the_sample_grid_pipelines_bytes_and_the_hybrid_client_the_same_image(
    server: Server, quickstart_run: Path, tmp_path: Path
) -> None:
    answer = server.post("/v1/generate", {"prompt": PROMPT, "seed": 3, "steps": 12, "guidance": 4.0})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
    target = resolve_targets([str(quickstart_run)], quickstart_run / "dl", Storage())[-1]
    parts = load_components(target.base_model)
    parts.unet = unet_of(target, parts)
    expected = generate(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(parts.noise_scheduler.config),
                        [PROMPT], [3], 12, 4.0, 64)  # fmt: skip
    assert answer.content == encode_image(expected[0]), "the grids' pipeline, same seed: same PNG bytes"
    several = server.post("/v1/generate", {"prompt": PROMPT, "seed": 3, "steps": 12, "num_images": 2, "format": "json"})
    images = several.json()["images"]
    assert several.json()["seeds"] == [3, 4] and base64.b64decode(images[0]) == answer.content

    # The hybrid split: the prompt is encoded here, the server only denoises, the latents are decoded here.
    out = tmp_path / "hybrid.png"
    client = subprocess.run([sys.executable, "-m", "sdtune", "client", "--url", server.url, "--prompt", PROMPT,
                             "--seed", "3", "--steps", "12", "--out", str(out)], cwd=REPO, env=train_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert client.returncode == 0, client.stderr[-3000:]
    local = np.asarray(Image.open(out), dtype=np.float32) / 255
    served = np.asarray(Image.open(io.BytesIO(answer.content)), dtype=np.float32) / 255
    assert np.abs(local - served).max() <= 1 / 255, "hybrid image = server image, within 8-bit rounding"

    # The same client on the ONNX export (onnxruntime, no torch in the client's two halves).
    exported = subprocess.run([sys.executable, "-m", "sdtune", "export", "onnx", "--out", str(tmp_path / "onnx")],
                              cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    import onnxruntime

    sessions = {name: onnxruntime.InferenceSession(str(tmp_path / "onnx" / f"{name}.onnx")) for name in
                ("text_encoder", "vae_decoder")}  # fmt: skip
    ids = parts.tokenizer([PROMPT, "", "a handwritten digit 7"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text = parts.text_encoder(ids)[0].numpy()
        pixels = parts.vae.decode(latents / parts.vae.config.scaling_factor).sample.numpy()
    assert np.abs(sessions["text_encoder"].run(None, {"input_ids": ids.numpy()})[0] - text).max() < 1e-4
    assert np.abs(sessions["vae_decoder"].run(None, {"latents": latents.numpy()})[0] - pixels).max() < 1e-4
    client = subprocess.run([sys.executable, "-m", "sdtune", "client", "--url", server.url, "--prompt", PROMPT,
                             "--seed", "3", "--steps", "12", "--onnx", str(tmp_path / "onnx"), "--out",
                             str(tmp_path / "onnx.png")], cwd=REPO, env=train_env(), capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert client.returncode == 0, client.stderr[-3000:]
    via_onnx = np.asarray(Image.open(tmp_path / "onnx.png"), dtype=np.float32) / 255
    assert np.abs(via_onnx - served).max() <= 2 / 255, "ONNX client image = server image, within 2 levels of 255"


def test_interpolation_frames_run_from_prompt_a_to_prompt_b(server: Server) -> None:
    other = "a photo of a large yellow square on a green background"
    body = {"prompt_a": PROMPT, "prompt_b": other, "frames": 3, "seed": 5, "steps": 8}
    frames = server.post("/v1/interpolate", body).json()
    assert frames["alphas"] == [0.0, 0.5, 1.0] and len(frames["images"]) == 3

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255

    ends = [server.post("/v1/generate", {"prompt": p, "seed": 5, "steps": 8}).content for p in (PROMPT, other)]
    first, middle, last = (pixels(base64.b64decode(b)) for b in frames["images"])
    assert np.abs(first - pixels(ends[0])).max() <= 2 / 255 and np.abs(last - pixels(ends[1])).max() <= 2 / 255
    assert np.abs(middle - first).mean() > 0.01 and np.abs(middle - last).mean() > 0.01, "the middle is neither end"


def test_metrics_parse_and_count_the_requests(server: Server) -> None:
    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sdtune_requests_total":
                    found[(sample.labels["endpoint"], sample.labels["status"])] = sample.value
        return found

    before = counts()
    for _ in range(3):
        assert server.post("/v1/generate", {"prompt": PROMPT, "steps": 2}).status_code == 200
    assert server.post("/v1/generate", {"prompt": PROMPT, "steps": 99}).status_code == 422
    after = counts()
    assert after[("/v1/generate", "200")] - before.get(("/v1/generate", "200"), 0) == 3
    assert after[("/v1/generate", "422")] - before.get(("/v1/generate", "422"), 0) == 1
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert "sdtune_batch_images_bucket" in text and "sdtune_queue_length" in text and PROMPT not in text


BAD = [
    ("steps above the limit", {"prompt": PROMPT, "steps": 31}, 422, "steps"),
    ("size not a multiple of 8", {"prompt": PROMPT, "size": 60}, 422, "size"),
    ("size above the limit", {"prompt": PROMPT, "size": 4096}, 422, "size"),
    ("missing prompt", {"steps": 2}, 422, "prompt"),
    ("unknown field (a path)", {"prompt": PROMPT, "model": "/etc/passwd"}, 422, "model"),
    ("negative seed", {"prompt": PROMPT, "seed": -1}, 422, "seed"),
    ("too many images", {"prompt": PROMPT, "num_images": 9, "format": "json"}, 422, "num_images"),
    ("oversized body", {"prompt": "x" * (2 << 20)}, 413, None),
]


@pytest.mark.parametrize(("case", "body", "status", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_naming_the_field(
    server: Server, case: str, body: dict, status: int, field: str | None
) -> None:
    answer = server.post("/v1/generate", body)
    assert answer.status_code == status, (case, answer.text)
    if field is not None:
        assert any(field in detail["loc"] for detail in answer.json()["detail"]), answer.json()


def test_a_full_queue_answers_429_with_retry_after_and_loses_nothing(server: Server) -> None:
    def one(seed: int) -> httpx.Response:
        size = 64 if seed % 2 else 56  # two kinds of job: they batch apart
        return server.post("/v1/generate", {"prompt": PROMPT, "seed": seed, "steps": 25, "size": size})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 3, codes
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
    assert all(a.content.startswith(b"\x89PNG") for a in answers if a.status_code == 200)


def test_the_prompt_page_and_the_runs_page_in_chromium(server: Server, quickstart_run: Path, tmp_path: Path) -> None:
    runs = httpx.get(server.url + "/runs", timeout=10).text
    assert "/runs/quickstart" in runs
    page = httpx.get(server.url + "/runs/quickstart", timeout=10).text
    assert page.count("<h2>samples at epoch=") == 2 and "loss.png" in page
    assert httpx.get(server.url + "/runs/quickstart/file/..%2f..%2fconfig.yaml", timeout=10).status_code == 404
    if find_chromium() is None:
        pytest.skip("chromium not installed (make test installs Debian's chromium)")
    seen = inspect_page(server.url + "/runs/quickstart", tmp_path / "runs.png")
    assert len(seen["images"]) == 3 and all(i["complete"] and i["width"] > 100 for i in seen["images"]), seen
    done = type_and_click(server.url + "/interpolate", "b", "a photo of a large pink square on a black background",
                          "go", "document.querySelectorAll('#strip img').length == 5", tmp_path / "interpolate.png",
                          width=390)  # fmt: skip
    assert all(i["complete"] and i["width"] == 64 for i in done["images"]) and len(done["images"]) == 6, done
    for width in (390, 1200):  # a phone, a desktop
        done = type_and_click(server.url + "/", "prompt", "a photo of a large pink square on a black background",
                              "go", "document.querySelectorAll('#images img').length == 4",
                              tmp_path / f"prompt_{width}.png", width=width)  # fmt: skip
        assert all(i["complete"] and i["width"] == 64 for i in done["images"]), done
        assert "pink square" in done["images"][0]["alt"] and done["scrollWidth"] <= width, done
        assert all(u.startswith(server.url) or u.startswith("data:") for u in done["requested"]), done["requested"]


def test_keys_off_loopback_and_a_graceful_sigterm(quickstart_run: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "sdtune", "serve", str(quickstart_run), "--host", "0.0.0.0"],
                             cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "set SDTUNE_API_KEY" in refused.stderr and "Traceback" not in refused.stderr
    keyed = Server(quickstart_run, "--max_batch", "1", env={"SDTUNE_API_KEY": KEY})
    try:
        assert keyed.post("/v1/generate", {"prompt": PROMPT, "steps": 2}).status_code == 401
        assert keyed.post("/v1/generate", {"prompt": PROMPT, "steps": 2}, key=KEY + "x").status_code == 401
        assert keyed.post("/v1/generate", {"prompt": PROMPT, "steps": 2}, key=KEY).status_code == 200
        assert KEY not in httpx.get(keyed.url + "/metrics", timeout=10).text

        # SIGTERM while 4 requests are in flight: they finish, a new one is refused, the server exits 0.
        with ThreadPoolExecutor(4) as pool:
            flying = [pool.submit(keyed.post, "/v1/generate", {"prompt": PROMPT, "seed": s, "steps": 25}, KEY)
                      for s in range(4)]  # fmt: skip
            time.sleep(1.0)
            keyed.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):
                httpx.post(keyed.url + "/v1/generate", json={"prompt": PROMPT}, timeout=5,
                           headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
            assert [f.result().status_code for f in flying] == [200] * 4
        assert keyed.process.wait(timeout=120) == 0
        log = keyed.process.stdout.read() if keyed.process.stdout else ""
        assert KEY not in log
    finally:
        if keyed.process.poll() is None:
            os.kill(keyed.process.pid, signal.SIGKILL)


def test_limits_refuse_bad_options_and_a_client_over_its_rate_gets_429() -> None:
    from sdtune.serve.limits import Limits

    with pytest.raises(ValueError, match="--max_batch"):
        Limits(max_batch=0)
    limited = Server(Path("tiny-pretrained"), "--rate_per_minute", "2")  # a base model: no run needed
    try:
        answers = [limited.post("/v1/generate", {"prompt": PROMPT, "steps": 1}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429], [a.text for a in answers]
        assert int(answers[2].headers["retry-after"]) >= 1
    finally:
        assert limited.stop() == 0


def test_the_load_test_with_batching_on_and_off_loses_nothing_and_matches_metrics(
    quickstart_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "load.json"
    command = [sys.executable, "-m", "sdtune", "bench", "serve", str(quickstart_run), "--clients", "4", "--requests",
               "12", "--steps", "3", "--max_batch", "1,4", "--queue_size", "16", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["max_batch"]: row for row in json.loads(out.read_text())}
    for row in rows.values():
        assert row["accepted"] + row["rejected_429"] == 12 and row["other_status"] == [] and row["one_image_each"]
        assert row["server_accepted"] == row["accepted"] == row["server_images"], row
        assert row["server_429"] == row["rejected_429"] and row["server_exit"] == 0, row
    assert rows[1]["batches"] == rows[1]["accepted"], "max_batch 1: one image per batch"
    assert rows[4]["batches"] < rows[4]["accepted"], "4 clients at once: some batches hold several requests"
