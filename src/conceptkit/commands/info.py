"""`conceptkit info`: versions, device and the bundled model, as JSON."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, device and the bundled model, as JSON")
    p.set_defaults(func=run)


def run(args) -> None:
    """Only torch is imported (for the device): the libraries' versions are read from their installed metadata, so
    `info` does not pay for importing diffusers, transformers and peft (seconds)."""
    from importlib.metadata import version
    from pathlib import Path

    import torch

    import conceptkit
    from .. import __version__

    bundled = Path(conceptkit.__file__).parent / "bundled" / "shapes-base"  # models.loading.bundled_model_path
    print(json.dumps({
        "conceptkit": __version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_devices": torch.cuda.device_count(),
        "cpu_threads": torch.get_num_threads(),
        "bundled_model": str(bundled),
        "bundled_model_present": (bundled / "model_index.json").exists(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "python": sys.version.split()[0],
    }, indent=2))
