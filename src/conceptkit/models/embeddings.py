"""Textual-inversion embeddings: read the ecosystem's file layouts, write ours, and add them to a pipeline.

Layouts read (ALGORITHMS.md §1.6):
- diffusers: `{token: (n, d)}` or `{token: (d,)}` in `.safetensors` or `.bin`;
- AUTOMATIC1111 `.pt`: `{"string_to_token", "string_to_param": {"*": (n, d)}, "name", "step", ...}`;
- AUTOMATIC1111 / kohya `.safetensors`: `{"emb_params": (n, d)}` (the token is the file name, as in the web UI);
- SDXL, one vector set per text encoder: the community single file `{"clip_l": (n, 768), "clip_g": (n, 1280)}`
  (AUTOMATIC1111, ComfyUI, kohya), and diffusers' layout, a folder holding `learned_embeds.safetensors` (the first
  encoder's `{token: (n, d)}`) and `learned_embeds_2.safetensors` (the second's), as diffusers'
  `textual_inversion_sdxl.py` writes them; added with `load_textual_inversion` once per encoder. An SDXL embedding
  given to an SD 1.x/2.x model, or a one-encoder embedding given to SDXL, is refused in one line;
- the official Textual Inversion repo's `embeddings.pt`: like A1111 but with no "name" and its params in an
  `nn.ParameterDict`;
- embeddings bundled in a LoRA file (kohya / AUTOMATIC1111 "bundle_emb"): `bundle_emb.<token>.string_to_param.*`
  (SD 1.x/2.x) or `bundle_emb.<token>.clip_l` / `.clip_g` (SDXL) beside the LoRA's layers; the web UI teaches
  the tokens when it loads the LoRA, and so does `models.lora.load_lora`.
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


SDXL_SECOND_FILE = "learned_embeds_2.safetensors"
BUNDLE_PREFIX = "bundle_emb."


@dataclass
class Embedding:
    token: str
    vectors: torch.Tensor  # (n, d); on SDXL the first text encoder's (clip_l)
    layout: str  # which file layout it came from
    vectors_2: torch.Tensor | None = None  # SDXL only: the second text encoder's (clip_g), (n, d2)

    @property
    def is_sdxl(self) -> bool:
        return self.vectors_2 is not None


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
    if path.is_dir() and (path / SDXL_SECOND_FILE).is_file():
        return read_diffusers_sdxl(path, token)
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
        return read_community_sdxl(path, state, token)
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


def read_community_sdxl(path: Path, state: dict, token: str | None) -> Embedding:
    missing = [key for key in ("clip_l", "clip_g") if key not in state]
    if missing:
        raise UserError(f"embedding {path} is an SDXL embedding without '{missing[0]}': an SDXL embedding needs both "
                        "clip_l and clip_g (one per text encoder); re-export it")
    first, second = _as_matrix(state["clip_l"], path, "clip_l"), _as_matrix(state["clip_g"], path, "clip_g")
    if first.shape[0] != second.shape[0]:
        raise UserError(f"embedding {path}: clip_l has {first.shape[0]} vectors but clip_g {second.shape[0]}; they "
                        "must match: re-export it")
    return Embedding(token or path.stem, first, "sdxl", second)


def read_diffusers_sdxl(folder: Path, token: str | None) -> Embedding:
    """diffusers' SDXL layout: learned_embeds.safetensors (first encoder) + learned_embeds_2.safetensors."""
    first = read_embedding(folder / "learned_embeds.safetensors", token)
    second = read_embedding(folder / SDXL_SECOND_FILE, token)
    if first.is_sdxl or second.is_sdxl or first.token != second.token:
        raise UserError(f"embedding folder {folder}: learned_embeds.safetensors and {SDXL_SECOND_FILE} must each "
                        f"hold one token, the same one (found {first.token!r} and {second.token!r}): re-export it")
    if first.vectors.shape[0] != second.vectors.shape[0]:
        raise UserError(f"embedding folder {folder}: the two encoders' files hold {first.vectors.shape[0]} and "
                        f"{second.vectors.shape[0]} vectors; they must match: re-export it")
    return Embedding(first.token, first.vectors, "diffusers_sdxl", second.vectors)


