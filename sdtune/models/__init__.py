"""Model components and LightningModules."""

from sdtune.models.classifier import Classifier
from sdtune.models.sd_finetune import SDFineTune

__all__ = ["Classifier", "SDFineTune"]
