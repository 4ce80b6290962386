"""Composition settings: plain data (no torch import), shared by the sampler, the CLI and the benchmarks.

`CLoRAConfig()` holds conceptkit's defaults, which fix the official code's quirks (ALGORITHMS.md §5);
`CLoRAConfig.reference()` reproduces the official behaviour (maps averaged over both CFG halves, stale noise
predictions, no epsilon in the min-max normalisation, the notebook's schedule).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .. import values as v

METHODS = ("clora", "merge", "switch", "composite", "none", "text", "regional")


@dataclass
class CLoRAConfig:
    steps: int = 50
    scheduler: str = "ddim"  # any of generate/schedulers.py (the official code: DDIM, η = 0)
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    # latent optimisation (§2.5)
    latent_update: bool = True
    step_size: float = 20.0  # plain gradient step on z, constant (no decay), as the official code
    max_iter_to_alter: int | None = None  # None: the first half of the steps (the notebook: 50 of 100)
    iterative_steps: tuple[int, ...] = (0, 10, 20)
    iterative_steps_steps: int = 20
    temperature: float = 0.5
    # attention maps (§2.3)
    attn_res: int | None = None  # None: latent side / 4 (the spec's H/32 for SD), but at least 8 (tiny models)
    cond_only_maps: bool = True  # reference: False (the unconditional half is averaged in, keyed to other tokens)
    minmax_eps: float = 1e-8  # reference: 0 (divides by zero on a flat map)
    # masks (§2.6)
    apply_mask_after: int = 0
    mask_threshold: float = 0.4
    # how a branch's concept tokens make one mask: "or" (the official code): each token's map thresholded at alpha x
    # its own maximum, then OR-ed, so a token the model hardly attends to (an untrained trigger word) adds its noise
    # as mask; "sum": the tokens' maps summed, then thresholded at alpha x the sum's maximum, so each token counts
    # by the attention it gets
    mask_combine: str = "or"
    # ours: a latent pixel goes to the one concept branch whose score is highest there (where the official masks
    # overlap, the branches are averaged, which mixes the two concepts' attributes)
    mask_exclusive: bool = False
    dilate: bool = False
    erode: bool = False
    opening: bool = False
    closing: bool = False
    # §5 fixes
    fresh_predictions: bool = True  # reference: False (the DDIM step uses ε from before the last latent update)
    explicit_attention: bool = False  # reference: True (explicit softmax(QKᵀ) in every layer, not only the mapped ones)
    graphs_every_step: bool = False  # reference: True (autograd graphs even on steps without a latent update)
    # ours: the latent update's forward stops once the last mapped layer has its map (the loss needs the maps only,
    # and with fresh predictions its ε is thrown away): the UNet's later blocks run neither forward nor backward
    stop_after_maps: bool = True  # reference: False
    use_text_encoder_lora: bool = True
    # ours: the concept LoRAs' UNet layers act on the first `lora_end` share of the steps only, by diffusers'
    # control_guidance_end rule (step i of n while (i + 1) / n <= lora_end); after that the branches keep their
    # prompts (a learned trigger word keeps working) and the base UNet draws the detail. A concept LoRA's errors can
    # live in its low-noise steps, where the object's fine texture is drawn (README, "Does it work?").
    lora_end: float = 1.0
    style_weight: float = 0.8
    # execution: "batched" = all branches and both CFG halves in one UNet call with per-row adapters;
    # "sequential" = the official structure (one batch-2 call per branch with adapter switching)
    execution: str = "batched"
    # baselines
    merge_weight: float = 1.0
    switch_every: int = 5

    QUIRKS = dict(cond_only_maps=False, minmax_eps=0.0, fresh_predictions=False, execution="sequential",
                  graphs_every_step=True, explicit_attention=True, stop_after_maps=False)

    def __post_init__(self) -> None:
        """A bad setting fails here, naming the field, not in the sampler (tests/test_config_checks.py)."""
        v.check_config(self, {"steps": v.COUNT, "guidance_scale": v.GUIDANCE, "guidance_rescale": v.PROBABILITY,
                              "step_size": v.WEIGHT, "max_iter_to_alter": v.COUNT_OR_ZERO,
                              "iterative_steps_steps": v.COUNT_OR_ZERO, "temperature": v.POSITIVE, "lora_end": v.SHARE,
                              "attn_res": v.Number(int, 1, 1024), "minmax_eps": v.PROBABILITY,
                              "apply_mask_after": v.COUNT_OR_ZERO, "mask_threshold": v.PROBABILITY,
                              "style_weight": v.SMALL_WEIGHT, "merge_weight": v.SMALL_WEIGHT, "switch_every": v.COUNT},
                       optional=("max_iter_to_alter", "attn_res"))
        v.check_choice(self, "scheduler", v.SCHEDULER_NAMES)
        v.check_choice(self, "execution", ("batched", "sequential"))
        v.check_choice(self, "mask_combine", ("or", "sum"))
        if not isinstance(self.iterative_steps, (tuple, list)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= v.BIG for s in self.iterative_steps):
            raise ValueError(f"CLoRAConfig.iterative_steps = {self.iterative_steps!r}: pass a tuple of step numbers "
                             "≥ 0, e.g. (0, 10, 20)")

    @classmethod
    def reference(cls, **overrides) -> "CLoRAConfig":
        """The official code's behaviour, quirks included (§5). Schedule values stay conceptkit's unless overridden;
        the notebook's are steps=100, guidance_scale=10, max_iter_to_alter=50, iterative_steps=(0, 10, 20)."""
        return cls(**overrides).as_reference()

    def as_reference(self) -> "CLoRAConfig":
        """These settings with the official code's quirks switched back on."""
        return replace(self, **self.QUIRKS)

    def alter_until(self) -> int:
        return self.steps // 2 if self.max_iter_to_alter is None else self.max_iter_to_alter
