"""Official ProFusion checkpoints (drboog/ProFusion) as conceptkit PromptNets.

The official `PromptNetModel` (its diffusers fork, `models/promptnet.py`) and conceptkit's `PromptNet` are the same
network (ALGORITHMS.md §3.2) under other names:

    official                                                conceptkit
    conv_in, time_embedding, down_blocks.*, mid_block.*     the same (both are a copy of the UNet's encoder half)
    promptnet_cond_embedding.conv_in / .conv_out            prompt_embedding.0 / prompt_embedding.2
    vision_embedding                                        context_proj
    first_prompt_projection                                 projections.0
    down_prompt_projections.{i}                             projections.{i + 1}
    mid_prompt_projection                                   projections.{blocks + 1}
    region_prompt_output                                    to_word
    residual_projections(_2).*, mid_residual_projection(_2).*   dropped: the residual heads, multiplied by 0 (§3.2)

What the official code saves is a pipeline folder (`StableDiffusionPromptNetPipeline.save_pretrained`: model_index.json,
promptnet/ with config.json and diffusion_pytorch_model.bin or .safetensors, openclip/ the CLIP model whose vision
tower gives PromptNet its tokens, and the SD parts). Any of the pipeline folder, its promptnet/ folder or the
weights file is accepted. The network's shape comes from promptnet/config.json, or, for a weights file alone, from
the base model's UNet (`unet_config`). Its projection kernels are read off the weights (the official first kernel is
max(2^(blocks-1), 8), which `PromptNet.projection_grid` reproduces), and every tensor is checked for name and shape
(profusion/state.py). `.bin` files are read with torch.load(weights_only=True) (models/pickles.py): no code runs.

The converted PromptNet expects the official training prompt (6 unpadded tokens, posterior samples of the latent),
which is what the metadata written with it says.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

OFFICIAL_CLASS = "PromptNetModel"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MARKER = "promptnet_cond_embedding.conv_in.weight"  # a tensor only the official PromptNet has
RESIDUAL_HEADS = ("residual_projections.", "residual_projections_2.", "mid_residual_projection.",
                  "mid_residual_projection_2.")
# the official config's keys that describe the copied UNet encoder half (UNet2DConditionModel's names)
UNET_KEYS = ("sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
             "mid_block_type", "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
             "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
             "attention_head_dim", "dual_cross_attention", "use_linear_projection", "class_embed_type",
             "num_class_embeds", "upcast_attention", "resnet_time_scale_shift", "time_embedding_type",
             "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel", "projection_class_embeddings_input_dim")
UP_FOR_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
FIX = "pass an official ProFusion PromptNet (the pipeline folder train.py writes, its promptnet/ folder or its weights)"


@dataclass
class OfficialSource:
    """Where the parts of an official checkpoint are."""
    weights: Path
    config: Path | None  # promptnet/config.json
    image_encoder: Path | None  # the pipeline's openclip/ folder (a transformers CLIPModel)
    given: Path


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as JSON ({e.__class__.__name__}): {FIX}") from None
    return data if isinstance(data, dict) else {}


def _is_official_config(path: Path) -> bool:
    """Whether `path` is an official PromptNetModel config.json (an unreadable one is not: the loader of the
    folder it is in says what is wrong with it)."""
    try:
        return path.is_file() and json.loads(path.read_text()).get("_class_name") == OFFICIAL_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def _weights_in(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def _pipeline_encoder(pipeline: Path) -> Path | None:
    index = pipeline / "model_index.json"
    if index.is_file() and "openclip" in _json(index) and (pipeline / "openclip" / "config.json").is_file():
        return pipeline / "openclip"
    return None


def _file_is_official(path: Path) -> bool:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                return MARKER in f.keys()
        except Exception:  # noqa: BLE001 - not a safetensors file: not an official checkpoint either
            return False
    return path.suffix in (".bin", ".pt", ".pth", ".ckpt")  # told apart by their keys when read


def find_official(path: str | Path) -> OfficialSource | None:
    """The official checkpoint at `path` (a pipeline folder, its promptnet/ folder or a weights file), or None when
    `path` is not one (a conceptkit PromptNet folder, or nothing)."""
    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        if index.is_file() and "promptnet" in _json(index):
            folder = path / "promptnet"
            weights = _weights_in(folder)
            if weights is None:
                raise UserError(f"{path} is an official ProFusion pipeline folder without PromptNet weights "
                                f"(none of {', '.join(WEIGHT_FILES)} in {folder}): {FIX}")
            return OfficialSource(weights, folder / "config.json" if (folder / "config.json").is_file() else None,
                                  _pipeline_encoder(path), path)
        if _is_official_config(path / "config.json"):
            weights = _weights_in(path)
            if weights is None:
                raise UserError(f"{path} holds an official PromptNet config.json but no weights "
                                f"({' or '.join(WEIGHT_FILES)}): {FIX}")
            return OfficialSource(weights, path / "config.json", _pipeline_encoder(path.parent), path)
        return None
    if path.is_file() and _file_is_official(path):
        config = path.parent / "config.json"
        return OfficialSource(path, config if _is_official_config(config) else None,
                              _pipeline_encoder(path.parent.parent), path)
    return None


def read_official_state(source: OfficialSource) -> dict[str, torch.Tensor]:
    path = source.weights
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        from ..models.pickles import load_weights_only

        state = load_weights_only(path, "official PromptNet")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning-style wrapper
        state = state["state_dict"]
    if not isinstance(state, dict) or MARKER not in state:
        raise UserError(f"{path} is not an official ProFusion PromptNet (it has no {MARKER}): {FIX}, or a "
                        "conceptkit PromptNet folder")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def our_name(key: str, blocks: int) -> str | None:
    """conceptkit's name for an official tensor; None for the residual heads, which are dropped."""
    if key.startswith(RESIDUAL_HEADS):
        return None
    for official, ours in (("promptnet_cond_embedding.conv_in.", "prompt_embedding.0."),
                           ("promptnet_cond_embedding.conv_out.", "prompt_embedding.2."),
                           ("vision_embedding.", "context_proj."),
                           ("first_prompt_projection.", "projections.0."),
                           ("mid_prompt_projection.", f"projections.{blocks + 1}."),
                           ("region_prompt_output.", "to_word.")):
        if key.startswith(official):
            return ours + key[len(official):]
    found = re.match(r"down_prompt_projections\.(\d+)\.(.*)", key)
    if found:
        return f"projections.{int(found[1]) + 1}.{found[2]}"
    return key  # conv_in, time_embedding, down_blocks, mid_block: the UNet's names in both


