"""The one place where conceptkit loads base models (the `--model` option).

`--model` accepts (a StableDiffusionPipeline or StableDiffusionXLPipeline; the class model_index.json names decides,
anything else is refused in one line):
- "toy": the bundled shapes-world model (`CONCEPTKIT_TOY_MODEL` overrides its folder);
- a local diffusers folder (with model_index.json);
- a single `.safetensors` / `.ckpt` checkpoint in the original LDM layout, plus `config=` a diffusers folder or a
  cached hub id that describes its architecture;
- a hub id ("org/name") that is already in the local Hugging Face cache.

Loading never reaches the network: every diffusers call gets `local_files_only=True`, hub ids are resolved to
snapshot folders by us, and `.ckpt` files are unpickled with `weights_only=True` only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import conceptkit
from conceptkit.errors import UserError

TOY_MODEL_NAME = "toy"
TOY_MODEL_ENV = "CONCEPTKIT_TOY_MODEL"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_REVISION = "main"
SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
SUPPORTED_PIPELINES = (SD_PIPELINE, SDXL_PIPELINE)
ACCEPTED_FORMS = ("pass 'toy', a diffusers folder (with model_index.json), a .safetensors/.ckpt file together with "
                  "--config <diffusers folder or cached hub id>, or a hub id already in the local Hugging Face cache")


@dataclass(frozen=True)
class ModelSource:
    """Where a `--model` value points, resolved to local paths."""

    folder: Path | None = None  # a diffusers pipeline folder
    single_file: Path | None = None  # an LDM-layout checkpoint, read with `folder` as its config


BUNDLED_PROMPTNET = Path(conceptkit.__file__).parent / "bundled" / "promptnet"


def bundled_promptnet_path(model: str) -> Path:
    """The PromptNet that ships for `model` (only the bundled toy model has one)."""
    if model != "toy":
        raise UserError(f"no PromptNet ships for --model {model}: pass --promptnet DIR (pre-train one with "
                        "`conceptkit learn promptnet --pretrain --images DIR`)")
    return BUNDLED_PROMPTNET


def bundled_model_path() -> Path:
    """Where the bundled toy model lives inside the installed package."""
    return Path(conceptkit.__file__).parent / "bundled" / "shapes-base"


def toy_model_path() -> Path:
    override = os.environ.get(TOY_MODEL_ENV)
    return Path(override).expanduser() if override else bundled_model_path()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    default_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    hf_home = os.environ.get("HF_HOME") or str(default_home)
    return Path(os.path.expandvars(hf_home)).expanduser() / "hub"


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID_PATTERN.match(name)) and ".." not in name


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id` at its `main` ref, or None when it is not in the cache."""
    if not looks_like_hub_id(repo_id):
        return None
    repo_folder = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref_file = repo_folder / "refs" / HUB_REVISION
    if not ref_file.is_file():
        return None
    snapshot = repo_folder / "snapshots" / ref_file.read_text().strip()
    return snapshot if is_diffusers_folder(snapshot) else None


def resolve_toy() -> ModelSource:
    folder = toy_model_path()
    if is_diffusers_folder(folder):
        return ModelSource(folder=folder)
    if os.environ.get(TOY_MODEL_ENV):
        raise UserError(f"{TOY_MODEL_ENV}={folder} is not a diffusers folder (no model_index.json); "
                        f"point it at one or unset it")
    raise UserError(f"the bundled toy model is missing ({folder}); build it with `conceptkit shapes train-base`, "
                    f"or pass another --model")


def resolve_config(config: str | None, checkpoint: Path) -> Path:
    """The diffusers folder that describes a single-file checkpoint's architecture."""
    if config is None:
        raise UserError(f"{checkpoint} is a single-file checkpoint: also pass --config <a diffusers folder or cached "
                        f"hub id with the same architecture> (conceptkit never downloads one)")
    path = Path(config).expanduser()
    if is_diffusers_folder(path):
        return path
    snapshot = cached_hub_snapshot(config)
    if snapshot is not None:
        return snapshot
    raise UserError(f"--config {config!r}: not a diffusers folder (no model_index.json) and not in the local "
                    f"Hugging Face cache (HF_HUB_CACHE={hub_cache_dir()}); pass a local diffusers folder")


def resolve_model(model: str, config: str | None = None) -> ModelSource:
    """Turn a `--model` value into local paths, or raise UserError saying what was tried."""
    if model == TOY_MODEL_NAME:
        source = resolve_toy()
    else:
        source = resolve_path_or_hub_id(model, config)
    if config is not None and source.single_file is None:
        raise UserError(f"--config is only used with a .safetensors/.ckpt --model, not with {model!r}")
    return source


