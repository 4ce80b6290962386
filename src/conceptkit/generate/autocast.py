"""bf16 autocast of the UNet for sampling (issue 21): opt-in (`generate --bf16`), because it changes the images.

Within `bf16_unet(unet)` every call of the UNet runs under `torch.autocast(device, bfloat16)`: convolutions, linear
layers and attention in bfloat16, normalisations in float32 (autocast's lists). Its output is cast back to the
work dtype by the plug-in, and latents, guidance and the scheduler stay in float32 (loop.py), so only the UNet's
arithmetic rounds. Measured on the bundled model (benchmarks/generate_speed.py): faster on CPUs with native bf16
(`avx512_bf16` or AMX, see `cpu_has_bf16`) and on GPUs, at a max pixel difference of a few levels out of 255; on
CPUs without it bf16 is emulated and slower, so the flag is refused there.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import UserError

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (Linux: /proc/cpuinfo's flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return any(f in flags for f in BF16_FLAGS)


def check_bf16(device: torch.device) -> None:
    if device.type == "cpu" and not cpu_has_bf16():
        raise UserError("--bf16: this CPU has no native bf16 (avx512_bf16 or amx_bf16), where bf16 is slower than "
                        "float32: leave --bf16 out")


@contextlib.contextmanager
def bf16_unet(unet, enabled: bool = True):
    """Within the block, `unet(...)` runs under bf16 autocast (then as before). A float32 UNet only: a half-precision
    one is left alone."""
    if not enabled or unet.dtype != torch.float32:
        yield unet
        return
    check_bf16(unet.device)
    forward = unet.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast(unet.device.type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    previous = unet.__dict__.get("forward")  # a compiled forward (compiled_unet), kept under autocast
    unet.forward = autocast_forward
    try:
        yield unet
    finally:
        if previous is None:
            del unet.forward  # the class's forward again
        else:
            unet.forward = previous
