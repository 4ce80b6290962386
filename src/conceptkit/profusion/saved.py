"""A PromptNet folder on disk: what `learn promptnet` writes and `generate --promptnet` reads.

    config.json, diffusion_pytorch_model.safetensors   the PromptNet (diffusers save_pretrained)
    image_encoder.json                                  which image encoder gives it its context (plain data)
    promptnet.json                                      conceptkit metadata: base model, prefix, padding, recipe
    unet_attention.safetensors                          fine-tuned runs only: the UNet's to_q/to_k/to_v weights
    reference.png                                       fine-tuned runs only: the image it was fine-tuned on
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files import atomic_write, atomic_write_text
from .image_encoders import DESCRIPTION_FILE, load_image_encoder, read_description
from .promptnet import PromptNet
from .state import load_strict

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
META_FILE = "promptnet.json"
UNET_ATTENTION_FILE = "unet_attention.safetensors"
REFERENCE_FILE = "reference.png"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v")


@dataclass
class SavedPromptNet:
    promptnet: PromptNet
    image_encoder: object
    meta: dict
    unet_attention: dict[str, torch.Tensor] | None = None
    folder: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def reference_path(self) -> Path | None:
        path = self.folder / REFERENCE_FILE if self.folder else None
        return path if path is not None and path.is_file() else None


def attention_weight_names(unet) -> list[str]:
    """Every to_q/to_k/to_v weight (and bias, if any) of the UNet's attention layers."""
    return [name for name, _ in unet.named_parameters()
            if any(f".{p}." in f".{name}" for p in ATTENTION_PROJECTIONS) and "lora" not in name]


def save_promptnet(out: Path, promptnet: PromptNet, image_encoder, meta: dict,
                   unet_attention: dict[str, torch.Tensor] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in promptnet.state_dict().items()}  # as they are (fp16 ships)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", promptnet.to_json_string())
    atomic_write_text(out / DESCRIPTION_FILE, json.dumps(image_encoder.describe(), indent=2) + "\n")
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    if unet_attention is not None:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in unet_attention.items()}
        atomic_write(out / UNET_ATTENTION_FILE, lambda p: save_file(tensors, p))
    return out


def read_promptnet(folder: Path) -> PromptNet:
    """The PromptNet of a folder, every tensor checked against the network its config.json describes."""
    config = PromptNet.load_config(folder)
    try:
        net = PromptNet.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder / 'config.json'} does not describe a PromptNet ({str(e).splitlines()[0][:120]}): "
                        "pass a folder written by `conceptkit learn promptnet` or `conceptkit convert promptnet`"
                        ) from None
    return load_strict(net, load_file(folder / WEIGHTS_FILE), f"PromptNet {folder / WEIGHTS_FILE}",
                       "its weights do not fit its config.json: write the folder again with `conceptkit learn "
                       "promptnet` (or `convert promptnet`)")


def load_promptnet(folder: str | Path, pipe) -> SavedPromptNet:
    """A PromptNet folder, or an official ProFusion checkpoint converted in memory (profusion/official.py), for
    `pipe`'s UNet and text encoder."""
    from ..models.sdxl import refuse_unless_sd
    from .official import convert_official, find_official

    refuse_unless_sd(pipe, "ProFusion (PromptNet)")
    folder = Path(folder)
    official = find_official(folder)
    if official is not None:
        converted = convert_official(official, unet_config=pipe.unet.config)
        if converted.image_encoder is None:
            raise UserError(f"{folder} has no image encoder next to it (the pipeline folder's openclip/): convert it "
                            f"with `conceptkit convert promptnet --from-official {folder} --image-encoder FOLDER "
                            "--out DIR` and pass --promptnet DIR")
        net, meta, description = converted.promptnet, converted.meta, converted.image_encoder.describe()
        print(f"converted the official ProFusion PromptNet {folder} in memory (save it with `conceptkit convert "
              "promptnet`)", file=sys.stderr)
    elif not (folder / "config.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a PromptNet folder (no config.json + {WEIGHTS_FILE}): "
                        "pass a folder written by `conceptkit learn promptnet`, e.g. the bundled one, or an official "
                        "ProFusion checkpoint")
    else:
        meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
        net = read_promptnet(folder)
        description = read_description(folder)
    unet_cfg = net.config.unet_config
    checks = {"block_out_channels": list(pipe.unet.config.block_out_channels),
              "cross_attention_dim": pipe.unet.config.cross_attention_dim}
    for key, want in checks.items():
        have = unet_cfg.get(key)
        if (list(have) if isinstance(have, (list, tuple)) else have) != want:
            raise UserError(f"PromptNet {folder} was built for a UNet with {key}={have}, the loaded model has {want}: "
                            "pass the --model it was trained for, or train one for this model")
    text_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if net.config.text_embed_dim != text_dim:
        raise UserError(f"PromptNet {folder} makes {net.config.text_embed_dim}-d words, the text encoder takes "
                        f"{text_dim}-d: pass the --model it was trained for")
    net = net.to(pipe.unet.device, torch.float32).eval().requires_grad_(False)
    encoder = load_image_encoder(description, device=pipe.unet.device)
    attention = None
    if (folder / UNET_ATTENTION_FILE).is_file():
        attention = load_file(folder / UNET_ATTENTION_FILE)
        names = set(attention_weight_names(pipe.unet))
        if not set(attention) <= names:
            raise UserError(f"{folder / UNET_ATTENTION_FILE} names UNet weights this model does not have: pass the "
                            "--model it was fine-tuned on")
    return SavedPromptNet(net, encoder, meta, attention, folder)


@contextlib.contextmanager
def unet_attention_applied(unet, weights: dict[str, torch.Tensor] | None):
    """The UNet with fine-tuned to_q/to_k/to_v weights for the duration; the originals are put back after."""
    if not weights:
        yield unet
        return
    params = dict(unet.named_parameters())
    saved = {k: params[k].detach().clone() for k in weights}
    with torch.no_grad():
        for k, v in weights.items():
            if params[k].shape != v.shape:
                raise UserError(f"fine-tuned UNet weight {k} has shape {tuple(v.shape)}, the model's is "
                                f"{tuple(params[k].shape)}: pass the --model it was fine-tuned on")
            params[k].copy_(v.to(params[k].dtype))
    try:
        yield unet
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
