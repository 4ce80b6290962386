"""`conceptkit`: one command, sub-commands per job. Errors meant for the user print one line and exit with code 2."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .errors import UserError
from .learn.lora_config import LoRAConfig
from .learn.promptnet_config import FinetuneConfig, PretrainConfig
from .learn.ti_config import TIConfig

TI_DEFAULTS = TIConfig()
LORA_DEFAULTS = LoRAConfig()
PRETRAIN_DEFAULTS = PretrainConfig()
FINETUNE_DEFAULTS = FinetuneConfig()


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy",
                   help="'toy' (bundled), a diffusers folder, a .safetensors/.ckpt file (with --config), "
                        "or a hub id already in the local Hugging Face cache")
    p.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder (or cached hub id) "
                                    "whose configs describe it")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")


def _add_sampling(p: argparse.ArgumentParser, steps: int = 30, guidance: float = 7.5) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--guidance-scale", type=float, default=guidance)
    p.add_argument("--scheduler", default="ddim", help="ddim, dpm++, euler, euler-a, pndm")


def cmd_generate(args) -> None:
    from .generate.images import generate, read_prompt_file
    from .models.loading import load_pipeline

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    from .learn.distributed import launched_processes, process_device, processes

    if (args.promptnet or args.image) and launched_processes() > 1:
        raise UserError("ProFusion generation (--promptnet/--image) runs in one process: launch it without "
                        "accelerate/torchrun")
    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    load_embeddings(pipe, args.embedding)
    load_loras(pipe, args.lora)
    if args.promptnet or args.image:
        return generate_with_promptnet(pipe, prompts, args)
    out = generate(pipe, prompts, negative_prompt=args.negative_prompt, seed=args.seed, num_images=args.num_images,
                   steps=args.steps, guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
                   scheduler=args.scheduler,
                   height=args.height, width=args.width, out_dir=args.out, low_memory=args.low_memory or None,
                   procs=processes())
    if processes().main:
        print(f"wrote {len(out.paths)} images to {Path(args.out).resolve()} (grid: {out.grid_path.resolve()})")


def generate_with_promptnet(pipe, prompts: list[str], args) -> None:
    """ProFusion (ALGORITHMS.md §3.6): the image's word S* in the prompt; fusion sampling unless --no-fusion."""
    from .learn.images import load_reference_image
    from .models.loading import bundled_promptnet_path
    from .profusion.sampling import FusionConfig, generate_profusion, recommended_fusion
    from .profusion.saved import load_promptnet

    saved = load_promptnet(args.promptnet or bundled_promptnet_path(args.model), pipe)
    image = args.image or saved.reference_path
    if image is None:
        raise UserError(f"no reference image: pass --image FILE (the PromptNet in {saved.folder} was not "
                        "fine-tuned on one)")
    base = recommended_fusion(saved) if args.fusion else FusionConfig.plain()
    given = {"guidance_scale": args.guidance_scale, "ref_guidance_scale": args.ref_guidance_scale,
             "refine_steps": args.refine_steps, "refine_eta": args.refine_eta,
             "refine_emb_scale": args.refine_emb_scale, "refine_guidance_scale": args.refine_guidance,
             "class_word": args.class_word, "ref_prompt": args.ref_prompt, "placeholder": args.placeholder,
             "negative_prompt": args.negative_prompt}
    from dataclasses import replace

    cfg = replace(base, steps=args.steps, scheduler=args.scheduler, **{k: v for k, v in given.items() if v is not None})
    reference = load_reference_image(image, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    out = generate_profusion(pipe, saved, reference, prompts, cfg, seed=args.seed, num_images=args.num_images,
                             out_dir=args.out)
    print(f"wrote {len(out.paths)} images to {Path(args.out).resolve()} (grid: {out.grid_path.resolve()})")


def load_embeddings(pipe, specs: list[str] | None) -> None:
    from .models.embeddings import add_embedding, read_embedding, split_spec

    for spec in specs or []:
        path, token = split_spec(spec)
        embedding = read_embedding(path, token)
        add_embedding(pipe, embedding)
        print(f"loaded {embedding.token} ({embedding.vectors.shape[0]} vector(s), {embedding.layout} layout) "
              f"from {path}", file=sys.stderr)


def split_lora_spec(spec: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:WEIGHT' (a path that exists as given wins, so a ':' inside a file name still works)."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), 1.0
    path, weight = spec.rsplit(":", 1)
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):  # float() also reads 'nan' and 'inf', which would silently ruin every image
        raise UserError(f"--lora {spec}: the weight after ':' must be a number, e.g. {path}:0.8") from None
    return Path(path), value


def load_loras(pipe, specs: list[str] | None) -> None:
    from .models.lora import adapter_name_for, load_lora, loaded_adapters

    names, weights = [], []
    for spec in specs or []:
        path, weight = split_lora_spec(spec)
        name = adapter_name_for(path, loaded_adapters(pipe))
        info = load_lora(pipe, path, name)
        names.append(name)
        weights.append(weight)
        trigger = f", trigger '{info.trigger}'" if info.trigger else ""
        print(f"loaded LoRA {path} as '{name}' at weight {weight:g} (rank {info.rank or '?'}{trigger})",
              file=sys.stderr)
    if names:
        pipe.set_adapters(names, weights)


def progress_log(args, total: int):
    """--progress-log FILE: an on_step(step, loss) callback appending one JSON line per step ({"step", "total",
    "loss", "seconds"}), flushed at once, so another process (the web UI) can follow the run; None without it."""
    if not getattr(args, "progress_log", None):
        return None
    import time

    path = Path(args.progress_log)
    path.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "total": total, "loss": round(loss, 6),
                                "seconds": round(time.perf_counter() - began, 3)}) + "\n")
    return on_step


