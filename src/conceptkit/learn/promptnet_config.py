"""PromptNet training settings (ALGORITHMS.md §3.4 pre-training, §3.5 single-image fine-tuning): plain data.

Pre-training trains PromptNet only; fine-tuning trains PromptNet plus every UNet attention `to_q`, `to_k`, `to_v`
(self- and cross-attention, not `to_out`). Both minimise the diffusion loss of "a photo of S*" with S* =
PromptNet(reference); the official objective is regularisation-free (`l2_reg` 0; it exists for ablation).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import values as v

EMA_DECAY = v.Number(float, 0, 0.999999, lo_open=True)  # 1 would freeze the average at the initial weights


@dataclass
class PretrainConfig:
    steps: int = 20_000
    lr: float = 1e-4  # train.py's argparse default (its README run uses 2e-5 at batch 8 for 80k steps on SD 2)
    batch: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    l2_reg: float = 0.0  # λ_p · mean(S*²); the official default is 0 ("regularisation-free")
    prefix: str = "a photo of"
    pad_prompt: bool = False  # official: the 6-token unpadded sequence; True pads like inference does
    # sample: z ~ q(z|x), as the official code (SD's VAE posterior is narrow). mean: the posterior mean, for models
    # whose UNet was trained on means (the bundled VAE's posterior std is 0.32 against latents of std 1).
    latents: str = "sample"
    projection_channels: int = 128
    flip_p: float = 0.0
    resolution: int | None = None
    # how a non-square image becomes a square: squash (resized as it is; what conceptkit always did), center (the
    # centre square; the official --center_crop), random (a square at a random offset at every step, after resizing
    # the shorter side; the official default, Resize + RandomCrop)
    crop: str = "squash"
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 1000
    validation_images: int = 4  # the first N training images, reconstructed with "a photo of S*"
    validation_prompts: tuple[str, ...] = ("a photo of S*",)
    # the official training command's: `accelerate launch --mixed_precision fp16 ... --gradient_checkpointing`,
    # train.py --use_ema (decay 0.9999)
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast of the loss's forward; weights and Adam stay fp32
    gradient_checkpointing: bool = False  # PromptNet's and the UNet's blocks recompute activations in backward
    ema_decay: float | None = None  # an EMA of PromptNet's weights (diffusers EMAModel); what is saved when set
    # the training prompt: none, `prefix` S* for every image (official); scene, each image's own scene caption
    # with its object replaced by S* ("a large S* on the left, on a brown background", the form the evaluation's
    # prompts take), read from the folder's metadata.jsonl (`conceptkit shapes sample --p-pair 0`), so S* need not
    # carry the background, position and size
    captions: str = "none"
    # an exported PromptNet folder whose weights (and image encoder) start the run, with a fresh optimizer
    init_from: str | None = None

    def __post_init__(self) -> None:
        """A bad setting fails here, naming the field (tests/test_config_checks.py)."""
        v.check_config(self, {"steps": v.COUNT, "lr": v.RATE, "batch": v.COUNT, "grad_accum": v.COUNT,
                              "max_grad_norm": v.POSITIVE, "weight_decay": v.WEIGHT, "l2_reg": v.WEIGHT,
                              "projection_channels": v.COUNT, "flip_p": v.PROBABILITY, "resolution": v.SIZE,
                              "seed": v.SEED, "checkpoint_every": v.COUNT, "keep_checkpoints": v.COUNT,
                              "validate_every": v.COUNT_OR_ZERO, "validation_images": v.COUNT_OR_ZERO,
                              "ema_decay": EMA_DECAY},
                       optional=("resolution", "ema_decay"))
        v.check_choice(self, "latents", ("sample", "mean"))
        v.check_choice(self, "mixed_precision", ("no", "bf16", "fp16"))
        v.check_choice(self, "crop", ("squash", "center", "random"))
        v.check_choice(self, "captions", ("none", "scene"))
        v.check_text(self, ("init_from",), optional=("init_from",))


@dataclass
class FinetuneConfig:
    steps: int = 100  # [nb-PF]: 100 iterations
    lr: float = 2e-5  # [nb-PF]
    batch: int = 4  # two independent batches of this size: one gives the reference, the other the target
    copies: int = 32  # the mini dataset: the image plus copies-1 augmented versions
    augment: str = "affine"  # none (the image repeated) | flip | affine (flip + rotate/translate/scale, border fill)
    rotate: float = 10.0  # degrees, ±
    translate: float = 0.2  # fraction of the side, ±
    scale: tuple[float, float] = (0.6, 1.0)
    weight_decay: float = 1e-2
    max_grad_norm: float | None = None  # the notebook does not clip
    l2_reg: float = 0.0
    prefix: str = "a photo of"
    # the image's own caption with S* ("a large S* on the left, on a brown background") instead of prefix + S*:
    # S* then need not carry what the words say (PromptNet pre-trained with captions "scene" learnt that split)
    caption: str | None = None
    pad_prompt: bool | None = None  # None: as the PromptNet was pre-trained
    latents: str | None = None  # sample | mean; None: as the PromptNet was pre-trained
    train_unet_attention: bool = True
    seed: int = 0
    grad_accum: int = 1
    checkpoint_every: int = 10_000  # short runs: the final weights are the checkpoint
    validate_every: int = 0
    validation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """A bad setting fails here, naming the field (tests/test_config_checks.py)."""
        v.check_config(self, {"steps": v.COUNT, "lr": v.RATE, "batch": v.COUNT, "copies": v.COUNT,
                              "rotate": v.Number(float, 0, 180), "translate": v.PROBABILITY,
                              "weight_decay": v.WEIGHT, "max_grad_norm": v.POSITIVE, "l2_reg": v.WEIGHT,
                              "seed": v.SEED, "grad_accum": v.COUNT, "checkpoint_every": v.COUNT,
                              "validate_every": v.COUNT_OR_ZERO},
                       optional=("max_grad_norm",))
        v.check_choice(self, "augment", ("none", "flip", "affine"))
        v.check_choice(self, "latents", ("sample", "mean"), optional=True)
        v.check_text(self, ("caption",), optional=("caption",))
        if self.caption is not None:
            try:
                v.check_placeholder_text(self.caption)
            except ValueError as e:
                raise ValueError(f"FinetuneConfig.caption = {self.caption!r}: {e}") from None
        low, high = self.scale
        if not (0 < low <= high <= 10):
            raise ValueError(f"FinetuneConfig.scale = {self.scale!r}: pass (low, high) with 0 < low ≤ high ≤ 10")
