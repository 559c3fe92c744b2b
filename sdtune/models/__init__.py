"""Model components and the Stable Diffusion LightningModule (classifiers live in `sdtune.latent`)."""

from sdtune.models.sd_finetune import SDFineTune

__all__ = ["SDFineTune"]