def refuse_finished_run(out: str, resume: bool, result_file: str) -> None:
    """A finished run whose checkpoints were deleted would be overwritten silently: refuse (the trainers refuse a run
    that still has checkpoints)."""
    if not resume and (Path(out) / result_file).exists() and not any((Path(out) / "checkpoints").glob("step-*")):
        raise UserError(f"{out} already holds a finished run ({result_file}): pass a new --out folder (nothing in "
                        f"{out} was changed)")


def cmd_learn_ti(args) -> None:
    from .learn.textual_inversion import learn_textual_inversion
    from .models.loading import load_pipeline

    refuse_finished_run(args.out, args.resume, "learned_embeds.safetensors")

    cfg = TIConfig(token=args.token, init_word=args.init_word or None, vectors=args.vectors, template=args.template,
                   steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, batch=args.batch, grad_accum=args.grad_accum,
                   resolution=args.resolution, center_crop=args.center_crop, seed=args.seed,
                   checkpoint_every=args.checkpoint_every, validate_every=args.validate_every, fmt=args.format,
                   mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                   **({"validation_prompts": ()} if args.no_validation else {}))
    from .learn.distributed import process_device, processes

    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    result = learn_textual_inversion(pipe, args.images, args.out, cfg, model_name=args.model, resume=args.resume,
                                     on_step=progress_log(args, cfg.steps))
    if processes().main:
        print(f"learned {cfg.token} in {result.seconds:.0f} s (final loss {result.losses[-1]:.4f}); wrote "
          f"{result.out_dir / 'learned_embeds.safetensors'}; use it with: conceptkit generate --model {args.model} "
          f"--embedding {result.out_dir} --prompt 'a photo of {cfg.token}'")


def cmd_learn_lora(args) -> None:
    from .learn.lora import learn_lora
    from .models.loading import load_pipeline

    refuse_finished_run(args.out, args.resume, "pytorch_lora_weights.safetensors")

    cfg = LoRAConfig(trigger=args.trigger, class_word=args.class_word or None, prompt=args.prompt, rank=args.rank,
                     alpha=args.alpha, steps=args.steps, lr=args.lr, text_encoder=args.text_encoder,
                     text_encoder_lr=args.text_encoder_lr, batch=args.batch, grad_accum=args.grad_accum,
                     resolution=args.resolution, center_crop=args.center_crop, flip_p=args.flip_p, seed=args.seed,
                     checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
                     validation_prompts=() if args.no_validation else tuple(args.validation_prompt)
                     if args.validation_prompt is not None else LORA_DEFAULTS.validation_prompts,
                     mixed_precision=args.mixed_precision)
    from .learn.distributed import process_device, processes

    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    result = learn_lora(pipe, args.images, args.out, cfg, model_name=args.model, resume=args.resume,
                        on_step=progress_log(args, cfg.steps))
    final = f"final loss {result.losses[-1]:.4f}; " if result.losses else ""
    if processes().main:
        print(f"learned LoRA '{cfg.trigger}' in {result.seconds:.0f} s ({final}wrote {result.path}); use it with: "
          f"conceptkit generate --model {args.model} --lora {result.out_dir} --prompt 'a photo of {cfg.phrase}'")


