"""Evaluation of generated images: the checker (does an image show what its prompt asked for?) and the
CheckerScore callback. It builds on the latent wing's classifiers (`sdtune.latent`), never the reverse."""
