"""`generate --prompt-file`: read without torch, so that a bad file is refused before the model loads."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"prompt file {path} is a folder: pass a text file with one prompt per line")
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist: pass a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not text
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text: save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompt: write one prompt per line")
    return prompts
