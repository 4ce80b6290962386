"""The settings an image was made with, written into its PNG the way AUTOMATIC1111 does, and read back.

AUTOMATIC1111's web UI stores them in the PNG text chunk `parameters`, as three parts ("infotext"):

    a photo of <star> on a navy background
    Negative prompt: blurry
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 1000000, Size: 64x64, Model: shapes-base, TI: <star>

the prompt (possibly several lines), then an optional line starting with `Negative prompt: `, then one line of
`Key: value` pairs joined by ", "; a value holding ',', ':' or a line break is written as a JSON string. A1111's
"PNG Info" tab, its "send to txt2img" and other tools (ComfyUI's loaders, image browsers) read this chunk, and so does
`conceptkit evaluate images` (the prompt, for CLIP-T).

Our keys beyond A1111's own: `TI` (the Textual Inversion tokens the prompt uses), `Lora` ("name: weight" of the active
LoRAs), `Concepts` (a composed picture's slots), `Method` (compose's and ProFusion's method), `Version`.

`save_png` is the one way conceptkit writes a PNG it made: atomically, with the chunk.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..files import atomic_write

KEY = "parameters"
# A1111's sampler names for our schedulers (diffusers' PNDM with skip_prk_steps is PLMS).
SAMPLER_NAMES = {"ddim": "DDIM", "dpm++": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a", "pndm": "PLMS"}
NEGATIVE = "Negative prompt:"
# one `Key: value` of the settings line: a key of word characters, spaces, '-' and '/', then a JSON string or a
# plain value running to the next comma
PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass
class Settings:
    """What made one image. `sampler`: conceptkit's scheduler name (written as A1111's sampler name)."""

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    extra: dict = field(default_factory=dict)  # more `Key: value` pairs, written after A1111's own


def quote(value) -> str:
    """A1111's rule: a value holding ',', ':' or a line break becomes a JSON string."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(s: Settings) -> str:
    """The `parameters` text of `s`, in AUTOMATIC1111's format."""
    from .. import __version__

    pairs = {"Steps": s.steps, "Sampler": SAMPLER_NAMES.get(s.sampler, s.sampler) if s.sampler else None,
             "CFG scale": s.cfg_scale, "Seed": s.seed,
             "Size": f"{s.width}x{s.height}" if s.width and s.height else None, "Model": s.model,
             **s.extra, "Version": f"conceptkit {__version__}"}
    line = ", ".join(f"{k}: {quote(v)}" for k, v in pairs.items() if v is not None and v != "")
    negative = f"\n{NEGATIVE} {s.negative_prompt}" if s.negative_prompt else ""
    return f"{s.prompt}{negative}\n{line}"


def parse_infotext(text: str) -> dict:
    """Read A1111's `parameters` text: {"prompt": ..., "negative_prompt": ..., and every `Key: value` as a string}.
    A last line that is not a settings line (fewer than 3 pairs) belongs to the prompt, as in A1111."""
    lines = text.strip().split("\n")
    pairs = PAIR.findall(lines[-1]) if lines else []
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in pairs:
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        result[key.strip()] = value
    return result


def save_png(image: Image.Image, path: str | Path, settings: Settings | str | None) -> Path:
    """Write `image` to `path` (atomically) with its settings in the `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text(KEY, settings if isinstance(settings, str) else infotext(settings))
    return atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info))


def read_parameters(path: str | Path) -> str | None:
    """The `parameters` text of a PNG (None when it has none, or it is not a PNG)."""
    with Image.open(path) as image:
        text = getattr(image, "text", None) or image.info
        value = text.get(KEY) if hasattr(text, "get") else None
    return value if isinstance(value, str) else None


def read_prompt(path: str | Path) -> str | None:
    """The prompt an image records (None when it records none)."""
    text = read_parameters(path)
    if not text:
        return None
    return parse_infotext(text)["prompt"] or None


def model_name(pipe) -> str:
    """A1111's `Model`: the checkpoint's name, here the model folder's name, a cached hub id as `org/name`."""
    where = str(getattr(pipe, "name_or_path", "") or "")
    if not where:
        return "unknown"
    parts = Path(where).parts
    for part in parts:
        if part.startswith("models--"):  # a Hugging Face cache snapshot
            return part[len("models--"):].replace("--", "/")
    return Path(where).stem if Path(where).suffix in (".safetensors", ".ckpt") else Path(where).name


def concept_fields(pipe, prompts: list[str]) -> dict:
    """The learned concepts in use: Textual Inversion tokens the prompts name, and the active LoRAs."""
    fields: dict = {}
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None:
        special = set(getattr(tokenizer, "all_special_tokens", []))
        added = [t for t in tokenizer.get_added_vocab() if t not in special]
        used = [t for t in added if any(t in p for p in prompts)]
        used = [t for t in used if not (re.search(r"_\d+$", t) and re.sub(r"_\d+$", "", t) in used)]
        if used:
            fields["TI"] = ", ".join(used)
    loras = getattr(pipe, "conceptkit_loras", None) or {}
    try:
        active = pipe.get_active_adapters() if hasattr(pipe, "get_active_adapters") else []
    except (ValueError, AttributeError):  # no adapters loaded
        active = []
    if active:
        fields["Lora"] = ", ".join(f"{name}: {loras[name]:g}" if name in loras else name for name in active)
    return fields


def settings_for(pipe, prompt: str, *, seed: int, steps: int, sampler: str, cfg_scale: float,
                 image: Image.Image, negative_prompt: str | None = None, **extra) -> Settings:
    """The settings of one image `pipe` made from `prompt`."""
    return Settings(prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler,
                    cfg_scale=cfg_scale, seed=seed, width=image.width, height=image.height, model=model_name(pipe),
                    extra={**concept_fields(pipe, [prompt]), **{k: v for k, v in extra.items() if v is not None}})


RENDERER = "shapes-world renderer"


def rendered(scene) -> Settings:
    """The settings of a shapes-world render (no model made it): its canonical caption and size."""
    from ..shapes.captions import caption
    from ..shapes.render import render

    height, width = render(scene).shape[:2]
    return Settings(prompt=caption(scene), width=width, height=height, model=RENDERER)
