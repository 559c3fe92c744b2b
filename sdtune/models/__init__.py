"""Model components and LightningModules."""

from sdtune.models.sd_finetune import SDFineTune

__all__ = ["SDFineTune"]
