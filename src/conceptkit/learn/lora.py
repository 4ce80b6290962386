"""DreamBooth-style LoRA (no prior preservation): low-rank adapters on the UNet's attention projections (and, by
default, the text encoder's), trained on a few captioned images of a concept; every base weight stays frozen.

It runs like the Textual Inversion trainer and shares its machinery (learn/textual_inversion.py): the images (and
their mirror images) go through the VAE once and every step samples from the cached latent distributions; every step
draws its randomness from a generator seeded by (seed, step), so a run resumed from a checkpoint takes exactly the
steps an uninterrupted run takes; checkpoints and outputs are written atomically.

The adapters are added with diffusers' / transformers' PEFT integration (`add_adapter`, as diffusers'
`train_dreambooth_lora.py` does) under a private name and removed again before returning: the pipeline is left as it
was. On SDXL both text encoders get adapters (the trainer conditions the UNet as SDXL does, pooled embedding and
time ids included). The result is a diffusers-layout `pytorch_lora_weights.safetensors` that a plain `load_lora_weights` reads.

Pivotal tuning (`embedding`): the trigger is a word learned first by Textual Inversion (`learn ti`), kept fixed while
the adapters train, and bundled into the LoRA file (AUTOMATIC1111 / kohya `bundle_emb`), so the concept reaches the
UNet through the text path as well as through the adapters (README, `evaluate clora`: single-LoRA fidelity over
four backgrounds 0.815 -> 0.93 on the tune concepts; CLoRA's success on the test split 0.359 -> 0.552).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from .. import __version__
from ..errors import UserError
from ..files import atomic_write_text
from ..models.lora import LORA_WEIGHT_NAME, LoraInfo, loaded_adapters, quiet_diffusers, read_lora_info, save_lora
from ..models.sdxl import encoders, is_sdxl, tokenize
from .distributed import Processes, processes
from .images import image_files, load_images
from .lora_config import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, LoRAConfig
from .loop import latest_checkpoint, load_checkpoint, save_checkpoint, start_run_folder, train_steps
from .textual_inversion import (
    autocast,
    check_resume_config,
    draw_batch,
    encode_latent_cache,
    freeze,
    global_config,
    share,
    ti_loss,
)

ADAPTER = "conceptkit_training"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoRAResult:
    path: Path  # the LoRA file
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    info: LoraInfo | None = None


def read_captions(files: list[Path], cfg: LoRAConfig) -> list[str]:
    """One caption per image: cfg.prompt ('{}' = trigger + class word) for all, else `<image stem>.txt` (kohya)."""
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise UserError("--prompt is empty: pass the instance prompt, e.g. 'a photo of sks dog'")
        return [cfg.prompt.replace("{}", cfg.phrase)] * len(files)
    captions = []
    for image in files:
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            raise UserError(f"no caption for {image.name}: write {sidecar} (one line naming the concept, e.g. "
                            f"'a photo of {cfg.phrase}'), or pass --prompt 'a photo of {cfg.phrase}' to use one "
                            "prompt for every image")
        try:
            caption = sidecar.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"caption {sidecar} is not UTF-8 text: save it as UTF-8") from None
        if not caption:
            raise UserError(f"caption {sidecar} is empty: write one line naming the concept, e.g. "
                            f"'a photo of {cfg.phrase}'")
        captions.append(" ".join(caption.split()))
    return captions


def check_config(cfg: LoRAConfig) -> None:
    for name, value in (("rank", cfg.rank), ("steps", cfg.steps), ("batch", cfg.batch), ("grad-accum", cfg.grad_accum),
                        ("checkpoint-every", cfg.checkpoint_every)):
        if value < 1:
            raise UserError(f"--{name} {value}: pass 1 or more")
    if cfg.lr <= 0 or cfg.effective_text_encoder_lr <= 0 or cfg.effective_alpha <= 0:
        raise UserError("--lr, --text-encoder-lr and --alpha must be positive")
    if not cfg.trigger.strip():
        raise UserError("--trigger is empty: pass a rare word such as 'sks' or 'zwx'")


def add_training_adapters(pipe, cfg: LoRAConfig, seed: int) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Add LoRA adapter ADAPTER (diffusers' init: gaussian A, zero B, seeded) and return its parameters per
    component, in fp32 (diffusers' cast_training_params)."""
    from peft import LoraConfig

    params: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoders = ["text_encoder", "text_encoder_2"][: len(encoders(pipe))]
        for component, targets in (("unet", UNET_TARGET_MODULES),
                                   *((name, TEXT_ENCODER_TARGET_MODULES) for name in text_encoders)):
            if component != "unet" and not cfg.text_encoder:
                continue
            model = getattr(pipe, component)
            config = LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_alpha, init_lora_weights="gaussian",
                                target_modules=list(targets))
            model.add_adapter(config, adapter_name=ADAPTER)
            named = [(n, p) for n, p in model.named_parameters() if f".{ADAPTER}." in n]
            for _, p in named:
                p.data = p.data.float()
                p.requires_grad_(True)
            params[component] = named
    return params


