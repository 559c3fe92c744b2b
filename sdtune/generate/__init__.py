"""Guided generation: latent interpolations refined by the UNet, pulled towards a target under a metric."""
