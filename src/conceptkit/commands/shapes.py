"""`conceptkit shapes sample|read|train-base`: the shapes world's renderer, oracle and base-model trainer."""
from __future__ import annotations

from . import options as o

import json
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    shapes = sub.add_parser("shapes", help="the shapes world").add_subparsers(dest="shapes_command", required=True)
    p = shapes.add_parser("sample", help="render random scenes with captions into an image folder")
    p.add_argument("--n", type=o.count, default=16)
    p.add_argument("--seed", type=o.seed, default=0)
    p.add_argument("--held-out", action="store_true", help="use the held-out attribute combinations")
    p.add_argument("--p-pair", type=o.probability, default=0.4, help="fraction of two-object scenes")
    p.add_argument("--reference-pairs", type=o.count_or_zero, default=0, metavar="N",
                   help="after the scenes, N two-object scenes each holding one of their one-object scenes' objects, "
                        "that scene's file named as its reference (for learn promptnet --pretrain --captions scene)")
    p.add_argument("--out", type=o.path, required=True)
    p.set_defaults(func=run_sample, writes=("out",))
    p = shapes.add_parser("read", help="the oracle: read images back into attributes (JSON)")
    p.add_argument("images", type=o.path, nargs="+")
    p.set_defaults(func=run_read)
    p = shapes.add_parser("train-base", help="train the bundled model from scratch (resumable)")
    p.add_argument("--run", type=o.path, default="runs/base", help="run folder: checkpoints, logs, caches")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=o.seed, default=0)
    p.add_argument("--unet-steps", type=o.count, default=30000)
    p.add_argument("--export-to", type=o.path, help="write the run's weights as a diffusers folder and stop")
    p.add_argument("--export-weights", choices=("ema", "raw"), default="ema",
                   help="with --export-to: the EMA weights (default) or the raw trained weights (v4 ships raw: its "
                        "EMA lagged behind a model still improving fast)")
    p.add_argument("--export-checkpoint", type=o.path,
                   help="with --export-to: a copy of the run's unet_state.pt to export instead of the latest one")
    p.add_argument("--threads", type=o.threads, help="CPU threads (use 1 to leave a core free for other work: two "
                                                "busy processes on 2 threads each slow each other down many times)")
    p.add_argument("--init-from", type=o.path, help="start a new run from shipped weights (e.g. the bundled folder) when the "
                                       "original run's checkpoints are gone")
    p.add_argument("--set", type=o.key_value, action="append", metavar="KEY=VALUE",
                   help="a recipe field of a new run (shapes/train_base.py Recipe), e.g. --set grounding_weight=0.1; with "
                        "--resume only ema_decay, checkpoint_every and lr_decay_steps")
    p.set_defaults(func=run_train_base, writes=train_base_writes)


def train_base_writes(args) -> list[str]:
    """The run folder while training; an export replaces its folder whole (a temporary folder renamed), so it
    takes no lock there (the lock file would go with the old folder)."""
    return [] if args.export_to else [args.run]


def run_sample(args) -> None:
    from ..shapes.dataset import reference_pairs, scenes, write_image_folder

    items = scenes(args.n, seed=args.seed, held_out=args.held_out, p_pair=args.p_pair)
    pairs = []
    if args.reference_pairs:
        if not any(len(s.objects) == 1 for s in items):
            raise UserError("--reference-pairs: no one-object scene to take objects from: lower --p-pair")
        pairs = reference_pairs(items, args.reference_pairs, seed=args.seed)
    out = write_image_folder(args.out, items, seed=args.seed, pairs=pairs)
    print(f"wrote {len(items) + len(pairs)} images and {out / 'metadata.jsonl'}")


def run_read(args) -> None:
    from PIL import Image, UnidentifiedImageError

    from ..shapes import oracle

    rows = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                rows.append({"image": path, **oracle.read(im).to_dict()})
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    print(json.dumps(rows, indent=2))


def run_train_base(args) -> None:
    import torch

    from ..shapes import train_base

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export_to:
        path = train_base.export(Path(args.run), Path(args.export_to), weights=args.export_weights,
                                 checkpoint=args.export_checkpoint and Path(args.export_checkpoint))
        print(f"exported {path}")
        return
    overrides = train_base.parse_overrides(args.set or [])
    changes = overrides if args.resume else {}  # train() refuses what a resumed run may not change
    if args.init_from:
        train_base.seed_run_from_export(args.run, args.init_from, overrides)
        args.resume = True
    recipe = train_base.Recipe(**{"seed": args.seed, **overrides, "unet_steps": args.unet_steps})
    train_base.train(args.run, recipe, resume=args.resume, changes=changes)
    print(f"training reached its step targets; export with: conceptkit shapes train-base --run {args.run} "
          f"--export-to DIR")
