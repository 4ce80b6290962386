"""Image encoders that give PromptNet its cross-attention context (the "CLIP tokens" of ALGORITHMS.md §3.1).

- `ClipVisionEncoder`: what ProFusion uses — a CLIP vision transformer the user has locally (e.g. the vision half of
  `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` for SD 2); tokens = `last_hidden_state` (no post-LN, no projection); the
  image is resized to the model's input size (bicubic) and normalised with CLIP's mean/std.
- `LatentPatchEncoder`: for the bundled shapes-world model, which has no vision model trained with it. The tokens are
  the reference's VAE latent cut into p x p patches, each with its (x, y) centre in [-1, 1] appended, so the learned
  `PromptNet.context_proj` sees both content and layout. It has no weights: everything learned lives in PromptNet.
  (The choice: a separately trained vision encoder would need its own training run and objective; the VAE latent
  already holds everything the shapes-world oracle can read, and PromptNet's conv path sees the same latent.)

An encoder is described by plain data (`describe()` → `image_encoder.json` next to the PromptNet weights) and
rebuilt from it by `load_image_encoder`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DESCRIPTION_FILE = "image_encoder.json"


class LatentPatchEncoder:
    kind = "latent-patches"

    def __init__(self, latent_channels: int = 4, patch: int = 2):
        self.latent_channels, self.patch = latent_channels, patch

    @property
    def embed_dim(self) -> int:
        return self.latent_channels * self.patch**2 + 2

    def describe(self) -> dict:
        return {"kind": self.kind, "latent_channels": self.latent_channels, "patch": self.patch}

    def __call__(self, pixels: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        p = self.patch
        if h % p or w % p:
            raise UserError(f"latent size {h}x{w} is not divisible by the image encoder's patch {p}")
        patches = F.unfold(latents.float(), kernel_size=p, stride=p).transpose(1, 2)  # (B, N, c*p*p)
        ys = (torch.arange(h // p, dtype=torch.float32) + 0.5) / (h // p) * 2 - 1
        xs = (torch.arange(w // p, dtype=torch.float32) + 0.5) / (w // p) * 2 - 1
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, -1, 2).to(latents.device)
        return torch.cat([patches, coords.expand(b, -1, -1)], dim=-1)


class ClipVisionEncoder:
    kind = "clip-vision"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPVisionModel
        from transformers.utils import logging as transformers_logging

        self.path = str(path)
        verbosity = transformers_logging.get_verbosity()
        # a whole CLIPModel folder (an official ProFusion pipeline's openclip/) loads its vision tower only:
        # transformers would list every text-tower tensor it skips, which is expected here
        transformers_logging.set_verbosity_error()
        try:
            self.model = CLIPVisionModel.from_pretrained(self.path, local_files_only=True).to(device, dtype).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a CLIP vision model from {self.path} ({str(e).splitlines()[0][:120]}): "
                            "pass --image-encoder FOLDER holding a transformers CLIPVisionModel") from None
        finally:
            transformers_logging.set_verbosity(verbosity)
        self.model.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return self.model.config.hidden_size

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path}

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        size = self.model.config.image_size
        x = (pixels.float() + 1) / 2  # [-1, 1] → [0, 1]
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.model.device, self.model.dtype)
        return self.model(pixel_values=x).last_hidden_state.float()


def load_image_encoder(description: dict, device="cpu"):
    kind = description.get("kind")
    if kind == LatentPatchEncoder.kind:
        return LatentPatchEncoder(description.get("latent_channels", 4), description.get("patch", 2))
    if kind == ClipVisionEncoder.kind:
        return ClipVisionEncoder(description["path"], device=device)
    raise UserError(f"unknown image encoder kind {kind!r} in {DESCRIPTION_FILE}: expected "
                    f"'{LatentPatchEncoder.kind}' or '{ClipVisionEncoder.kind}'")


def read_description(folder: Path) -> dict:
    path = Path(folder) / DESCRIPTION_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {DESCRIPTION_FILE}: pass a folder written by `conceptkit learn promptnet`")
    return json.loads(path.read_text())
