"""What `generate --embedding/--lora` name, loaded into a pipeline: Textual Inversion tokens and weighted LoRAs."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import UserError


def load_embeddings(pipe, specs: list[str] | None) -> None:
    from ..models.embeddings import add_embedding, read_embedding, split_spec

    for spec in specs or []:
        path, token = split_spec(spec)
        embedding = read_embedding(path, token)
        add_embedding(pipe, embedding)
        print(f"loaded {embedding.token} ({embedding.vectors.shape[0]} vector(s), {embedding.layout} layout) "
              f"from {path}", file=sys.stderr)


def split_lora_spec(spec: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:WEIGHT' (a path that exists as given wins, so a ':' inside a file name still works)."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), 1.0
    path, weight = spec.rsplit(":", 1)
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):  # float() also reads 'nan' and 'inf', which would silently ruin every image
        raise UserError(f"--lora {spec}: the weight after ':' must be a number, e.g. {path}:0.8") from None
    return Path(path), value


def load_loras(pipe, specs: list[str] | None) -> None:
    from ..models.lora import adapter_name_for, load_lora, loaded_adapters

    names, weights = [], []
    for spec in specs or []:
        path, weight = split_lora_spec(spec)
        name = adapter_name_for(path, loaded_adapters(pipe))
        info = load_lora(pipe, path, name)
        names.append(name)
        weights.append(weight)
        trigger = f", trigger '{info.trigger}'" if info.trigger else ""
        print(f"loaded LoRA {path} as '{name}' at weight {weight:g} (rank {info.rank or '?'}{trigger})",
              file=sys.stderr)
    if names:
        pipe.set_adapters(names, weights)
        # what each image's PNG records (generate/infotext.py: `Lora: name: weight`)
        pipe.conceptkit_loras = {**(getattr(pipe, "conceptkit_loras", None) or {}), **dict(zip(names, weights))}
