"""CLoRA (§2.5) and the baselines as a plug-in of the denoising loop (generate/loop.py).

A composition is K *branches* (branches.py). Every step computes all branches' ε (both CFG halves), optionally
moves the latent to lower the contrastive loss of their attention maps, and blends the branches with masks; the
loop takes the scheduler's step:
- clora:     K = N+1 (base + one branch per concept), latent updates, attention masks;
- composite: K = N, every branch the full prompt with one LoRA, uniform average (LoRA Composite);
- merge:     K = 1, the full prompt with every LoRA at once (weighted adapters);
- switch:    K = 1, the full prompt, the active LoRA changes every `switch_every` steps (LoRA Switch);
- none:      K = 1, the plain prompt without LoRAs;
- text:      K = 1, every concept written out in words (its description), no LoRA: the base model's own binding;
- regional:  clora's branches without latent updates, each concept's branch confined to a fixed region (a half of
             the image: regional prompting with the layout given, an upper reference for attention masks).

The latent update touches the scheduler only through the latent: the loss's gradient is taken with respect to the
model's input (the scheduler's `scale_model_input` of its latent) and the latent the scheduler holds moves by the
same change, scaled back, so every scheduler the plain path takes works and a step size means the same on each
(`CLoRAConfig.scheduler`; the official code and the defaults use DDIM, η = 0).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..generate.loop import Step, Trace, denoise, guide, initial_noise, latent_size, lora_acts, sampler
from ..models.sdxl import is_sdxl
from .attention import AttentionStore, capturing, default_attn_res
from .branches import BranchModel, Branches, WordRows, encode_branches
from .config import CLoRAConfig, METHODS
from .contrastive import clora_loss
from .masks import attention_masks, blend, region_masks
from .prompts import BranchPrompts


@dataclass
class SampleResult:
    latents: torch.Tensor
    trace: Trace
    unet_calls: int
    seconds: float


class Composition:
    """The plug-in: `before_step` is CLoRA's contrastive latent update, calling the object is the masked blend of
    the branches' guided predictions (what the model is), and both record into the step's trace."""

    def __init__(self, models: list[BranchModel], cfg: CLoRAConfig, *, groups: list[list[list[int]]] | None,
                 mask_indices: list[list[int]] | None, latent_hw: tuple[int, int], switch_every: int | None = None,
                 fixed_masks: torch.Tensor | None = None, lora_ends: dict[str, float] | None = None):
        self.models, self.cfg, self.groups, self.mask_indices = models, cfg, groups, mask_indices
        self.fixed_masks = fixed_masks  # (K, 1, C, h, w): regional composition's masks, used at every step
        self.latent_hw, self.switch_every = latent_hw, switch_every
        self.update_until = cfg.alter_until() if (cfg.latent_update and groups is not None) else 0
        # With maps from the conditional half and ε recomputed after the update, the update's forward needs only
        # the K conditional rows: half the forward and half the backward of the official all-rows graph.
        self.cond_only = cfg.cond_only_maps and cfg.fresh_predictions
        self.stale = None  # the official code's predictions from before the last update (§5), when kept
        self.lora_ends = lora_ends or {}  # {concept adapter: the share of the steps its UNet layers act on}

    def off_at(self, step: Step) -> frozenset:
        """The concept adapters whose UNet layers are off at this step."""
        return frozenset(a for a, end in self.lora_ends.items() if not lora_acts(step.index, self.cfg.steps, end))

    def model_at(self, step: Step) -> BranchModel:
        return self.models[(step.index // self.switch_every) % len(self.models)] if self.switch_every else self.models[0]

    def loss_of(self, maps: torch.Tensor) -> torch.Tensor:
        return clora_loss(maps.to(self.models[0].work_dtype), self.groups, self.cfg.temperature, self.cfg.minmax_eps)

    def gradient_step(self, z: torch.Tensor, model: BranchModel, step: Step):
        """One step down the loss's gradient, taken in the model's input space (the variance-preserving latent the
        official DDIM code updates) and carried back to the latent the scheduler holds: with a sigma-scaled
        scheduler (Euler: input = z / sqrt(σ² + 1)) the noisy image moves exactly as it would under DDIM, instead
        of (σ² + 1) times less."""
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            x = step.model_input(z)  # z itself (the same tensor) for DDIM, DPM-Solver, PNDM
            eps_u, eps_c, maps = model(x, step.t, cond_only=self.cond_only, maps_only=self.cfg.stop_after_maps,
                                       off=self.off_at(step))
            loss = self.loss_of(maps)
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, x)
                z = z - self.cfg.step_size * grad / step.model_input(torch.ones_like(z))
        eps_u = None if eps_u is None else eps_u.detach()
        eps_c = None if eps_c is None else eps_c.detach()  # None: the forward stopped after the maps
        return z.detach(), eps_u, eps_c, maps.detach(), float(loss.detach())

    def before_step(self, z: torch.Tensor, step: Step) -> torch.Tensor:
        """The contrastive update of the latent the scheduler holds, on the first `max_iter_to_alter` steps."""
        self.stale = None
        if step.index >= self.update_until:
            return z
        model, cfg = self.model_at(step), self.cfg
        z, eps_u, eps_c, maps, loss = self.gradient_step(z, model, step)
        for _ in range(cfg.iterative_steps_steps if step.index in cfg.iterative_steps else 0):
            z, eps_u, eps_c, maps, loss = self.gradient_step(z, model, step)
        if not cfg.fresh_predictions:  # §5: the official step uses ε from before the last latent update
            self.stale = eps_u, eps_c, maps
        step.trace.losses.append(loss)
        return z

    def __call__(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        cfg, model = self.cfg, self.model_at(step)
        off = self.off_at(step)
        if self.stale is not None:
            eps_u, eps_c, maps = self.stale
        elif step.index < self.update_until:  # fresh predictions on the updated latent
            eps_u, eps_c, maps = model(x, step.t, off=off)
        else:
            graphs = cfg.graphs_every_step  # the official code builds autograd graphs even here (§2.8)
            with torch.enable_grad() if graphs else torch.no_grad():
                eps_u, eps_c, maps = model(x.detach().requires_grad_(graphs), step.t, off=off)
            eps_u, eps_c, maps = eps_u.detach(), eps_c.detach(), maps.detach()
        K, channels = eps_u.shape[:2]
        if self.fixed_masks is not None:
            masks = self.fixed_masks.to(eps_u.device)
        elif self.mask_indices is not None and step.index >= cfg.apply_mask_after:
            masks = attention_masks(maps, self.mask_indices, self.latent_hw, cfg.mask_threshold, channels,
                                    dilation=cfg.dilate, erosion=cfg.erode, opening=cfg.opening, closing=cfg.closing,
                                    combine=cfg.mask_combine, exclusive=cfg.mask_exclusive)
        else:
            masks = torch.ones(K, 1, channels, *self.latent_hw, device=eps_u.device)
        step.trace.record(step.index, maps, masks[:, 0, 0])
        return guide(blend(eps_u, masks), blend(eps_c, masks), cfg.guidance_scale, cfg.guidance_rescale)


def sample(pipe, branch_sets: list[Branches], cfg: CLoRAConfig, *, groups: list[list[list[int]]] | None,
           mask_indices: list[list[int]] | None, generator: torch.Generator, style: str | None = None,
           height: int | None = None, width: int | None = None, switch_every: int | None = None,
           record: bool = False, embeddings: list[torch.Tensor] | None = None,
           words: dict | None = None, regions: list[str] | None = None, fixed_masks: bool = False,
           lora_ends: dict[str, float] | None = None) -> SampleResult:
    """Denoise one latent. `branch_sets` has one entry, or (switch) one per adapter, used in turn.

    groups=None turns latent updates off; mask_indices=None blends the branches uniformly. `embeddings`: the
    branch sets' `encode_branches` output, when the caller samples several seeds with the same prompts. `words`:
    {concept name: its word source (profusion/image_word.py's ImageWord)} for branches with word slots.
    fixed_masks=True (regional): branch 0 is the base prompt and branch i its concept i's, blended with the fixed
    region masks of masks.region_masks(regions) instead of attention masks. `lora_ends`: {concept adapter: the
    share of the steps its UNet layers act on} (CLoRAConfig.lora_end: the one for adapters not named; a style LoRA
    acts on every step).
    """
    began = time.perf_counter()
    latent_hw = latent_size(pipe, height, width)
    schedule = sampler(cfg.scheduler, pipe, cfg.steps)
    z = initial_noise(pipe, [generator], latent_hw, schedule)
    deepest = 2 ** (len(pipe.unet.config.block_out_channels) - 1) if is_sdxl(pipe) else None
    store = AttentionStore(default_attn_res(latent_hw, cfg.attn_res, deepest))
    if embeddings is None:
        embeddings = [encode_branches(pipe, b, cfg, style) for b in branch_sets]
    models = [BranchModel(pipe, b, e, cfg, store, WordRows(pipe, b, cfg, style, words or {}) if b.words else None)
              for b, e in zip(branch_sets, embeddings)]
    concept_adapters = {a for b in branch_sets for branch in b.adapters for a in branch} - {style}
    ends = {a: (lora_ends or {}).get(a, cfg.lora_end) for a in concept_adapters}
    fixed = None
    if fixed_masks:
        fixed = region_masks(regions, len(branch_sets[0]) - 1, latent_hw, z.shape[1])
    composition = Composition(models, cfg, groups=groups, mask_indices=mask_indices, latent_hw=latent_hw,
                              switch_every=switch_every, fixed_masks=fixed,
                              lora_ends={a: end for a, end in ends.items() if end < 1})
    trace = Trace(keep_maps=record)
    with capturing(pipe.unet, store, explicit_everywhere=cfg.explicit_attention):
        z = denoise(composition, z, schedule, before_step=composition.before_step, generators=[generator],
                    trace=trace)
    return SampleResult(z, trace, sum(m.calls for m in models), time.perf_counter() - began)


def method_branches(method: str, bp: BranchPrompts, adapters: list[str | None], cfg: CLoRAConfig, negative: str = "",
                    style: tuple[str, float] | None = None, weights: list[float] | None = None
                    ) -> tuple[list[Branches], bool, bool, int | None]:
    """(branch sets, use latent updates, use masks, switch_every) for a method. `adapters`: each concept's LoRA
    adapter, in slot order; None for a concept that is a word (Textual Inversion token, ProFusion image).
    `weights`: each adapter's scale (default 1; merge multiplies it by cfg.merge_weight)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    extra = {style[0]: style[1]} if style else {}
    N = len(adapters)
    scale = dict(zip(adapters, weights or [1.0] * N))

    def own(adapter: str | None) -> dict[str, float]:
        return {adapter: scale[adapter], **extra} if adapter else dict(extra)

    def merged(n: int) -> dict:  # n branches of the prompt with every concept in it
        return {"words": [bp.merged_words] * n, "ids": [bp.merged_ids] * n} if bp.merged_words else {}

    if method in ("clora", "regional"):  # regional: the same branches, fixed region masks (sample(fixed_masks=True))
        per = [dict(extra)] + [own(a) for a in adapters]
        words = {"words": bp.words, "ids": bp.ids} if any(bp.words) else {}
        clora = method == "clora"
        return [Branches(bp.prompts, [negative] * (N + 1), per, **words)], clora, clora, None
    if method == "composite":
        per = [own(a) for a in adapters]
        return [Branches([bp.merged_prompt] * N, [negative] * N, per, **merged(N))], False, False, None
    if method == "merge":
        per = [{**{a: cfg.merge_weight * scale[a] for a in adapters if a}, **extra}]
        return [Branches([bp.merged_prompt], [negative], per, **merged(1))], False, False, None
    if method == "switch":
        sets = [Branches([bp.merged_prompt], [negative], [own(a)], **merged(1)) for a in adapters]
        return sets, False, False, cfg.switch_every
    if method == "text":
        if bp.text_prompt is None:
            missing = [c.name for c in bp.concepts if not c.description]
            raise UserError(f"--method text writes every concept out in words, and concept '{missing[0]}' has no "
                            "description: give it one (LoraSpec(description=...), or a LoRA file whose metadata has "
                            "one: learn lora --description)")
        return [Branches([bp.text_prompt], [negative], [dict(extra)])], False, False, None
    return [Branches([bp.prompts[0]], [negative], [dict(extra)])], False, False, None