def cmd_learn_promptnet(args) -> None:
    from .models.loading import load_pipeline

    if args.export_to:
        from .learn.promptnet import export_pretrain_checkpoint
        from .models.loading import load_pipeline

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
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, config=args.config, device=args.device)
    if args.pretrain:
        from .learn.promptnet import pretrain_promptnet

        d = PRETRAIN_DEFAULTS
        cfg = PretrainConfig(steps=args.steps or d.steps, lr=args.lr or d.lr, batch=args.batch or d.batch,
                             grad_accum=args.grad_accum, l2_reg=args.l2_reg, prefix=args.prefix,
                             pad_prompt=bool(args.pad_prompt), latents=args.latents or "sample", flip_p=args.flip_p,
                             seed=args.seed,
                             checkpoint_every=args.checkpoint_every or d.checkpoint_every,
                             validate_every=d.validate_every if args.validate_every is None else args.validate_every)
        encoder = None
        if args.image_encoder:
            from .profusion.image_encoders import ClipVisionEncoder

            encoder = ClipVisionEncoder(args.image_encoder, device=pipe.unet.device)
        result = pretrain_promptnet(pipe, args.images, args.out, cfg, image_encoder=encoder, model_name=args.model,
                                    resume=args.resume, on_step=progress_log(args, cfg.steps))
        print(f"pre-trained PromptNet in {result.seconds:.0f} s (loss over the last 100 steps "
              f"{sum(result.losses[-100:]) / max(len(result.losses[-100:]), 1):.4f}); wrote {result.out_dir}; "
              f"fine-tune it with: conceptkit learn promptnet --finetune --promptnet {result.out_dir} "
              "--image IMAGE --out OUT")
        return
    from .learn.promptnet import finetune_promptnet
    from .models.loading import bundled_promptnet_path
    from .profusion.saved import load_promptnet

    d = FINETUNE_DEFAULTS
    cfg = FinetuneConfig(steps=args.steps or d.steps, lr=args.lr or d.lr, batch=args.batch or d.batch,
                         grad_accum=args.grad_accum, l2_reg=args.l2_reg, prefix=args.prefix, augment=args.augment,
                         copies=args.copies, train_unet_attention=args.unet_attention, seed=args.seed,
                         pad_prompt=args.pad_prompt, latents=args.latents,
                         checkpoint_every=args.checkpoint_every or d.checkpoint_every,
                         validate_every=d.validate_every if args.validate_every is None else args.validate_every)
    pretrained = load_promptnet(args.promptnet or bundled_promptnet_path(args.model), pipe)
    result = finetune_promptnet(pipe, pretrained, args.image, args.out, cfg, model_name=args.model,
                                resume=args.resume, on_step=progress_log(args, cfg.steps))
    print(f"fine-tuned PromptNet on {args.image} in {result.seconds:.1f} s; wrote {result.out_dir}; use it with: "
          f"conceptkit generate --model {args.model} --promptnet {result.out_dir} --prompt 'S* on a navy background'")


def cmd_ui(args) -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: machines may have no network
    try:
        from .ui.app import serve
    except ModuleNotFoundError as e:
        if e.name not in ("gradio", "pandas"):
            raise
        raise UserError(f"the web UI needs {e.name}: pip install 'conceptkit[ui]'") from None

    serve(host=args.host, port=args.port, model=args.model, work=args.work, models_dir=args.models_dir,
          token=args.token or os.environ.get("CONCEPTKIT_UI_TOKEN"), max_upload_mb=args.max_upload_mb)


def cmd_demo(args) -> None:
    from .report.demo import run_demo
    from .report.steps import shell

    command = shell(["conceptkit", "demo", "--out", args.out] + ["--quick"] * args.quick + ["--fresh"] * args.fresh)
    index = run_demo(args.out, quick=args.quick, fresh=args.fresh, command=command)
    print(f"wrote {index.resolve()}")


def cmd_report(args) -> None:
    from .report.evaluations import write_report
    from .report.steps import shell

    index = write_report(args.json_files, args.out, shell(["conceptkit", "report", *args.json_files, "--out", args.out]))
    print(f"wrote {index.resolve()}")


def cmd_info(args) -> None:
    import diffusers
    import peft
    import torch
    import transformers

    from . import __version__
    from .models.loading import bundled_model_path

    bundled = bundled_model_path()
    print(json.dumps({
        "conceptkit": __version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_devices": torch.cuda.device_count(),
        "cpu_threads": torch.get_num_threads(),
        "bundled_model": str(bundled),
        "bundled_model_present": (bundled / "model_index.json").exists(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }, indent=2))


def cmd_shapes_sample(args) -> None:
    from .shapes.dataset import scenes, write_image_folder

    items = scenes(args.n, seed=args.seed, held_out=args.held_out, p_pair=args.p_pair)
    out = write_image_folder(args.out, items, seed=args.seed)
    print(f"wrote {len(items)} images and {out / 'metadata.jsonl'}")


def cmd_shapes_read(args) -> None:
    from PIL import Image, UnidentifiedImageError

    from .shapes import oracle

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


def cmd_shapes_train_base(args) -> None:
    import torch

    from .shapes import train_base

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export_to:
        path = train_base.export(Path(args.run), Path(args.export_to))
        print(f"exported {path}")
        return
    overrides = train_base.parse_overrides(args.set or [])
    if overrides and args.resume:
        raise UserError("--set changes a new run's recipe; a resumed run keeps its own (only --unet-steps may rise)")
    if args.init_from:
        train_base.seed_run_from_export(args.run, args.init_from, overrides)
        args.resume = True
    recipe = train_base.Recipe(**{"seed": args.seed, **overrides, "unet_steps": args.unet_steps})
    train_base.train(args.run, recipe, resume=args.resume)
    print(f"training reached its step targets; export with: conceptkit shapes train-base --run {args.run} "
          f"--export-to DIR")


def cmd_evaluate_base(args) -> None:
    from .evaluate.base import evaluate_base, table, write_json
    from .learn.distributed import process_device, processes
    from .models.loading import load_pipeline

    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    results = evaluate_base(pipe, seeds=args.seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                            scheduler=args.scheduler, image_dir=args.images, procs=processes(), split=args.split)
    if not processes().main:
        return
    results["model"] = args.model
    print(table(results))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")


def cmd_evaluate_ti(args) -> None:
    from .evaluate.base import write_json
    from .evaluate.ti import evaluate_ti, table
    from .shapes.concepts import CONCEPTS, by_name

    try:
        concepts = [by_name(n) for n in args.concepts.split(",")] if args.concepts else list(CONCEPTS)
    except KeyError as e:
        raise UserError(f"unknown concept {e}: pass some of {', '.join(c.name for c in CONCEPTS)}") from None
    cfg = TIConfig(steps=args.ti_steps, lr=args.lr, batch=args.batch, vectors=args.vectors,
                   init_word=args.init_word or None, seed=args.seed)
    results = evaluate_ti(args.model, cfg, concepts=concepts, seeds=args.seeds, out_dir=args.out)
    print(table(results))
    print(f"picture grid: {Path(args.out) / 'grid.png'}")
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")


def cmd_evaluate_oracle(args) -> None:
    from .evaluate.oracle_accuracy import oracle_accuracy, table
    from .models.loading import load_pipeline

    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True)
    else:
        vae = load_pipeline(args.model, config=args.config, device=args.device).vae if args.model else None
    results = oracle_accuracy(args.n, vae)
    print(table(results))
    if args.json:
        from .evaluate.base import write_json

        write_json(results, args.json)