def official_name(key: str, blocks: int) -> str:
    """The official name of a conceptkit PromptNet tensor (our_name's inverse), for messages in the file's terms."""
    for ours, official in (("prompt_embedding.0.", "promptnet_cond_embedding.conv_in."),
                           ("prompt_embedding.2.", "promptnet_cond_embedding.conv_out."),
                           ("context_proj.", "vision_embedding."), ("to_word.", "region_prompt_output.")):
        if key.startswith(ours):
            return official + key[len(ours):]
    found = re.match(r"projections\.(\d+)\.(.*)", key)
    if found:
        i = int(found[1])
        name = ("first_prompt_projection" if i == 0 else "mid_prompt_projection" if i == blocks + 1
                else f"down_prompt_projections.{i - 1}")
        return f"{name}.{found[2]}"
    return key


def to_our_state(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        name = our_name(key, blocks)
        if name is not None:
            renamed[name] = tensor
    return renamed


def unet_config_from_official(config: dict) -> dict:
    """The UNet2DConditionModel config of the encoder half the official PromptNet copied (its up blocks mirror the
    down blocks; PromptNet does not keep them)."""
    unet = {k: config[k] for k in UNET_KEYS if k in config}
    downs = list(unet.get("down_block_types", ()))
    unknown = [d for d in downs if d not in UP_FOR_DOWN]
    if not downs or unknown:
        raise UserError(f"official PromptNet config has down blocks {downs}: conceptkit converts "
                        f"{' and '.join(UP_FOR_DOWN)} blocks only")
    unet["up_block_types"] = [UP_FOR_DOWN[d] for d in reversed(downs)]
    return unet


def build_promptnet(state: dict[str, torch.Tensor], unet_config: dict, source: str):
    """conceptkit's PromptNet for the official tensors `state` (official names): its sizes read off the tensors,
    its encoder half from `unet_config`, the weights loaded strictly."""
    from .promptnet import PromptNet
    from .state import load_strict, state_problems

    blocks = len(unet_config["block_out_channels"])
    ours = to_our_state(state, blocks)
    shapes = {k: ours[k].shape for k in ("context_proj.weight", "projections.0.weight", "to_word.weight") if k in ours}
    if len(shapes) < 3:
        missing = sorted({"context_proj.weight", "projections.0.weight", "to_word.weight"} - set(shapes))
        raise UserError(f"{source}: missing {', '.join(missing)} (official: vision_embedding, "
                        f"first_prompt_projection, region_prompt_output): {FIX}")
    projection_channels, _, first_kernel, _ = shapes["projections.0.weight"]
    text_dim, _, word_kernel, _ = shapes["to_word.weight"]
    image_dim = shapes["context_proj.weight"][1]
    size = unet_config.get("sample_size")
    if not isinstance(size, int) or size % first_kernel:
        raise UserError(f"{source}: its first projection's kernel {first_kernel} does not divide the latent size "
                        f"{size} of the UNet it is built for: pass the --model it was trained for")
    grid = size // first_kernel
    if word_kernel != grid:
        raise UserError(f"{source}: its region_prompt_output kernel {word_kernel} on its {grid}x{grid} projection "
                        "grid makes more than one word per image; conceptkit's PromptNet makes one (the official "
                        "SD 2 setting: region_kernel_size 8 at 64x64 latents)")
    try:
        net = PromptNet(unet_config=unet_config, image_embed_dim=int(image_dim), text_embed_dim=int(text_dim),
                        projection_channels=int(projection_channels), projection_grid=grid)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{source}: cannot build a PromptNet of its shape ({str(e).splitlines()[0][:160]}): "
                        "pass the --model it was trained for") from None
    # checked in the file's own names (the residual heads left out), so a message names what the file holds
    expected = {official_name(k, blocks): v.shape for k, v in net.state_dict().items()}
    problem = state_problems(expected, {k: v for k, v in state.items() if our_name(k, blocks) is not None})
    if problem:
        raise UserError(f"{source}: {problem}: pass the --model it was trained for, or an unmodified official "
                        "checkpoint")
    return load_strict(net.float(), {k: v.float() for k, v in ours.items()}, source,
                       "pass the --model it was trained for, or an unmodified official checkpoint")


