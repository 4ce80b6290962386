"""PromptNet training (ALGORITHMS.md §3.4, §3.5): domain pre-training and single-image fine-tuning.

Both minimise  mean((UNet(x_t, t, τ("a photo of S*")) − target)²) + λ·mean(S*²)  with S* = PromptNet(x_ref, t,
tokens(ref), x_t); the target is ε, or v for v-prediction models, as the base model was trained. The VAE, text
encoder and (in pre-training) UNet are frozen; fine-tuning also trains the UNet's to_q/to_k/to_v and puts the
pipeline's weights back when it returns (the tuned ones are written next to the PromptNet).

- Pre-training: x_ref and the target are the same image (the official FFHQ/CC3M setting). Latents are encoded
  once (mean and std of q(z|x), cached in the run folder) and sampled every step; with random crops (`crop`
  "random", the official default for non-square images) the drawn images are read, cropped and encoded at every
  step instead, the crops drawn from the step's generator (so a resumed run takes the same crops).
  With captions "scene" each row's prompt is its image's scene caption with the object as S* (a mirrored
  image's caption says left for right), from the folder's metadata.jsonl; init_from starts from an exported
  PromptNet's weights with a fresh optimizer. Fine-tuning keeps the fixed prefix prompt (its augmented copies move,
  scale and mirror the object, so one caption would misdescribe most of them).
- Fine-tuning: a mini dataset of the image plus augmented copies (§3.5; for the shapes world an affine jitter with
  the border colour filled in, instead of the face-inpainting of the notebook), and two independent random batches
  per step: one gives the reference, the other the denoising target.

Like the other trainers: per-step generators (resume == uninterrupted run), atomic checkpoints, validation grids.
Pre-training also takes the official training command's options: mixed precision (autocast of the loss's forward,
fp32 weights and Adam; fp16 with a loss scaler, as Accelerate does), gradient checkpointing (PromptNet's and the
UNet's blocks) and an EMA of PromptNet's weights (diffusers' EMAModel, as train.py --use_ema): the EMA and the
scaler are part of the checkpoints, and the EMA weights are what validation shows and what is saved and exported.
A run whose checkpoints have no EMA (older runs) resumes as it was; given --ema-decay, its EMA starts from the
weights at the resumed step.
"""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UserError
from ..files import atomic_write, atomic_write_text, remove_interrupted_writes
from ..profusion.image_encoders import DESCRIPTION_FILE, LatentPatchEncoder, load_image_encoder, read_description
from ..profusion.promptnet import PromptNet
from ..profusion.prompts import encode_with_word, prompt_batch_ids, training_ids
from ..profusion.saved import SavedPromptNet, attention_weight_names, save_promptnet
from ..profusion.state import load_strict
from .images import check_image_files, image_files, load_reference_image, random_crop, read_images, to_pil
from .loop import (check_same_settings, latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint,
                   trained_tensors, train_steps)
from .promptnet_config import FinetuneConfig, PretrainConfig
from .textual_inversion import autocast, freeze

EMA_PREFIX = "ema/"  # checkpoint tensors: the EMA of each trained tensor, by its name
EMA_STEP = "ema_optimization_step"  # EMAModel.optimization_step: the updates the average has seen
SCALER_STATE = ("amp/scale", "amp/growth_tracker")  # the fp16 loss scaler's dynamic state


@dataclass
class PromptNetResult:
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z|x), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    # contiguous: the VAE may return channels-last views, which safetensors refuses to save (latent cache)
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def sample_latents(means, stds, index, g, scaling, how: str = "sample") -> torch.Tensor:
    if how == "mean":
        return means[index] * scaling
    if how != "sample":
        raise UserError(f"latents {how!r}: pass sample or mean")
    return (means[index] + stds[index] * torch.randn(means[index].shape, generator=g)) * scaling


