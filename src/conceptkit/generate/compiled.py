"""torch.compile of the UNet for long sampling runs (issue 21): opt-in (`generate --compile`).

The first call compiles (TorchInductor; minutes on a 2-core CPU, and again for every new batch shape or image size),
later calls run the compiled kernels: worth it only for runs long enough to amortise the warm-up (many images, the
web UI's server, evaluations). Inductor caches the compiled graphs on disk (its FX-graph cache), so a later process
re-compiles faster. The compiled forward is kept on the UNet (one per process) and put in place only within
`compiled_unet(unet)`: outside it the UNet is the eager module. Measured on the bundled model
(benchmarks/generate_speed.py --compile): the same images up to float rounding (max pixel difference 0 in one
run, 1 of 255 in another, float32 on CPU).
"""
from __future__ import annotations

import contextlib

import torch

ATTRIBUTE = "_conceptkit_compiled_forward"


@contextlib.contextmanager
def compiled_unet(unet, enabled: bool = True, backend: str = "inductor"):
    """Within the block, `unet(...)` runs torch.compile(unet.forward, backend=backend) (compiled once per UNet and
    backend, on the first call)."""
    if not enabled:
        yield unet
        return
    cache = unet.__dict__.setdefault(ATTRIBUTE, {})
    if backend not in cache:
        cache[backend] = torch.compile(type(unet).forward.__get__(unet), backend=backend, dynamic=False)
    previous = unet.__dict__.get("forward")
    unet.forward = cache[backend]
    try:
        yield unet
    finally:
        if previous is None:
            del unet.forward
        else:
            unet.forward = previous
