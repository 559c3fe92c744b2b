"""sdtune's quickstart-shaped step against diffusers' own train_text_to_image.py, side by side on this machine.

    python scripts/diffusers_side_by_side/run.py --script DIFFUSERS/examples/text_to_image/train_text_to_image.py

Both train the same tiny SD model (saved as a diffusers folder) on the same synthetic images at 64 px, batch 8,
fp32, data read in the training process (0 workers), seed 0, constant LR 1e-5, for `--steps` steps, alternating
`--runs` times. diffusers' script runs unchanged except for two lines: its torchvision transforms come from
`pil_transforms.py` (torchvision has no CPU build here) and it records each step's end time. sdtune runs
`train.py fit` on configs/quickstart.yaml with the same data, batch, workers and steps (its other settings,
e.g. `deterministic: true`, as the quickstart has them). Prints the median step time of each run (after
`--warmup` steps) and the ratio sdtune / diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def prepare(work: Path, images: int) -> tuple[Path, Path, Path]:
    from sdtune.models.components import load_components

    model = work / "tiny-model"
    if not model.is_dir():
        load_components("tiny").save_pretrained(model)
    folder = work / "images"
    if not folder.is_dir():
        data = [sys.executable, "-m", "data_tools"]
        subprocess.run([*data, "synth", "--out", str(folder), "--num_images", str(images)], check=True)
        subprocess.run(
            [
                *data,
                "make_shards",
                "--source",
                str(folder),
                "--out",
                str(work / "shards"),
                "--samples_per_shard",
                "8",
                "--resolution",
                "64",
            ],
            check=True,
        )
        pngs = sorted(folder.glob("*.png"))
        rows = [{"file_name": p.name, "text": p.with_suffix(".txt").read_text().strip()} for p in pngs]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model, folder, work / "shards"


def patched_script(script: Path, work: Path) -> Path:
    text = script.read_text()
    text = text.replace("from torchvision import transforms", "import pil_transforms as transforms")
    hook = "progress_bar.update(1)"
    assert text.count(hook) == 1, f"{script}: expected one '{hook}'"
    indent = text[: text.index(hook)].rsplit("\n", 1)[1]
    record = "_STEP_TIMES.append((__import__('time').perf_counter(), __import__('time').process_time()))"
    text = text.replace(hook, f"{hook}\n{indent}{record}")
    text = text.replace(
        "\ndef main():",
        "\n_STEP_TIMES = []\n__import__('atexit').register(lambda: open(os.environ['STEP_TIMES'], 'w')"
        ".write(json.dumps(_STEP_TIMES)))\n\n\ndef main():",
        1,
    )
    if "\nimport json" not in text:
        text = "import json\n" + text
    out = work / "train_text_to_image_pil.py"
    out.write_text(text)
    return out


def median_step(times_file: Path, warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per step after `warmup` steps; CPU time (all threads) is what a noisy shared
    machine does not blur: the work a step took."""
    times = json.loads(times_file.read_text())[warmup:]
    steps = list(zip(times, times[1:], strict=False))
    return statistics.median(b[0] - a[0] for a, b in steps), statistics.median(b[1] - a[1] for a, b in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", type=Path, required=True, help="diffusers' text_to_image/train_text_to_image.py")
    parser.add_argument("--work", type=Path, default=Path("runs/diffusers_side_by_side"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--python", default=sys.executable, help="interpreter for diffusers' script (needs datasets)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, images, shards = prepare(work, 64)
    script = patched_script(args.script, work)
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["data"]["init_args"].update(shards=str(shards), batch_size=8, num_workers=0, val_shards=None)
    config["trainer"].update(
        max_steps=args.steps,
        max_epochs=-1,
        logger=False,
        callbacks=[{"class_path": "step_times.StepTimes"}],
        default_root_dir=str(work / "sdtune-run"),
    )
    (work / "sdtune.yaml").write_text(yaml.safe_dump(config))
    path = f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"}
    diffusers_args = [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(images),
        "--resolution",
        "64",
        "--random_flip",
        "--train_batch_size",
        "8",
        "--max_train_steps",
        str(args.steps),
        "--learning_rate",
        "1e-5",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--mixed_precision",
        "no",
        "--dataloader_num_workers",
        "0",
        "--seed",
        "0",
        "--checkpointing_steps",
        "1000000",
        "--report_to",
        "wandb",
    ]
    results: dict[str, list[tuple[float, float]]] = {"diffusers": [], "sdtune": []}
    for run in range(args.runs):
        for name in ("diffusers", "sdtune"):
            times = work / f"{name}-{run}.json"
            env["STEP_TIMES"] = str(times)
            if name == "diffusers":
                out_dir = str(work / f"diffusers-out-{run}")
                command = [args.python, str(script), *diffusers_args, "--output_dir", out_dir]
            else:
                command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(work / "sdtune.yaml")]
            log = work / f"{name}-{run}.log"
            with log.open("w") as out:
                subprocess.run(command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
            results[name].append(median_step(times, args.warmup))
            wall, cpu = results[name][-1]
            print(f"run {run} {name}: median step {wall * 1000:.1f} ms wall, {cpu * 1000:.1f} ms CPU", flush=True)
    summary: dict[str, object] = {"step_s_wall_cpu": results}
    for i, kind in enumerate(("wall", "cpu")):
        ours = statistics.median(r[i] for r in results["sdtune"])
        theirs = statistics.median(r[i] for r in results["diffusers"])
        summary[kind] = {"sdtune_median_s": ours, "diffusers_median_s": theirs, "ratio": ours / theirs}
    (work / "side_by_side.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
