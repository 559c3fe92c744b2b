"""`sdtune eval CHECKPOINT... --prompts FILE --seeds 0,1,2 [--base] --out DIR`: see sdtune.eval.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdtune.eval.evaluate import EvalSettings, evaluate, parse_seeds
from sdtune.eval.image_sets import read_prompts
from sdtune.eval.render import Sampler
from sdtune.eval.scorer import HIGHER_IS_BETTER, ScoreSettings
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdtune eval",
        description="Render fixed prompts x seeds for each checkpoint (and the base model) and score them; writes "
        "eval.json, eval.csv and eval.html into --out",
        allow_abbrev=False,
    )
    sources = "run folders, checkpoint folders, a sweep plan.json, or s3:// / hf:// checkpoint URLs"
    p.add_argument("checkpoints", nargs="+", help=sources)
    p.add_argument("--out", type=Path, required=True, help="output folder (the image cache lives in OUT/cache)")
    p.add_argument("--prompts", type=Path, required=True, help="a text file, one prompt per line")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--base", action="store_true", help="also evaluate the base model, as step 0")
    p.add_argument("--trained", action="store_true", help="use the trained weights, not the EMA ones")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance (default 4)")
    p.add_argument("--resolution", type=int, default=0, help="image size (default: the model's native size)")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"], help="rendering precision")
    p.add_argument("--batch_size", type=int, default=16, help="images rendered per batch")
    p.add_argument(
        "--checker", default="tiny-pretrained", help="'tiny-pretrained', a checker folder, or 'none' (default: "
        "tiny-pretrained's shape/colour/digit checker)"
    )  # fmt: skip
    p.add_argument("--features", default=None, help="FD/KID/memorisation space: 'checker', 'pixels', or a vision "
                   "model's Hub id or folder (CLIP, DINOv2); default: checker when there is one")  # fmt: skip
    p.add_argument("--clip", default=None, help="a CLIP model (Hub id or folder) for CLIP score")
    p.add_argument("--real", default=None, help="held-out real images (folder or shards) for FD and KID")
    p.add_argument("--train", default=None, help="training images (folder or shards) for memorisation")
    p.add_argument("--val_shards", default=None, help="held-out shards: each checkpoint's denoising loss at fixed "
                   "noise and timesteps (the sweep's val/loss)")  # fmt: skip
    p.add_argument("--val_batches", type=int, default=16, help="at most this many held-out batches of --batch_size")
    p.add_argument("--memorisation_threshold", type=float, default=0.95, help="cosine similarity counted as a copy")
    p.add_argument("--max_images", type=int, default=2000, help="at most this many real / training images")
    p.add_argument("--rank_by", default=None, choices=sorted(HIGHER_IS_BETTER), help="metric that ranks checkpoints")
    p.add_argument("--s3_endpoint_url", default=None, help="S3 endpoint for s3:// sources (R2: https://...)")
    return p


def main(args: list[str]) -> None:
    options = parser().parse_args(args)
    checker = None if options.checker == "none" else options.checker
    features = options.features or ("checker" if checker else None)
    settings = EvalSettings(
        prompts=read_prompts(options.prompts),
        seeds=parse_seeds(options.seeds),
        sampler=Sampler(options.steps, options.guidance_scale, options.resolution, options.precision),
        scores=ScoreSettings(
            features=features,
            clip=options.clip,
            checker=checker,
            real=options.real,
            train=options.train,
            memorisation_threshold=options.memorisation_threshold,
            max_images=options.max_images,
        ),
        val_shards=options.val_shards,
        val_batches=options.val_batches,
    )
    record = evaluate(
        options.checkpoints,
        options.out,
        settings,
        base=options.base,
        use_ema=not options.trained,
        batch_size=options.batch_size,
        rank_by=options.rank_by,
        storage=Storage(S3Settings(endpoint_url=options.s3_endpoint_url)),
    )
    render = record["render"]
    print(
        f"eval: {len(record['checkpoints'])} checkpoint(s); rendered {render['rendered']} image(s) "
        f"({render['images_per_second']:.2f}/s), {render['cached']} from the cache; ranking by "
        f"{record['ranking']['by']}: {' > '.join(record['ranking']['order'])}; {options.out / 'eval.html'}"
    )
