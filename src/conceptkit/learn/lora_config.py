"""DreamBooth-style LoRA settings: plain data (no torch import), shared by the trainer and the CLI.

Defaults are the recipe for the bundled shapes-world model (64 px): rank 4, alpha 4, lr 1e-3, batch 4, 800 steps,
UNet + text-encoder attention, no mirroring; about 0.17 s a step on one CPU thread (2.3 min a concept). Measured on
the four bundled concept sets, instance prompt "a zwx object", then "a zwx object" at 8 held-out seeds plus the five
compositional prompts of `evaluate ti` at 2 seeds each, 25 DDIM steps, read by the oracle (fidelity: shape, colour
and pattern all right; adherence: the requested background/position/size):

| steps (lr 1e-3) | "a zwx object" fidelity | all prompts fidelity | adherence |
|---|---|---|---|
| 0 (no LoRA)     | 0.00 | 0.00 | 0.833 |
| 200             | 0.69 (star .50, moon .75, cross .63, diamond .88) | 0.35 | 0.80 |
| 400             | 0.84 (1.0, .88, .88, .63) | 0.39 | 0.78 |
| 800             | 1.00 (1.0, 1.0, 1.0, 1.0) | 0.50 | 0.78 |

On red-striped-star alone: lr 1e-4 needs 800 steps for fidelity 1.0 (0.0 at 200, 0.5 at 400); lr 3e-3 gets there
by 200 steps but adherence falls to 0.60 by 400; without the text encoder (lr 1e-3) 0.75 / 1.0 / 1.0 at
200 / 400 / 800 steps, like with it.

The SD-1.5 recipe of diffusers' `train_dreambooth_lora.py` README is: rank 4 (alpha = rank), lr 1e-4 (AdamW, weight
decay 1e-2), batch 1, 500 steps, 512 px, UNet attention projections (add --train_text_encoder for the text encoder,
same lr), no prior preservation in its quick start. On SD 1.5 pass e.g. `--lr 1e-4 --steps 500 --batch 1`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import values as v

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoRAConfig:
    trigger: str = "sks"  # the rare word the images are captioned with
    class_word: str | None = None  # the coarse class ("circle", "dog"); validation prompts say "trigger class_word"
    description: str | None = None  # the concept in plain words ("yellow checkered circle"): compose --method text
    prompt: str | None = None  # the instance prompt for every image; None: per-image captions <image stem>.txt
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (LoRA scale alpha / rank = 1)
    steps: int = 800
    lr: float = 1e-3
    text_encoder: bool = True  # also put LoRA on the text encoder's attention projections
    text_encoder_lr: float | None = None  # None: lr
    batch: int = 4
    grad_accum: int = 1
    resolution: int | None = None  # None: the model's native size
    center_crop: bool = False
    flip_p: float = 0.0  # DreamBooth / kohya default: no mirroring (it changes asymmetric objects)
    seed: int = 0
    checkpoint_every: int = 100
    validate_every: int = 0  # 0: only at the end
    validation_prompts: tuple[str, ...] = ("a photo of {}",)  # {} = "trigger class_word" (or the trigger alone)
    validation_seeds: int = 4
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast for the models; the LoRA weights stay fp32
    weight_decay: float = 1e-2  # AdamW, on the LoRA weights (diffusers' --adam_weight_decay)
    # sample: z ~ q(z|x), as diffusers' trainer. mean: the posterior mean, for models whose UNet was trained on means
    # (the bundled model: its VAE's posterior std is 0.31 against latents of std 1, and LoRAs trained on samples
    # learn that noise as colour speckle; README, evaluate clora)
    latents: str = "sample"
    # pivotal tuning: a Textual Inversion file (one or more vectors) whose token is the trigger (learned first by `learn ti`,
    # fixed while the adapters train, bundled into the LoRA file)
    embedding: str | None = None

    def __post_init__(self) -> None:
        """A bad setting fails here, naming the field, not deep inside the trainer (tests/test_config_checks.py)."""
        v.check_config(self, {"rank": v.RANK, "alpha": v.POSITIVE, "steps": v.COUNT, "lr": v.RATE,
                              "text_encoder_lr": v.RATE, "batch": v.COUNT, "grad_accum": v.COUNT,
                              "resolution": v.SIZE, "flip_p": v.PROBABILITY, "seed": v.SEED,
                              "checkpoint_every": v.COUNT, "validate_every": v.COUNT_OR_ZERO,
                              "validation_seeds": v.COUNT, "weight_decay": v.WEIGHT},
                       optional=("alpha", "text_encoder_lr", "resolution"))
        v.check_text(self, ("trigger", "class_word", "prompt", "description", "embedding"),
                     optional=("class_word", "prompt", "description", "embedding"))
        v.check_choice(self, "mixed_precision", ("no", "bf16", "fp16"))
        v.check_choice(self, "latents", ("sample", "mean"))

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.lr if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def phrase(self) -> str:
        """What {} stands for in validation prompts: 'trigger class_word', or the trigger alone."""
        return f"{self.trigger} {self.class_word}" if self.class_word else self.trigger
