# make quickstart: set up .venv and fine-tune tiny-pretrained on a colour it never saw (CPU, a few minutes)
# make test:       set up .venv and run lint + the whole test suite
# make latent-benchmark / latent-report: digits -> latent shards -> classifier benchmark / HTML report
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
QS := data/quickstart/pink
DIGITS := data/digits

.PHONY: setup system-deps quickstart test lint bench bench-remote latent-data latent-benchmark latent-report tiny-model clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; any other spec pulls the CUDA wheels
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# test-only: torch-fidelity's Inception, the reference for sdtune's FID network (its own deps pull torchvision)
	$(BIN)/pip install --quiet --no-deps torch-fidelity==0.4.0
	touch $@

setup: $(BIN)/.installed

$(QS)/shards/manifest.json: | setup
	$(BIN)/python -m data_tools synth --out $(QS)/images --num_images 64 --size 64 --colors '[pink]' \
	  --shapes '[circle,square,triangle,diamond,cross]' --sizes '[small,medium,large]' --jitter 0.15
	$(BIN)/python -m data_tools make_shards --source $(QS)/images --out $(QS)/shards --resolution 64 --samples_per_shard 16

quickstart: setup $(QS)/shards/manifest.json
	WANDB_MODE=offline $(BIN)/python train.py fit --config configs/quickstart.yaml --resume auto
	@echo "checkpoints: runs/quickstart/checkpoints  sample grids: runs/quickstart/samples  checker: runs/quickstart/checker_score.json"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The SLURM tests start a real one-node cluster (Debian's slurm-wlm and munge) and the report test opens
# the page in Debian's chromium: installed here when root; without them those tests are skipped with the reason.
system-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing slurm-wlm, munge and chromium for the SLURM and report tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge chromium >/dev/null; \
	else echo "slurm-wlm/munge/chromium missing and not root: the SLURM/browser tests will be skipped"; fi

# Two test processes, one file each at a time (a file's fixtures, such as its SLURM cluster or DDP reference
# run, stay in one process); one torch thread per process, since two processes of two OpenMP threads each on
# 2 cores spin against each other and run several times slower.
test: lint system-deps
	WANDB_MODE=offline OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: setup $(QS)/shards/manifest.json
	$(BIN)/python -m sdtune.bench --config configs/quickstart.yaml

# S3 loader vs local disk, and checkpoint-publish blocking time, against a local S3 server
bench-remote: setup
	$(BIN)/python scripts/local_s3.py $(BIN)/python -m sdtune.bench_remote --endpoint_url {endpoint} --bucket sdtune-bench --create_bucket true

# Latent workloads on sklearn's bundled digits with tiny-pretrained's VAE (offline; a real learned latent space,
# 16x16x4 at 64 px, not SD's). For SD's latent space: make latent-report VAE=stable-diffusion-v1-5/stable-diffusion-v1-5 SIZE=256
VAE ?= tiny-pretrained
SIZE ?= 64
# The latents are re-encoded when tiny-pretrained's VAE changes (make tiny-model): a cache of the old VAE's
# latents would give every latent workload the wrong latent space (encode_latents refuses to mix the two).
VAE_WEIGHTS := $(if $(filter tiny-pretrained,$(VAE)),sdtune/models/tiny_pretrained/vae/diffusion_pytorch_model.safetensors)
$(DIGITS)/latents/manifest.json: $(VAE_WEIGHTS) | setup
	$(BIN)/python -m data_tools digits --out $(DIGITS)/images --size $(SIZE)
	$(BIN)/python -m data_tools make_shards --source $(DIGITS)/images --out $(DIGITS)/shards --resolution $(SIZE) \
	  --samples_per_shard 200 --class_folders true
	rm -rf $(DIGITS)/latents
	$(BIN)/python -m data_tools encode_latents --source $(DIGITS)/shards --out $(DIGITS)/latents --vae $(VAE)

latent-data: $(DIGITS)/latents/manifest.json

latent-benchmark: latent-data
	$(BIN)/python -m sdtune.latent.benchmark --latents $(DIGITS)/latents --images $(DIGITS)/shards \
	  --out runs/latent_benchmark --seeds [0,1,2]

latent-report: latent-data
	WANDB_MODE=offline $(BIN)/python train.py fit --config configs/latent/latent_attention.yaml
	$(BIN)/python -m sdtune.latent.report --images $(DIGITS)/shards --latents $(DIGITS)/latents \
	  --out runs/latent_report --classifier runs/latent_attention/classifier \
	  $(if $(wildcard runs/latent_benchmark/benchmark.json),--benchmark runs/latent_benchmark/benchmark.json)
	@echo "open runs/latent_report/report.html"

clean:
	rm -rf $(VENV) runs data

# Re-train tiny-pretrained (sdtune/models/tiny_pretrained: VAE, UNet, checker, figures, model card) from
# scratch: 44 minutes on 2 CPU cores (88 on a host half as fast). Resumes by stage; WORK keeps data and runs (rm -r it for a fresh run).
WORK ?= runs/tiny_model
tiny-model: setup
	WANDB_MODE=offline $(BIN)/python -m sdtune tiny-model --work $(WORK)
