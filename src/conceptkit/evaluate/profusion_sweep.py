"""`conceptkit evaluate profusion --sweep KEY=V1,V2,...`: the grid of fusion settings a sweep samples, parsed and
checked before anything loads (no torch import here, so a bad --sweep fails at once, in one line).

KEY is a FusionConfig field (profusion/fusion_config.py) or its usual symbol: λ `refine_emb_scale` (lambda),
w_f `refine_guidance_scale` (w_f, refine_guidance), s `emb_scale` (s: S*'s scale in the main step), w2 `ref_guidance_scale` (w2), w1 `guidance_scale` (w1),
m `refine_steps` (m), η `refine_eta` (eta), r `ref_prompt` (a fixed reference prompt such as "a photo of an
object"; `none` = the prompt with S* replaced by the class word) and `class_word`. Several --sweep options give
every combination of their values (a Cartesian grid). Values are separated by commas, so a value holds no comma.
"""
from __future__ import annotations

import itertools

from .. import values as v
from ..errors import UserError

# field: its range (None: text)
SWEEPABLE: dict[str, v.Number | None] = {
    "refine_emb_scale": v.SMALL_WEIGHT,
    "refine_guidance_scale": v.GUIDANCE,
    "emb_scale": v.SMALL_WEIGHT,
    "ref_guidance_scale": v.GUIDANCE,
    "guidance_scale": v.GUIDANCE,
    "refine_steps": v.COUNT_OR_ZERO,
    "refine_eta": v.ETA,
    "ref_prompt": None,
    "class_word": None,
}
ALIASES = {"lambda": "refine_emb_scale", "λ": "refine_emb_scale", "w_f": "refine_guidance_scale",
           "wf": "refine_guidance_scale", "refine_guidance": "refine_guidance_scale", "w2": "ref_guidance_scale",
           "w1": "guidance_scale", "m": "refine_steps", "eta": "refine_eta", "η": "refine_eta", "r": "ref_prompt", "s": "emb_scale"}
SYMBOLS = {"refine_emb_scale": "λ", "refine_guidance_scale": "w_f", "emb_scale": "s", "ref_guidance_scale": "w2",
           "guidance_scale": "w1", "refine_steps": "m", "refine_eta": "η", "ref_prompt": "r", "class_word": "class"}
MAX_SETTINGS = 64


def _keys_text() -> str:
    return ", ".join(f"{k} ({SYMBOLS[k]})" for k in SWEEPABLE)


def parse_one(text: str) -> tuple[str, list]:
    """(field, [values]) of one --sweep text; ValueError(what to pass) for anything wrong in it."""
    key, sep, rest = text.partition("=")
    name = ALIASES.get(key.strip().replace("-", "_"), key.strip().replace("-", "_"))
    if not sep or not key.strip():
        raise ValueError(f"pass KEY=V1,V2,... (KEY one of {_keys_text()})")
    if name not in SWEEPABLE:
        raise ValueError(f"{key.strip()} is not a fusion setting: pass one of {_keys_text()}")
    parts = [part.strip() for part in rest.split(",")]
    if any(not part for part in parts):
        raise ValueError(f"an empty value: pass values separated by commas, e.g. {key.strip()}=0.4,0.6")
    rule = SWEEPABLE[name]
    values = []
    for part in parts:
        if rule is None:
            if "|" in part:
                raise ValueError(f"{part!r} holds '|': pass text without it")
            value = None if name == "ref_prompt" and part.lower() == "none" else part
        else:
            try:
                value = rule.parse(part)
            except ValueError as e:
                raise ValueError(f"{part}: {e}") from None
        if value in values:
            raise ValueError(f"{part} is given twice")
        values.append(value)
    return name, values


def parse_sweep(texts: list[str]) -> list[tuple[str, list]]:
    """[(field, [values])] from the --sweep texts, in the order given; UserError (one line) for anything wrong."""
    parsed: list[tuple[str, list]] = []
    for text in texts:
        try:
            name, values = parse_one(text)
        except ValueError as e:
            raise UserError(f"--sweep {text}: {e}") from None
        if any(name == seen for seen, _ in parsed):
            raise UserError(f"--sweep {text}: {name} is swept twice: give all its values in one --sweep "
                            f"{text.partition('=')[0].strip()}=V1,V2,...")
        parsed.append((name, values))
    size = 1
    for _, values in parsed:
        size *= len(values)
    if size > MAX_SETTINGS:
        raise UserError(f"--sweep: {size} settings (every combination of the values given); at most {MAX_SETTINGS}: "
                        "sweep fewer values at once")
    return parsed


def grid(parsed: list[tuple[str, list]]) -> list[dict]:
    """Every combination of the swept values, the last --sweep varying fastest."""
    names = [name for name, _ in parsed]
    return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in parsed))]


def effective(settings: dict) -> tuple:
    """What decides the images, from FusionConfig fields: settings that sample the same images give the same key
    (no reference branch when w2 = 0, so r and the class word do not count; no fusion sub-step when m = 0 or
    η = 0, so λ and w_f do not count; a fixed r makes the class word irrelevant)."""
    s = dict(settings)
    if not s.get("ref_guidance_scale"):
        s["ref_prompt"] = s["class_word"] = None
    elif s.get("ref_prompt") is not None:
        s["class_word"] = None
    if not s.get("refine_steps") or not s.get("refine_eta"):
        s["refine_steps"] = s["refine_eta"] = s["refine_emb_scale"] = s["refine_guidance_scale"] = 0
    return tuple(sorted((k, repr(val)) for k, val in s.items()))


def label(setting: dict) -> str:
    """'λ=0.4 w_f=5 r="a photo of an object"': how tables and per-object results name a setting."""
    def show(value):
        if value is None:
            return "none"
        if isinstance(value, str):
            return f'"{value}"'
        return f"{value:g}"
    return " ".join(f"{SYMBOLS[k]}={show(val)}" for k, val in setting.items())
