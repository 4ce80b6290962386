"""Textual Inversion (ALGORITHMS.md §1): learn new token vectors for a concept; everything else stays frozen.

Design (the spec's recommended from-scratch form, §1.2): the pipeline's embedding table is never touched while
training. A copy of the tokenizer gets the placeholder tokens; the text encoder's token-embedding module is wrapped
so ids past the old vocabulary read from a small (n, d) trainable tensor. Only that tensor gets gradients, so there
is nothing to restore after each step, and the optimiser sees n*d numbers instead of the whole table.

Speed: each image (and its mirror image) goes through the VAE once; every step samples from the cached latent
distributions, as `latent_dist.sample()` would. Frozen models are in eval mode with requires_grad off, so the
backward pass computes no weight gradients.

SDXL (models/sdxl.py): a vector set for each text encoder (clip_l and clip_g), trained together through the UNet's
conditioning on both (hidden states and the pooled embedding); written as diffusers' two files and as the
community single file.

Resumable and reproducible: every step draws its randomness from a generator seeded by (seed, step), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .. import __version__
from ..errors import UserError
from ..files import atomic_write_text
from ..models.embeddings import SDXL_SECOND_FILE, Embedding, add_embedding, save_embedding
from ..models.sdxl import added_conditioning, encode_ids, encoders, is_sdxl, time_ids
from .distributed import Processes, processes
from .images import load_images
from .loop import (check_same_settings, latest_checkpoint, load_checkpoint, save_checkpoint, start_run_folder,
                   train_steps)
from .ti_config import TIConfig
from .templates import load_templates

EMBEDDINGS_FILE = "learned_embeds.safetensors"


@dataclass
class TIResult:
    embedding: Embedding
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class SplicedTokenEmbedding(torch.nn.Module):
    """A frozen embedding table plus trainable rows for ids >= first_new_id."""

    def __init__(self, base: torch.nn.Embedding, learned: torch.Tensor, first_new_id: int):
        super().__init__()
        self.base, self.learned, self.first_new_id = base, learned, first_new_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_new_id
        out = self.base(torch.where(new, 0, ids))
        rows = self.learned[(ids - self.first_new_id).clamp(0, self.learned.shape[0] - 1)].to(out.dtype)
        return torch.where(new[..., None], rows, out)


@contextlib.contextmanager
def spliced_all(pipe, learned: list[torch.Tensor], first_new_ids: list[int]):
    """Every text encoder of the pipeline spliced with its own trainable rows (one encoder, or SDXL's two)."""
    with contextlib.ExitStack() as stack:
        for (_, encoder), rows, first in zip(encoders(pipe), learned, first_new_ids):
            stack.enter_context(spliced(encoder, rows, first))
        yield


@contextlib.contextmanager
def spliced(text_encoder, learned: torch.Tensor, first_new_id: int):
    base = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(SplicedTokenEmbedding(base, learned, first_new_id))
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(base)


def placeholder_tokens(token: str, n: int) -> list[str]:
    """diffusers' multi-vector naming: P, P_1, ..., P_{n-1}; a prompt says P and it expands to all of them."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def training_tokenizer(tokenizer, cfg: TIConfig):
    """A copy of the tokenizer that knows the placeholder tokens; the pipeline's own is left alone."""
    for name, value in (("vectors", cfg.vectors), ("steps", cfg.steps), ("batch", cfg.batch),
                        ("grad-accum", cfg.grad_accum), ("checkpoint-every", cfg.checkpoint_every)):
        if value < 1:  # a checkpoint interval of 0 would divide by zero in the training loop
            raise UserError(f"--{name} {value}: pass 1 or more")
    names = placeholder_tokens(cfg.token, cfg.vectors)
    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab]
    if taken:
        raise UserError(f"token '{taken[0]}' is already in the model's vocabulary: pick a new name with --token "
                        f"(e.g. '<my-{cfg.token.strip('<>') or 'concept'}>')")
    tok = copy.deepcopy(tokenizer)
    if tok.add_tokens(names) != len(names) or tok.convert_tokens_to_ids(names) != list(
            range(len(tokenizer), len(tokenizer) + len(names))):
        raise UserError(f"token '{cfg.token}' could not be added as {len(names)} new tokens: choose another --token")
    return tok


