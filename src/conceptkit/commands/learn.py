"""`conceptkit learn ti|lora|promptnet`: the trainers' options and what the commands print."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..learn.lora_config import LoRAConfig
from ..learn.promptnet_config import EMA_DECAY, FinetuneConfig, PretrainConfig
from ..learn.ti_config import TIConfig
from . import options as o
from .options import add_model, add_progress_log, progress_log, refuse_finished_run

TI_DEFAULTS = TIConfig()
LORA_DEFAULTS = LoRAConfig()
PRETRAIN_DEFAULTS = PretrainConfig()
FINETUNE_DEFAULTS = FinetuneConfig()


def register(sub) -> None:
    learn = sub.add_parser("learn", help="teach the model a concept").add_subparsers(dest="learn_command",
                                                                                     required=True)
    p = learn.add_parser("ti", help="Textual Inversion: learn a new token from 3-5 images")
    add_model(p)
    p.add_argument("--images", type=o.path, required=True, help="folder of 3-5 images of the concept")
    p.add_argument("--token", type=o.name, required=True, help="the new pseudo-word, e.g. '<my-cat>'")
    p.add_argument("--init-word", default=TI_DEFAULTS.init_word, help="a one-token word to start from (coarse class); '' for "
                                                        "the vocabulary mean")
    p.add_argument("--vectors", type=o.vectors, default=TI_DEFAULTS.vectors, help="vectors per token")
    p.add_argument("--template", type=o.name, default=TI_DEFAULTS.template, help="object (27), object81, style (19), or a file of templates")
    p.add_argument("--steps", type=o.count, default=TI_DEFAULTS.steps)
    p.add_argument("--lr", type=o.rate, default=TI_DEFAULTS.lr)
    p.add_argument("--scale-lr", action="store_true", help="multiply lr by batch x grad-accum")
    p.add_argument("--batch", type=o.count, default=TI_DEFAULTS.batch)
    p.add_argument("--grad-accum", type=o.count, default=1)
    p.add_argument("--resolution", type=o.size, help="training size (default: the model's native size)")
    p.add_argument("--center-crop", action="store_true", help="crop to a square instead of squashing")
    p.add_argument("--seed", type=o.seed, default=0)
    p.add_argument("--checkpoint-every", type=o.count, default=TI_DEFAULTS.checkpoint_every)
    p.add_argument("--validate-every", type=o.count_or_zero, default=0, help="validation grid every N steps (0: at the end)")
    p.add_argument("--no-validation", action="store_true", help="write no validation grids (quick runs, tests)")
    p.add_argument("--format", choices=["diffusers", "a1111"], default="diffusers",
                   help="a1111 also writes AUTOMATIC1111's .pt layout")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast the frozen models (GPU); the learned vectors stay fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more compute (GPU, 512 px)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_progress_log(p)
    p.add_argument("--out", type=o.path, required=True, help="output folder")
    p.set_defaults(func=run_ti, several_processes=True, writes=("out",))

    p = learn.add_parser("lora", help="DreamBooth-style LoRA: fine-tune low-rank adapters on 3-5 captioned images")
    add_model(p)
    p.add_argument("--images", type=o.path, required=True, help="folder of 3-5 images of the concept (captions: --prompt, or "
                                                   "<image>.txt next to each image)")
    p.add_argument("--prompt", type=o.prompt, default=LORA_DEFAULTS.prompt,
                   help="instance prompt for every image, e.g. 'a photo of zwx circle' ({} = trigger + class word)")
    p.add_argument("--trigger", type=o.name, default=LORA_DEFAULTS.trigger, help="the rare word the captions use for the concept")
    p.add_argument("--class-word", type=o.name, default=LORA_DEFAULTS.class_word, help="the concept's class, e.g. 'circle' "
                                                                          "(validation prompts say 'trigger class')")
    p.add_argument("--description", type=o.prompt, help="the concept in plain words, e.g. 'yellow checkered circle' "
                                                        "(recorded in the file; compose --method text uses it)")
    p.add_argument("--rank", type=o.rank, default=LORA_DEFAULTS.rank)
    p.add_argument("--alpha", type=o.positive, default=LORA_DEFAULTS.alpha, help="LoRA alpha (default: the rank)")
    p.add_argument("--steps", type=o.count, default=LORA_DEFAULTS.steps)
    p.add_argument("--lr", type=o.rate, default=LORA_DEFAULTS.lr)
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=LORA_DEFAULTS.text_encoder,
                   help="also train LoRA on the text encoder's attention")
    p.add_argument("--text-encoder-lr", type=o.rate, default=LORA_DEFAULTS.text_encoder_lr, help="(default: --lr)")
    p.add_argument("--batch", type=o.count, default=LORA_DEFAULTS.batch)
    p.add_argument("--grad-accum", type=o.count, default=LORA_DEFAULTS.grad_accum)
    p.add_argument("--resolution", type=o.size, help="training size (default: the model's native size)")
    p.add_argument("--center-crop", action="store_true", help="crop to a square instead of squashing")
    p.add_argument("--flip-p", type=o.probability, default=LORA_DEFAULTS.flip_p, help="probability of a mirrored image")
    p.add_argument("--seed", type=o.seed, default=LORA_DEFAULTS.seed)
    p.add_argument("--checkpoint-every", type=o.count, default=LORA_DEFAULTS.checkpoint_every)
    p.add_argument("--validate-every", type=o.count_or_zero, default=0, help="validation grid every N steps (0: at the end)")
    p.add_argument("--no-validation", action="store_true", help="write no validation grids (quick runs, tests)")
    p.add_argument("--validation-prompt", type=o.prompt, action="append",
                   help="repeatable; {} = trigger + class word (default: 'a photo of {}')")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast the models (GPU); the LoRA weights stay fp32")
    p.add_argument("--latents", choices=["sample", "mean"], default=LORA_DEFAULTS.latents,
                   help="train on z ~ q(z|x) (sample, diffusers) or its mean (for base models trained on means, "
                        "such as the bundled one)")
    p.add_argument("--embedding", type=o.path, help="pivotal tuning: the trigger's word vector, learned first with "
                   "`learn ti --token TRIGGER` (pass its --out folder or file and the same --trigger); fixed while "
                   "the LoRA trains and bundled into the LoRA file, as AUTOMATIC1111/kohya do")
    p.add_argument("--pivotal-steps", type=o.count_or_zero, default=0,
                   help="pivotal tuning in one run: first learn the --trigger (a new token, e.g. '<sks>') as a word "
                        "for N Textual Inversion steps into OUT/word/, then the LoRA with it (600 for the bundled "
                        "model's concept LoRAs; 0: off)")
    p.add_argument("--pivotal-init", type=o.prompt, help="--pivotal-steps: the word(s) the trigger starts from, one "
                   "vector per word (default: --class-word)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_progress_log(p)
    p.add_argument("--out", type=o.path, required=True, help="output folder")
    p.set_defaults(func=run_lora, several_processes=True, writes=("out",))

    p = learn.add_parser("promptnet", help="ProFusion's PromptNet: --pretrain on a domain, or --finetune on one image")
    add_model(p)
    p.add_argument("--pretrain", action="store_true", help="domain pre-training on --images DIR (ALGORITHMS.md §3.4)")
    p.add_argument("--finetune", action="store_true", help="fine-tune on one --image FILE (§3.5)")
    p.add_argument("--images", type=o.path, help="--pretrain: a folder of images of the domain")
    p.add_argument("--image", type=o.path, help="--finetune: the image of the concept")
    p.add_argument("--promptnet", type=o.path, help="--finetune: the pre-trained PromptNet folder (default: the bundled one)")
    p.add_argument("--image-encoder", type=o.path, help="--pretrain: a local transformers CLIPVisionModel folder for the context "
                                           "tokens (default: the VAE-latent patch encoder of the bundled model)")
    p.add_argument("--steps", type=o.count, help=f"default {PRETRAIN_DEFAULTS.steps} (pretrain), {FINETUNE_DEFAULTS.steps} (finetune)")
    p.add_argument("--lr", type=o.rate, help=f"default {PRETRAIN_DEFAULTS.lr} (pretrain), {FINETUNE_DEFAULTS.lr} (finetune)")
    p.add_argument("--batch", type=o.count, help=f"default {PRETRAIN_DEFAULTS.batch} (pretrain), {FINETUNE_DEFAULTS.batch} (finetune)")
    p.add_argument("--grad-accum", type=o.count, default=1)
    p.add_argument("--l2-reg", type=o.weight, default=0.0, help="λ·mean(S*²) (default 0: the official regularisation-free objective)")
    p.add_argument("--prefix", type=o.prompt, default=PRETRAIN_DEFAULTS.prefix, help="training prompt before S*")
    p.add_argument("--pad-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="pad the training prompt like inference does (default: no, the official 6 tokens; "
                        "--finetune: as the PromptNet was pre-trained)")
    p.add_argument("--latents", choices=["sample", "mean"],
                   help="z ~ q(z|x) (default, official) or its mean (for a UNet trained on means, like the bundled "
                        "one); --finetune default: as pre-trained")
    p.add_argument("--flip-p", type=o.probability, default=0.0, help="--pretrain: probability of a mirrored image")
    p.add_argument("--crop", choices=["squash", "center", "random"],
                   help="--pretrain: how a non-square image becomes square: squash it (default), its centre square "
                        "(the official --center_crop), or a random square at every step after resizing its shorter "
                        "side (the official default)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="--pretrain: autocast the loss's forward in bf16 (GPUs, and CPUs) or fp16 (with a loss scaler, "
                        "as the official command's Accelerate); PromptNet's weights and Adam stay fp32 (default no)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="--pretrain: PromptNet's and the UNet's blocks recompute their activations in backward: "
                        "less memory, more compute (the official command uses it)")
    p.add_argument("--ema-decay", type=o.number(EMA_DECAY),
                   help="--pretrain: keep an EMA of PromptNet's weights with this decay (train.py --use_ema: 0.9999); "
                        "validation, the saved folder and --export-to use it (default: none)")
    p.add_argument("--captions", choices=["none", "scene"],
                   help="--pretrain: the training prompt: none, --prefix S* for every image (default, official); "
                        "scene, each image's own scene caption with its object as S* ('a large S* on the left, on a "
                        "brown background'), from the folder's metadata.jsonl (`conceptkit shapes sample --p-pair 0`); a line "
                        "naming a 'reference' file has PromptNet read that image (--reference-pairs)")
    p.add_argument("--init-from", type=o.path,
                   help="--pretrain: start from the weights (and image encoder) of an exported pre-trained PromptNet "
                        "folder, with a fresh optimizer (e.g. one written by --export-to); pass it again with --resume")
    p.add_argument("--augment", default=FINETUNE_DEFAULTS.augment, choices=["none", "flip", "affine"],
                   help="--finetune: the mini dataset's augmentation")
    p.add_argument("--copies", type=o.count, default=FINETUNE_DEFAULTS.copies, help="--finetune: mini dataset size")
    p.add_argument("--caption", type=o.caption,
                   help="--finetune: the image's caption with S* for the object ('a large S* on the left, on a brown "
                        "background'; mirrored copies swap left and right) instead of --prefix S*; suits a "
                        "PromptNet pre-trained with --captions scene")
    p.add_argument("--unet-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="--finetune: also train the UNet's to_q/to_k/to_v (default yes, as the paper)")
    p.add_argument("--seed", type=o.seed, default=0)
    p.add_argument("--checkpoint-every", type=o.count)
    p.add_argument("--validate-every", type=o.count_or_zero, help="validation grid every N steps (0: at the end)")
    p.add_argument("--no-validation", action="store_true", help="--pretrain: write no validation grids")
    p.add_argument("--threads", type=o.threads, help="CPU threads (1 leaves a core for other work)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_progress_log(p)
    p.add_argument("--export-to", type=o.path, help="write the latest checkpoint of the pre-training run in --out as a PromptNet "
                                       "folder here, and stop (works while the run goes on)")
    p.add_argument("--export-dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--out", type=o.path, required=True, help="output folder")
    p.set_defaults(func=run_promptnet, writes=promptnet_writes)


def promptnet_writes(args) -> list[str]:
    """--export-to reads a run that may still be going on: only the export folder is locked then."""
    return [args.export_to] if args.export_to else [args.out]


def announce_validation(images: int, resolution: int | None, validate_every: int, sampler: str = "25 DDIM steps"
                        ) -> None:
    """The run's first line, on stderr: what validation will cost and how to skip it (it can outlast a short
    training run on a CPU)."""
    import sys

    from ..learn.distributed import processes

    if not processes().main:
        return
    size = f"{resolution}x{resolution} px" if resolution else "the training resolution (the model's native size)"
    when = f"every {validate_every} steps and after the last one" if validate_every else "after the last step"
    print(f"validation: {images} image(s) at {size}, {sampler} each, {when}; skip it with --no-validation",
          file=sys.stderr, flush=True)


def check_before_loading(args) -> None:
    """What a training command can refuse before torch and diffusers load (seconds): the model and image folder."""
    from ..learn.images import image_files
    from ..models.loading import resolve_model

    resolve_model(args.model, args.config)
    image_files(args.images)


def run_ti(args) -> None:
    refuse_finished_run(args.out, args.resume, "learned_embeds.safetensors")
    check_before_loading(args)

    cfg = TIConfig(token=args.token, init_word=args.init_word or None, vectors=args.vectors, template=args.template,
                   steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, batch=args.batch, grad_accum=args.grad_accum,
                   resolution=args.resolution, center_crop=args.center_crop, seed=args.seed,
                   checkpoint_every=args.checkpoint_every, validate_every=args.validate_every, fmt=args.format,
                   mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                   **({"validation_prompts": ()} if args.no_validation else {}))
    if cfg.validation_prompts:
        announce_validation(len(cfg.validation_prompts) * cfg.validation_seeds, cfg.resolution, cfg.validate_every)
    from ..learn.distributed import process_device, processes
    from ..learn.textual_inversion import learn_textual_inversion
    from ..models.loading import load_pipeline

    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    result = learn_textual_inversion(pipe, args.images, args.out, cfg, model_name=args.model, resume=args.resume,
                                     on_step=progress_log(args, cfg.steps))
    if processes().main:
        print(f"learned {cfg.token} in {result.seconds:.0f} s (final loss {result.losses[-1]:.4f}); wrote "
          f"{result.out_dir / 'learned_embeds.safetensors'}; use it with: conceptkit generate --model {args.model} "
          f"--embedding {result.out_dir} --prompt 'a photo of {cfg.token}'")


def run_lora(args) -> None:
    refuse_finished_run(args.out, args.resume, "pytorch_lora_weights.safetensors")
    check_before_loading(args)

    cfg = LoRAConfig(trigger=args.trigger, class_word=args.class_word or None, description=args.description,
                     prompt=args.prompt, rank=args.rank,
                     alpha=args.alpha, steps=args.steps, lr=args.lr, text_encoder=args.text_encoder,
                     text_encoder_lr=args.text_encoder_lr, batch=args.batch, grad_accum=args.grad_accum,
                     resolution=args.resolution, center_crop=args.center_crop, flip_p=args.flip_p, seed=args.seed,
                     checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
                     validation_prompts=() if args.no_validation else tuple(args.validation_prompt)
                     if args.validation_prompt is not None else LORA_DEFAULTS.validation_prompts,
                     mixed_precision=args.mixed_precision, latents=args.latents,
                     embedding=None if args.embedding is None else str(args.embedding))
    if args.pivotal_steps and args.embedding is not None:
        raise UserError("--embedding and --pivotal-steps both give the trigger's word: pass one of them")
    if args.pivotal_init is not None and not args.pivotal_steps:
        raise UserError("--pivotal-init: the start of a word learned with --pivotal-steps N; pass that too")
    if args.embedding is not None and not Path(args.embedding).exists():
        raise UserError(f"--embedding {args.embedding} does not exist: pass the --out folder (or the file) of a "
                        f"`conceptkit learn ti --token '{cfg.trigger}'` run")
    if cfg.validation_prompts:
        announce_validation(len(cfg.validation_prompts) * cfg.validation_seeds, cfg.resolution, cfg.validate_every)
    from ..learn.distributed import process_device, processes
    from ..learn.lora import learn_lora
    from ..models.loading import load_pipeline

    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    if args.pivotal_steps:
        from ..learn.pivotal import learn_pivotal_lora

        result = learn_pivotal_lora(pipe, args.images, args.out, cfg, args.pivotal_steps, args.pivotal_init,
                                    model_name=args.model, resume=args.resume, on_step=progress_log(args, cfg.steps))
    else:
        result = learn_lora(pipe, args.images, args.out, cfg, model_name=args.model, resume=args.resume,
                            on_step=progress_log(args, cfg.steps))
    final = f"final loss {result.losses[-1]:.4f}; " if result.losses else ""
    if processes().main:
        print(f"learned LoRA '{cfg.trigger}' in {result.seconds:.0f} s ({final}wrote {result.path}); use it with: "
          f"conceptkit generate --model {args.model} --lora {result.out_dir} --prompt 'a photo of {cfg.phrase}'")


def run_promptnet(args) -> None:
    from ..models.loading import load_pipeline

    if args.export_to:
        from ..learn.promptnet import export_pretrain_checkpoint
        from ..models.loading import load_pipeline

        pipe = load_pipeline(args.model, config=args.config, device=args.device)
        import torch

        dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.export_dtype]
        path = export_pretrain_checkpoint(pipe, args.out, args.export_to, dtype, model_name=args.model)
        print(f"wrote the latest checkpoint of {args.out} as a PromptNet folder: {path}")
        return
    if args.pretrain == args.finetune:
        raise UserError("pass exactly one of --pretrain (with --images DIR) or --finetune (with --image FILE)")
    if args.pretrain and not args.images:
        raise UserError("--pretrain needs --images DIR, a folder of images of the domain")
    if args.finetune and not args.image:
        raise UserError("--finetune needs --image FILE, the one image of the concept")
    if args.pretrain and args.caption is not None:
        raise UserError("--caption: a --finetune option (pre-training takes each image's caption with --captions "
                        "scene): leave it out with --pretrain")
    pretrain_only = [name for name, given in (("--crop", args.crop is not None),
                                              ("--mixed-precision", args.mixed_precision is not None),
                                              ("--gradient-checkpointing", args.gradient_checkpointing),
                                              ("--ema-decay", args.ema_decay is not None),
                                              ("--captions", args.captions is not None),
                                              ("--init-from", args.init_from is not None)) if given]
    if args.finetune and pretrain_only:
        raise UserError(f"{', '.join(pretrain_only)}: --pretrain options (fine-tuning is 100 short steps): leave "
                        "them out with --finetune")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, config=args.config, device=args.device)
    if args.pretrain:
        from ..learn.promptnet import pretrain_promptnet

        d = PRETRAIN_DEFAULTS
        cfg = PretrainConfig(steps=args.steps or d.steps, lr=args.lr or d.lr, batch=args.batch or d.batch,
                             grad_accum=args.grad_accum, l2_reg=args.l2_reg, prefix=args.prefix,
                             pad_prompt=bool(args.pad_prompt), latents=args.latents or "sample", flip_p=args.flip_p,
                             seed=args.seed,
                             checkpoint_every=args.checkpoint_every or d.checkpoint_every,
                             validate_every=d.validate_every if args.validate_every is None else args.validate_every,
                             mixed_precision=args.mixed_precision or d.mixed_precision, crop=args.crop or d.crop,
                             gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay,
                             captions=args.captions or d.captions,
                             init_from=str(args.init_from) if args.init_from else None,
                             **({"validation_prompts": ()} if args.no_validation else {}))
        if cfg.validation_prompts and cfg.validation_images:
            announce_validation(cfg.validation_images * len(cfg.validation_prompts), cfg.resolution,
                                cfg.validate_every)
        encoder = None
        if args.image_encoder:
            from ..profusion.image_encoders import ClipVisionEncoder

            encoder = ClipVisionEncoder(args.image_encoder, device=pipe.unet.device)
        result = pretrain_promptnet(pipe, args.images, args.out, cfg, image_encoder=encoder, model_name=args.model,
                                    resume=args.resume, on_step=progress_log(args, cfg.steps))
        print(f"pre-trained PromptNet in {result.seconds:.0f} s (loss over the last 100 steps "
              f"{sum(result.losses[-100:]) / max(len(result.losses[-100:]), 1):.4f}); wrote {result.out_dir}; "
              f"fine-tune it with: conceptkit learn promptnet --finetune --promptnet {result.out_dir} "
              "--image IMAGE --out OUT")
        return
    from ..learn.promptnet import finetune_promptnet
    from ..models.loading import bundled_promptnet_path
    from ..profusion.saved import load_promptnet

    d = FINETUNE_DEFAULTS
    cfg = FinetuneConfig(steps=args.steps or d.steps, lr=args.lr or d.lr, batch=args.batch or d.batch,
                         grad_accum=args.grad_accum, l2_reg=args.l2_reg, prefix=args.prefix, augment=args.augment,
                         copies=args.copies, train_unet_attention=args.unet_attention, seed=args.seed,
                         caption=args.caption, pad_prompt=args.pad_prompt, latents=args.latents,
                         checkpoint_every=args.checkpoint_every or d.checkpoint_every,
                         validate_every=d.validate_every if args.validate_every is None else args.validate_every)
    pretrained = load_promptnet(args.promptnet or bundled_promptnet_path(args.model), pipe)
    result = finetune_promptnet(pipe, pretrained, args.image, args.out, cfg, model_name=args.model,
                                resume=args.resume, on_step=progress_log(args, cfg.steps))
    print(f"fine-tuned PromptNet on {args.image} in {result.seconds:.1f} s; wrote {result.out_dir}; use it with: "
          f"conceptkit generate --model {args.model} --promptnet {result.out_dir} --prompt 'S* on a navy background'")