def remove_training_adapters(pipe) -> None:
    """Take every LoRA layer out again (diffusers' unload): the original Linear modules are back in place."""
    with quiet_diffusers():
        pipe.unload_lora_weights()


def trigger_embedding(cfg: LoRAConfig):
    """The Textual Inversion embedding the trigger stands for (cfg.embedding), or None."""
    if cfg.embedding is None:
        return None
    from ..models.embeddings import read_embedding

    embedding = read_embedding(cfg.embedding)
    if embedding.token != cfg.trigger:
        raise UserError(f"--embedding {cfg.embedding} teaches '{embedding.token}' but the trigger is "
                        f"'{cfg.trigger}': pass --trigger '{embedding.token}' (the captions must use the token)")
    return embedding


@contextlib.contextmanager
def taught(pipe, embedding):
    """The pipeline knows `embedding`'s token within the block; taken out again on the way out if it was added here."""
    if embedding is None:
        yield
        return
    from ..models.embeddings import ensure_embedding, remove_embedding

    added = ensure_embedding(pipe, embedding, "train on a freshly loaded model")
    try:
        yield
    finally:
        if added:
            remove_embedding(pipe, embedding.token)


@contextlib.contextmanager
def restored_pipeline(pipe):
    """Whatever training does to the pipeline (adapters, requires_grad, train/eval, the sampling scheduler) is undone
    on the way out, on errors too."""
    modules = [getattr(pipe, c) for c in ("unet", "vae", "text_encoder", "text_encoder_2")
               if getattr(pipe, c, None) is not None]
    grads = [[p.requires_grad for p in m.parameters()] for m in modules]
    modes = [[s.training for s in m.modules()] for m in modules]
    scheduler = pipe.scheduler
    try:
        yield
    finally:
        if loaded_adapters(pipe):
            remove_training_adapters(pipe)
        for m, g, mode in zip(modules, grads, modes):
            for p, flag in zip(m.parameters(), g):
                p.requires_grad_(flag)
            for s, flag in zip(m.modules(), mode):
                s.training = flag
        pipe.scheduler = scheduler


def flat_params(params: dict[str, list[tuple[str, torch.nn.Parameter]]]) -> dict[str, torch.nn.Parameter]:
    return {f"{component}.{name}": p for component, named in params.items() for name, p in named}


def run_config(cfg: LoRAConfig, model: str, captions: list[str], procs: Processes = Processes()) -> dict:
    """The run's settings (config.json); --batch is per process, the global batch is batch x processes."""
    return {"method": "lora", "base_model": model, "conceptkit": __version__, **asdict(cfg),
            "processes": procs.count, "alpha": cfg.effective_alpha,
            "text_encoder_lr": cfg.effective_text_encoder_lr, "captions": captions}


def validate(pipe, cfg: LoRAConfig, out_dir: Path, step: int, resolution: int, progress: bool = True) -> Path:
    """The validation grid at step `step`: 25 DDIM steps at the training resolution, with a progress bar."""
    from ..generate.images import generate

    prompts = [p.format(cfg.phrase) for p in cfg.validation_prompts]
    with torch.no_grad():
        result = generate(pipe, prompts, seed=cfg.seed, num_images=cfg.validation_seeds, steps=25,
                          guidance_scale=7.5, height=resolution, width=resolution, progress=progress,
                          desc=f"validation at step {step}", out_dir=out_dir / f"step-{step:06d}")
    return result.grid_path


def file_metadata(cfg: LoRAConfig, model_name: str, seconds: float, losses: list[float]) -> dict:
    """What the LoRA file's header says about it (conceptkit.* entries)."""
    return {"trigger": cfg.trigger, "class_word": cfg.class_word, "description": cfg.description,
            "base_model": model_name or None,
            "rank": cfg.rank, "alpha": cfg.effective_alpha, "prompt": cfg.prompt, "text_encoder": cfg.text_encoder,
            "steps": cfg.steps, "seconds": round(seconds, 1), "final_loss": losses[-1] if losses else None,
            "version": __version__}


