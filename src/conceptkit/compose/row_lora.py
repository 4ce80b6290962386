"""Per-row LoRA: one batched forward in which every batch row uses its own mix of adapters.

CLoRA runs K branches (base + one per LoRA) at both CFG halves; switching adapters between K separate calls costs
K small forwards per step. Instead the PEFT layers are told to skip their own LoRA path and a forward hook adds
`Σ_a w[row, a] · B_a(A_a(x[row])) · scaling_a` for exactly the rows that use adapter a (a concept LoRA runs on
its branch's 2 rows, a style LoRA on all rows). The base layer runs once on the whole batch.

The scale is the adapter's own (lora_alpha / r, or / sqrt(r) for rsLoRA), never PEFT's current `scaling`: PEFT's
`set_adapters` multiplies its weight into `scaling`, so reading it after an adapter switch (the sequential path,
`--method reference`) would apply that weight a second time.
"""
from __future__ import annotations

import contextlib
import math

import torch
from peft.tuners.lora import LoraLayer

from ..errors import UserError


def lora_layers(*models) -> list[LoraLayer]:
    return [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]


def row_plan(weights: dict[str, list[float]]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """{adapter: per-row weights} -> {adapter: (rows, weights of those rows)}; rows=None means every row."""
    plan = {}
    for name, w in weights.items():
        w = torch.as_tensor(w, dtype=torch.float32)
        rows = torch.nonzero(w).flatten()
        if len(rows) == 0:
            continue
        if len(rows) == len(w):
            plan[name] = (None, w)
        else:
            plan[name] = (rows, w[rows])
    return plan


def base_scaling(layer: LoraLayer, name: str) -> float:
    """The adapter's scale before any weight: what `set_adapters(name, 1.0)` would give."""
    r = layer.r[name]
    return layer.lora_alpha[name] / (math.sqrt(r) if layer.use_rslora.get(name, False) else r)


def _add_adapter_rows(layer: LoraLayer, x: torch.Tensor, output: torch.Tensor, plan) -> torch.Tensor:
    for name, (rows, w) in plan.items():
        if name not in layer.lora_A:
            continue
        sub = x if rows is None else x[rows.to(x.device)]
        sub = sub.to(layer.lora_A[name].weight.dtype)
        delta = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](sub))) * base_scaling(layer, name)
        scale = w.to(delta.device, delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
        delta = (delta * scale).to(output.dtype)
        output = output + delta if rows is None else output.index_add(0, rows.to(output.device), delta)
    return output


@contextlib.contextmanager
def per_row_adapters(models, weights: dict[str, list[float]]):
    """Within the block, LoRA layers of `models` apply adapter a with weight weights[a][row] to each batch row."""
    plan = row_plan(weights)
    layers = lora_layers(*models)
    for layer in layers:
        if getattr(layer, "lora_variant", None):
            raise UserError("a loaded LoRA uses a variant (DoRA or similar) that per-row mixing does not support: "
                            "pass --execution sequential")
    saved = [layer._disable_adapters for layer in layers]
    handles = []
    try:
        for layer in layers:
            layer._disable_adapters = True  # the layer computes only its base output; the hook adds the rows
            handles.append(layer.register_forward_hook(
                lambda mod, args, out: _add_adapter_rows(mod, args[0], out, plan)))
        yield
    finally:
        for h in handles:
            h.remove()
        for layer, s in zip(layers, saved):
            layer._disable_adapters = s
