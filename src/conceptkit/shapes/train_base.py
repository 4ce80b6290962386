"""Train the bundled shapes-world model from scratch: VAE, then text encoder + UNet, then export a diffusers folder.

Every stage checkpoints atomically into the run folder and resumes from it, so the job can be killed at any moment
and continued with `--resume` (across sessions, too). Given the same seed, a resumed run is identical to an
uninterrupted one: every step's data, noise and timesteps come from (seed, step), not from a running RNG.

    conceptkit shapes train-base --run runs/base --resume           # all stages, as far as the step targets say
    conceptkit shapes train-base --run runs/base --export-to DIR    # write the diffusers folder (EMA weights)
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import dataclasses
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import UserError
from ..files import atomic_write, atomic_write_text
from .captions import caption
from .dataset import render_all, scenes
from .grounding import GROUNDED_WORDS, grounding_masks, object_targets, pixel_loss, token_loss, token_owners
from .tokenizer import write_tokenizer
from .world import Scene


@dataclass
class Recipe:
    seed: int = 0
    # VAE: random 32x32 crops first (cheap, the VAE is convolutional), then full 64x64 images
    vae_crop_steps: int = 5000
    vae_full_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_pool: int = 20000  # rendered training images for the VAE
    # text encoder + UNet
    latent_pool: int = 100000  # scenes encoded once; captions are re-phrased every time a scene is drawn
    unet_steps: int = 30000
    batch: int = 64
    lr: float = 6e-4
    warmup: int = 500
    # the last lr_decay_steps steps before unet_steps take the lr linearly down to 0 (0 = constant lr): an anneal to
    # end a run with, instead of the EMA, whose window lags a model still improving (see CHANGEABLE_ON_RESUME)
    lr_decay_steps: int = 0
    caption_dropout: float = 0.1
    p_pair: float = 0.4  # share of two-object scenes in the pool
    # Loss weighting over timesteps. "flat": every timestep's v-loss counts alike. "min_snr" (diffusers'
    # min-SNR-gamma for v: min(snr, gamma) / (snr + 1)) is what v1-v3 used; on this zero-terminal-SNR schedule it is
    # ~SNR at high noise (0.086 at t=500, 0.007 at t=700, 4e-5 at t=999), so the steps where layout is decided were
    # hardly trained (measured: position 0.445 vs 0.711 after 400 more steps from v3, min-SNR-5 vs flat).
    loss_weighting: str = "flat"
    min_snr_gamma: float = 5.0
    # TokenCompose's token loss (shapes/grounding.py), weight 0 = off; maps of these side lengths are grounded
    grounding_weight: float = 0.0
    grounding_resolutions: tuple[int, ...] = (16, 8)
    grounding_words: str = "object"  # or "object+position" (grounding.GROUNDED_WORDS)
    grounding_pixel_weight: float = 0.0  # TokenCompose's pixel loss (grounding.pixel_loss), weight 0 = off
    ema_decay: float = 0.9995
    checkpoint_every: int = 250
    bf16: bool = True
    # Noise schedule. DDPM's linear schedule, not Stable Diffusion's scaled_linear (0.00085 -> 0.012): with SD's,
    # alpha_bar at t=999 is 0.0047, and a 16x16x4 latent still shows where an object is (object-level SNR ~0.7)
    # and which colour the background is (SNR ~5), so the model learns to read layout from the noisy latent rather
    # than from the prompt, and at sampling (pure noise) positions come out at chance (measured: 0.23 after 2k
    # steps). Linear 1e-4 -> 0.02 leaves alpha_bar_T = 4e-5: layout must come from the text.
    # With alpha_bar_T that small, epsilon-prediction learns almost nothing about layout at high noise (an error
    # in x0 costs sqrt(SNR) ~ 0.02 there) and its x0 estimates blow up (measured: colour-cast mush after 1k steps),
    # so the UNet predicts v (as SD 2.x-v does); the scheduler config tells every sampler.
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        mid_block_add_attention=False,  # fully convolutional, so training on crops transfers to full images
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 96, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32,
    )


def build_scheduler(r: "Recipe"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=r.beta_start, beta_end=r.beta_end,
                         beta_schedule=r.beta_schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing", prediction_type=r.prediction_type)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _save_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def _load_state(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------------- VAE
def train_vae(run: Path, r: Recipe) -> None:
    state_path = run / "vae_state.pt"
    total = r.vae_crop_steps + r.vae_full_steps
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    state = _load_state(state_path) or {"step": 0, "seconds": 0.0}
    if "model" in state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    step, seconds = state["step"], state["seconds"]
    if step >= total:
        return
    pool = _to_tensor(render_all(scenes(r.vae_pool, seed=r.seed + 1)))
    log = Log(run / "vae_log.jsonl")
    bar = tqdm(total=total, initial=step, desc="vae", dynamic_ncols=True)
    vae.train()
    while step < total:
        t0 = time.time()
        g = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
        crop = step < r.vae_crop_steps
        batch = r.vae_batch if crop else r.vae_batch // 2
        x = pool[torch.randint(0, len(pool), (batch,), generator=g)]
        if crop:
            i, j = torch.randint(0, 33, (2,), generator=g).tolist()
            x = x[:, :, i : i + 32, j : j + 32]
        lr = r.vae_lr * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample.float()
        loss_rec = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = loss_rec + r.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        seconds += time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss_rec.item():.4f}")
        if step % 50 == 0:
            log(step=step, loss=loss_rec.item(), seconds=round(seconds, 1))
        if step % r.checkpoint_every == 0 or step == total:
            _save_state(state_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                     "seconds": seconds})
    bar.close()


@torch.no_grad()
def normalise_latents(vae, images: torch.Tensor) -> dict:
    """Rescale the VAE's latent space exactly (no retraining) so every channel has mean 0 and std 1.

    z' = a * (z - mu) per channel: fold a and mu into quant_conv (encoder side) and their inverse into
    post_quant_conv (decoder side). The decoder sees the same z, so reconstructions are unchanged; the latents the
    UNet learns have unit spread per channel, and the pipeline's single scaling_factor becomes 1.0."""
    mean = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    mu = mean.mean(dim=(0, 2, 3))
    a = 1.0 / mean.std(dim=(0, 2, 3))
    c = len(mu)
    q = vae.quant_conv  # 1x1 conv: 2c -> 2c (means, then log-variances)
    q.weight[:c] *= a[:, None, None, None]
    q.bias[:c] = a * (q.bias[:c] - mu)
    q.bias[c:] += 2 * torch.log(a)
    p = vae.post_quant_conv  # 1x1 conv: c -> c, input z = z' / a + mu
    p.bias += (p.weight[:, :, 0, 0] * mu[None, :]).sum(1)
    p.weight /= a[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)
    return {"channel_mean": mu.tolist(), "channel_scale": a.tolist()}


