#!/bin/bash
# GPU check of the distributed paths on one CUDA machine (no downloads): the SD 1.5-shaped random preset
# at 512 px in bf16, trained through train.py with DDP, DDP + 8-bit AdamW, and FSDP (checkpoint, then
# resume), each with the Throughput callback (images/s, peak memory in run_summary.json).
#   bash scripts/gpu_distributed_check.sh OUT_DIR [STEPS]
set -euo pipefail
out=${1:?output folder}; steps=${2:-40}
work=$(mktemp -d)
mkdir -p "$out"
python3 -m data_tools synth --out "$work/images" --num_images 256 --size 512
python3 -m data_tools make_shards --source "$work/images" --out "$work/shards" --resolution 512 --samples_per_shard 32
common=(--config configs/quickstart.yaml --model.init_args.pretrained sd15-random --model.init_args.learning_rate 1e-5
        --data.init_args.shards "$work/shards" --data.init_args.resolution 512 --data.init_args.batch_size 8
        --data.init_args.num_workers 4 --trainer.precision bf16-mixed --trainer.devices 1 --trainer.logger false
        --trainer.callbacks+=sdtune.callbacks.throughput.Throughput --trainer.enable_progress_bar false)
run() {  # name, run folder, then extra arguments
    local name=$1 root=$work/$2; shift 2
    local start=$SECONDS
    python3 train.py fit "${common[@]}" --trainer.default_root_dir "$root" "$@" > "$out/$name.log" 2>&1 \
        || { echo "$name FAILED"; tail -40 "$out/$name.log"; return 1; }
    cp "$root/run_summary.json" "$out/$name.json"
    echo "$name: $((SECONDS - start)) s; $(python3 -c "import json,sys; d=json.load(open('$out/$name.json')); print({k: d[k] for k in ('steps','strategy','images_per_s','peak_mem_gib') if k in d} | {'loss': d['metrics'].get('train/loss')})" 2>/dev/null | sed 's/perf\///g')"
}
run ddp ddp --trainer.strategy ddp --trainer.max_steps "$steps" || true
run ddp_8bit ddp_8bit --trainer.strategy ddp --model.init_args.optimizer adamw8bit --trainer.max_steps "$steps" || true
run fsdp fsdp --trainer.strategy fsdp --trainer.max_steps "$steps" || true
ls "$work/fsdp/checkpoints" 2>/dev/null || true
run fsdp_resumed fsdp --trainer.strategy fsdp --trainer.max_steps $((steps + 16)) --resume auto || true
grep -h "Restoring states\|resume auto" "$out/fsdp_resumed.log" | head -3 || true