def initial_vectors(tokenizer, text_encoder, cfg: TIConfig) -> torch.Tensor:
    table = text_encoder.get_input_embeddings().weight.detach().float()
    if cfg.init_word is None:
        row = table.mean(0, keepdim=True)
    else:
        ids = tokenizer(cfg.init_word, add_special_tokens=False).input_ids
        if len(ids) not in (1, cfg.vectors):
            raise UserError(f"initializer word '{cfg.init_word}' is {len(ids)} tokens "
                            f"{tokenizer.convert_ids_to_tokens(ids)}: pass a single-token --init-word, or "
                            f"--vectors {len(ids)} (one vector from each token, as AUTOMATIC1111's initialization text)")
        row = table[ids]  # (1 or vectors, dim)
        if cfg.init_includes_pos0:
            embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings  # transformers 4.x / 5.x
            row = row + embeddings.position_embedding.weight[0].detach().float()
    return row.expand(cfg.vectors, -1).clone()


def encode_latent_cache(vae, images: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z|x) for every image and its mirror image (flipped images come second)."""
    both = torch.cat([images, images.flip(-1)])
    means, stds = [], []
    with torch.inference_mode():
        for i in range(0, len(both), batch):
            dist = vae.encode(both[i : i + batch].to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    template_ids: torch.Tensor
    image_ids: torch.Tensor | None = None  # which image each sample shows (its mirror image included)


def draw_batch(g: torch.Generator, means: torch.Tensor, stds: torch.Tensor, cfg: TIConfig, num_templates: int,
               num_train_timesteps: int, scaling_factor: float) -> Batch:
    n_images = means.shape[0] // 2
    index = torch.randint(0, n_images, (cfg.batch,), generator=g)
    flipped = torch.rand(cfg.batch, generator=g) < cfg.flip_p
    source = index + n_images * flipped.long()
    sample = torch.randn(means[source].shape, generator=g)
    latents = (means[source] + stds[source] * sample) * scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, num_train_timesteps, (cfg.batch,), generator=g)
    template_ids = torch.randint(0, num_templates, (cfg.batch,), generator=g)
    return Batch(latents, noise, timesteps, template_ids, index)


def global_config(cfg, procs: Processes):
    """cfg with --batch the global batch (batch x processes): what every process draws from the step's generator,
    and what --scale-lr scales by. cfg itself with one process."""
    return dataclasses.replace(cfg, batch=cfg.batch * procs.count) if procs.several else cfg


def share(batch: Batch, procs: Processes, n: int) -> Batch:
    """This process's n samples of a global batch (the whole batch with one process)."""
    if not procs.several:
        return batch
    part = procs.share(n)
    values = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    return Batch(*(None if v is None else v[part] for v in values))


def condition(pipe, tokens, rows: torch.Tensor, latent_hw: tuple[int, int]):
    """(encoder hidden states, added_cond_kwargs or None) of the token ids `tokens[rows]`: one tensor for a
    one-encoder model, a list (one tensor per encoder) for SDXL, which also gets its pooled embedding and time ids."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    if not is_sdxl(pipe):
        return pipe.text_encoder(tokens[rows].to(device))[0].to(dtype), None
    hidden, pooled = encode_ids(pipe, [ids[rows] for ids in tokens])
    height, width = (side * pipe.vae_scale_factor for side in latent_hw)
    return hidden.to(dtype), added_conditioning(pooled, time_ids(pipe, height, width, len(rows)), dtype)


def ti_loss(pipe, scheduler, batch: Batch, template_ids_tokens) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (ε, or v for v-prediction models), §1.1.
    template_ids_tokens: (templates, L) ids, or on SDXL a list of them, one per text encoder."""
    device = pipe.unet.device
    latents, noise, t = batch.latents.to(device), batch.noise.to(device), batch.timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    cond, added = condition(pipe, template_ids_tokens, batch.template_ids, latents.shape[-2:])
    pred = pipe.unet(noisy.to(pipe.unet.dtype), t, cond, added_cond_kwargs=added).sample.float()
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    return F.mse_loss(pred, target.float())


