"""The hybrid client: the prompt is encoded here (the text encoder, on CPU), the server only runs the diffusion
steps (`POST /v1/denoise`), and the latents are decoded here (the VAE decoder): the GPU server never sees text
and never sends images.

    from sdtune.serve.client import HybridClient
    image = HybridClient("http://127.0.0.1:8000", model="tiny-pretrained").generate("a photo of a red circle", seed=3)

    sdtune client --url http://127.0.0.1:8000 --prompt "a photo of a red circle" --seed 3 --out red.png

`model` must be the served model's base (its text encoder and VAE; a fine-tune trains the UNet only). The API key,
when the server wants one, comes from SDTUNE_API_KEY.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from sdtune.models.components import encode_prompts, load_vae, resolve_pretrained
from sdtune.models.sampling import to_pil

API_KEY_ENV = "SDTUNE_API_KEY"


def pack(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


class HybridClient:
    """With `onnx` (a folder from `sdtune export onnx`), the text encoder and the decoder run in onnxruntime."""

    def __init__(self, url: str, model: str = "tiny-pretrained", api_key: str | None = None, timeout: float = 600,
                 onnx: Path | None = None):  # fmt: skip
        self.url, self.timeout, self.onnx = url.rstrip("/"), timeout, onnx
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if onnx is not None:
            import onnxruntime

            if not (onnx / "onnx.json").is_file():
                raise ValueError(f"client --onnx: {onnx} has no onnx.json (make it with sdtune export onnx)")
            self.tokenizer = CLIPTokenizer.from_pretrained(onnx / "tokenizer")
            self.sessions = {name: onnxruntime.InferenceSession(str(onnx / f"{name}.onnx"),
                                                                providers=["CPUExecutionProvider"])
                             for name in ("text_encoder", "vae_decoder")}  # fmt: skip
            return
        folder = resolve_pretrained(model)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True,
                                                          torch_dtype=torch.float32).eval()  # fmt: skip
        self.vae = load_vae(model).eval()

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> np.ndarray:
        if self.onnx is not None:
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="np").input_ids.astype(np.int64)  # fmt: skip
            return self.sessions["text_encoder"].run(None, {"input_ids": ids})[0]
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, torch.device("cpu")).numpy()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (1, C, h, w) as the server sends them -> (H, W, 3) in [0, 1], as the pipeline's output."""
        if self.onnx is not None:
            pixels = torch.from_numpy(self.sessions["vae_decoder"].run(None, {"latents": latents.numpy()})[0])
        else:
            pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((pixels[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)

    def generate(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 25, guidance: float = 4.0,
                 size: int | None = None) -> Image.Image:  # fmt: skip
        embeds = self.embed([prompt, negative_prompt])
        body = {"prompt_embeds": pack(embeds[0]), "negative_prompt_embeds": pack(embeds[1]), "seed": seed,
                "steps": steps, "guidance": guidance} | ({"size": size} if size else {})  # fmt: skip
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        answer = httpx.post(self.url + "/v1/denoise", json=body, headers=headers, timeout=self.timeout)
        if answer.status_code != 200:
            raise ValueError(f"client: {self.url}/v1/denoise answered {answer.status_code}: {answer.text[:300]}")
        data = answer.json()
        latents = np.frombuffer(base64.b64decode(data["latents"]), dtype="<f4").reshape(1, *data["shape"])
        return to_pil(self.decode(torch.from_numpy(latents.copy())))


def main(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sdtune client", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (sdtune serve)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--model", default="tiny-pretrained", help="the served model's base: its text encoder and VAE")
    p.add_argument("--onnx", type=Path, default=None, help="run the text encoder and decoder from this `sdtune "
                   "export onnx` folder in onnxruntime (instead of PyTorch)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    o = p.parse_args(args)
    client = HybridClient(o.url, o.model, onnx=o.onnx)
    image = client.generate(o.prompt, o.negative_prompt, o.seed, o.steps, o.guidance, o.size)
    image.save(o.out)
    print(f"client: {o.out} ({image.width}x{image.height}; text encoded and latents decoded here)")