def finish_vae(run: Path, r: Recipe):
    """The trained, latent-normalised VAE as a diffusers folder in run/vae."""
    from diffusers import AutoencoderKL

    out = run / "vae"
    if (out / "config.json").exists():
        return AutoencoderKL.from_pretrained(out)
    vae = build_vae()
    vae.load_state_dict(_load_state(run / "vae_state.pt")["model"])
    vae.eval()
    stats = normalise_latents(vae, _to_tensor(render_all(scenes(2048, seed=r.seed + 2))))
    tmp = run / "vae.tmp"
    vae.save_pretrained(tmp)
    (tmp / "normalisation.json").write_text(json.dumps(stats, indent=2))
    tmp.rename(out)
    return vae


@torch.no_grad()
def encode_pool(run: Path, r: Recipe, vae) -> tuple[torch.Tensor, list[Scene]]:
    """Encode the UNet's training scenes once (posterior means, fp16) and cache them."""
    path = run / "latents.safetensors"
    items = scenes(r.latent_pool, seed=r.seed + 3, p_pair=r.p_pair)
    if path.exists():
        return load_file(path)["latents"].float(), items
    out = []
    for i in tqdm(range(0, len(items), 512), desc="encode", dynamic_ncols=True):
        x = _to_tensor(render_all(items[i : i + 512]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            out.append(vae.encode(x).latent_dist.mean.float())
    latents = torch.cat(out).half().contiguous()
    atomic_write(path, lambda p: save_file({"latents": latents}, str(p)))
    return latents.float(), items  # the fp16 values, exactly as a resumed run reads them back


# ---------------------------------------------------------------------------------------------------------- UNet
LOSS_BANDS = 8  # the per-timestep loss is logged in this many equal bands of timesteps


def unet_lr(r: Recipe, step: int, warm_start: int = 0) -> float:
    """Linear warm-up from warm_start, then constant, then (lr_decay_steps > 0) linearly down to 0 at unet_steps."""
    factor = min(1.0, (step - warm_start + 1) / r.warmup)
    if r.lr_decay_steps > 0:
        factor *= min(1.0, max(0.0, (r.unet_steps - step) / r.lr_decay_steps))
    return r.lr * factor


def loss_weight(r: Recipe, snr: torch.Tensor) -> torch.Tensor:
    if r.loss_weighting == "flat":
        return torch.ones_like(snr)
    if r.loss_weighting == "min_snr":
        clamped = torch.clamp(snr, max=r.min_snr_gamma)
        return clamped / (snr + 1) if r.prediction_type == "v_prediction" else clamped / snr
    raise ValueError(f"loss_weighting {r.loss_weighting!r}: use flat or min_snr")


class GroundingStore:
    """A store for compose.attention's capture processors: every map resolution the grounding loss uses."""

    def __init__(self, resolutions):
        self.queries = {res * res for res in resolutions}
        self.maps: list[torch.Tensor] = []
        self.stop_at = None  # every forward runs whole (compose.attention.AttentionStore.maps_only)

    def wants(self, queries: int) -> bool:
        return queries in self.queries


def train_unet(run: Path, r: Recipe, latents: torch.Tensor, items: list[Scene]) -> None:
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTokenizer

    from ..compose.attention import capturing

    tokenizer = CLIPTokenizer.from_pretrained(run / "tokenizer")
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.01)
    ema = EMAModel(params, decay=r.ema_decay, use_ema_warmup=True, power=3 / 4)
    scheduler = build_scheduler(r)
    state_path = run / "unet_state.pt"
    state = _load_state(state_path) or {"step": 0, "seconds": 0.0}
    if "unet" in state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema.load_state_dict(state["ema"])
        ema.decay = r.ema_decay  # the saved EMA state carries its decay; the recipe's wins (it may change on resume)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    step, seconds = state["step"], state["seconds"]
    # a run seeded from shipped weights has no optimizer moments: warm the learning rate up again from there
    warm_start = state.get("warm_start", step if "unet" in state and "opt" not in state else 0)
    if step >= r.unet_steps:
        return
    log = Log(run / "unet_log.jsonl")
    bar = tqdm(total=r.unet_steps, initial=step, desc="unet", dynamic_ncols=True)
    unet.train()
    text_encoder.train()
    store = GroundingStore(r.grounding_resolutions)
    grounding = capturing(unet, store) if r.grounding_weight > 0 else contextlib.nullcontext()
    bands = torch.linspace(0, scheduler.config.num_train_timesteps, LOSS_BANDS + 1)
    band_sum, band_count, grounding_sum, pixel_sum = torch.zeros(LOSS_BANDS), torch.zeros(LOSS_BANDS), 0.0, 0.0
    with grounding:
        while step < r.unet_steps:
            t0 = time.time()
            g = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
            rng = random.Random(r.seed * 1_000_003 + step)
            idx = torch.randint(0, len(items), (r.batch,), generator=g)
            batch_items = [items[i] for i in idx.tolist()]
            texts = ["" if rng.random() < r.caption_dropout else caption(s, rng) for s in batch_items]
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            z0 = latents[idx]
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (r.batch,), generator=g)
            zt = scheduler.add_noise(z0, noise, t)
            for group in opt.param_groups:
                group["lr"] = unet_lr(r, step, warm_start)
            store.maps = []
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
                cond = text_encoder(ids).last_hidden_state
                pred = unet(zt, t, cond).sample.float()
            target = scheduler.get_velocity(z0, noise, t) if r.prediction_type == "v_prediction" else noise
            per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
            loss = (loss_weight(r, compute_snr(scheduler, t)) * per_sample).mean()
            if r.grounding_weight > 0:
                owners = [token_owners(tokenizer.convert_ids_to_tokens(row), s, GROUNDED_WORDS[r.grounding_words])
                          if text else []
                          for row, s, text in zip(ids.tolist(), batch_items, texts)]
                masks = {res * res: grounding_masks(owners, batch_items, ids.shape[1], res)
                         for res in r.grounding_resolutions}
                grounding_loss = token_loss(store.maps, masks)
                loss = loss + r.grounding_weight * grounding_loss
                if r.grounding_pixel_weight > 0:
                    targets = {res * res: object_targets(owners, batch_items, ids.shape[1], res)
                               for res in r.grounding_resolutions}
                    pixel = pixel_loss(store.maps, targets)
                    loss = loss + r.grounding_pixel_weight * pixel
                    pixel_sum += pixel.item()
                grounding_sum += grounding_loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.step(params)
            band = torch.bucketize(t.float(), bands[1:-1], right=True)
            band_sum += torch.bincount(band, per_sample.detach(), LOSS_BANDS)
            band_count += torch.bincount(band, minlength=LOSS_BANDS)
            step += 1
            seconds += time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % 50 == 0:
                row = {"step": step, "loss": round(loss.item(), 5), "seconds": round(seconds, 1),
                       "band_loss": [round(x, 5) for x in (band_sum / band_count.clamp_min(1)).tolist()]}
                if r.grounding_weight > 0:
                    row["grounding_loss"] = round(grounding_sum / 50, 5)
                if r.grounding_pixel_weight > 0:
                    row["pixel_loss"] = round(pixel_sum / 50, 5)
                log(**row)
                band_sum, band_count, grounding_sum, pixel_sum = torch.zeros(LOSS_BANDS), torch.zeros(LOSS_BANDS), 0.0, 0.0
            if step % r.checkpoint_every == 0 or step == r.unet_steps:
                _save_state(state_path, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                         "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step,
                                         "seconds": seconds, "warm_start": warm_start})
    bar.close()


