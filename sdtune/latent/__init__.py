"""The VAE latent space: latent shards, tables for classifiers, augmentation, analysis report."""