def compose_config(args):
    from dataclasses import fields

    from .compose.config import CLoRAConfig

    values = {f.name: getattr(args, f.name) for f in fields(CLoRAConfig) if getattr(args, f.name, None) is not None}
    if "iterative_steps" in values:
        try:
            values["iterative_steps"] = tuple(int(v) for v in values["iterative_steps"].split(",") if v.strip())
        except ValueError:
            raise UserError(f"--iterative-steps {values['iterative_steps']!r}: pass step numbers separated by "
                            "commas, e.g. 0,10,20 ('' for none)") from None
    return CLoRAConfig(**values)


def cmd_compose(args) -> None:
    from .compose.run import LoraSpec, compose
    from .models.loading import load_pipeline

    from .learn.distributed import process_device, processes

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    result = compose(pipe, args.prompt, [LoraSpec.parse(s) for s in args.lora or []], methods=methods,
                     seeds=[args.seed + i for i in range(args.num_images)], cfg=compose_config(args),
                     negative_prompt=args.negative_prompt, style_lora=args.style_lora, height=args.height,
                     width=args.width, out_dir=args.out, save_maps=args.save_maps, procs=processes())
    if not processes().main:
        return
    for m in methods:
        print(f"{m}: {len(result.images[m])} image(s), {result.seconds[m]:.2f} s/image, "
              f"{result.unet_calls[m]} UNet calls/image")
    print(f"wrote {Path(args.out).resolve()} (grid.png: rows seeds, columns methods; compose.json)")


def cmd_evaluate_clora(args) -> None:
    from .evaluate.base import write_json
    from .evaluate.clora import METHODS, evaluate_clora, table, train_concept_loras
    from .models.loading import load_pipeline

    pipe = load_pipeline(args.model, config=args.config, device=args.device)
    loras = None
    if args.train_loras:
        train_concept_loras(pipe, Path(args.train_loras), model_name=args.model)
        loras = Path(args.train_loras)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    result = evaluate_clora(pipe, compose_config(args), methods=methods, loras=loras,
                            out_dir=Path(args.images) if args.images else None)
    result["model"] = args.model
    print(table(result, methods))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def cmd_evaluate_profusion(args) -> None:
    from .evaluate.base import write_json
    from .evaluate.profusion import METHODS, evaluate_profusion, table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}: pass some of {', '.join(METHODS)}")
    d = FINETUNE_DEFAULTS
    finetune = FinetuneConfig(steps=args.finetune_steps or d.steps, lr=args.finetune_lr or d.lr,
                              augment=args.augment or d.augment)
    given = {"guidance_scale": args.guidance_scale, "ref_guidance_scale": args.ref_guidance_scale,
             "refine_steps": args.refine_steps, "refine_eta": args.refine_eta,
             "refine_emb_scale": args.refine_emb_scale, "refine_guidance_scale": args.refine_guidance,
             "class_word": args.class_word}
    result = evaluate_profusion(args.model, args.promptnet, methods=methods, seeds=args.seeds, steps=args.steps,
                                finetune=finetune, fusion_overrides={k: v for k, v in given.items() if v is not None},
                                objects=args.objects, split=args.split,
                                out_dir=args.out)
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def _add_compose_settings(p: argparse.ArgumentParser) -> None:
    from .compose.config import CLoRAConfig

    d = CLoRAConfig()
    g = p.add_argument_group("CLoRA (ALGORITHMS.md §2; defaults fix the official quirks, --method reference keeps them)")
    g.add_argument("--steps", type=int, help=f"denoising steps (default {d.steps})")
    g.add_argument("--guidance-scale", type=float, help=f"default {d.guidance_scale}")
    g.add_argument("--step-size", type=float, help=f"latent update step (default {d.step_size})")
    g.add_argument("--max-iter-to-alter", type=int, help="update the latent on the first N steps (default: half)")
    g.add_argument("--iterative-steps", help="steps with extra refinement, comma-separated (default "
                                             f"{','.join(map(str, d.iterative_steps))}; '' for none)")
    g.add_argument("--iterative-steps-steps", type=int, help=f"refinements at those steps (default {d.iterative_steps_steps})")
    g.add_argument("--no-latent-update", dest="latent_update", action="store_false", default=None)
    g.add_argument("--mask-threshold", type=float, help=f"alpha: mask where a map > alpha*max (default {d.mask_threshold})")
    g.add_argument("--apply-mask-after", type=int, help="blend uniformly before this step (default 0)")
    g.add_argument("--attn-res", type=int, help="side of the attention maps used (default: latent/4, at least 8)")
    for name in ("dilate", "erode", "opening", "closing"):
        g.add_argument(f"--{name}", action="store_true", default=None, help=f"{name} the masks (3x3)")
    g.add_argument("--execution", choices=["batched", "sequential"], help="default batched (one UNet call a step)")
    g.add_argument("--scheduler", help=f"default {d.scheduler}: ddim, dpm++, euler, euler-a, pndm (the latent update "
                                       "moves the latent the scheduler holds)")
    g.add_argument("--merge-weight", type=float, help=f"merge: weight of every LoRA (default {d.merge_weight})")
    g.add_argument("--switch-every", type=int, help=f"switch: steps per LoRA (default {d.switch_every})")


