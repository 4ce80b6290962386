"""`conceptkit generate`: text-to-image with the learned concepts (embeddings, LoRAs, a PromptNet's image word)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..profusion.fusion_config import START_TIMESTEP, default_text
from . import options as o
from .options import add_model, add_sampling

start_timestep = o.number(START_TIMESTEP)


def register(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image: PNGs plus a grid")
    add_model(p)
    p.add_argument("--prompt", type=o.prompt, action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", type=o.path, help="a text file, one prompt per line")
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=o.seed, default=0)
    p.add_argument("--num-images", type=o.count, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--height", type=o.size)
    p.add_argument("--width", type=o.size)
    p.add_argument("--low-memory", action="store_true",
                   help="VAE tiling and slicing, one image per batch (automatic above 4x the "
                        "model's native pixel count, e.g. over 1024x1024 on SD 1.5)")
    add_sampling(p, guidance=None, guidance_help="classifier-free guidance scale (default 7.5); with "
                 f"--promptnet/--image it is ProFusion's w1 ({default_text('guidance_scale')})")
    p.add_argument("--embedding", type=o.path, action="append", metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (diffusers, AUTOMATIC1111, kohya); repeatable")
    p.add_argument("--lora", type=o.path, action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA file or `learn lora` folder (diffusers or kohya layout), at WEIGHT (default 1); "
                        "repeatable")
    p.add_argument("--lora-end", type=o.share, default=1.0,
                   help="the LoRAs' UNet layers act on this first share of the steps, the base UNet after it "
                        "(diffusers' control_guidance_end rule; default 1: every step)")
    g = p.add_argument_group("ProFusion (ALGORITHMS.md §3.6): the image's word S* in the prompt")
    g.add_argument("--promptnet", type=o.path, help="a PromptNet folder (`learn promptnet`, `convert promptnet`) or an "
                                                    "official ProFusion checkpoint, converted in memory (default with "
                                                    "--image: the bundled one)")
    g.add_argument("--image", type=o.path, help="the reference image (default: the one a fine-tuned PromptNet was tuned on)")
    g.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=True,
                   help="fusion sampling (default; the PromptNet folder's recommended settings, else the notebook's),"
                        " or plain sampling with S* (--no-fusion: CFG 5, no reference prompt)")
    g.add_argument("--refine-steps", type=o.count_or_zero,
                   help=f"fusion sub-steps per step, m ({default_text('refine_steps')})")
    g.add_argument("--refine-eta", type=o.eta,
                   help=f"η of the fusion sub-step, in [0, sqrt(2)] ({default_text('refine_eta')})")
    g.add_argument("--refine-emb-scale", type=o.small_weight,
                   help=f"λ: S* output scale in the fusion sub-step ({default_text('refine_emb_scale')})")
    g.add_argument("--emb-scale", type=o.small_weight,
                   help=f"s: S* output scale in the main step, > 1 emphasises the image's word against the prompt's "
                        f"other words ({default_text('emb_scale')})")
    g.add_argument("--refine-guidance", type=o.guidance_scale,
                   help=f"w_f: guidance in the fusion sub-step ({default_text('refine_guidance_scale')})")
    g.add_argument("--ref-guidance-scale", type=o.guidance_scale,
                   help=f"w2: guidance of the reference prompt ({default_text('ref_guidance_scale')})")
    g.add_argument("--class-word", type=o.name, help="the reference prompt is the prompt with S* replaced by this (default 'object')")
    g.add_argument("--ref-prompt", type=o.prompt, help="the reference prompt, given whole")
    g.add_argument("--placeholder", type=o.name, help="the word that stands for the image in the prompt (default S*)")
    g.add_argument("--extra-image", type=o.text("FILE[:WEIGHT]"), action="append", metavar="FILE[:WEIGHT]",
                   help="another image of the concept, at WEIGHT (default 1): its S* joins the fusion sub-step's "
                        "output (weights w1 and WEIGHT) and adds WEIGHT x its guidance to the main step; repeatable")
    g.add_argument("--start-timestep", type=start_timestep, metavar="T",
                   help="start from the reference noised to timestep T (1-999) and sample only t <= T: the "
                        "reference's layout stays (the official code's `st`; DDIM only; default: pure noise)")
    g = p.add_argument_group("speed (opt-in: they change the images or cost a warm-up; benchmarks/generate_speed.py)")
    g.add_argument("--bf16", action="store_true", help="the UNet under bf16 autocast (GPUs; CPUs with avx512_bf16 or "
                                                       "AMX): faster, images within a few pixel levels")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet: minutes of warm-up on a CPU, then "
                                                          "faster steps, the same images (long runs)")
    p.add_argument("--out", type=o.path, default="outputs/generate")
    p.set_defaults(func=run, several_processes=True, writes=("out",))


def run(args) -> None:
    from ..generate.prompts import read_prompt_file
    from ..learn.distributed import launched_processes, process_device, processes
    from ..models.loading import load_pipeline, resolve_model

    # the option checks come before torch and diffusers load (seconds): a mistake is told at once
    prompts = list(args.prompt or [])
    extra_images = [extra_image_spec(spec) for spec in args.extra_image or []]
    if (extra_images or args.start_timestep is not None) and not (args.promptnet or args.image):
        raise UserError("--extra-image and --start-timestep are ProFusion options: pass --promptnet DIR or "
                        "--image FILE with them")
    if (args.promptnet or args.image) and (args.bf16 or args.compile):
        raise UserError("--bf16 and --compile apply to plain sampling: leave them out with --promptnet/--image")
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    if (args.promptnet or args.image) and args.lora_end != 1:
        raise UserError("--lora-end works with plain sampling: leave it out with --promptnet/--image")
    if (args.promptnet or args.image) and launched_processes() > 1:
        raise UserError("ProFusion generation (--promptnet/--image) runs in one process: launch it without "
                        "accelerate/torchrun")
    resolve_model(args.model, args.config)
    from ..generate.images import generate
    from ..generate.loading import load_embeddings, load_loras

    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    load_embeddings(pipe, args.embedding)
    load_loras(pipe, args.lora)
    if args.promptnet or args.image:
        return generate_with_promptnet(pipe, prompts, args, extra_images)
    out = generate(pipe, prompts, negative_prompt=args.negative_prompt, seed=args.seed, num_images=args.num_images,
                   steps=args.steps, guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
                   scheduler=args.scheduler,
                   height=args.height, width=args.width, out_dir=args.out, low_memory=args.low_memory or None,
                   procs=processes(), bf16=args.bf16, compile=args.compile, lora_end=args.lora_end)
    if processes().main:
        print(f"wrote {len(out.paths)} images to {Path(args.out).resolve()} (grid: {out.grid_path.resolve()})")


def extra_image_spec(spec: str) -> tuple[Path, float]:
    """--extra-image 'FILE' or 'FILE:WEIGHT' (a path that exists as given wins, so a ':' in a file name still
    works); the weight must be a number > 0."""
    import math

    if Path(spec).exists() or ":" not in spec:
        return Path(spec), 1.0
    path, text = spec.rsplit(":", 1)
    try:
        weight = float(text)
    except ValueError:
        weight = float("nan")
    if not (math.isfinite(weight) and weight > 0):  # float() also reads 'nan' and 'inf'
        raise UserError(f"--extra-image {spec}: the weight after ':' must be a number > 0, e.g. {path}:0.5")
    return Path(path), weight


def generate_with_promptnet(pipe, prompts: list[str], args, extra_images: list[tuple[Path, float]] = ()) -> None:
    """ProFusion (ALGORITHMS.md §3.6): the image's word S* in the prompt; fusion sampling unless --no-fusion."""
    from ..models.loading import bundled_promptnet_path
    from ..profusion.sampling import generate_from_image

    given = {"guidance_scale": args.guidance_scale, "ref_guidance_scale": args.ref_guidance_scale,
             "refine_steps": args.refine_steps, "refine_eta": args.refine_eta,
             "refine_emb_scale": args.refine_emb_scale, "refine_guidance_scale": args.refine_guidance,
             "emb_scale": args.emb_scale,
             "class_word": args.class_word, "ref_prompt": args.ref_prompt, "placeholder": args.placeholder,
             "negative_prompt": args.negative_prompt, "start_timestep": args.start_timestep}
    out = generate_from_image(pipe, prompts, promptnet=args.promptnet or bundled_promptnet_path(args.model),
                              image=args.image, fusion=args.fusion, steps=args.steps, scheduler=args.scheduler,
                              seed=args.seed, num_images=args.num_images, out_dir=args.out,
                              extra_images=list(extra_images), **{k: v for k, v in given.items() if v is not None})
    print(f"wrote {len(out.paths)} images to {Path(args.out).resolve()} (grid: {out.grid_path.resolve()})")
