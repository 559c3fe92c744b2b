# make quickstart: set up .venv and run the tiny fine-tune on synthetic shards (CPU, a few minutes)
# make test:       set up .venv and run lint + the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
QS := data/quickstart

.PHONY: setup system-deps quickstart test lint bench bench-remote clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; any other spec pulls the CUDA wheels
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

$(QS)/shards/manifest.json: | setup
	$(BIN)/python -m data_tools synth --out $(QS)/images --num_images 64 --size 64
	$(BIN)/python -m data_tools make_shards --source $(QS)/images --out $(QS)/shards --resolution 64 --samples_per_shard 16

quickstart: setup $(QS)/shards/manifest.json
	WANDB_MODE=offline $(BIN)/python train.py fit --config configs/quickstart.yaml --resume auto
	@echo "checkpoints: runs/quickstart/checkpoints  sample grids: runs/quickstart/samples"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The SLURM tests start a real one-node cluster: Debian's slurm-wlm and munge (installed here when root;
# without them those tests are skipped with the reason).
system-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing slurm-wlm and munge for the SLURM tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	else echo "slurm-wlm/munge missing and not root: the SLURM tests will be skipped"; fi

test: lint system-deps
	WANDB_MODE=offline $(BIN)/python -m pytest -q

bench: setup $(QS)/shards/manifest.json
	$(BIN)/python -m sdtune.bench --config configs/quickstart.yaml

# S3 loader vs local disk, and checkpoint-publish blocking time, against a local S3 server
bench-remote: setup
	$(BIN)/python -m sdtune.bench_remote

clean:
	rm -rf $(VENV) runs data