def _add_progress_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress-log", metavar="FILE", help="append one JSON line per step (step, total, loss, "
                                                          "seconds) to FILE, for another program to follow the run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="text-to-image: PNGs plus a grid")
    _add_model(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a text file, one prompt per line")
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--low-memory", action="store_true",
                   help="VAE tiling and slicing, one image per batch (automatic above 4x the "
                        "model's native pixel count, e.g. over 1024x1024 on SD 1.5)")
    _add_sampling(p, guidance=None)
    p.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (diffusers, AUTOMATIC1111, kohya); repeatable")
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA file or `learn lora` folder (diffusers or kohya layout), at WEIGHT (default 1); "
                        "repeatable")
    g = p.add_argument_group("ProFusion (ALGORITHMS.md §3.6): the image's word S* in the prompt")
    g.add_argument("--promptnet", help="a PromptNet folder (`learn promptnet`; default with --image: the bundled one)")
    g.add_argument("--image", help="the reference image (default: the one a fine-tuned PromptNet was tuned on)")
    g.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=True,
                   help="fusion sampling (default; the PromptNet folder's recommended settings, else the notebook's),"
                        " or plain sampling with S* (--no-fusion: CFG 5, no reference prompt)")
    g.add_argument("--refine-steps", type=int, help="fusion sub-steps per step, m (default 1)")
    g.add_argument("--refine-eta", type=float, help="η of the fusion sub-step, in [0, sqrt(2)] (default 1)")
    g.add_argument("--refine-emb-scale", type=float, help="λ: S* output scale in the fusion sub-step (default 0.6)")
    g.add_argument("--refine-guidance", type=float, help="w_f: guidance in the fusion sub-step (default 7)")
    g.add_argument("--ref-guidance-scale", type=float, help="w2: guidance of the reference prompt (default 5; 0 with --no-fusion)")
    g.add_argument("--class-word", help="the reference prompt is the prompt with S* replaced by this (default 'object')")
    g.add_argument("--ref-prompt", help="the reference prompt, given whole")
    g.add_argument("--placeholder", help="the word that stands for the image in the prompt (default S*)")
    p.add_argument("--out", default="outputs/generate")
    p.set_defaults(func=cmd_generate)

    learn = sub.add_parser("learn", help="teach the model a concept").add_subparsers(dest="learn_command",
                                                                                     required=True)
    p = learn.add_parser("ti", help="Textual Inversion: learn a new token from 3-5 images")
    _add_model(p)
    p.add_argument("--images", required=True, help="folder of 3-5 images of the concept")
    p.add_argument("--token", required=True, help="the new pseudo-word, e.g. '<my-cat>'")
    p.add_argument("--init-word", default=TI_DEFAULTS.init_word, help="a one-token word to start from (coarse class); '' for "
                                                        "the vocabulary mean")
    p.add_argument("--vectors", type=int, default=TI_DEFAULTS.vectors, help="vectors per token")
    p.add_argument("--template", default=TI_DEFAULTS.template, help="object (27), object81, style (19), or a file of templates")
    p.add_argument("--steps", type=int, default=TI_DEFAULTS.steps)
    p.add_argument("--lr", type=float, default=TI_DEFAULTS.lr)
    p.add_argument("--scale-lr", action="store_true", help="multiply lr by batch x grad-accum")
    p.add_argument("--batch", type=int, default=TI_DEFAULTS.batch)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--resolution", type=int, help="training size (default: the model's native size)")
    p.add_argument("--center-crop", action="store_true", help="crop to a square instead of squashing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=TI_DEFAULTS.checkpoint_every)
    p.add_argument("--validate-every", type=int, default=0, help="validation grid every N steps (0: at the end)")
    p.add_argument("--no-validation", action="store_true", help="write no validation grids (quick runs, tests)")
    p.add_argument("--format", choices=["diffusers", "a1111"], default="diffusers",
                   help="a1111 also writes AUTOMATIC1111's .pt layout")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast the frozen models (GPU); the learned vectors stay fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more compute (GPU, 512 px)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_progress_log(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_learn_ti)

    p = learn.add_parser("lora", help="DreamBooth-style LoRA: fine-tune low-rank adapters on 3-5 captioned images")
    _add_model(p)
    p.add_argument("--images", required=True, help="folder of 3-5 images of the concept (captions: --prompt, or "
                                                   "<image>.txt next to each image)")
    p.add_argument("--prompt", default=LORA_DEFAULTS.prompt,
                   help="instance prompt for every image, e.g. 'a photo of zwx circle' ({} = trigger + class word)")
    p.add_argument("--trigger", default=LORA_DEFAULTS.trigger, help="the rare word the captions use for the concept")
    p.add_argument("--class-word", default=LORA_DEFAULTS.class_word, help="the concept's class, e.g. 'circle' "
                                                                          "(validation prompts say 'trigger class')")
    p.add_argument("--rank", type=int, default=LORA_DEFAULTS.rank)
    p.add_argument("--alpha", type=float, default=LORA_DEFAULTS.alpha, help="LoRA alpha (default: the rank)")
    p.add_argument("--steps", type=int, default=LORA_DEFAULTS.steps)
    p.add_argument("--lr", type=float, default=LORA_DEFAULTS.lr)
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=LORA_DEFAULTS.text_encoder,
                   help="also train LoRA on the text encoder's attention")
    p.add_argument("--text-encoder-lr", type=float, default=LORA_DEFAULTS.text_encoder_lr, help="(default: --lr)")
    p.add_argument("--batch", type=int, default=LORA_DEFAULTS.batch)
    p.add_argument("--grad-accum", type=int, default=LORA_DEFAULTS.grad_accum)
    p.add_argument("--resolution", type=int, help="training size (default: the model's native size)")
    p.add_argument("--center-crop", action="store_true", help="crop to a square instead of squashing")
    p.add_argument("--flip-p", type=float, default=LORA_DEFAULTS.flip_p, help="probability of a mirrored image")
    p.add_argument("--seed", type=int, default=LORA_DEFAULTS.seed)
    p.add_argument("--checkpoint-every", type=int, default=LORA_DEFAULTS.checkpoint_every)
    p.add_argument("--validate-every", type=int, default=0, help="validation grid every N steps (0: at the end)")
    p.add_argument("--no-validation", action="store_true", help="write no validation grids (quick runs, tests)")
    p.add_argument("--validation-prompt", action="append",
                   help="repeatable; {} = trigger + class word (default: 'a photo of {}')")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast the models (GPU); the LoRA weights stay fp32")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_progress_log(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_learn_lora)

    p = learn.add_parser("promptnet", help="ProFusion's PromptNet: --pretrain on a domain, or --finetune on one image")
    _add_model(p)
    p.add_argument("--pretrain", action="store_true", help="domain pre-training on --images DIR (ALGORITHMS.md §3.4)")
    p.add_argument("--finetune", action="store_true", help="fine-tune on one --image FILE (§3.5)")
    p.add_argument("--images", help="--pretrain: a folder of images of the domain")
    p.add_argument("--image", help="--finetune: the image of the concept")
    p.add_argument("--promptnet", help="--finetune: the pre-trained PromptNet folder (default: the bundled one)")
    p.add_argument("--image-encoder", help="--pretrain: a local transformers CLIPVisionModel folder for the context "
                                           "tokens (default: the VAE-latent patch encoder of the bundled model)")
    p.add_argument("--steps", type=int, help=f"default {PRETRAIN_DEFAULTS.steps} (pretrain), {FINETUNE_DEFAULTS.steps} (finetune)")
    p.add_argument("--lr", type=float, help=f"default {PRETRAIN_DEFAULTS.lr} (pretrain), {FINETUNE_DEFAULTS.lr} (finetune)")
    p.add_argument("--batch", type=int, help=f"default {PRETRAIN_DEFAULTS.batch} (pretrain), {FINETUNE_DEFAULTS.batch} (finetune)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--l2-reg", type=float, default=0.0, help="λ·mean(S*²) (default 0: the official regularisation-free objective)")
    p.add_argument("--prefix", default=PRETRAIN_DEFAULTS.prefix, help="training prompt before S*")
    p.add_argument("--pad-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="pad the training prompt like inference does (default: no, the official 6 tokens; "
                        "--finetune: as the PromptNet was pre-trained)")
    p.add_argument("--latents", choices=["sample", "mean"],
                   help="z ~ q(z|x) (default, official) or its mean (for a UNet trained on means, like the bundled "
                        "one); --finetune default: as pre-trained")
    p.add_argument("--flip-p", type=float, default=0.0, help="--pretrain: probability of a mirrored image")
    p.add_argument("--augment", default=FINETUNE_DEFAULTS.augment, choices=["none", "flip", "affine"],
                   help="--finetune: the mini dataset's augmentation")
    p.add_argument("--copies", type=int, default=FINETUNE_DEFAULTS.copies, help="--finetune: mini dataset size")
    p.add_argument("--unet-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="--finetune: also train the UNet's to_q/to_k/to_v (default yes, as the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--validate-every", type=int, help="validation grid every N steps (0: at the end)")
    p.add_argument("--threads", type=int, help="CPU threads (1 leaves a core for other work)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_progress_log(p)
    p.add_argument("--export-to", help="write the latest checkpoint of the pre-training run in --out as a PromptNet "
                                       "folder here, and stop (works while the run goes on)")
    p.add_argument("--export-dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_learn_promptnet)

    p = sub.add_parser("compose", help="several LoRA concepts in one image: CLoRA and the baselines")
    _add_model(p)
    p.add_argument("--prompt", required=True, help='template with a slot per concept: "a {cat} and a {dog} on the grass"')
    p.add_argument("--lora", action="append", metavar="NAME=FILE[:TRIGGER[:CLASS]]",
                   help="one per slot; trigger and class word default to the LoRA's metadata")
    p.add_argument("--style-lora", metavar="FILE[:WEIGHT]", help="a style LoRA on every branch (weight 0.8)")
    p.add_argument("--method", default="clora", help="clora, reference, merge, switch, composite, none; "
                                                      "comma-separated for a side-by-side grid")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="seeds seed, seed+1, ...")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--save-maps", action="store_true", help="also write per-step attention maps and masks as PNG grids")
    p.add_argument("--out", default="outputs/compose")
    _add_compose_settings(p)
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("ui", help="the web UI (Gradio): generate, learn, compose, ProFusion")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="toy", help="the model selected at start ('toy': the bundled one)")
    p.add_argument("--models-dir", help="a folder of local checkpoints (diffusers folders, .safetensors) to pick from")
    p.add_argument("--work", default="outputs/ui", help="where jobs, generated images and uploads are kept (the "
                                                        "server reads and writes nothing else but the models)")
    p.add_argument("--token", help="required with a --host other than this machine: visitors log in with it "
                                   "(default: $CONCEPTKIT_UI_TOKEN)")
    p.add_argument("--max-upload-mb", type=int, default=50, help="largest accepted upload (default 50 MB)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("demo", help="the showcase: Textual Inversion, CLoRA and ProFusion on the bundled model, "
                                    "scored by the oracle, as a static page OUT/index.html")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; the scores mean nothing), for tests")
    p.add_argument("--fresh", action="store_true", help="redo every step (default: reuse the finished steps whose "
                                                        "command is unchanged)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="a static page (OUT/index.html) from `evaluate ... --json` files")
    p.add_argument("json_files", nargs="+", metavar="JSON", help="files written by `conceptkit evaluate ... --json`")
    p.add_argument("--out", required=True, help="folder for index.html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="versions, device and the bundled model, as JSON")
    p.set_defaults(func=cmd_info)

    shapes = sub.add_parser("shapes", help="the shapes world").add_subparsers(dest="shapes_command", required=True)
    p = shapes.add_parser("sample", help="render random scenes with captions into an image folder")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", action="store_true", help="use the held-out attribute combinations")
    p.add_argument("--p-pair", type=float, default=0.4, help="fraction of two-object scenes")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_shapes_sample)
    p = shapes.add_parser("read", help="the oracle: read images back into attributes (JSON)")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_shapes_read)
    p = shapes.add_parser("train-base", help="train the bundled model from scratch (resumable)")
    p.add_argument("--run", default="runs/base", help="run folder: checkpoints, logs, caches")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-steps", type=int, default=30000)
    p.add_argument("--export-to", help="write the run's EMA weights as a diffusers folder and stop")
    p.add_argument("--threads", type=int, help="CPU threads (use 1 to leave a core free for other work: two "
                                                "busy processes on 2 threads each slow each other down many times)")
    p.add_argument("--init-from", help="start a new run from shipped weights (e.g. the bundled folder) when the "
                                       "original run's checkpoints are gone")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a recipe field of a new run (shapes/train_base.py Recipe), e.g. --set grounding_weight=0.1")
    p.set_defaults(func=cmd_shapes_train_base)

    evaluate = sub.add_parser("evaluate", help="benchmarks on the shapes world").add_subparsers(
        dest="evaluate_command", required=True)
    p = evaluate.add_parser("base", help="oracle accuracy of a model on the held-out prompt set")
    _add_model(p)
    _add_sampling(p)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--split", choices=["test", "tune"], default="test",
                   help="test: the held-out prompts and seeds (report these); tune: training combinations and their "
                        "own seeds (choose recipes and settings on these)")
    p.add_argument("--json")
    p.add_argument("--images", help="also write the generated images here")
    p.set_defaults(func=cmd_evaluate_base)
    p = evaluate.add_parser("ti", help="Textual Inversion on the bundled concept sets: fidelity and adherence")
    p.add_argument("--model", default="toy")
    p.add_argument("--concepts", help="comma-separated concept names (default: all bundled sets)")
    p.add_argument("--ti-steps", type=int, default=TI_DEFAULTS.steps)
    p.add_argument("--lr", type=float, default=TI_DEFAULTS.lr)
    p.add_argument("--batch", type=int, default=TI_DEFAULTS.batch)
    p.add_argument("--vectors", type=int, default=TI_DEFAULTS.vectors)
    p.add_argument("--init-word", default=TI_DEFAULTS.init_word)
    p.add_argument("--seed", type=int, default=0, help="training seed (sampling uses the held-out seeds)")
    p.add_argument("--seeds", type=int, default=4, help="held-out sampling seeds per prompt")
    p.add_argument("--out", default="outputs/evaluate-ti", help="embeddings, images and the picture grid")
    p.add_argument("--json")
    p.set_defaults(func=cmd_evaluate_ti)
    p = evaluate.add_parser("clora", help="compose pairs of concept LoRAs: success of CLoRA and the baselines")
    _add_model(p)
    p.add_argument("--methods", help="comma-separated (default: clora,reference,merge,switch,composite,none)")
    p.add_argument("--train-loras", metavar="DIR", help="train (or resume) the concept LoRAs into DIR and use "
                                                        "them instead of the bundled ones")
    p.add_argument("--images", help="also write every image into this folder")
    p.add_argument("--json", help="write the results (keys <method>.success, <method>.seconds_per_image)")
    _add_compose_settings(p)
    p.set_defaults(func=cmd_evaluate_clora)
    p = evaluate.add_parser("profusion", help="ProFusion on held-out objects: detail preservation and prompt adherence")
    p.add_argument("--model", default="toy")
    p.add_argument("--promptnet", help="the pre-trained PromptNet (default: the bundled one)")
    p.add_argument("--methods", help="comma-separated (default: fusion,fusion_notebook,plain,pretrained,"
                                     "pretrained_plain,ti)")
    p.add_argument("--objects", type=int, default=8, help="held-out test objects (at most 8)")
    p.add_argument("--split", choices=["test", "tune"], default="test",
                   help="tune: 4 objects seen in pre-training and seeds of their own, for choosing settings")
    p.add_argument("--seeds", type=int, default=4, help="held-out sampling seeds per prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--finetune-lr", type=float)
    p.add_argument("--augment", choices=["none", "flip", "affine"])
    g = p.add_argument_group("fusion sampling settings (default: the notebook's fusion call, see generate --help)")
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--ref-guidance-scale", type=float)
    g.add_argument("--refine-steps", type=int)
    g.add_argument("--refine-eta", type=float)
    g.add_argument("--refine-emb-scale", type=float)
    g.add_argument("--refine-guidance", type=float)
    g.add_argument("--class-word")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="outputs/evaluate-profusion", help="fine-tuned PromptNets, images, grid.png")
    p.add_argument("--json", help="write the results (keys <method>.preservation/.adherence/.seconds)")
    p.set_defaults(func=cmd_evaluate_profusion)
    p = evaluate.add_parser("oracle", help="oracle accuracy on clean renders and a model's VAE reconstructions")
    p.add_argument("--model", default="toy", help="whose VAE to test; '' for clean renders only")
    p.add_argument("--config")
    p.add_argument("--device", default="auto")
    p.add_argument("--vae", help="a diffusers AutoencoderKL folder to test instead of --model's VAE")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--json")
    p.set_defaults(func=cmd_evaluate_oracle)
    return parser


def check_processes(args) -> None:
    """Under `accelerate launch`/`torchrun` with several processes only the commands that split their work run."""
    from .learn.distributed import launched_processes

    several = (cmd_generate, cmd_learn_ti, cmd_learn_lora, cmd_compose, cmd_evaluate_base)
    if launched_processes() > 1 and args.func not in several:
        raise UserError("this command runs in one process (learn ti, learn lora, generate, compose and evaluate base "
                        "run in several): launch it without accelerate/torchrun")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_processes(args)
        args.func(args)
    except UserError as e:  # one line, even when it quotes user input that holds line breaks
        print("error: " + str(e).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from .resources import is_out_of_memory, oom_advice

        if not is_out_of_memory(e):
            raise
        print(f"error: {oom_advice(args.command, e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
