"""Textual-inversion embeddings: read the ecosystem's file layouts, write ours, and add them to a pipeline.

Layouts read (ALGORITHMS.md §1.6):
- diffusers: `{token: (n, d)}` or `{token: (d,)}` in `.safetensors` or `.bin`;
- AUTOMATIC1111 `.pt`: `{"string_to_token", "string_to_param": {"*": (n, d)}, "name", "step", ...}`;
- AUTOMATIC1111 / kohya `.safetensors`: `{"emb_params": (n, d)}` (the token is the file name, as in the web UI);
- SDXL `{"clip_l", "clip_g"}`: refused with a clear error (our base models have one text encoder);
- the official Textual Inversion repo's `embeddings.pt`: like A1111 but with no "name" and its params in an
  `nn.ParameterDict`.
Pickled files are only ever read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .pickles import load_weights_only
from ..files import atomic_write

PLACEHOLDER_PATTERN = re.compile(r"<[^<>\s]+>")


@dataclass
class Embedding:
    token: str
    vectors: torch.Tensor  # (n, d)
    layout: str  # which file layout it came from


def split_spec(spec: str) -> tuple[Path, str | None]:
    """'FILE' or 'FILE:TOKEN' (a path that exists as given wins, so a ':' inside a file name still works)."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), None
    path, token = spec.rsplit(":", 1)
    return Path(path), token or None


def _load_pickle(path: Path) -> dict:
    # ParameterDict is the official repo's container; allowing it (and nothing else) keeps weights_only's guarantee
    # that no code from the file runs.
    return load_weights_only(path, "embedding", (torch.nn.ParameterDict,))


def _as_matrix(value, path: Path, key: str) -> torch.Tensor:
    if isinstance(value, (torch.nn.ParameterDict, dict)):
        if len(value) != 1:
            raise UserError(f"embedding {path}: '{key}' holds {len(value)} placeholders {list(value)}; conceptkit "
                            "loads one per file: pass a file with a single placeholder")
        value = next(iter(value.values()))
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2):
        raise UserError(f"embedding {path}: '{key}' is not a (vectors, dim) tensor: pass a textual-inversion file")
    if not value.is_floating_point():
        raise UserError(f"embedding {path}: '{key}' holds {str(value.dtype).removeprefix('torch.')} numbers, not "
                        "floating-point vectors: the file is damaged or not an embedding; re-export it")
    if value.ndim == 2 and value.shape[0] == 0:
        raise UserError(f"embedding {path}: '{key}' holds no vectors (shape {tuple(value.shape)}): re-export it")
    if not bool(torch.isfinite(value).all()):
        raise UserError(f"embedding {path}: '{key}' holds NaN or infinite values (a diverged training run?): "
                        "use an earlier checkpoint or retrain with a lower learning rate")
    value = value.detach().to(torch.float32)
    return value[None] if value.ndim == 1 else value


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read any supported embedding file; `token` overrides the name stored in (or implied by) the file."""
    path = Path(path)
    if path.is_dir():
        for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise UserError(f"embedding file {path} does not exist: pass a .safetensors/.bin/.pt file (or a folder "
                        "holding learned_embeds.safetensors)")
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"embedding {path} is not a readable .safetensors file ({e}): re-download or "
                            "re-export it") from None
    else:
        state = _load_pickle(path)
    if isinstance(state, torch.Tensor):
        if token is None:
            raise UserError(f"embedding {path} is a bare tensor with no token name: pass it as {path}:<token>")
        return Embedding(token, _as_matrix(state, path, "tensor"), "tensor")
    if not isinstance(state, dict):
        raise UserError(f"embedding {path} is not a textual-inversion file: expected a dict of tensors")
    if "clip_l" in state or "clip_g" in state:
        raise UserError(f"embedding {path} is an SDXL embedding (clip_l/clip_g, one per text encoder); the base model "
                        "has a single text encoder: use an embedding trained for SD 1.x/2.x or an SDXL base model")
    if "string_to_param" in state:
        layout = "a1111" if "name" in state else "textual_inversion_repo"
        name = token or state.get("name") or path.stem
        return Embedding(str(name), _as_matrix(state["string_to_param"], path, "string_to_param"), layout)
    if "emb_params" in state:
        return Embedding(token or path.stem, _as_matrix(state["emb_params"], path, "emb_params"), "a1111_safetensors")
    if len(state) == 1:
        key, value = next(iter(state.items()))
        return Embedding(token or key, _as_matrix(value, path, key), "diffusers")
    raise UserError(f"embedding {path} has keys {sorted(state)[:6]}, which no known textual-inversion layout uses: "
                    "pass a diffusers, AUTOMATIC1111 or kohya embedding")


def save_embedding(path: str | Path, token: str, vectors: torch.Tensor, *, fmt: str = "diffusers",
                   metadata: dict | None = None) -> Path:
    """Write `vectors` (n, d) for `token` atomically, in diffusers or AUTOMATIC1111 layout."""
    vectors = vectors.detach().to("cpu", torch.float32).contiguous()
    if fmt == "diffusers":
        return atomic_write(path, lambda p: save_file({token: vectors}, p, metadata={"format": "pt"}))
    if fmt == "a1111":
        state = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token,
                 "step": int((metadata or {}).get("steps", 0)), "sd_checkpoint": None,
                 "sd_checkpoint_name": str((metadata or {}).get("base_model", ""))}
        return atomic_write(path, lambda p: torch.save(state, p))
    raise UserError(f"unknown embedding format {fmt!r}: pass 'diffusers' or 'a1111'")


def add_embedding(pipe, embedding: Embedding) -> None:
    """Teach the pipeline's tokenizer/text encoder `embedding.token` (diffusers' loader, after our checks)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    dim = encoder.get_input_embeddings().embedding_dim
    n, d = embedding.vectors.shape
    if d != dim:
        raise UserError(f"embedding '{embedding.token}' has vectors of size {d} but this model's text encoder uses "
                        f"{dim}: it was trained for another base model (768 = SD 1.x, 1024 = SD 2.x); use an "
                        "embedding made for this model")
    vocab = tokenizer.get_vocab()
    if embedding.token in vocab or f"{embedding.token}_1" in vocab:
        raise UserError(f"token '{embedding.token}' is already in the vocabulary: load the embedding under another "
                        f"name with FILE:<new-token>")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # resize_token_embeddings explains mean-resizing; our rows are overwritten
    try:
        pipe.load_textual_inversion(embedding.vectors.to(encoder.dtype), token=embedding.token)
    finally:
        hf_logging.set_verbosity(level)


def check_prompt_tokens(tokenizer, prompts: list[str]) -> None:
    """Refuse a prompt that names a <placeholder> no loaded embedding defines (it would silently become text)."""
    vocab = tokenizer.get_vocab()  # added tokens and special tokens included
    for prompt in prompts:
        for word in PLACEHOLDER_PATTERN.findall(prompt):
            if word not in vocab:
                raise UserError(f"prompt uses {word} but no loaded embedding defines it: load one with "
                                f"--embedding FILE:{word}")
