"""LoRA files: find them, read their metadata, check they fit a pipeline, load them, write ours.

Layouts read: whatever diffusers' own converter (`StableDiffusionPipeline.lora_state_dict`) understands: diffusers /
PEFT (`unet.….lora_A.weight`, `text_encoder.….lora_linear_layer.down.weight`, …) and kohya / AUTOMATIC1111
(`lora_unet_…`, `lora_te_…` with `.lora_down/.lora_up/.alpha`; on SDXL `lora_te1_…`/`lora_te2_…` and the UNet's
original `input_blocks/…` names). The converter is the model's own pipeline class's (`StableDiffusionXLPipeline` for
SDXL, which also adapts the second text encoder, `text_encoder_2`). Ours is diffusers' own layout (what
`train_dreambooth_lora.py` writes, with its `lora_adapter_metadata` header so a plain `load_lora_weights` gets the
right alpha) plus `conceptkit.*` entries in the safetensors header (trigger word, class word, base model, rank, alpha).
A LoRA trained with its trigger's word vector learned first (pivotal tuning, `learn lora --embedding`) carries that
vector as AUTOMATIC1111 / kohya do (`bundle_emb.<token>.string_to_param.*`, models/embeddings.py); loading the LoRA
teaches the pipeline the token, as the web UI does.
Pickled files are only ever read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files import atomic_write
from .embeddings import BUNDLE_PREFIX, bundle_entries, bundled_embeddings, ensure_embedding
from .loading import first_line
from .pickles import load_weights_only

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_PREFIX = "conceptkit."
SIDECAR = "metadata.json"
# what a cross-attention key/value projection's input size says about the model a LoRA was made for
CONTEXT_DIMS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraInfo:
    path: Path
    trigger: str | None = None
    class_word: str | None = None
    base_model: str | None = None
    rank: int | None = None
    alpha: float | None = None
    has_text_encoder: bool = False
    embeddings: tuple[str, ...] = ()  # tokens of the bundled embeddings (bundle_emb.<token>.…)
    metadata: dict = field(default_factory=dict)  # everything conceptkit.* (or the sidecar) holds, parsed


def lora_file(path: str | Path) -> Path:
    """`path` itself, or the `pytorch_lora_weights.safetensors` inside the folder `path`."""
    path = Path(path)
    if path.is_dir():
        if (path / LORA_WEIGHT_NAME).is_file():
            return path / LORA_WEIGHT_NAME
        raise UserError(f"LoRA folder {path} holds no {LORA_WEIGHT_NAME}: pass the LoRA file itself (.safetensors) "
                        "or the --out folder of `conceptkit learn lora`")
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist: pass a .safetensors LoRA file or a folder holding "
                        f"{LORA_WEIGHT_NAME}")
    return path


def _unreadable(path: Path, error: BaseException) -> UserError:
    return UserError(f"LoRA {path} is not a readable .safetensors file ({first_line(error)[:160]}): re-download or "
                     "re-export it")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of a LoRA file (.safetensors, or a pickle that holds nothing but tensors)."""
    if path.suffix.lower() == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(path, e) from None
    else:
        state = load_weights_only(path, "LoRA")
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"LoRA {path} is not a LoRA file (expected named tensors): pass a diffusers or kohya LoRA")
    for key, value in state.items():
        if not value.is_floating_point() and not key.endswith(".alpha"):  # kohya may store alpha as an integer
            raise UserError(f"LoRA {path}: {key} holds {str(value.dtype).removeprefix('torch.')} numbers, not "
                            "floating-point weights: the file is damaged or not a LoRA; re-export it")
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"LoRA {path}: {key} holds NaN or infinite values (a diverged training run?): use an "
                            "earlier checkpoint or retrain with a lower learning rate")
    return state


def _header(path: Path) -> dict[str, str]:
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def _shapes_and_alpha(path: Path) -> tuple[dict[str, tuple], float | None]:
    """Every tensor's shape, and the first kohya `.alpha` value if there is one (without reading the weights)."""
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(path, "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                alpha_key = next((k for k in shapes if k.endswith(".alpha")), None)
                alpha = float(f.get_tensor(alpha_key).reshape(-1)[0]) if alpha_key else None
        except (SafetensorError, OSError) as e:
            raise _unreadable(path, e) from None
        return shapes, alpha
    state = read_state_dict(path)
    alpha_key = next((k for k in state if k.endswith(".alpha")), None)
    return {k: tuple(v.shape) for k, v in state.items()}, (float(state[alpha_key].reshape(-1)[0]) if alpha_key
                                                           else None)


DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", ".lora_linear_layer.down.weight",
                 "_lora.down.weight")