def promptnet_loss(pipe, scheduler, promptnet, *, reference, tokens, target, noise, timesteps, ids, slot,
                   l2_reg: float) -> torch.Tensor:
    """The diffusion loss with S* at `slot` of `ids`: one training prompt for the batch (ids (L,), slot an int), or
    one per row (ids (B, L) and slot (B,), e.g. prompt_batch_ids of the rows' scene captions)."""
    device = pipe.unet.device
    target, noise, t = target.to(device), noise.to(device), timesteps.to(device)
    noisy = scheduler.add_noise(target, noise, t)
    words = promptnet(reference.to(device), t, tokens.to(device), noisy)
    b = target.shape[0]
    slots = torch.full((b,), slot) if isinstance(slot, int) else torch.as_tensor(slot)
    cond = encode_with_word(pipe.text_encoder, ids.expand(b, -1), slots, words)
    pred = pipe.unet(noisy.to(pipe.unet.dtype), t, cond.to(pipe.unet.dtype)).sample.float()
    goal = scheduler.get_velocity(target, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    loss = F.mse_loss(pred, goal.float())
    if l2_reg:
        loss = loss + l2_reg * words.float().pow(2).mean()
    return loss


def check_resume(out: Path, config: dict, resume: bool, checkpoints: Path) -> None:
    if not resume:
        if latest_checkpoint(checkpoints) is not None:
            raise UserError(f"{out} already holds a training run: pass --resume to continue it, or a new --out folder")
        return
    path = out / "training.json"
    if path.exists():
        saved = json.loads(path.read_text()).get("config", {})
        if saved.get("ema_decay") is None and config.get("ema_decay") is not None:
            saved = {**saved, "ema_decay": config["ema_decay"]}  # an EMA may join a run that had none
        check_same_settings(out, config, saved)


def checkpoint_tensors(path: Path, names: tuple[str, ...] | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Some tensors of a checkpoint (those named, or those under `prefix`, without it), read alone."""
    with safe_open(path, "pt") as f:
        keys = [k for k in f.keys() if (k in names if names is not None else k.startswith(prefix))]
        return {k[len(prefix):]: f.get_tensor(k) for k in keys}


def start_ema(params: dict, decay: float, last: Path | None, step: int):
    """diffusers' EMAModel over the trained tensors: from the checkpoint's EMA, or from the weights now (a new run,
    or a resumed run whose checkpoints have none)."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(list(params.values()), decay=decay)
    saved = checkpoint_tensors(last, prefix=EMA_PREFIX) if last is not None else {}
    if saved:
        if set(saved) != set(params):
            raise UserError(f"checkpoint {last} holds an EMA of other tensors than this run trains: pass the run's "
                            "settings, or a new --out folder")
        count = int(checkpoint_tensors(last, (EMA_STEP,))[EMA_STEP].item())
        ema.load_state_dict({"optimization_step": count,
                             "shadow_params": [saved[n].to(p.device, p.dtype) for n, p in params.items()]})
    elif last is not None:
        print(f"the EMA of the weights (--ema-decay {decay:g}) starts at step {step}: the run's checkpoints have none",
              file=sys.stderr)
    return ema


def restore_scaler(scaler, last: Path | None) -> None:
    saved = checkpoint_tensors(last, SCALER_STATE) if last is not None else {}
    if len(saved) == len(SCALER_STATE):
        scaler.load_state_dict({**scaler.state_dict(), "scale": float(saved["amp/scale"].item()),
                                "_growth_tracker": int(saved["amp/growth_tracker"].item())})


def prune_checkpoints(folder: Path, keep: int) -> None:
    for old in sorted(folder.glob("step-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)


def validation_grid(pipe, saved: SavedPromptNet, pixels: torch.Tensor, prompts, out: Path, step: int,
                    seed: int, progress: bool = True) -> Path:
    """Row 0: the reference images; then one row per prompt, plain sampling with S* (25 DDIM steps) at the
    references' (the training) resolution, with a progress bar."""
    from diffusers.utils import make_image_grid
    from tqdm.auto import tqdm

    from ..profusion.sampling import FusionConfig, generate_profusion

    cells = [to_pil(p) for p in pixels]
    latent_hw = tuple(side // pipe.vae_scale_factor for side in pixels.shape[-2:])
    with tqdm(total=len(prompts) * len(pixels), desc=f"validation at step {step}", unit="image",
              disable=not progress, dynamic_ncols=True) as bar:
        for prompt in prompts:
            for i, image in enumerate(pixels):
                result = generate_profusion(pipe, saved, image[None], [prompt], FusionConfig.plain(steps=25),
                                            seed=seed + i, progress=False, latent_hw=latent_hw)
                cells.append(result.images[0])
                bar.update(1)
    from ..generate.infotext import Settings, model_name, save_png

    grid = make_image_grid(cells, rows=1 + len(prompts), cols=len(pixels))
    plain = FusionConfig.plain(steps=25)
    settings = Settings(prompt=" | ".join(prompts), steps=plain.steps, sampler=plain.scheduler,
                        cfg_scale=plain.guidance_scale, seed=seed, width=cells[-1].width, height=cells[-1].height,
                        model=model_name(pipe), extra={"Method": "ProFusion plain sampling",
                                                       "Grid": f"PromptNet validation at step {step}: row 1 the "
                                                               "references, then one row per prompt"})
    return save_png(grid, out / f"step-{step:06d}.png", settings)


def _run(pipe, promptnet, encoder, cfg, *, out: Path, kind: str, meta: dict, params: dict, draw, val_pixels,
         resume: bool, progress: bool, unet_attention=None, on_step=None) -> PromptNetResult:
    """`unet_attention`: for fine-tuning, a function giving the tuned UNet weights to save."""
    # the shared part of both trainers: optimiser, checkpoints, resume, validation, final save
    checkpoints = out / "checkpoints"
    config = {"kind": kind, **json.loads(json.dumps(asdict(cfg)))}
    check_resume(out, config, resume, checkpoints)
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    last = latest_checkpoint(checkpoints) if resume else None
    if last is not None:
        start, losses = load_checkpoint(last, params, optimizer)
    mixed_precision = getattr(cfg, "mixed_precision", "no")
    scaler = torch.amp.GradScaler(pipe.unet.device.type) if mixed_precision == "fp16" else None
    if scaler is not None:
        restore_scaler(scaler, last)
    ema = start_ema(params, cfg.ema_decay, last, start) if getattr(cfg, "ema_decay", None) else None
    if resume:
        remove_interrupted_writes(out)  # temporary files of writes a kill cut short
    out.mkdir(parents=True, exist_ok=True)
    # the encoder's description goes in first, so a running pre-training's checkpoints can be exported
    atomic_write_text(out / DESCRIPTION_FILE, json.dumps(encoder.describe(), indent=2) + "\n")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids, slot = training_ids(pipe.tokenizer, cfg.prefix, meta["pad_prompt"])
    meta = {**meta, "prefix": cfg.prefix, "placeholder": "S*"}

    def batch_loss(g):
        b = draw(g)
        prompts = b.pop("prompts", None)  # one prompt per row (captions "scene"), else the fixed one
        rows = (ids, slot) if prompts is None else prompt_batch_ids(pipe.tokenizer, prompts, pad=meta["pad_prompt"])
        with autocast(pipe, mixed_precision):
            return promptnet_loss(pipe, scheduler, promptnet, ids=rows[0], slot=rows[1], l2_reg=cfg.l2_reg, **b)

    def current() -> SavedPromptNet:
        return SavedPromptNet(promptnet, encoder, meta, None, out)

    def run_state() -> dict[str, torch.Tensor]:
        state = {}
        if ema is not None:
            state.update({EMA_PREFIX + n: t for n, t in zip(params, ema.shadow_params)})
            state[EMA_STEP] = torch.tensor([ema.optimization_step])
        if scaler is not None:
            scaler_state = scaler.state_dict()
            state.update({"amp/scale": torch.tensor([float(scaler_state["scale"])]),
                          "amp/growth_tracker": torch.tensor([int(scaler_state["_growth_tracker"])])})
        return state

    def checkpoint(done):
        save_checkpoint(checkpoints, done, params, optimizer, losses, run_state())
        prune_checkpoints(checkpoints, getattr(cfg, "keep_checkpoints", 2))
        atomic_write_text(out / "training.json", json.dumps({"config": config, "steps_done": done,
                                                              "loss_last_100": _mean(losses[-100:])}, indent=2) + "\n")

    def validate(done):
        promptnet.eval()
        if ema is not None:  # the grid shows the weights that will be saved
            ema.store(params.values())
            ema.copy_to(params.values())
        try:
            validation_grid(pipe, current(), val_pixels, cfg.validation_prompts, out / "validation", done, cfg.seed,
                            progress)
        finally:
            if ema is not None:
                ema.restore(params.values())
            promptnet.train()

    clip = None
    if cfg.max_grad_norm:
        def clip():
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
    promptnet.train()
    seconds = train_steps(cfg, start=start, losses=losses, optimizer=optimizer, batch_loss=batch_loss,
                          checkpoint=checkpoint, validate=validate, desc=f"promptnet {kind}", progress=progress,
                          before_update=clip, on_step=on_step, scaler=scaler,
                          after_update=(lambda: ema.step(params.values())) if ema is not None else None)
    promptnet.eval()
    if ema is not None:  # what is saved (and validated at the end) is the average, as train.py --use_ema
        ema.copy_to(params.values())
        meta["weights"] = {"ema_decay": cfg.ema_decay, "ema_updates": ema.optimization_step}
    previous = json.loads((out / "training.json").read_text()).get("seconds_total", 0.0) \
        if resume and (out / "training.json").exists() else 0.0
    meta.update({"steps": cfg.steps, "seconds_this_run": round(seconds, 1),
                 "seconds_total": round(previous + seconds, 1), "loss_last_100": _mean(losses[-100:]),
                 "config": config, "conceptkit": __version__})
    save_promptnet(out, promptnet, encoder, meta, unet_attention() if unet_attention else None)
    atomic_write_text(out / "training.json", json.dumps({"config": config, "steps_done": cfg.steps,
                                                          "seconds_total": meta["seconds_total"],
                                                          "loss_last_100": meta["loss_last_100"]}, indent=2) + "\n")
    final_grid = out / "validation" / f"step-{cfg.steps:06d}.png"  # a run killed while validating validates again
    if cfg.validation_prompts and len(val_pixels) and (cfg.steps > start or not final_grid.is_file()):
        validate(cfg.steps)
    return PromptNetResult(out, losses, seconds)


def _mean(xs):
    return round(sum(xs) / len(xs), 6) if xs else None


def _latent_cache(pipe, files: list[Path], where: Path, out: Path, resolution: int,
                  keep_pixels: bool, center_crop: bool = False) -> dict[str, torch.Tensor]:
    """Latent mean/std of every image (and the images as uint8, when the encoder needs pixels), cached in out;
    squashed to a square, or its centre square (`center_crop`)."""
    path = out / "latent_cache.safetensors"
    stamp = f"{len(files)}:{files[0].name}:{files[-1].name}:{resolution}:{int(keep_pixels)}" + \
        (":center" if center_crop else "")  # (squash keeps the stamp caches were written with)
    if path.is_file():
        with safe_open(path, "pt") as f:
            if f.metadata().get("stamp") == stamp:
                return load_file(path)
    means, stds, pixels = [], [], []
    for i in range(0, len(files), 512):
        images = read_images(files[i : i + 512], resolution, center_crop, where=where)
        m, s = encode_images(pipe.vae, images)
        means.append(m)
        stds.append(s)
        if keep_pixels:
            pixels.append(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    cache = {"means": torch.cat(means), "stds": torch.cat(stds), **({"pixels": torch.cat(pixels)} if pixels else {})}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(cache, p, metadata={"stamp": stamp}))
    return cache


METADATA_FILE = "metadata.jsonl"  # an image folder's captions: {"file_name", "text", "scene"} a line
FLIPPED = {"left": "right", "right": "left"}  # a mirrored image's object positions


@dataclass(frozen=True)
class SceneRow:
    """One training image's caption source: its scene, the object S* stands for, and the image PromptNet reads
    (its own index, or another file of the folder: metadata "reference", e.g. that object alone)."""
    scene: object
    which: int = 0
    reference: int | None = None


def read_scenes(folder: Path, files: list[Path]) -> list[SceneRow]:
    """Each file's scene (shapes.world.Scene), from the folder's metadata.jsonl; a one-line UserError when a file
    has none, or several objects without a "placeholder" (the index of the object S* stands for) and a
    "reference" (the file PromptNet reads instead: an image of that object alone)."""
    from ..shapes.world import Scene

    fix = ("pass a folder made by `conceptkit shapes sample --p-pair 0 --out DIR` (its metadata.jsonl gives each "
           "image's scene), or --captions none")
    path = folder / METADATA_FILE
    entries = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("scene"), dict) and "file_name" in row:
                entries[row["file_name"]] = row
    missing = [f.name for f in files if f.name not in entries]
    if missing:
        where = f"{path} gives no scene" if path.is_file() else f"there is no {path}"
        raise UserError(f"--captions scene: {where} for {len(missing)} of the {len(files)} images in {folder} "
                        f"(e.g. {missing[0]}): {fix}")
    index = {f.name: i for i, f in enumerate(files)}
    rows = []
    for f in files:
        entry = entries[f.name]
        try:
            scene = Scene.from_dict(entry["scene"])
        except (KeyError, TypeError) as e:
            raise UserError(f"--captions scene: {path} has an unreadable scene for {f.name} ({e}): {fix}") from None
        which, reference = entry.get("placeholder"), entry.get("reference")
        if len(scene.objects) != 1 and (which is None or reference is None):
            raise UserError(f"--captions scene: {f.name} in {folder} shows {len(scene.objects)} objects, and S* stands "
                            f"for one: give its metadata line a \"placeholder\" (the object's index) and a "
                            f"\"reference\" (an image of that object alone), or {fix}")
        if reference is not None and reference not in index:
            raise UserError(f"--captions scene: {f.name}'s reference {reference!r} is not an image of {folder}: "
                            "put the reference image in the same folder")
        which = 0 if which is None else which
        if type(which) is not int or not 0 <= which < len(scene.objects):
            raise UserError(f"--captions scene: {f.name}'s placeholder {which!r} is not an object of its scene "
                            f"(0 to {len(scene.objects) - 1})")
        rows.append(SceneRow(scene, which, index.get(reference)))
    return rows


def scene_caption(scene, flipped: bool = False, placeholder: str = "S*", which: int | None = None) -> str:
    """The scene's caption with its object (`which`, in a two-object scene) as S*; of the mirrored image when
    `flipped` (left and right swap)."""
    from dataclasses import replace

    from ..shapes.captions import placeholder_caption

    if flipped:
        scene = replace(scene, objects=tuple(replace(o, position=FLIPPED.get(o.position, o.position))
                                             for o in scene.objects))
    return placeholder_caption(scene, placeholder, which)


def init_promptnet(pipe, folder: str | Path, image_encoder, projection_channels: int):
    """(PromptNet, image encoder) with the weights of an exported pre-trained PromptNet folder (--init-from): its
    image encoder unless one is given, which must then be the one it was trained with."""
    from ..profusion.saved import load_promptnet

    saved = load_promptnet(folder, pipe)
    if saved.unet_attention:
        raise UserError(f"--init-from {folder} is fine-tuned on one image: pass a pre-trained PromptNet folder")
    encoder = image_encoder or saved.image_encoder
    if encoder.describe() != saved.image_encoder.describe():
        raise UserError(f"--init-from {folder} was trained with the image encoder {saved.image_encoder.describe()}, "
                        f"not {encoder.describe()}: leave --image-encoder out (the folder's is used)")
    text_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    promptnet = PromptNet.from_unet(pipe.unet, encoder.embed_dim, text_dim, projection_channels).float()
    load_strict(promptnet, saved.promptnet.state_dict(), f"--init-from {folder}",
                f"it was built with projection_channels={saved.promptnet.config.projection_channels} or for another "
                "model: pass a PromptNet pre-trained for this --model with the default projection channels")
    return promptnet, encoder


def default_image_encoder(pipe):
    return LatentPatchEncoder(pipe.vae.config.latent_channels, patch=2)


def pretrain_promptnet(pipe, images_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig | None = None, *,
                       image_encoder=None, model_name: str = "", resume: bool = False,
                       progress: bool = True, on_step=None) -> PromptNetResult:
    """Pre-train a PromptNet on a folder of domain images (§3.4); write it into out_dir."""
    from ..models.sdxl import refuse_unless_sd

    refuse_unless_sd(pipe, "ProFusion (PromptNet)")
    cfg = cfg or PretrainConfig()
    out = Path(out_dir)
    resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    freeze(pipe)
    if cfg.init_from:
        promptnet, encoder = init_promptnet(pipe, cfg.init_from, image_encoder, cfg.projection_channels)
    else:
        encoder = image_encoder or default_image_encoder(pipe)
    needs_pixels = not isinstance(encoder, LatentPatchEncoder)
    files = image_files(images_dir)
    scenes = read_scenes(Path(images_dir), files) if cfg.captions == "scene" else None
    # PromptNet reads each row's reference image: the image itself, or another file of the folder
    references = None
    if scenes is not None and any(r.reference is not None for r in scenes):
        references = torch.tensor([i if r.reference is None else r.reference for i, r in enumerate(scenes)])
    random_crops = cfg.crop == "random"
    if random_crops and references is not None:
        raise UserError(f"--crop random: {images_dir}'s metadata names reference images, which random crops do not "
                        "read: pass --crop squash or center")
    if random_crops:  # read at every step: checked now, so a bad file does not stop the run hours in
        check_image_files(files, resolution, where=Path(images_dir))
        means = stds = pixels_u8 = None
    else:
        cache = _latent_cache(pipe, files, Path(images_dir), out, resolution, keep_pixels=needs_pixels,
                              center_crop=cfg.crop == "center")
        means, stds, pixels_u8 = cache["means"], cache["stds"], cache.get("pixels")
    scaling = pipe.vae.config.scaling_factor
    text_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    torch.manual_seed(cfg.seed)
    if not cfg.init_from:
        promptnet = PromptNet.from_unet(pipe.unet, encoder.embed_dim, text_dim, cfg.projection_channels).float()
    params = dict(promptnet.named_parameters())
    T = pipe.scheduler.config.num_train_timesteps

    def draw(g):
        index = torch.randint(0, len(files), (cfg.batch,), generator=g)
        flip = torch.rand(cfg.batch, generator=g) < cfg.flip_p
        mirror = lambda x: torch.where(flip[:, None, None, None], x.flip(-1), x)  # noqa: E731 - the drawn rows
        if random_crops:
            crops = torch.stack([random_crop(files[i], resolution, g) for i in index.tolist()])
            crop_means, crop_stds = encode_images(pipe.vae, crops)
            latents = sample_latents(crop_means, crop_stds, torch.arange(cfg.batch), g, scaling, cfg.latents)
        else:
            latents = sample_latents(means, stds, index, g, scaling, cfg.latents)
        latents = mirror(latents)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, T, (cfg.batch,), generator=g)
        reference, read = latents, index
        if references is not None:  # drawn last: a folder without references draws as it always did
            read = references[index]
            reference = sample_latents(means, stds, read, g, scaling, cfg.latents)
            reference = mirror(reference)
        pixels = None
        if needs_pixels:
            pixels = crops if random_crops else pixels_u8[read].float() / 127.5 - 1
            pixels = mirror(pixels)
        batch = {"reference": reference, "tokens": encoder(pixels, reference), "target": latents, "noise": noise,
                 "timesteps": t}
        if scenes is not None:  # each row's own prompt (no random draws: the batch is the one captions=none draws)
            batch["prompts"] = [scene_caption(scenes[i].scene, f, which=scenes[i].which)
                                for i, f in zip(index.tolist(), flip.tolist())]
        return batch

    # validation shows the centre squares of random-crop runs (the same images at every validation)
    val = read_images(files[: cfg.validation_images], resolution, cfg.crop != "squash", where=Path(images_dir))
    meta = {"method": "profusion", "base_model": model_name, "stage": "pretrained", "pad_prompt": cfg.pad_prompt,
            "latents": cfg.latents, "captions": cfg.captions,
            "images": str(images_dir), "num_images": len(files),
            **({"num_referenced": sum(r.reference is not None for r in scenes)} if references is not None else {}),
            **({"init_from": str(cfg.init_from)} if cfg.init_from else {})}
    unet_checkpointing = pipe.unet.is_gradient_checkpointing
    if cfg.gradient_checkpointing:
        # the UNet's activations are the larger part of the graph (S* reaches the loss through its cross-attention)
        promptnet.enable_gradient_checkpointing()
        pipe.unet.enable_gradient_checkpointing()
    try:
        return _run(pipe, promptnet, encoder, cfg, out=out, kind="pretrain", meta=meta, params=params, draw=draw,
                    val_pixels=val, resume=resume, progress=progress, on_step=on_step)
    finally:
        if not unet_checkpointing:
            pipe.unet.disable_gradient_checkpointing()  # the pipeline as it was given


def augment_copies(image: torch.Tensor, cfg: FinetuneConfig, seed: int, flipped: list | None = None) -> torch.Tensor:
    """(copies, 3, R, R): the image first, then augmented versions (flip; rotation, translation, scale with the
    border colour filled in, like the shapes world's flat backgrounds). `flipped`, a list: gets one bool per copy
    (mirrored or not), so a caption can say left for right."""
    g = torch.Generator().manual_seed(seed)
    out = [image[0]]
    if flipped is not None:
        flipped.append(False)
    for _ in range(cfg.copies - 1):
        x = image
        flip = cfg.augment in ("flip", "affine") and bool(torch.rand((), generator=g) < 0.5)
        if flip:
            x = x.flip(-1)
        if flipped is not None:
            flipped.append(flip)
        if cfg.augment == "affine":
            angle = math.radians((torch.rand((), generator=g).item() * 2 - 1) * cfg.rotate)
            scale = cfg.scale[0] + torch.rand((), generator=g).item() * (cfg.scale[1] - cfg.scale[0])
            tx, ty = ((torch.rand(2, generator=g) * 2 - 1) * cfg.translate * 2).tolist()  # grid units: side = 2
            cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
            theta = torch.tensor([[[cos, -sin, -tx], [sin, cos, -ty]]], dtype=x.dtype)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif cfg.augment not in ("none", "flip"):
            raise UserError(f"--augment {cfg.augment}: pass none, flip or affine")
        out.append(x[0])
    return torch.stack(out)


def mirrored_caption(caption: str) -> str:
    """The caption of the mirrored image: the words left and right swap."""
    return re.sub(r"\b(left|right)\b", lambda m: FLIPPED[m.group(1)], caption)


def finetune_promptnet(pipe, pretrained: SavedPromptNet, image_path: str | Path, out_dir: str | Path,
                       cfg: FinetuneConfig | None = None, *, model_name: str = "", resume: bool = False,
                       progress: bool = True, on_step=None) -> PromptNetResult:
    """Fine-tune a pre-trained PromptNet (and the UNet's to_q/to_k/to_v) on one image (§3.5); write it into out_dir.
    The pipeline's own weights are unchanged on return."""
    cfg = cfg or FinetuneConfig()
    out = Path(out_dir)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = load_reference_image(image_path, resolution)
    freeze(pipe)
    encoder = pretrained.image_encoder
    promptnet = copy.deepcopy(pretrained.promptnet).to(pipe.unet.device, torch.float32).requires_grad_(True)
    params = {f"promptnet.{n}": p for n, p in promptnet.named_parameters()}
    unet_params = dict(pipe.unet.named_parameters())
    names = attention_weight_names(pipe.unet) if cfg.train_unet_attention else []
    originals = {n: unet_params[n].detach().clone() for n in names}
    if pretrained.unet_attention:
        raise UserError("this PromptNet is already fine-tuned on an image: fine-tune the pre-trained one instead")
    for n in names:
        unet_params[n].requires_grad_(True)
        params[f"unet.{n}"] = unet_params[n]
    pad = pretrained.meta.get("pad_prompt", False) if cfg.pad_prompt is None else cfg.pad_prompt
    how = pretrained.meta.get("latents", "sample") if cfg.latents is None else cfg.latents
    flipped: list[bool] = []
    copies = augment_copies(image, cfg, cfg.seed, flipped)
    captions = None
    if cfg.caption is not None:  # each copy's own caption: a mirrored copy's left and right swap
        captions = [mirrored_caption(cfg.caption) if f else cfg.caption for f in flipped]
    means, stds = encode_images(pipe.vae, copies)
    scaling = pipe.vae.config.scaling_factor
    needs_pixels = not isinstance(encoder, LatentPatchEncoder)
    fixed_tokens = encoder(copies, means * scaling) if needs_pixels else None
    T = pipe.scheduler.config.num_train_timesteps

    def draw(g):
        ref_index = torch.randint(0, len(means), (cfg.batch,), generator=g)
        target_index = torch.randint(0, len(means), (cfg.batch,), generator=g)
        reference = sample_latents(means, stds, ref_index, g, scaling, how)
        target = sample_latents(means, stds, target_index, g, scaling, how)
        noise = torch.randn(target.shape, generator=g)
        t = torch.randint(0, T, (cfg.batch,), generator=g)
        tokens = fixed_tokens[ref_index] if needs_pixels else encoder(None, reference)
        batch = {"reference": reference, "tokens": tokens, "target": target, "noise": noise, "timesteps": t}
        if captions is not None:
            batch["prompts"] = [captions[i] for i in target_index.tolist()]  # the target copy's caption
        return batch

    meta = {"method": "profusion", "base_model": model_name or pretrained.meta.get("base_model", ""),
            "stage": "finetuned", "pad_prompt": pad, "latents": how, "image": str(image_path),
            "pretrained": str(pretrained.folder) if pretrained.folder else None}
    if "fusion_settings" in pretrained.meta:  # the pre-trained folder's recommended sampling still applies
        meta["fusion_settings"] = pretrained.meta["fusion_settings"]
    cfg_used = FinetuneConfig(**{**asdict(cfg), "pad_prompt": pad, "latents": how})
    began = time.perf_counter()
    try:
        result = _run(pipe, promptnet, encoder, cfg_used, out=out, kind="finetune", meta=meta, params=params,
                      draw=draw, val_pixels=image, resume=resume, progress=progress,
                      unet_attention=lambda: {n: unet_params[n] for n in names}, on_step=on_step)
        atomic_write(out / "reference.png", lambda p: to_pil(image[0]).save(p, format="PNG"))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a finished fine-tune keeps only its weights
    finally:
        with torch.no_grad():
            for n, w in originals.items():
                unet_params[n].copy_(w)
                unet_params[n].requires_grad_(False)
    result.seconds = time.perf_counter() - began
    return result


def export_pretrain_checkpoint(pipe, run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                               model_name: str = "") -> Path:
    """Write the latest checkpoint of a pre-training run (which may still be running) as a PromptNet folder."""
    run = Path(run_dir)
    last = latest_checkpoint(run / "checkpoints")
    info = run / "training.json"
    if last is None or not info.is_file():
        raise UserError(f"{run} holds no pre-training checkpoint: pass the --out folder of a `learn promptnet "
                        "--pretrain` run")
    config = json.loads(info.read_text())["config"]
    encoder = load_image_encoder(read_description(run), device=pipe.unet.device)
    text_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    promptnet = PromptNet.from_unet(pipe.unet, encoder.embed_dim, text_dim, config["projection_channels"]).float()
    tensors, step, losses = read_checkpoint(last)
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    weights = ema if config.get("ema_decay") and ema else trained_tensors(tensors)  # the EMA when the run has one
    load_strict(promptnet, weights, f"checkpoint {last}",
                "it was written for another model or --image-encoder: pass the --model the run was started with")
    meta = {"method": "profusion", "base_model": model_name, "stage": "pretrained",
            "pad_prompt": config["pad_prompt"], "latents": config.get("latents", "sample"), "prefix": config["prefix"],
            "captions": config.get("captions", "none"),
            "placeholder": "S*", "steps": step, "loss_last_100": _mean(losses[-100:]), "config": config,
            "exported_from": str(last), "conceptkit": __version__}
    if weights is ema:
        meta["weights"] = {"ema_decay": config["ema_decay"], "ema_updates": int(tensors[EMA_STEP].item())}
    promptnet = promptnet.to(dtype)
    return save_promptnet(Path(out_dir), promptnet, encoder, meta)