def resolve_path_or_hub_id(model: str, config: str | None) -> ModelSource:
    path = Path(model).expanduser()
    if is_diffusers_folder(path):
        return ModelSource(folder=path)
    if path.is_dir():
        raise UserError(f"--model {model!r} is a folder without model_index.json (not a diffusers pipeline); "
                        f"{ACCEPTED_FORMS}")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"--model {model!r} is a file but not .safetensors or .ckpt; {ACCEPTED_FORMS}")
        return ModelSource(folder=resolve_config(config, path), single_file=path)
    snapshot = cached_hub_snapshot(model)
    if snapshot is not None:
        return ModelSource(folder=snapshot)
    raise UserError(f"--model {model!r}: not a diffusers folder, not a .safetensors/.ckpt file, not in the local "
                    f"Hugging Face cache (HF_HUB_CACHE={hub_cache_dir()}); {ACCEPTED_FORMS}")


def ensure_ckpt_holds_only_weights(path: Path) -> None:
    """Refuse `.ckpt` pickles that need anything beyond tensors and plain containers to unpickle."""
    import torch

    mmap = zipfile.is_zipfile(path)  # torch can only memory-map the zip format; mapping avoids reading it twice
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path} is a pickle that needs more than tensors to load (possibly code); refusing to "
                        f"unpickle it: convert it to .safetensors with a tool you trust") from error
    except Exception as error:
        raise UserError(f"{path} is not a readable PyTorch checkpoint: {first_line(error)}") from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def quiet_loading_bars():
    """Hide diffusers' and transformers' loading progress bars, restoring their previous state afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for library in (diffusers_logging, transformers_logging):
        if library.is_progress_bar_enabled():
            library.disable_progress_bar()
            restore.append(library.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()


class DropEmptyKeepInFloat32Warning(logging.Filter):
    """diffusers 0.42 warns "modules ... should be kept in float32: []" on every `.to(dtype)`, even with none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def silence_empty_keep_in_float32_warning() -> None:
    diffusers_model_logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(existing, DropEmptyKeepInFloat32Warning) for existing in diffusers_model_logger.filters):
        diffusers_model_logger.addFilter(DropEmptyKeepInFloat32Warning())


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON ({first_line(error)[:120]}): pass a complete diffusers "
                        "folder") from None
    return value if isinstance(value, dict) else {}


def architecture(folder: Path) -> str:
    """The pipeline class a diffusers folder declares (model_index.json's `_class_name`), checked to be one we
    support (a folder that names none is left to diffusers, which says what it lacks)."""
    name = read_json(folder / "model_index.json").get("_class_name", SD_PIPELINE)
    if name not in SUPPORTED_PIPELINES:
        raise UserError(f"{folder} is a {name} model, which conceptkit does not support: pass a Stable Diffusion "
                        f"1.x/2.x ({SD_PIPELINE}) or SDXL ({SDXL_PIPELINE}) base model")
    return name


def load_from_source(source: ModelSource, dtype: torch.dtype):
    import diffusers

    pipeline_class = getattr(diffusers, architecture(source.folder))
    # diffusers 0.42 takes `dtype`; `torch_dtype` still works but emits a deprecation warning.
    if source.single_file is None:
        return pipeline_class.from_pretrained(str(source.folder), local_files_only=True, dtype=dtype)
    if source.single_file.suffix.lower() == ".ckpt":
        ensure_ckpt_holds_only_weights(source.single_file)
    pipe = pipeline_class.from_single_file(str(source.single_file), config=str(source.folder),
                                           local_files_only=True, dtype=dtype)
    ensure_every_weight_was_read(pipe, source.single_file)
    return pipe


def ensure_every_weight_was_read(pipe, checkpoint: Path) -> None:
    """from_single_file leaves a weight the checkpoint lacks as an empty (meta) tensor, which fails later with a
    PyTorch traceback; say which, in one line (ValueError: load_pipeline makes it a UserError)."""
    import torch

    missing = [f"{name}.{key}" for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
               for key, parameter in module.named_parameters() if parameter.is_meta]
    if missing:
        raise ValueError(f"{checkpoint} lacks {len(missing)} weight(s) of the --config architecture (first: "
                         f"{missing[0]}): pass the --config of the model the file was made from")


def load_pipeline(model: str = TOY_MODEL_NAME, *, config: str | None = None, dtype: torch.dtype | None = None,
                  device: str = "auto"):
    """Load a StableDiffusionPipeline or StableDiffusionXLPipeline (whichever the model's model_index.json names)
    from `model` (see the module docstring), on `device` ("auto": CUDA when there is one) in `dtype` (default
    float32)."""
    source = resolve_model(str(model), None if config is None else str(config))  # a wrong --model: no torch wait
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    silence_empty_keep_in_float32_warning()
    try:
        with quiet_loading_bars():
            pipe = load_from_source(source, dtype)
    except (OSError, ValueError) as error:
        # Missing or mismatched files in a user-supplied model are the user's to fix, not a conceptkit bug.
        raise UserError(f"could not load --model {model!r}: {first_line(error)}") from error
    except KeyError as error:  # a config (e.g. model_index.json) without an entry diffusers needs
        raise UserError(f"could not load --model {model!r}: its configuration lacks the entry {error}; pass a "
                        "complete diffusers folder") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def describe_model(model: str) -> str:
    """A short, stable name of `model` for run metadata: 'toy', an absolute path, or a hub id."""
    if model == TOY_MODEL_NAME:
        return TOY_MODEL_NAME
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