def _parse(value: str):
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def _number(value, kind):
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None


def read_lora_info(path: str | Path) -> LoraInfo:
    """Trigger, class word, base model, rank and alpha of a LoRA: from our header entries, else from a sidecar
    metadata.json next to the file; rank/alpha else from diffusers' adapter metadata, kohya's ss_ entries, the
    tensors (rank = the down matrix's rows, kohya's .alpha); whatever is not found is None."""
    path = lora_file(path)
    header = _header(path)
    ours = {k[len(METADATA_PREFIX):]: _parse(v) for k, v in header.items() if k.startswith(METADATA_PREFIX)}
    if not ours and (path.parent / SIDECAR).is_file():
        try:
            sidecar = json.loads((path.parent / SIDECAR).read_text(encoding="utf-8"))
            ours = sidecar if isinstance(sidecar, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            ours = {}
    rank, alpha = _number(ours.get("rank"), int), _number(ours.get("alpha"), float)
    adapter = _parse(header.get("lora_adapter_metadata", "")) or {}
    if isinstance(adapter, dict):
        rank = rank if rank is not None else _number(adapter.get("unet.r"), int)
        alpha = alpha if alpha is not None else _number(adapter.get("unet.lora_alpha"), float)
    rank = rank if rank is not None else _number(header.get("ss_network_dim"), int)
    alpha = alpha if alpha is not None else _number(header.get("ss_network_alpha"), float)
    shapes, kohya_alpha = _shapes_and_alpha(path)
    if rank is None:  # the rank is the down (A) matrix's first dimension
        rank = next((shape[0] for k, shape in shapes.items() if k.endswith(DOWN_SUFFIXES) and shape), None)
    alpha = alpha if alpha is not None else kohya_alpha
    has_text_encoder = any(k.startswith(("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_"))
                           for k in shapes)
    base_model = ours.get("base_model") or header.get("ss_sd_model_name") or None
    bundled = tuple(dict.fromkeys(k[len(BUNDLE_PREFIX):].partition(".")[0] for k in shapes
                                  if k.startswith(BUNDLE_PREFIX)))

    def text(key):
        value = ours.get(key)
        return None if value in (None, "") else str(value)

    return LoraInfo(path, text("trigger"), text("class_word"), None if base_model is None else str(base_model),
                    rank, alpha, has_text_encoder, bundled, ours)


# ---------------------------------------------------------------------------------------------------------------
# Does it fit?
# ---------------------------------------------------------------------------------------------------------------

def _peft_layout(state_dict: dict[str, torch.Tensor], pipe) -> dict[str, dict[str, torch.Tensor]]:
    """Split diffusers' converted state dict per component and bring each to PEFT names (`….lora_A.weight`), the way
    diffusers itself does before loading (load_lora_adapter / _load_lora_into_text_encoder)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    if "unet" in parts and parts["unet"] and "lora_A" not in next(iter(parts["unet"])):
        parts["unet"] = convert_unet_state_dict_to_peft(parts["unet"])
    for name in TEXT_ENCODERS:
        if name in parts:
            te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(parts[name]))
            encoder = getattr(pipe, name, None)
            if encoder is not None and not hasattr(encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
                te = {k.removeprefix("text_model."): v for k, v in te.items()}
            parts[name] = te
    return parts


def _layer_shape(module) -> tuple[int, int, tuple] | None:
    """(in, out, weight shape) of a Linear / Conv layer (the base layer if another LoRA already wraps it)."""
    module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, tuple(module.weight.shape)
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels, tuple(module.weight.shape)
    return None


def _architecture_guess(module: str, lora_in: int) -> str:
    if module.endswith(("attn2.to_k", "attn2.to_v")) and lora_in in CONTEXT_DIMS:
        return CONTEXT_DIMS[lora_in]
    return "SD 2.x/SDXL?"


def check_lora_fits(pipe, path: str | Path) -> list[str]:
    """Refuse (one UserError line) a LoRA whose layers do not exist in, or do not match the sizes of, `pipe.unet` /
    `pipe.text_encoder` (and SDXL's `pipe.text_encoder_2`). Returns the modules it adapts
    ('unet.down_blocks.0….to_q', …)."""
    from .sdxl import is_sdxl

    path = lora_file(path)
    raw = {k: v for k, v in read_state_dict(path).items() if not k.startswith(BUNDLE_PREFIX)}
    sdxl = is_sdxl(pipe)
    options = {"unet_config": pipe.unet.config} if sdxl else {}  # kohya SDXL files name the UNet's LDM blocks
    try:
        with quiet_diffusers():
            state_dict = type(pipe).lora_state_dict(dict(raw), **options)[0]
    except (ValueError, KeyError, RuntimeError, IndexError) as e:
        model = "SDXL" if sdxl else "Stable Diffusion 1.x/2.x"
        raise UserError(f"LoRA {path.name} is in a layout diffusers cannot read ({first_line(e)[:160]}): pass a diffusers "
                        f"or kohya LoRA for {model}") from None
    name = path.name
    problems: list[str] = []
    modules: list[str] = []
    for component, weights in _peft_layout(state_dict, pipe).items():
        model = getattr(pipe, component, None) if component in ("unet", *TEXT_ENCODERS) else None
        if model is None:
            problems.append(f"it holds weights for '{component}' ({component}.{next(iter(weights))}), which this "
                            "model does not have")
            continue
        for key, tensor in weights.items():
            for suffix, side in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
                if key.endswith(suffix):
                    break
            else:
                continue
            module_name = key[: -len(suffix)]
            full = f"{component}.{module_name}"
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                problems.append(f"it adapts {full}, a layer this model does not have")
                continue
            shape = _layer_shape(module)
            if shape is None:
                problems.append(f"it adapts {full}, which in this model is a {type(module).__name__}, not a "
                                "Linear/Conv layer")
                continue
            model_in, model_out, weight_shape = shape
            lora_shape = tuple(tensor.shape)
            if side == "A" and (tensor.ndim < 2 or tensor.shape[1] != model_in):
                lora_in = tensor.shape[1] if tensor.ndim >= 2 else -1
                problems.append(f"{full} expects input {lora_in} (lora_A {lora_shape}) but the model's has "
                                f"{model_in} (weight {weight_shape}); it was made for another architecture "
                                f"({_architecture_guess(full, lora_in)})")
            elif side == "B" and tensor.shape[0] != model_out:
                problems.append(f"{full} gives output {tensor.shape[0]} (lora_B {lora_shape}) but the model's has "
                                f"{model_out} (weight {weight_shape}); it was made for another architecture")
            elif side == "A":
                modules.append(full)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) like it)" if len(problems) > 1 else ""
        raise UserError(f"LoRA {name} does not fit this model: {problems[0]}{more} — use a LoRA trained on this "
                        "base model")
    if not modules:
        raise UserError(f"LoRA {name} holds no LoRA layers (no lora_A/lora_down weights for the unet or text encoders): "
                        "pass a diffusers or kohya LoRA file")
    return modules


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_diffusers():
    """diffusers and transformers log load reports and key lists while loading LoRAs: keep only errors."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .loading import quiet_loading_bars

    levels = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in levels:
        lib.set_verbosity_error()
    try:
        with quiet_loading_bars(), warnings.catch_warnings():
            # peft warns on every second adapter: "Already found a `peft_config` attribute in the model"
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        for lib, level in levels:
            lib.set_verbosity(level)


ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


def loaded_adapters(pipe) -> list[str]:
    names: list[str] = []
    for component in ("unet", *TEXT_ENCODERS):
        model = getattr(pipe, component, None)
        for name in getattr(model, "peft_config", None) or {}:
            if name not in names:
                names.append(name)
    return names


def adapter_name_for(path: str | Path, taken: list[str] | tuple = ()) -> str:
    """An adapter name from the file stem (the folder name for a folder), made unique among `taken`."""
    path = Path(path)
    if path.is_dir():
        stem = path.name
    elif path.name == LORA_WEIGHT_NAME:
        stem = path.parent.name
    else:
        stem = path.stem
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "lora"
    if hasattr(torch.nn.Module, base):  # 'train', 'eval', 'forward' … would shadow Module attributes
        base = f"lora_{base}"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def load_lora(pipe, path: str | Path, adapter_name: str) -> LoraInfo:
    """Check that the LoRA fits, then load it with diffusers' own loader as adapter `adapter_name`."""
    file = lora_file(path)
    if not ADAPTER_NAME_PATTERN.fullmatch(adapter_name) or hasattr(torch.nn.Module, adapter_name):
        raise UserError(f"adapter name {adapter_name!r} cannot be used (letters, digits, _ and - only, and not a "
                        "torch Module attribute such as 'train'): rename the LoRA file")
    if adapter_name in loaded_adapters(pipe):
        raise UserError(f"a LoRA named '{adapter_name}' is already loaded: load {file} under another name")
    check_lora_fits(pipe, file)
    info = read_lora_info(file)
    source = str(file) if file.suffix.lower() == ".safetensors" else read_state_dict(file)
    with tempfile.TemporaryDirectory(prefix="conceptkit-lora-") as tmp:
        if info.embeddings:
            source = _teach_bundled_embeddings(pipe, file, Path(tmp))
        try:
            with quiet_diffusers():
                pipe.load_lora_weights(source, adapter_name=adapter_name)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"LoRA {file} could not be loaded ({first_line(e)[:160]}): pass a diffusers or kohya LoRA "
                            "made for this base model") from None
    return info


def _teach_bundled_embeddings(pipe, file: Path, tmp: Path):
    """Add the file's bundled embeddings to the pipeline (kept if already there with the same vectors); returns the
    LoRA layers alone for diffusers' loader, which refuses other keys (a file with the same header, or a dict)."""
    state = read_state_dict(file)
    for embedding in bundled_embeddings(state, file):
        ensure_embedding(pipe, embedding, f"LoRA {file.name} bundles another '{embedding.token}': load it on a "
                                          "freshly loaded model")
    layers = {k: v for k, v in state.items() if not k.startswith(BUNDLE_PREFIX)}
    if file.suffix.lower() != ".safetensors":
        return layers
    target = tmp / LORA_WEIGHT_NAME
    save_file(layers, target, metadata=_header(file))
    return str(target)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def _adapter_layers(model, adapter_name: str):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if model is None or adapter_name not in (getattr(model, "peft_config", None) or {}):
        return None, None
    # the LoRA layers only: a vocabulary grown by a bundled word is not the adapter's
    layers = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    return convert_state_dict_to_diffusers(layers), model.peft_config[adapter_name].to_dict()


def header_entries(metadata: dict | None) -> dict[str, str]:
    """Our metadata as safetensors header strings: 'conceptkit.<key>' = the string, or JSON for anything else."""
    entries = {}
    for key, value in (metadata or {}).items():
        if value is None:
            continue
        entries[f"{METADATA_PREFIX}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return entries


def save_lora(path: str | Path, unet, text_encoder=None, *, text_encoder_2=None, metadata: dict | None = None,
              adapter_name: str = "default", embeddings=()) -> Path:
    """Write the LoRA adapter `adapter_name` of `unet` (and `text_encoder`, and SDXL's `text_encoder_2`) in
    diffusers' layout (StableDiffusionXLPipeline's for an SDXL UNet), atomically.

    `path` is a .safetensors file or a folder (then `pytorch_lora_weights.safetensors` inside it). The header holds
    diffusers' adapter metadata (rank, alpha, targets: a plain `load_lora_weights` rebuilds the same scale) and
    `metadata` as conceptkit.* entries; `embeddings` (models.embeddings.Embedding) are bundled (bundle_emb.…).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    target = path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME
    unet_layers, unet_meta = _adapter_layers(unet, adapter_name)
    te_layers, te_meta = _adapter_layers(text_encoder, adapter_name)
    te2_layers, te2_meta = _adapter_layers(text_encoder_2, adapter_name)
    if unet_layers is None and te_layers is None and te2_layers is None:
        raise ValueError(f"no model has a LoRA adapter named {adapter_name!r}")
    options = {}
    pipeline_class = StableDiffusionPipeline
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        pipeline_class = StableDiffusionXLPipeline
        options = {"text_encoder_2_lora_layers": te2_layers, "text_encoder_2_lora_adapter_metadata": te2_meta}
    with tempfile.TemporaryDirectory(prefix="conceptkit-lora-") as tmp:
        with quiet_diffusers():
            pipeline_class.save_lora_weights(
                tmp, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
                unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=te_meta,
                safe_serialization=True, **options)
        written = Path(tmp) / LORA_WEIGHT_NAME
        tensors = load_file(written)
        with safe_open(written, "pt") as f:
            header = dict(f.metadata() or {})
    header.update(header_entries(metadata))
    for embedding in embeddings:
        tensors.update(bundle_entries(embedding))
    return atomic_write(target, lambda p: save_file(tensors, p, metadata=header))