def autocast(pipe, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise UserError(f"--mixed-precision {mixed_precision}: pass no, bf16 or fp16")
    return torch.autocast(pipe.unet.device.type, dtype=dtypes[mixed_precision])


def freeze(pipe) -> None:
    for module in (pipe.unet, pipe.vae, *(encoder for _, encoder in encoders(pipe))):
        module.requires_grad_(False)
        module.eval()


def run_config(cfg: TIConfig, model: str, procs: Processes = Processes()) -> dict:
    """The run's settings (config.json); --batch is per process, the global batch is batch x processes."""
    return {"method": "textual_inversion", "base_model": model, "conceptkit": __version__, **asdict(cfg),
            "processes": procs.count, "effective_lr": global_config(cfg, procs).effective_lr}


def check_resume_config(out: Path, config: dict) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    check_same_settings(out, config, json.loads(path.read_text()))


def validate(pipe, toks, learned, first_new_ids, cfg: TIConfig, out_dir: Path, step: int, resolution: int,
             progress: bool = True) -> Path:
    """The validation grid at step `step`: 25 DDIM steps at the training resolution, with a progress bar."""
    from ..generate.images import generate

    prompts = [p.format(cfg.token) for p in cfg.validation_prompts]
    names = ["tokenizer", "tokenizer_2"][: len(toks)]
    originals = [getattr(pipe, name) for name in names]
    for name, tok in zip(names, toks):
        setattr(pipe, name, tok)
    try:
        with spliced_all(pipe, [rows.detach() for rows in learned], first_new_ids), torch.no_grad():
            result = generate(pipe, prompts, seed=cfg.seed, num_images=cfg.validation_seeds, steps=25,
                              guidance_scale=7.5, height=resolution, width=resolution, progress=progress,
                              desc=f"validation at step {step}", out_dir=out_dir / f"step-{step:06d}")
    finally:
        for name, original in zip(names, originals):
            setattr(pipe, name, original)
    return result.grid_path


def sdxl_file_name(token: str) -> str:
    """The community SDXL file's name: the token, as the web UIs name the word after the file."""
    return f"{token.strip('<>') or 'embedding'}.safetensors"


def learn_textual_inversion(pipe, images_dir: str | Path, out_dir: str | Path, cfg: TIConfig | None = None, *,
                            model_name: str = "", resume: bool = False, progress: bool = True,
                            on_step=None) -> TIResult:
    """Learn `cfg.token` from the images in `images_dir`; write the embedding + metadata into `out_dir`.

    On return the pipeline knows the token (loaded as diffusers would load the written file).
    """
    cfg = cfg or TIConfig()
    if cfg.fmt == "a1111" and is_sdxl(pipe):
        raise UserError("--format a1111 writes AUTOMATIC1111's SD-1/2 .pt; on SDXL leave it out: the community "
                        ".safetensors (clip_l + clip_g) that AUTOMATIC1111 and ComfyUI read is always written")
    procs = processes()
    out = Path(out_dir)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    resolution = cfg.resolution or native
    images = load_images(images_dir, resolution, cfg.center_crop)
    templates = load_templates(cfg.template)
    pairs = encoders(pipe)  # SDXL: a vector set for each text encoder, trained together
    toks = [training_tokenizer(tokenizer, cfg) for tokenizer, _ in pairs]
    first_new_ids = [len(tokenizer) for tokenizer, _ in pairs]
    freeze(pipe)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    learned = [torch.nn.Parameter(initial_vectors(tokenizer, encoder, cfg).to(encoder.device))
               for tokenizer, encoder in pairs]
    state = {"learned": learned[0], **({"learned_2": learned[1]} if len(learned) > 1 else {})}
    optimizer = torch.optim.AdamW(learned, lr=global_config(cfg, procs).effective_lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    config = run_config(cfg, model_name, procs)
    checkpoints = out / "checkpoints"
    start, losses = 0, []
    if resume:
        check_resume_config(out, config)
        last = latest_checkpoint(checkpoints)
        if last is not None:
            start, losses = load_checkpoint(last, state, optimizer)
    elif latest_checkpoint(checkpoints) is not None:
        raise UserError(f"{out} already holds a training run: pass --resume to continue it, or a new --out folder")
    start_run_folder(out, config, resume, procs)

    means, stds = encode_latent_cache(pipe.vae, images)
    placeholder = " ".join(placeholder_tokens(cfg.token, cfg.vectors))
    texts = [t.format(placeholder) for t in templates]
    template_tokens = [tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids for tok in toks]
    template_tokens = template_tokens if is_sdxl(pipe) else template_tokens[0]
    scaling = pipe.vae.config.scaling_factor

    drawn = global_config(cfg, procs)

    def batch_loss(g):
        batch = draw_batch(g, means, stds, drawn, len(templates), scheduler.config.num_train_timesteps, scaling)
        batch = share(batch, procs, cfg.batch)
        with autocast(pipe, cfg.mixed_precision):
            return ti_loss(pipe, scheduler, batch, template_tokens)

    with spliced_all(pipe, learned, first_new_ids):
        seconds = train_steps(
            cfg, start=start, losses=losses, optimizer=optimizer, batch_loss=batch_loss,
            checkpoint=lambda done: save_checkpoint(checkpoints, done, state, optimizer, losses),
            validate=lambda done: validate(pipe, toks, learned, first_new_ids, cfg, out / "validation", done,
                                          resolution, progress),
            desc=f"textual inversion {cfg.token}", progress=progress, on_step=on_step, procs=procs)
    # the final grid is written last: a run killed while validating (folder there, grid not) validates again
    final_grid = out / "validation" / f"step-{cfg.steps:06d}" / "grid.png"
    if procs.main and cfg.validation_prompts and (cfg.steps > start or not final_grid.is_file()):
        validate(pipe, toks, learned, first_new_ids, cfg, out / "validation", cfg.steps, resolution, progress)

    vectors, *second = [rows.detach().float().cpu() for rows in learned]
    embedding = Embedding(cfg.token, vectors, "sdxl" if second else cfg.fmt, second[0] if second else None)
    metadata = {**config, "steps_done": cfg.steps, "seconds": round(seconds, 1), "final_loss": losses[-1] if losses
                else None, "vector_norms": [round(float(v.norm()), 4) for v in vectors]}
    if second:
        metadata["vector_norms_2"] = [round(float(v.norm()), 4) for v in second[0]]
    if procs.main:
        if second:  # the community single file (clip_l/clip_g) beside diffusers' two files
            save_embedding(out / sdxl_file_name(cfg.token), cfg.token, (vectors, second[0]), fmt="sdxl")
            save_embedding(out / SDXL_SECOND_FILE, cfg.token, second[0])
        elif cfg.fmt == "a1111":
            save_embedding(out / f"{cfg.token.strip('<>') or 'embedding'}.pt", cfg.token, vectors, fmt="a1111",
                           metadata={"steps": cfg.steps, "base_model": model_name})
        save_embedding(out / EMBEDDINGS_FILE, cfg.token, vectors, metadata=metadata)
        atomic_write_text(out / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    procs.barrier()  # every process returns once the files are there
    add_embedding(pipe, embedding)
    return TIResult(embedding, out, losses, seconds)
