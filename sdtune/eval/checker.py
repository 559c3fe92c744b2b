"""The checker: does a generated image show what its prompt asked for? An offline stand-in for CLIP score.

Three small pixel classifiers (sdtune.latent.classifier's `Classifier`, trained on the real synthetic
images by `sdtune tiny-model`) ship with `tiny-pretrained` in `checker/`: `shape` (circle, square,
triangle, diamond, cross), `color` (the shape's colour: the 8 base colours and pink) and `digit` (0-9).
A prompt names what it asks for ("a photo of a large pink circle on a blue background" asks for shape
circle and colour pink; "a handwritten digit 7" for digit 7); the checker scores the attributes the prompt
names and nothing else.

    checker = Checker.load(tiny_pretrained_folder() / "checker")
    result = checker.score(images, prompts)      # images (N, 3, 64, 64) in [-1, 1]
    result = checker.score_rendered(array, prompts)  # or a pipeline's output: (N, H, W, 3) in [0, 1]
    result.summary()                             # {"shape": 0.93, "color": 0.88, "all": 0.85, "count": 40}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdtune.latent.classifier import load_classifier
from sdtune.models.components import TINY_PRETRAINED, tiny_pretrained_folder

ATTRIBUTES = ("shape", "color", "digit")
_DIGIT = re.compile(r"\bdigit\s+(\d)\b")


def checker_folder(checker: str) -> Path:
    """`tiny-pretrained` -> the checker shipped with it; else a folder of checker heads."""
    folder = tiny_pretrained_folder() / "checker" if checker == TINY_PRETRAINED else Path(checker)
    if not folder.is_dir():
        raise ValueError(f"checker: folder {folder} not found; give 'tiny-pretrained' or a folder")
    return folder


@dataclass
class CheckerHead:
    net: nn.Module
    classes: list[str]
    image_size: int


def asked_for(prompt: str, vocabulary: dict[str, list[str]]) -> dict[str, str]:
    """The attributes `prompt` names, among the classes the checker knows: {"shape": "circle", "color":
    "pink"} or {"digit": "7"}; {} when it names none."""
    words = re.findall(r"[a-z]+", prompt.lower())
    wanted: dict[str, str] = {}
    digit = _DIGIT.search(prompt.lower())
    if digit and digit.group(1) in vocabulary.get("digit", []):
        return {"digit": digit.group(1)}
    for attribute in ("shape", "color"):
        # "a red circle on a blue background": the first colour named is the shape's.
        named = [w for w in words if w in vocabulary.get(attribute, [])]
        if named:
            wanted[attribute] = named[0]
    return wanted


@dataclass
class CheckerResult:
    """Per image: the attributes asked for, the checker's predictions, and whether each matched."""

    asked: list[dict[str, str]]
    predicted: list[dict[str, str]]
    prompts: list[str] = field(default_factory=list)

    def hits(self, index: int) -> dict[str, bool]:
        return {k: self.predicted[index].get(k) == v for k, v in self.asked[index].items()}

    def summary(self) -> dict[str, float]:
        """Fraction of images whose prompted shape, colour, digit was found, and `all`: every named attribute."""
        totals: dict[str, list[bool]] = {}
        for index in range(len(self.asked)):
            hits = self.hits(index)
            for attribute, hit in hits.items():
                totals.setdefault(attribute, []).append(hit)
            if hits:
                totals.setdefault("all", []).append(all(hits.values()))
        figures = {k: round(sum(v) / len(v), 4) for k, v in totals.items()}
        return {**figures, "count": float(len(totals.get("all", [])))}


class Checker:
    """The shape, colour and digit classifiers, applied to the attributes each prompt names."""

    def __init__(self, heads: dict[str, CheckerHead]) -> None:
        self.heads = heads

    @classmethod
    def load(cls, folder: Path) -> Checker:
        """Every head found in `folder` (`shape/`, `color/`, `digit/`, each a `Classifier.export` folder)."""
        heads = {}
        for attribute in ATTRIBUTES:
            if (folder / attribute / "classifier.json").is_file():
                net, info = load_classifier(folder / attribute)
                heads[attribute] = CheckerHead(net, list(info["classes"]), int(info["image_size"]))
        if not heads:
            raise ValueError(f"checker: no classifier in {folder} (expected shape/, color/ or digit/ folders)")
        return cls(heads)

    @property
    def vocabulary(self) -> dict[str, list[str]]:
        return {attribute: head.classes for attribute, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per head for images (N, 3, H, W) in [-1, 1]."""
        out = {}
        for attribute, head in self.heads.items():
            x = images.float()
            if x.shape[-1] != head.image_size:
                x = nn.functional.interpolate(x, size=head.image_size, mode="bilinear", antialias=True)
            out[attribute] = torch.cat([head.net(b).softmax(dim=1) for b in x.split(256)])
        return out

    def score(self, images: torch.Tensor, prompts: list[str]) -> CheckerResult:
        if len(images) != len(prompts):
            raise ValueError(f"checker: {len(images)} images but {len(prompts)} prompts")
        probabilities = self.predict(images)
        vocabulary = self.vocabulary
        asked = [asked_for(p, vocabulary) for p in prompts]
        predicted = [
            {a: self.heads[a].classes[int(probabilities[a][i].argmax())] for a in asked[i]} for i in range(len(prompts))
        ]
        return CheckerResult(asked, predicted, list(prompts))

    def score_rendered(self, images: np.ndarray, prompts: list[str]) -> CheckerResult:
        """`score` of a pipeline's numpy output: (N, H, W, 3) floats in [0, 1]."""
        return self.score(_from_rendered(images), prompts)

    def predict_rendered(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """`predict` of a pipeline's numpy output: (N, H, W, 3) floats in [0, 1]."""
        return self.predict(_from_rendered(images))


def _from_rendered(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) floats in [0, 1] -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