# -------------------------------------------------------------------------------------------------------- export
def export(run: Path, out: Path, half: bool = True, weights: str = "ema", checkpoint: Path | None = None) -> Path:
    """Write the run's weights — EMA (weights="ema") or the raw trained ones ("raw") — as a standard diffusers
    StableDiffusionPipeline folder. checkpoint: a copy of the run's unet_state.pt to export instead."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(run / "tokenizer")
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights {weights!r}: use ema or raw")
    state = _load_state(checkpoint or run / "unet_state.pt")
    if state is None:
        raise UserError(f"{checkpoint or run / 'unet_state.pt'}: no UNet checkpoint to export; train first")
    if weights == "raw":
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
    else:
        params = list(unet.parameters()) + list(text_encoder.parameters())
        ema = EMAModel(params)
        ema.load_state_dict(state["ema"])
        ema.copy_to(params)
    vae = AutoencoderKL.from_pretrained(run / "vae")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(_recipe_of(run)), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)
    if half:  # halves the shipped size; conceptkit loads it back in float32
        pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if half:
        # Stored in float16, computed in float32: transformers 5 loads a text encoder in its config's dtype, so a
        # plain StableDiffusionPipeline.from_pretrained(folder) would otherwise get a float16 text encoder beside
        # a float32 UNet and fail at the first call (Half and Float). diffusers' models load as float32 already.
        config_path = tmp / "text_encoder" / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    vae_state = _load_state(run / "vae_state.pt")
    card = {
        "recipe": asdict(_recipe_of(run)),
        "unet_steps": state["step"],
        "weights": weights,
        "vae_steps": vae_state["step"],
        "train_seconds": {"vae": round(vae_state["seconds"]), "unet": round(state["seconds"])},
        "hardware": f"{torch.get_num_threads()} CPU threads (torch {torch.__version__})",
        "band_loss": band_losses(run / "unet_log.jsonl", up_to=state["step"]),
    }
    (tmp / "training.json").write_text(json.dumps(card, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def band_losses(log_path: Path, rows: int = 20, up_to: int | None = None) -> dict | None:
    """The unweighted v-loss per band of timesteps, averaged over the last `rows` log rows (x 50 steps) at or
    before step `up_to`."""
    if not log_path.exists():
        return None
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    logged = [row for row in logged if "band_loss" in row and (up_to is None or row["step"] <= up_to)][-rows:]
    if not logged:
        return None
    width = 1000 // LOSS_BANDS
    mean = torch.tensor([row["band_loss"] for row in logged]).mean(0).tolist()
    return {"steps": [logged[0]["step"] - 49, logged[-1]["step"]],
            "bands": {f"{i * width}-{(i + 1) * width - 1}": round(v, 4) for i, v in enumerate(mean)}}


def _recipe_of(run: Path) -> Recipe:
    return Recipe(**json.loads((run / "recipe.json").read_text()))


def seed_run_from_export(run: str | Path, folder: str | Path, overrides: dict | None = None) -> Path:
    """Start a run folder from shipped weights (when a run's checkpoints were lost): its VAE, tokenizer, text
    encoder and UNet (the EMA weights) become the run's state at the shipped step count; the optimizer starts
    afresh, with a new learning-rate warm-up. Latents are re-encoded with the shipped (float16) VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    run, folder = Path(run), Path(folder)
    if (run / "recipe.json").exists():
        raise UserError(f"{run} already holds a training run; resume it instead of seeding it")
    card = json.loads((folder / "training.json").read_text())
    recipe = Recipe(**{**card["recipe"], **(overrides or {})})
    run.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder / "tokenizer", run / "tokenizer")
    AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).save_pretrained(run / "vae")
    total_vae = recipe.vae_crop_steps + recipe.vae_full_steps
    _save_state(run / "vae_state.pt", {"step": total_vae, "seconds": float(card["train_seconds"]["vae"])})
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=True, power=3 / 4)
    ema.optimization_step = card["unet_steps"]
    _save_state(run / "unet_state.pt", {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                        "ema": ema.state_dict(), "step": card["unet_steps"],
                                        "seconds": float(card["train_seconds"]["unet"])})
    atomic_write_text(run / "recipe.json", json.dumps(asdict(recipe), indent=2))
    return run


