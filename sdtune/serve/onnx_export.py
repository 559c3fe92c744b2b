"""`sdtune export onnx`: the hybrid client's two halves as ONNX for onnxruntime (no torch on the client): the text
encoder (token ids -> hidden states) and the VAE decoder (latents as /v1/denoise sends them -> images in
[-1, 1]), with the tokenizer copied next to them and an `onnx.json` that records the shapes and the parity with
PyTorch measured at export.

    sdtune export onnx --model tiny-pretrained --out runs/onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdtune.models.components import load_components, resolve_pretrained, vae_scale_factor


class TextEncoderOnnx(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class DecoderOnnx(nn.Module):
    """Latents as the pipeline leaves them (scaled) -> pixels in [-1, 1]."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    torch.onnx.export(module.eval(), (example,), str(path), input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, dynamo=False,
                      opset_version=17)  # fmt: skip


def parity(session_path: Path, module: nn.Module, example: torch.Tensor, input_name: str) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(session_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {input_name: example.numpy()})
    with torch.no_grad():
        torch_out = module(example).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def export_onnx(model: str, out: Path) -> dict[str, Any]:
    parts = load_components(model)
    out.mkdir(parents=True, exist_ok=True)
    parts.tokenizer.save_pretrained(out / "tokenizer")
    ids = parts.tokenizer(["a photo of a large red circle on a blue background", ""], padding="max_length",
                          max_length=parts.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    side = parts.unet.config.sample_size
    latents = torch.randn(2, parts.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    text, decoder = TextEncoderOnnx(parts.text_encoder.eval()), DecoderOnnx(parts.vae.eval())
    with torch.no_grad():
        _export(text, ids, out / "text_encoder.onnx", "input_ids", "hidden_states")
        _export(decoder, latents, out / "vae_decoder.onnx", "latents", "images")
    record = {
        "model": model, "source": str(resolve_pretrained(model)),
        "text_encoder": {"input": list(ids.shape), "max_abs_diff_vs_torch": parity(out / "text_encoder.onnx", text,
                                                                                    ids, "input_ids")},
        "vae_decoder": {"input": list(latents.shape), "image_size": side * vae_scale_factor(parts.vae),
                        "max_abs_diff_vs_torch": parity(out / "vae_decoder.onnx", decoder, latents, "latents")},
    }  # fmt: skip
    (out / "onnx.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sdtune export onnx", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("what", choices=["onnx"], help="the format (onnx)")
    p.add_argument("--model", default="tiny-pretrained", help="base model whose text encoder and VAE to export")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    o = p.parse_args(args)
    record = export_onnx(o.model, o.out)
    print(f"export onnx: {o.out} (text encoder max |diff| {record['text_encoder']['max_abs_diff_vs_torch']:.2e}, "
          f"VAE decoder {record['vae_decoder']['max_abs_diff_vs_torch']:.2e} against PyTorch)")  # fmt: skip