def learn_lora(pipe, images_dir: str | Path, out_dir: str | Path, cfg: LoRAConfig | None = None, *,
               model_name: str = "", resume: bool = False, progress: bool = True, on_step=None) -> LoRAResult:
    """Train a LoRA on the images in `images_dir`; write it (plus metadata, checkpoints, validation grids) into
    `out_dir`. On return the pipeline is exactly as before (load the written file with models.lora.load_lora)."""
    cfg = cfg or LoRAConfig()
    check_config(cfg)
    embedding = trigger_embedding(cfg)
    procs = processes()
    out = Path(out_dir)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    resolution = cfg.resolution or native
    files = image_files(images_dir)
    images = load_images(images_dir, resolution, cfg.center_crop)
    captions = read_captions(files, cfg)
    if loaded_adapters(pipe):
        raise UserError(f"the pipeline already has LoRA adapters loaded ({', '.join(loaded_adapters(pipe))}): train "
                        "on a freshly loaded model")

    config = run_config(cfg, model_name, captions, procs)
    checkpoints = out / "checkpoints"
    last = latest_checkpoint(checkpoints)
    if resume:
        check_resume_config(out, config)
    elif last is not None:
        raise UserError(f"{out} already holds a training run: pass --resume to continue it, or a new --out folder")

    with taught(pipe, embedding), restored_pipeline(pipe):
        freeze(pipe)
        params = flat_params(add_training_adapters(pipe, cfg, cfg.seed))
        groups = [{"params": [p for n, p in params.items() if n.startswith("unet.")], "lr": cfg.lr}]
        if cfg.text_encoder:
            groups.append({"params": [p for n, p in params.items() if n.startswith("text_encoder")],
                           "lr": cfg.effective_text_encoder_lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        start, losses = 0, []
        if resume and last is not None:
            start, losses = load_checkpoint(last, params, optimizer)
        start_run_folder(out, config, resume, procs)

        means, stds = encode_latent_cache(pipe.vae, images)
        if cfg.latents == "mean":  # the same draws, without the posterior's spread
            stds = torch.zeros_like(stds)
        # a word of several vectors is written "<t> <t>_1 ..." in the token sequence, as encode_prompt does
        expanded = [pipe.maybe_convert_prompt(c, pipe.tokenizer) for c in captions] if embedding else captions
        tokens = [tokenize(tokenizer, expanded, "cpu") for tokenizer, _ in encoders(pipe)]
        tokens = tokens if is_sdxl(pipe) else tokens[0]
        scaling = pipe.vae.config.scaling_factor

        drawn = global_config(cfg, procs)

        def batch_loss(g):
            batch = draw_batch(g, means, stds, drawn, 1, scheduler.config.num_train_timesteps, scaling)
            batch = share(batch, procs, cfg.batch)
            batch = dataclasses.replace(batch, template_ids=batch.image_ids)  # each image with its caption
            with autocast(pipe, cfg.mixed_precision):
                return ti_loss(pipe, scheduler, batch, tokens)

        seconds = train_steps(
            cfg, start=start, losses=losses, optimizer=optimizer, batch_loss=batch_loss,
            checkpoint=lambda done: save_checkpoint(checkpoints, done, params, optimizer, losses),
            validate=lambda done: validate(pipe, cfg, out / "validation", done, resolution, progress),
            desc=f"lora {cfg.trigger}", progress=progress, on_step=on_step, procs=procs)
        # the final grid is written last: a run killed while validating (folder there, grid not) validates again
        final_grid = out / "validation" / f"step-{cfg.steps:06d}" / "grid.png"
        if procs.main and cfg.validation_prompts and (cfg.steps > start or not final_grid.is_file()):
            validate(pipe, cfg, out / "validation", cfg.steps, resolution, progress)

        meta = file_metadata(cfg, model_name, seconds, losses)
        path = out / LORA_WEIGHT_NAME
        if procs.main:
            text_encoder_2 = getattr(pipe, "text_encoder_2", None) if cfg.text_encoder else None
            save_lora(path, pipe.unet, pipe.text_encoder if cfg.text_encoder else None, text_encoder_2=text_encoder_2,
                      metadata=meta, adapter_name=ADAPTER, embeddings=[embedding] if embedding else [])
    if procs.main:
        atomic_write_text(out / "metadata.json",
                          json.dumps({**config, **meta, "steps_done": cfg.steps}, indent=2) + "\n")
    procs.barrier()  # every process returns once the files are there
    return LoRAResult(path, out, losses, seconds, read_lora_info(path))
