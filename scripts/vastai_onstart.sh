#!/usr/bin/env bash
# vast.ai on-start script: paste into the template's "On-start script" field (or run it by hand).
# It installs sdtune, then trains with --resume auto: on a fresh instance that means "continue from the
# newest complete checkpoint in R2 (or on the Hub)", so a dead instance is replaced by starting a new one.
#
# Set these in the instance's environment (vast.ai: template -> Environment variables), never in a config:
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   an R2 API token's access key id and secret
#   AWS_ENDPOINT_URL                           https://<account_id>.r2.cloudflarestorage.com
#   HF_TOKEN                                   only if the config publishes to the Hub (hub_repo)
#   WANDB_API_KEY                              only if the config logs to wandb online
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
[ -n "${WANDB_API_KEY:-}" ] && export WANDB_API_KEY

if [ ! -d "$WORKDIR/.git" ]; then
    git clone --depth 1 "${SDTUNE_REPO:?set SDTUNE_REPO to your sdtune git URL}" "$WORKDIR"
fi
cd "$WORKDIR"
# --system-site-packages: the image's CUDA torch (vast.ai's PyTorch images) is reused when it is >= 2.10.
python3 -m venv --system-site-packages .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .

mkdir -p runs
.venv/bin/python train.py fit --config "$CONFIG" --resume auto 2>&1 | tee -a "runs/onstart-$(date +%Y%m%d-%H%M%S).log"
