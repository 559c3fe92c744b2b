#!/usr/bin/env bash
# vast.ai on-start script: paste into the template's "On-start script" field (or run it by hand).
# It installs sdtune, then trains with --resume auto: on a fresh instance that means "continue from the
# newest complete checkpoint in R2 (or on the Hub)", so a dead instance is replaced by starting a new one.
#
# Set these in the instance's environment (vast.ai: template -> Environment variables), never in a config:
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   an R2 API token's access key id and secret
#   AWS_ENDPOINT_URL                           https://<account_id>.r2.cloudflarestorage.com
#   HF_TOKEN                                   only if the config publishes to the Hub (hub_repo)
#   WANDB_API_KEY                              to log to wandb online; without it the run logs offline
#                                              (train.py warns; `wandb sync` uploads the run later)
#   SDTUNE_REPO      git URL of your sdtune repository (cloned into SDTUNE_WORKDIR if not there yet)
#   SDTUNE_CONFIG    config to train, e.g. configs/sd15_lora_r2.yaml (shards and checkpoints on R2)
set -euo pipefail

CONFIG="${SDTUNE_CONFIG:?set SDTUNE_CONFIG to the config to train, e.g. configs/sd15_lora_r2.yaml}"
WORKDIR="${SDTUNE_WORKDIR:-/workspace/sdtune}"

for name in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL; do
    if [ -z "${!name:-}" ]; then
        echo "vastai_onstart: $name is not set in the instance environment" >&2
        exit 2
    fi
done

# vast.ai runs on-start scripts with a minimal environment; make the credentials visible to child
# processes without writing them to disk.
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL
export AWS_REGION="${AWS_REGION:-auto}"
[ -n "${HF_TOKEN:-}" ] && export HF_TOKEN
if [ -n "${WANDB_API_KEY:-}" ]; then
    export WANDB_API_KEY
else
    echo "vastai_onstart: WANDB_API_KEY is not set: wandb will log offline (wandb sync uploads it later)" >&2
fi

# The GPU must be visible before anything is installed: a missing driver is a rental problem, not ours.
if ! nvidia-smi > /dev/null 2>&1; then
    echo "vastai_onstart: nvidia-smi fails: this instance shows no GPU; pick an offer with a working GPU" >&2
    exit 2
fi
# DataLoader workers hand batches over through /dev/shm; Docker's default is 64 MB. train.py lowers the
# prefetch (or stops with a message) when it is too small; vast.ai sets it from the template's --shm-size.
df -h /dev/shm | tail -1 | awk '{print "vastai_onstart: /dev/shm is " $2 " (" $4 " free)"}'

if [ ! -d "$WORKDIR/.git" ]; then
    git clone --depth 1 "${SDTUNE_REPO:?set SDTUNE_REPO to your sdtune git URL}" "$WORKDIR"
fi
cd "$WORKDIR"
# --system-site-packages: the image's CUDA torch (vast.ai's PyTorch images) is reused. The constraint pins
# it, so installing sdtune cannot replace it with a wheel built for another CUDA than the host driver runs;
# an image with torch older than sdtune needs makes pip stop here with a conflict instead.
python3 -m venv --system-site-packages .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/python -c "import torch; print(f'torch=={torch.__version__}')" > .venv/torch-constraint.txt \
    || { echo "vastai_onstart: the image has no torch; use a PyTorch image (torch >= 2.10)" >&2; exit 2; }
.venv/bin/pip install --quiet -c .venv/torch-constraint.txt -e .
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "vastai_onstart: torch $(cat .venv/torch-constraint.txt) cannot use the GPU (driver too old for its CUDA?)" >&2; exit 2; }

mkdir -p runs
.venv/bin/python train.py fit --config "$CONFIG" --resume auto 2>&1 | tee -a "runs/onstart-$(date +%Y%m%d-%H%M%S).log"