def parse_overrides(pairs: list[str]) -> dict:
    """['lr=3e-4', 'loss_weighting=flat'] -> {'lr': 0.0003, 'loss_weighting': 'flat'}, typed by Recipe's fields."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise UserError(f"--set {pair!r}: use KEY=VALUE with KEY one of {', '.join(fields)}")
        default = getattr(Recipe(), key)
        try:
            if isinstance(default, bool):
                out[key] = {"true": True, "false": False}[value.lower()]
            elif isinstance(default, tuple):
                out[key] = tuple(int(v) for v in value.split(","))
            else:
                out[key] = type(default)(value)
        except (ValueError, KeyError):
            raise UserError(f"--set {pair!r}: {value!r} is not a {type(default).__name__}") from None
    return out


# Recipe fields a resumed run may change: they decide neither the data, the draws nor the loss (lr_decay_steps: how
# a run ends, set when a run is to be finished). (The EMA's window:
# 0.9995 averages ~2,000 steps, which lags a model still improving fast; measured on v4 at step 6,750: raw weights
# 0.83 two-object shapes, EMA 0.64.)
CHANGEABLE_ON_RESUME = ("ema_decay", "checkpoint_every", "lr_decay_steps")


def train(run: str | Path, recipe: Recipe | None = None, resume: bool = False, changes: dict | None = None) -> None:
    """Train (or resume) the run in `run`. On resume the saved recipe holds, but for `recipe.unet_steps` and the
    `changes` named in CHANGEABLE_ON_RESUME."""
    run = Path(run)
    changes = changes or {}
    if (run / "recipe.json").exists():
        if not resume:
            raise UserError(f"{run} already holds a training run; pass --resume to continue it, or another --run")
        refused = sorted(set(changes) - set(CHANGEABLE_ON_RESUME))
        if refused:
            raise UserError(f"--set {refused[0]}: a resumed run keeps its recipe; only "
                            f"{', '.join(CHANGEABLE_ON_RESUME)} (and --unet-steps) may change")
        saved = _recipe_of(run)
        if recipe is not None:  # step targets may be raised on resume; everything else must match
            saved.unet_steps = recipe.unet_steps
        recipe = dataclasses.replace(saved, **changes)
    recipe = recipe or Recipe()
    if recipe.grounding_pixel_weight > 0 and recipe.grounding_weight <= 0:
        # the pixel loss reads the maps and word owners the token loss captures; alone it would silently do nothing
        raise UserError("--set grounding_pixel_weight needs --set grounding_weight > 0 (the token loss it builds on)")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "recipe.json", json.dumps(asdict(recipe), indent=2))
    torch.manual_seed(recipe.seed)
    if not (run / "tokenizer" / "vocab.json").exists():
        write_tokenizer(run / "tokenizer")
    train_vae(run, recipe)
    vae = finish_vae(run, recipe)
    latents, items = encode_pool(run, recipe, vae)
    del vae
    train_unet(run, recipe, latents, items)


def weighting_words(r: dict) -> str:
    if r.get("loss_weighting", "min_snr") == "min_snr":  # v1-v3 have no loss_weighting field: they used min-SNR
        return f"min-SNR-{r['min_snr_gamma']} weighting"
    return "every timestep weighted alike (flat v-loss)"


def write_model_card(folder: str | Path, evaluation: dict | None = None, oracle: dict | None = None) -> Path:
    """README.md of the shipped folder, from its training.json (plus evaluation results, also stored there)."""
    folder = Path(folder)
    card = json.loads((folder / "training.json").read_text())
    if evaluation is not None:
        card["evaluate_base"] = {k: v for k, v in evaluation.items() if k != "model"}
    if oracle is not None:
        card["oracle_accuracy"] = oracle
    atomic_write_text(folder / "training.json", json.dumps(card, indent=2) + "\n")
    r = card["recipe"]
    secs = card["train_seconds"]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    lines = [
        "# shapes-base: conceptkit's bundled text-to-image model",
        "",
        "A tiny Stable Diffusion-architecture model (AutoencoderKL 64x64x3 -> 16x16x4, CLIPTextModel, "
        "UNet2DConditionModel) trained from scratch by `conceptkit shapes train-base` on the procedurally rendered "
        "shapes world. Weights are stored in float16 and load in float32 by default, in conceptkit and in a plain "
        "`StableDiffusionPipeline.from_pretrained(folder)` (the text encoder's config says float32).",
        "",
        "## Recipe",
        f"- VAE: {r['vae_crop_steps']} steps on 32x32 crops + {r['vae_full_steps']} on full images, batch "
        f"{r['vae_batch']}, lr {r['vae_lr']}, L1+MSE, KL weight {r['vae_kl_weight']}; latents then normalised "
        "per channel (exact reparametrisation), so scaling_factor = 1.0",
        f"- Text encoder + UNet, trained jointly: {card['unet_steps']} steps at batch {r['batch']}, AdamW lr "
        f"{r['lr']} ({r['warmup']} warm-up steps), {weighting_words(r)}, caption drop-out "
        f"{r['caption_dropout']}, "
        + ("raw weights shipped (the EMA, decay " + str(r["ema_decay"]) + ", lagged behind)" if card.get("weights") == "raw"
           else f"EMA {r['ema_decay']}") + f", bf16 autocast; {r['latent_pool']} pre-encoded scenes "
        f"({r.get('p_pair', 0.4):.0%} with two objects), captions re-phrased every draw"
        + (f"; TokenCompose token loss (shapes/grounding.py) weight {r['grounding_weight']} on the "
           f"{'/'.join(f'{x}x{x}' for x in r['grounding_resolutions'])} cross-attention maps"
           if r.get("grounding_weight") else ""),
        f"- Noise schedule: {sched['beta_schedule']} betas {sched['beta_start']} -> {sched['beta_end']}, "
        f"{sched.get('prediction_type', 'epsilon')} prediction",
        f"- Seed {r['seed']}. Wall time: VAE {secs['vae'] / 60:.0f} min, UNet + text encoder "
        f"{secs['unet'] / 3600:.1f} h, on {card['hardware']}",
        "",
    ]
    if card.get("band_loss"):
        b = card["band_loss"]
        lines += [f"Unweighted v-loss per band of timesteps (training steps {b['steps'][0]}-{b['steps'][1]}), so a "
                  "band the weighting starves shows up:", "", "| timesteps | " + " | ".join(b["bands"]) + " |",
                  "|---|" + "---|" * len(b["bands"]),
                  "| v-loss | " + " | ".join(f"{v:.4f}" for v in b["bands"].values()) + " |", ""]
    if "evaluate_base" in card:
        e = card["evaluate_base"]
        lines += ["## Held-out evaluation (`conceptkit evaluate base`)", "",
                  f"Settings: {json.dumps(e.get('settings', {}))}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in e.items() if isinstance(v, float) and k != "seconds"]
        lines.append("")
    if "oracle_accuracy" in card:
        o = card["oracle_accuracy"]
        lines += ["## Oracle accuracy (`conceptkit evaluate oracle`)", "", "| attribute | clean | VAE |", "|---|---|---|"]
        lines += [f"| {k} | {o['clean'][k]:.3f} | {o.get('vae', {}).get(k, float('nan')):.3f} |" for k in o["clean"]]
    atomic_write_text(folder / "README.md", "\n".join(lines) + "\n")
    return folder / "README.md"
