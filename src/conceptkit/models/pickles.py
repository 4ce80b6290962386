"""Reading pickled weight files (.pt/.bin/.ckpt) without ever running code from them."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import UserError


def load_weights_only(path: Path, kind: str, allowed_globals: tuple = ()):
    """torch.load with weights_only=True (plus `allowed_globals`, e.g. a container class): a file that needs more
    is refused in one line, as is an unreadable one. `kind` names the file for the user ('LoRA', 'embedding')."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{kind} {path} holds more than tensors ({str(e).splitlines()[0][:120]}); conceptkit never "
                        "unpickles code: convert it to .safetensors with a tool you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{kind} {path} is not a readable torch file ({e.__class__.__name__}): re-download or "
                        "re-export it") from None
