"""Loading PromptNet weights all or nothing: every layer of the module gets a tensor of its shape, or nothing loads.

`load_state_dict(strict=False)` (and diffusers' `from_pretrained`, which only warns about unexpected keys) leaves a
layer the file does not name at its random initialisation: the PromptNet then runs and gives a wrong word without
any sign. Every place that puts weights into a PromptNet (a saved folder, an exported checkpoint, a converted
official checkpoint, EMA weights) goes through `load_strict`, which refuses in one line naming the keys.
"""
from __future__ import annotations

import torch

from ..errors import UserError

SHOWN = 3  # keys named in a message; the rest are counted


def _some(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def state_problems(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with `state` for a module whose tensors are `expected` (name → shape); None if nothing."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} tensor(s): {_some(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} tensor(s): {_some(unexpected)}"] if unexpected else [])
        return "; ".join(parts)
    wrong = [k for k in sorted(expected) if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        return f"{k} has shape {tuple(state[k].shape)}, the PromptNet's is {tuple(expected[k])}{more}"
    return None


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, fix: str) -> torch.nn.Module:
    """Copy `state` into `module` (dtype converted); a missing, unexpected or misshapen tensor raises a one-line
    UserError: "{source}: {what is wrong}: {fix}"."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problem = state_problems(expected, state)
    if problem:
        raise UserError(f"{source}: {problem}: {fix}")
    module.load_state_dict(state, strict=True)
    return module
