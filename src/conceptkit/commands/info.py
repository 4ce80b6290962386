"""`conceptkit info`: versions, device and the bundled model, as JSON."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, device and the bundled model, as JSON")
    p.set_defaults(func=run)


def run(args) -> None:
    import diffusers
    import peft
    import torch
    import transformers

    from .. import __version__
    from ..models.loading import bundled_model_path

    bundled = bundled_model_path()
    print(json.dumps({
        "conceptkit": __version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_devices": torch.cuda.device_count(),
        "cpu_threads": torch.get_num_threads(),
        "bundled_model": str(bundled),
        "bundled_model_present": (bundled / "model_index.json").exists(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }, indent=2))
