"""The VAE latent space: latent augmentation, sklearn baselines, the classifier benchmark, the analysis report.

Latent shards (format, settings) and labelled tables live in `sdtune.data`."""
