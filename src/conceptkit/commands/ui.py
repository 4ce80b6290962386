"""`conceptkit ui`: the web UI's server options."""
from __future__ import annotations

from . import options as o

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("ui", help="the web UI (Gradio): generate, learn, compose, ProFusion")
    p.add_argument("--host", type=o.name, default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=o.port, default=7860)
    p.add_argument("--model", type=o.path, default="toy", help="the model selected at start ('toy': the bundled one)")
    p.add_argument("--models-dir", type=o.path, help="a folder of local checkpoints (diffusers folders, .safetensors) to pick from")
    p.add_argument("--work", type=o.path, default="outputs/ui", help="where jobs, generated images and uploads are kept (the "
                                                        "server reads and writes nothing else but the models)")
    p.add_argument("--token", type=o.name, help="required with a --host other than this machine: visitors log in with it "
                                   "(default: $CONCEPTKIT_UI_TOKEN)")
    p.add_argument("--max-upload-mb", type=o.upload_mb, default=50, help="largest accepted upload (default 50 MB)")
    p.add_argument("--clip", type=o.path, help="a CLIPModel folder or cached hub id: a finished Learn job also shows CLIP-I and "
                                  "CLIP-T of its final validation images against the uploads")
    p.add_argument("--dino", type=o.path, help="a DINOv2 / DINO ViT folder or cached hub id: ... and DINO")
    p.set_defaults(func=run, writes=("work",))


def run(args) -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: machines may have no network
    try:
        from ..ui.app import serve
    except ModuleNotFoundError as e:
        if e.name not in ("gradio", "pandas"):
            raise
        raise UserError(f"the web UI needs {e.name}: pip install 'conceptkit[ui]'") from None

    serve(host=args.host, port=args.port, model=args.model, work=args.work, models_dir=args.models_dir,
          token=args.token or os.environ.get("CONCEPTKIT_UI_TOKEN"), max_upload_mb=args.max_upload_mb,
          clip=args.clip, dino=args.dino)
