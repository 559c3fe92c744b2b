"""`tiny-pretrained`: a small latent diffusion model the project trains on its own offline data.

`sdtune tiny-model` (= `make tiny-model`) re-trains it from scratch: the data (`data`), the VAE (`vae`),
the UNet through sdtune's own fine-tuning path, the checker (`sdtune.eval.checker`), the figures and the
model card (`recipe`).
"""
