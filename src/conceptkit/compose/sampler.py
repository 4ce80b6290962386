"""The composition sampler: CLoRA (§2.5) and the baselines, on one loop.

A composition is K *branches*, each a prompt, a negative prompt and a set of adapter weights. Every step computes
all branches' ε (both CFG halves), optionally moves the latent to lower the contrastive loss of their attention
maps, blends the branches with masks and takes one DDIM (η = 0) step:
- clora:     K = N+1 (base + one branch per LoRA), latent updates, attention masks;
- composite: K = N, every branch the full prompt with one LoRA, uniform average (LoRA Composite);
- merge:     K = 1, the full prompt with every LoRA at once (weighted adapters);
- switch:    K = 1, the full prompt, the active LoRA changes every `switch_every` steps (LoRA Switch);
- none:      K = 1, the plain prompt without LoRAs.

`execution="batched"` runs all 2K rows as one UNet call with per-row adapters (row_lora.py) and computes explicit
attention only where maps are used; `"sequential"` is the official structure (one batch-2 call per branch with
adapter switching).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UserError
from .attention import AttentionStore, capturing, default_attn_res
from .config import CLoRAConfig, METHODS
from .contrastive import clora_loss
from .masks import attention_masks, blend
from .prompts import BranchPrompts
from .row_lora import per_row_adapters


@dataclass
class Branches:
    prompts: list[str]
    negatives: list[str]
    adapters: list[dict[str, float]]  # per branch: {adapter name: weight}; {} = base model

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Trace:
    """What a user looks at to debug a composition: per step, each branch's map for its tokens and the masks."""
    steps: list[int] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)  # (K, r_h, r_w, tokens) per recorded step
    masks: list[torch.Tensor] = field(default_factory=list)  # (K, latent h, latent w) per recorded step
    losses: list[float] = field(default_factory=list)


@dataclass
class SampleResult:
    latents: torch.Tensor
    trace: Trace
    unet_calls: int
    seconds: float


def plan_rows(branches: Branches, halves: int = 2) -> dict[str, list[float]]:
    """Per-row adapter weights for a batch laid out [uncond_0..uncond_{K-1}, cond_0..cond_{K-1}]."""
    names = sorted({a for b in branches.adapters for a in b})
    return {a: [b.get(a, 0.0) for b in branches.adapters] * halves for a in names}


def text_adapters(branch: dict[str, float], style: str | None, use_text_encoder_lora: bool) -> dict[str, float]:
    # the style LoRA is in the text encoder even without text-encoder LoRAs, as in the official code (§5)
    return {a: w for a, w in branch.items() if use_text_encoder_lora or a == style}


@contextlib.contextmanager
def active_adapters(pipe, adapters: dict[str, float], text_encoder: bool = True):
    """PEFT's own adapter switching (the sequential path): only `adapters` active, at their weights."""
    if not adapters:
        pipe.disable_lora()
        try:
            yield
        finally:
            pipe.enable_lora()
        return
    names = list(adapters)
    pipe.unet.set_adapters(names, [adapters[n] for n in names])
    te_names = [n for n in names if n in getattr(pipe.text_encoder, "peft_config", {})]
    if text_encoder and te_names:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters
        set_weights_and_activate_adapters(pipe.text_encoder, te_names, [adapters[n] for n in te_names])
    elif text_encoder and getattr(pipe.text_encoder, "peft_config", None):
        # none of these adapters has text-encoder weights: the text encoder runs plain (else the previous
        # branch's text-encoder adapter would still be active)
        from diffusers.loaders.lora_base import disable_lora_for_text_encoder, enable_lora_for_text_encoder
        disable_lora_for_text_encoder(pipe.text_encoder)
        try:
            yield
        finally:
            enable_lora_for_text_encoder(pipe.text_encoder)
        return
    yield


