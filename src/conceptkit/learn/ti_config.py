"""Textual Inversion settings: plain data (no torch import), shared by the trainer, the CLI and the benchmarks.

Defaults are the recipe for the bundled shapes-world model (measured by `conceptkit evaluate ti`); the SD-1.5
recipe is documented in the README (diffusers' README: lr 5e-4 x batch 4 with --scale-lr, 3000 steps, 512 px).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import values as v


@dataclass
class TIConfig:
    token: str = "<concept>"
    init_word: str | None = "object"  # None: start from the mean of the vocabulary's vectors
    vectors: int = 1
    template: str = "object"  # object | object81 | style | a file
    steps: int = 600
    lr: float = 5e-3
    scale_lr: bool = False  # lr *= batch * grad_accum, as --scale_lr in both reference codes
    batch: int = 4
    grad_accum: int = 1
    resolution: int | None = None  # None: the model's native size
    center_crop: bool = False
    flip_p: float = 0.5
    weight_decay: float = 0.01  # AdamW, applied to the learned vectors (intended in both codes)
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 0  # 0: only at the end
    validation_prompts: tuple[str, ...] = ("a photo of {}",)
    validation_seeds: int = 4
    init_includes_pos0: bool = False  # reference quirk of the official code (§1.2): init = tok[init] + pos[0]
    fmt: str = "diffusers"  # or a1111
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast for the frozen models; the learned vectors stay fp32
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, GPU at 512 px)

    def __post_init__(self) -> None:
        """A bad setting fails here, naming the field, not deep inside the trainer (tests/test_config_checks.py)."""
        v.check_config(self, {"vectors": v.VECTORS, "steps": v.COUNT, "lr": v.RATE, "batch": v.COUNT,
                              "grad_accum": v.COUNT, "resolution": v.SIZE, "flip_p": v.PROBABILITY,
                              "weight_decay": v.WEIGHT, "seed": v.SEED, "checkpoint_every": v.COUNT,
                              "validate_every": v.COUNT_OR_ZERO, "validation_seeds": v.COUNT},
                       optional=("resolution",))
        v.check_text(self, ("template", "init_word"), optional=("init_word",))  # the token: training_tokenizer
        v.check_choice(self, "fmt", ("diffusers", "a1111"))
        v.check_choice(self, "mixed_precision", ("no", "bf16", "fp16"))

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch * self.grad_accum if self.scale_lr else self.lr