class ClipDescription:
    """The image encoder of a converted PromptNet as image_encoder.json describes it, without loading the model
    (a ViT-H/14 is 2.5 GB): the pipeline's openclip/ CLIP model, whose vision tower the official code uses."""
    kind = "clip-vision"

    def __init__(self, path: Path):
        self.path = str(Path(path).resolve())

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path}


def clip_width(folder: Path) -> int | None:
    """The hidden size of the CLIP vision tower in `folder` (CLIPModel or CLIPVisionModel config), if readable."""
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    vision = config.get("vision_config", config)
    width = vision.get("hidden_size") if isinstance(vision, dict) else None
    return width if isinstance(width, int) else None


@dataclass
class Converted:
    promptnet: object  # PromptNet
    image_encoder: ClipDescription | None
    meta: dict


def convert_official(source: OfficialSource, unet_config: dict | None = None,
                     image_encoder: str | Path | None = None) -> Converted:
    """The official checkpoint as a conceptkit PromptNet (float32), with the description of its image encoder
    (`image_encoder`, else the pipeline's openclip/, else None) and the metadata of a PromptNet folder.
    `unet_config`: the base model's UNet config, used when the checkpoint has no promptnet/config.json."""
    label = f"official PromptNet {source.given}"
    if source.config is not None:
        unet = unet_config_from_official(_json(source.config))
        if unet.get("sample_size") is None and unet_config is not None:  # an official config may leave it out
            unet["sample_size"] = dict(unet_config).get("sample_size")
    elif unet_config is not None:
        unet = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    else:
        raise UserError(f"{source.given} has no config.json next to it: pass --model, the base model it was "
                        "trained for (its UNet gives the PromptNet's shape)")
    net = build_promptnet(read_official_state(source), unet, label)
    encoder_path = Path(image_encoder) if image_encoder else source.image_encoder
    description = None
    if encoder_path is not None:
        width = clip_width(encoder_path)
        if width is None:
            raise UserError(f"{encoder_path} holds no CLIP model config (config.json): pass --image-encoder FOLDER, "
                            "a transformers CLIPModel or CLIPVisionModel (ProFusion's SD 2 one: "
                            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
        if width != net.config.image_embed_dim:
            raise UserError(f"{label} takes {net.config.image_embed_dim}-d image tokens, the CLIP model in "
                            f"{encoder_path} gives {width}-d: pass the CLIP model it was trained with")
        description = ClipDescription(encoder_path)
    meta = {"method": "profusion", "base_model": "", "stage": "pretrained", "pad_prompt": False,
            "latents": "sample", "prefix": "a photo of", "placeholder": "S*",
            "converted_from": str(Path(source.given).resolve()), "official_weights": source.weights.name}
    return Converted(net, description, meta)
