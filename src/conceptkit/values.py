"""What a setting may hold: the ranges the CLI's options (commands/options.py) and the Python API's config objects
(`TIConfig`, `LoRAConfig`, `CLoRAConfig`, `FusionConfig`, `PretrainConfig`, `FinetuneConfig`) check, in one place so
the two never disagree. No torch import: the CLI checks its options before anything heavy loads.

Every number has an upper bound, even counts: a value like 1e30 steps or seeds is a typo, not a request, and
left unchecked it fails much later (an overflowing int64 generator seed, a loss of inf) or runs for ever.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

SCHEDULER_NAMES = ("ddim", "dpm++", "euler", "euler-a", "pndm")  # generate/schedulers.py's SCHEDULERS (tested)


def _show(x: float) -> str:
    if x == int(x) and abs(x) >= 10_000:
        return f"{int(x):,}"
    return f"{x:g}"


@dataclass(frozen=True)
class Number:
    """An int or float between lo and hi (lo excluded when lo_open), a multiple of `step` for ints when given."""
    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    multiple_of: int = 1

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.multiple_of > 1:
            what = f"a multiple of {self.multiple_of}"
        if self.lo_open:
            return f"{what} > {_show(self.lo)} and ≤ {_show(self.hi)}"
        return f"{what} from {_show(self.lo)} to {_show(self.hi)}"

    def check(self, value) -> int | float:
        """`value` if it is in range; ValueError(what to pass) if not. bools are refused: True is not a count."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"pass {self.describe()}")
        if self.kind is int and (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"pass {self.describe()}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"pass {self.describe()}")
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        if not (low_ok and value <= self.hi) or (self.kind is int and value % self.multiple_of):
            raise ValueError(f"pass {self.describe()}")
        return self.kind(value)

    def parse(self, text: str) -> int | float:
        """From command-line text; ValueError(what to pass) for text that is not a number of the kind."""
        try:
            value = int(text, 10) if self.kind is int else float(text)
        except ValueError:
            raise ValueError(f"pass {self.describe()}") from None
        return self.check(value)


BIG = 1_000_000_000
COUNT = Number(int, 1, BIG)  # steps, images, batch, seeds per prompt...
COUNT_OR_ZERO = Number(int, 0, BIG)  # 0 has a meaning (validate-every 0: at the end; refine-steps 0: plain sampling)
SEED = Number(int, 0, 2**32 - 1)  # numpy's and A1111's range; torch seeds are derived from it (seed * 1e6 + step)
SIZE = Number(int, 8, 8192, multiple_of=8)  # pixels: the VAE downsamples by 8
RATE = Number(float, 0, 1, lo_open=True)  # Adam learning rates: a step of 1 per element is already far too big
PROBABILITY = Number(float, 0, 1)
SHARE = Number(float, 0, 1, lo_open=True)  # a share that cannot be empty (the steps a LoRA is active on)
GUIDANCE = Number(float, 0, 100)  # classifier-free guidance scales (0: the unconditional prediction)
WEIGHT = Number(float, 0, 1_000_000)  # non-negative factors: regularisation, latent step size, LoRA alpha
SMALL_WEIGHT = Number(float, 0, 100)  # LoRA merge/style weights, embedding scales
POSITIVE = Number(float, 0, 1_000_000, lo_open=True)
ETA = Number(float, 0, math.sqrt(2))  # ProFusion's fusion η (ALGORITHMS.md §3.7)
THREADS = Number(int, 1, 1024)
PORT = Number(int, 1, 65535)
VECTORS = Number(int, 1, 75)  # a token's vectors must fit CLIP's 77 positions with start and end
RANK = Number(int, 1, 4096)


def check_config(config, rules: dict[str, Number], optional: tuple[str, ...] = ()) -> None:
    """Check the fields of a config dataclass against `rules` (field: range); fields in `optional` may be None.
    Raises ValueError naming the class, the field, the value and what to pass."""
    for f in fields(config):
        rule = rules.get(f.name)
        if rule is None:
            continue
        value = getattr(config, f.name)
        if value is None and f.name in optional:
            continue
        try:
            rule.check(value)
        except ValueError as e:
            raise ValueError(f"{type(config).__name__}.{f.name} = {value!r}: {e}") from None


def check_text(config, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Fields that must be non-empty strings (None allowed for those in `optional`)."""
    for name in names:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{type(config).__name__}.{name} = {value!r}: pass a non-empty string")


def check_placeholder_text(text: str, placeholder: str = "S*") -> str:
    """`text` if it names the placeholder exactly once (a ProFusion prompt or caption); ValueError(what to write)."""
    count = text.count(placeholder)
    if count != 1:
        raise ValueError(f"names {placeholder} {count} times: write it exactly once, where the object is named "
                         f"(e.g. \"{placeholder} on a navy background\")")
    return text


def check_choice(config, name: str, choices: tuple, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} = {value!r}: pass one of {', '.join(map(str, choices))}")
