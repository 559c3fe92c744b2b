"""sdtune: fine-tune Stable Diffusion and train classifiers on SD-VAE latents with PyTorch Lightning."""

__version__ = "0.1.0"
