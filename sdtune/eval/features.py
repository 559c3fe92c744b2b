"""Image feature extractors for FD, KID and memorisation, and the CLIP model for CLIP score.

    extractor = load_features("checker")                   # tiny-pretrained's checker: its heads' pooled features
    extractor = load_features("pixels")                    # 16x16 downsampled pixels (copies of training images)
    extractor = load_features("inception:weights.pth")     # the standard FID's Inception (a local weights file)
    extractor = load_features("facebook/dinov2-small")     # any transformers vision model (Hub id or local folder)
    extractor = load_features("openai/clip-vit-base-patch32")  # a CLIP model: its image embeddings
    features = extractor(images)                           # images (N, H, W, 3) in [0, 1] -> (N, D) float64

Hub ids load from the local Hugging Face cache or download as transformers does; tests build tiny random
models into folders. The standard FID's Inception network is sdtune.eval.inception (plain torch: torch-fidelity,
its maintained loader, needs torchvision); FD in it is the FID. FD in another space is named after it
("FD_dinov2-small"), never called FID.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from sdtune.eval.checker import Checker
from sdtune.models.sampling import to_pil

CHECKER = "checker"
PIXELS = "pixels"
INCEPTION = "inception:"


class Features(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _source_name(source: str) -> str:
    """A model's short name for the report: a folder's name, or a Hub id's last part."""
    return Path(source).name if Path(source).exists() else source.split("/")[-1]


def _embedding(output: torch.Tensor | object) -> torch.Tensor:
    """`get_image_features` / `get_text_features`' result as a tensor (transformers 5 returns an output object
    whose pooler_output is the projected embedding)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


def _pil(images: np.ndarray) -> list[Image.Image]:
    return [to_pil(a) for a in images]


@dataclass
class CheckerFeatures:
    """The checker heads' pooled features side by side (the layer before each head's classifier)."""

    checker: Checker
    name: str = CHECKER

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable: images (N, 3, H, W) in [-1, 1] -> (N, D) (guided generation steers by it)."""
        parts = []
        for head in self.checker.heads.values():
            y = x if x.shape[-1] == head.image_size else torch.nn.functional.interpolate(
                x, size=head.image_size, mode="bilinear", antialias=True
            )  # fmt: skip
            parts.append(torch.cat([head.net.features(b).mean(dim=(2, 3)) for b in y.split(256)]))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
        return self.embed(x).double().numpy()


@dataclass
class PixelFeatures:
    """The image itself, area-downsampled to `size` x `size` and centred ([-0.5, 0.5]): a space where a copy of a
    training image is a copy (cosine ~1), unlike a feature space that keeps only what an image shows."""

    size: int = 16
    name: str = PIXELS

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        small = torch.nn.functional.adaptive_avg_pool2d(x, self.size) - 0.5
        return small.flatten(1).double().numpy()


class VisionFeatures:
    """A transformers vision model's image embedding: CLIP's projected image features, or the pooled output
    (DINOv2's CLS token, ViT's pooler) of any other `AutoModel`."""

    def __init__(self, source: str, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.name = _source_name(source)
        self.model = AutoModel.from_pretrained(source).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(source)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self.processor(images=_pil(images[start : start + self.batch_size]), return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device)
            if hasattr(self.model, "get_image_features"):
                embeds = _embedding(self.model.get_image_features(pixel_values=pixels))
            else:
                embeds = self.model(pixel_values=pixels).pooler_output
            out.append(embeds.double().cpu())
        return torch.cat(out).numpy()


class ClipModel:
    """CLIP's image and text embeddings (a Hub id or a local folder with model, tokenizer and processor)."""

    def __init__(self, source: str, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.name = _source_name(source)
        self.model = CLIPModel.from_pretrained(source).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(source)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def embed(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        image_out, text_out = [], []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            batch = self.processor(
                text=prompts[start:end], images=_pil(images[start:end]), return_tensors="pt", padding=True,
                truncation=True,
            )  # fmt: skip
            batch = {k: v.to(self.device) for k, v in batch.items()}
            image = _embedding(self.model.get_image_features(pixel_values=batch["pixel_values"]))
            text = _embedding(
                self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            )
            image_out.append(image.double().cpu())
            text_out.append(text.double().cpu())
        return torch.cat(image_out).numpy(), torch.cat(text_out).numpy()


def load_features(source: str, checker: Checker | None = None, device: str = "cpu") -> Features:
    """ "checker" (needs `checker`), "pixels", "inception:WEIGHTS_FILE" (the standard FID's network), or a
    transformers vision model by Hub id or local folder."""
    if source == PIXELS:
        return PixelFeatures()
    if source.startswith(INCEPTION):
        from sdtune.eval.inception import InceptionFeatures

        return InceptionFeatures(Path(source[len(INCEPTION) :]))
    if source == CHECKER:
        if checker is None:
            raise ValueError("features: 'checker' needs a checker (--checker tiny-pretrained or a folder)")
        return CheckerFeatures(checker)
    try:
        return VisionFeatures(source, device)
    except OSError as err:
        raise ValueError(
            f"features: cannot load {source!r} as a vision model ({' '.join(str(err).split())[:200]}); give a "
            "local folder, a Hub id in the Hugging Face cache, 'checker' or 'pixels'"
        ) from err