def bundled_embeddings(state: dict[str, torch.Tensor], path: Path) -> list[Embedding]:
    """The embeddings a LoRA file carries under `bundle_emb.<token>.…` keys (none: an empty list)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(BUNDLE_PREFIX):
            token, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
            groups.setdefault(token, {})[rest] = value
    out = []
    for token, parts in groups.items():
        if "clip_l" in parts or "clip_g" in parts:
            out.append(read_community_sdxl(path, parts, token))
            continue
        params = [key for key in parts if key.startswith("string_to_param")]
        if len(params) != 1:
            raise UserError(f"LoRA {path}: bundled embedding '{token}' has keys {sorted(parts)[:4]}, not one "
                            f"{BUNDLE_PREFIX}{token}.string_to_param.*: re-export it")
        out.append(Embedding(token, _as_matrix(parts[params[0]], path, f"{BUNDLE_PREFIX}{token}"), "lora_bundle"))
    return out


def bundle_entries(embedding: Embedding) -> dict[str, torch.Tensor]:
    """`embedding` as the tensors of a LoRA file (AUTOMATIC1111's bundle_emb layout)."""
    def plain(v):
        return v.detach().to("cpu", torch.float32).contiguous()

    prefix = f"{BUNDLE_PREFIX}{embedding.token}."
    if embedding.is_sdxl:
        return {prefix + "clip_l": plain(embedding.vectors), prefix + "clip_g": plain(embedding.vectors_2)}
    return {prefix + "string_to_param.*": plain(embedding.vectors)}


def save_embedding(path: str | Path, token: str, vectors: torch.Tensor, *, fmt: str = "diffusers",
                   metadata: dict | None = None) -> Path:
    """Write `vectors` (n, d) for `token` atomically, in diffusers or AUTOMATIC1111 layout; `vectors` a pair
    (clip_l, clip_g) with fmt "sdxl": the community SDXL single file."""
    if fmt == "sdxl":
        first, second = (v.detach().to("cpu", torch.float32).contiguous() for v in vectors)
        return atomic_write(path, lambda p: save_file({"clip_l": first, "clip_g": second}, p,
                                                      metadata={"format": "pt", "token": token}))
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
    """Teach the pipeline's tokenizer(s)/text encoder(s) `embedding.token` (diffusers' loader, after our checks;
    on SDXL once per encoder, as diffusers documents it)."""
    from .sdxl import encoders, is_sdxl

    sdxl = is_sdxl(pipe)
    if embedding.is_sdxl and not sdxl:
        raise UserError(f"embedding '{embedding.token}' is an SDXL embedding (clip_l/clip_g, one per text encoder); "
                        "this base model has a single text encoder: use an embedding trained for SD 1.x/2.x or "
                        "an SDXL base model")
    if sdxl and not embedding.is_sdxl:
        raise UserError(f"embedding '{embedding.token}' has vectors for one text encoder (an SD 1.x/2.x embedding); "
                        "this SDXL model has two: use an SDXL embedding (clip_l + clip_g, or a folder with "
                        f"learned_embeds.safetensors and {SDXL_SECOND_FILE})")
    pairs = encoders(pipe)
    sets = [embedding.vectors, embedding.vectors_2][: len(pairs)]
    for index, ((tokenizer, encoder), vectors) in enumerate(zip(pairs, sets)):
        dim = encoder.get_input_embeddings().embedding_dim
        if vectors.shape[1] != dim:
            which = f"text encoder {index + 1}" if sdxl else "text encoder"
            raise UserError(f"embedding '{embedding.token}' has vectors of size {vectors.shape[1]} but this model's "
                            f"{which} uses {dim}: it was trained for another base model (768 = SD 1.x, 1024 = SD "
                            "2.x, 768 + 1280 = SDXL); use an embedding made for this model")
        vocab = tokenizer.get_vocab()
        if embedding.token in vocab or f"{embedding.token}_1" in vocab:
            raise UserError(f"token '{embedding.token}' is already in the vocabulary: load the embedding under "
                            "another name with FILE:<new-token>")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # resize_token_embeddings explains mean-resizing; our rows are overwritten
    try:
        for (tokenizer, encoder), vectors in zip(pairs, sets):
            pipe.load_textual_inversion(vectors.to(encoder.dtype), token=embedding.token, text_encoder=encoder,
                                        tokenizer=tokenizer)
    finally:
        hf_logging.set_verbosity(level)


def remove_embedding(pipe, token: str) -> None:
    """Take `token` (and `token_1` … of a word of several vectors) out of every tokenizer / text encoder again
    (diffusers' unload, which removes only the names it is given; the table shrinks back)."""
    from .sdxl import encoders

    for tokenizer, encoder in encoders(pipe):
        vocab, names, i = tokenizer.get_vocab(), [token], 1
        while f"{token}_{i}" in vocab:
            names.append(f"{token}_{i}")
            i += 1
        pipe.unload_textual_inversion(names, tokenizer=tokenizer, text_encoder=encoder)


def learned_vectors(pipe, token: str, n: int) -> list[torch.Tensor] | None:
    """The rows `token` (and `token_1` … for n vectors) hold in each text encoder's table (its dtype), or None if
    any of the names is not in the vocabulary."""
    from .sdxl import encoders

    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    rows = []
    for tokenizer, encoder in encoders(pipe):
        vocab = tokenizer.get_vocab()
        ids = [vocab.get(t) for t in names]
        if None in ids:
            return None
        rows.append(encoder.get_input_embeddings().weight[ids].detach().cpu())
    return rows


def ensure_embedding(pipe, embedding: Embedding, retry_hint: str) -> bool:
    """Teach the pipeline `embedding.token` unless it already holds exactly these vectors (a LoRA or composition
    loaded twice on one pipeline); another embedding under the same token is refused, with `retry_hint` (how to
    load it under another name). Returns whether it was added."""
    rows = learned_vectors(pipe, embedding.token, embedding.vectors.shape[0])
    if rows is None:
        add_embedding(pipe, embedding)
        return True
    wanted = [embedding.vectors] + ([embedding.vectors_2] if embedding.is_sdxl else [])
    if len(rows) != len(wanted) or not all(r.shape == w.shape and torch.equal(r, w.to(r.dtype))
                                           for r, w in zip(rows, wanted)):
        raise UserError(f"token '{embedding.token}' is already in the vocabulary with other vectors: {retry_hint}")
    return False


def check_prompt_tokens(tokenizer, prompts: list[str]) -> None:
    """Refuse a prompt that names a <placeholder> no loaded embedding defines (it would silently become text)."""
    vocab = tokenizer.get_vocab()  # added tokens and special tokens included
    for prompt in prompts:
        for word in PLACEHOLDER_PATTERN.findall(prompt):
            if word not in vocab:
                raise UserError(f"prompt uses {word} but no loaded embedding defines it: load one with "
                                f"--embedding FILE:{word}")