def tokenize(pipe, texts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_branches(pipe, branches: Branches, cfg: CLoRAConfig, style: str | None) -> torch.Tensor:
    """(2K, L, d): negative prompts then prompts, each encoded with its branch's text-encoder adapters."""
    ids = tokenize(pipe, branches.negatives + branches.prompts)
    per_branch = [text_adapters(b, style, cfg.use_text_encoder_lora) for b in branches.adapters]
    if cfg.execution == "batched":
        plan = plan_rows(Branches(branches.prompts, branches.negatives, per_branch))
        with per_row_adapters([pipe.text_encoder], plan):
            return pipe.text_encoder(ids)[0]
    K = len(branches)
    out = [None] * (2 * K)
    for p, adapters in enumerate(per_branch):
        with active_adapters(pipe, adapters):
            e = pipe.text_encoder(ids[[p, K + p]])[0]
        out[p], out[K + p] = e[0], e[1]
    return torch.stack(out)


class BranchModel:
    """ε of every branch at both CFG halves, and each branch's aggregated cross-attention map."""

    def __init__(self, pipe, branches: Branches, embeddings: torch.Tensor, cfg: CLoRAConfig, store: AttentionStore):
        self.pipe, self.branches, self.embeddings, self.cfg, self.store = pipe, branches, embeddings, cfg, store
        self.calls = 0
        self.work_dtype = torch.promote_types(pipe.unet.dtype, torch.float32)  # latent updates and blending in fp32+

    def __call__(self, z: torch.Tensor, t, cond_only: bool = False):
        """z (1, C, h, w) -> (ε_uncond (K, C, h, w) or None, ε_cond (K, C, h, w), maps (K, r_h, r_w, L)).

        cond_only: run the conditional rows alone (the latent update's forward, when maps come from the
        conditional half and ε is recomputed after the update: the unconditional half would be thrown away)."""
        unet, K = self.pipe.unet, len(self.branches)
        halves = 1 if cond_only else 2
        if self.cfg.execution == "batched":
            self.store.reset()
            x = z.to(unet.dtype).expand(halves * K, *z.shape[1:])
            embeddings = self.embeddings[K:] if cond_only else self.embeddings
            with per_row_adapters([unet], plan_rows(self.branches, halves)):
                eps = unet(x, t, encoder_hidden_states=embeddings).sample.to(self.work_dtype)
            self.calls += 1
            if cond_only:
                return None, eps, self.store.aggregate([[p] for p in range(K)])
            rows = [[K + p] if self.cfg.cond_only_maps else [p, K + p] for p in range(K)]
            return eps[:K], eps[K:], self.store.aggregate(rows)
        uncond, cond, maps = [], [], []
        for p, adapters in enumerate(self.branches.adapters):
            self.store.reset()
            index = [K + p] if cond_only else [p, K + p]
            with active_adapters(self.pipe, adapters, text_encoder=False):
                e = unet(z.to(unet.dtype).expand(halves, *z.shape[1:]), t,
                         encoder_hidden_states=self.embeddings[index]).sample.to(self.work_dtype)
            self.calls += 1
            uncond.append(None if cond_only else e[0])
            cond.append(e[-1])
            own = [[0]] if cond_only else [[1] if self.cfg.cond_only_maps else [0, 1]]
            maps.append(self.store.aggregate(own)[0])
        return None if cond_only else torch.stack(uncond), torch.stack(cond), torch.stack(maps)


def sample(pipe, branch_sets: list[Branches], cfg: CLoRAConfig, *, groups: list[list[list[int]]] | None,
           mask_indices: list[list[int]] | None, generator: torch.Generator, style: str | None = None,
           height: int | None = None, width: int | None = None, switch_every: int | None = None,
           record: bool = False, embeddings: list[torch.Tensor] | None = None) -> SampleResult:
    """Denoise one latent. `branch_sets` has one entry, or (switch) one per adapter, used in turn.

    groups=None turns latent updates off; mask_indices=None blends the branches uniformly. `embeddings`: the
    branch sets' `encode_branches` output, when the caller samples several seeds with the same prompts.
    """
    began = time.perf_counter()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise UserError(f"size {width}x{height} is not a multiple of {factor}: pass --width/--height divisible by {factor}")
    latent_hw = (height // factor, width // factor)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.steps, device=pipe.unet.device)
    work_dtype = torch.promote_types(pipe.unet.dtype, torch.float32)
    z = randn_tensor((1, pipe.unet.config.in_channels, *latent_hw), generator=generator,
                     device=pipe.unet.device, dtype=torch.float32).to(work_dtype) * scheduler.init_noise_sigma
    store = AttentionStore(default_attn_res(latent_hw, cfg.attn_res))
    if embeddings is None:
        embeddings = [encode_branches(pipe, b, cfg, style) for b in branch_sets]
    models = [BranchModel(pipe, b, e, cfg, store) for b, e in zip(branch_sets, embeddings)]
    update_until = cfg.alter_until() if (cfg.latent_update and groups is not None) else 0
    trace = Trace()

    def loss_of(maps):
        return clora_loss(maps.to(work_dtype), groups, cfg.temperature, cfg.minmax_eps)

    # With maps from the conditional half and ε recomputed after the update, the update's forward needs only the
    # K conditional rows: half the forward and half the backward of the official all-rows graph.
    cond_only = cfg.cond_only_maps and cfg.fresh_predictions

    def gradient_step(z, model, t):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            eps_u, eps_c, maps = model(z, t, cond_only=cond_only)
            loss = loss_of(maps)
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, z)
                z = z - cfg.step_size * grad
        eps_u = None if eps_u is None else eps_u.detach()
        return z.detach(), eps_u, eps_c.detach(), maps.detach(), float(loss.detach())

    with capturing(pipe.unet, store, explicit_everywhere=cfg.explicit_attention):
        for i, t in enumerate(scheduler.timesteps):
            model = models[(i // switch_every) % len(models)] if switch_every else models[0]
            if i < update_until:
                z, eps_u, eps_c, maps, loss = gradient_step(z, model, t)
                for _ in range(cfg.iterative_steps_steps if i in cfg.iterative_steps else 0):
                    z, eps_u, eps_c, maps, loss = gradient_step(z, model, t)
                if cfg.fresh_predictions:  # §5: the official DDIM step uses ε from before the last update
                    with torch.no_grad():
                        eps_u, eps_c, maps = model(z, t)
                trace.losses.append(loss)
            else:
                grad_mode = torch.enable_grad() if cfg.graphs_every_step else torch.no_grad()
                with grad_mode:
                    zz = z.detach().requires_grad_(cfg.graphs_every_step)
                    eps_u, eps_c, maps = model(zz, t)
                eps_u, eps_c, maps = eps_u.detach(), eps_c.detach(), maps.detach()
            K = eps_u.shape[0]
            if mask_indices is not None and i >= cfg.apply_mask_after:
                masks = attention_masks(maps, mask_indices, latent_hw, cfg.mask_threshold, eps_u.shape[1],
                                        dilation=cfg.dilate, erosion=cfg.erode, opening=cfg.opening,
                                        closing=cfg.closing)
            else:
                masks = torch.ones(K, 1, eps_u.shape[1], *latent_hw, device=eps_u.device)
            u, c = blend(eps_u, masks), blend(eps_c, masks)
            eps = u + cfg.guidance_scale * (c - u)
            if cfg.guidance_rescale > 0:
                eps = rescale_noise_cfg(eps, c, guidance_rescale=cfg.guidance_rescale)
            if record:
                trace.steps.append(i)
                trace.maps.append(maps.cpu())
                trace.masks.append(masks[:, 0, 0].cpu())
            z = scheduler.step(eps, t, z, eta=0.0, return_dict=False)[0]
    calls = sum(m.calls for m in models)
    return SampleResult(z, trace, calls, time.perf_counter() - began)


def decode(pipe, latents: torch.Tensor):
    with torch.no_grad():
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def method_branches(method: str, bp: BranchPrompts, adapters: list[str], cfg: CLoRAConfig, negative: str = "",
                    style: tuple[str, float] | None = None) -> tuple[list[Branches], bool, bool, int | None]:
    """(branch sets, use latent updates, use masks, switch_every) for a method."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    extra = {style[0]: style[1]} if style else {}
    N = len(adapters)
    if method == "clora":
        per = [dict(extra)] + [{a: 1.0, **extra} for a in adapters]
        return [Branches(bp.prompts, [negative] * (N + 1), per)], True, True, None
    if method == "composite":
        per = [{a: 1.0, **extra} for a in adapters]
        return [Branches([bp.merged_prompt] * N, [negative] * N, per)], False, False, None
    if method == "merge":
        per = [{**{a: cfg.merge_weight for a in adapters}, **extra}]
        return [Branches([bp.merged_prompt], [negative], per)], False, False, None
    if method == "switch":
        sets = [Branches([bp.merged_prompt], [negative], [{a: 1.0, **extra}]) for a in adapters]
        return sets, False, False, cfg.switch_every
    return [Branches([bp.prompts[0]], [negative], [dict(extra)])], False, False, None
