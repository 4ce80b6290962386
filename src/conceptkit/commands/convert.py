"""`conceptkit convert promptnet`: other codes' checkpoints as conceptkit folders (official ProFusion PromptNets)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import options as o


def register(sub) -> None:
    convert = sub.add_parser("convert", help="other codes' checkpoints as conceptkit folders").add_subparsers(
        dest="convert_command", required=True)
    p = convert.add_parser("promptnet", help="an official ProFusion PromptNet (drboog/ProFusion) as a PromptNet folder "
                                             "for `generate --promptnet` and `learn promptnet --finetune`")
    p.add_argument("--from-official", type=o.path, required=True, metavar="FILE_OR_DIR",
                   help="the pipeline folder train.py writes, its promptnet/ folder, or the weights file "
                        "(.safetensors, or .bin read without unpickling code)")
    p.add_argument("--image-encoder", type=o.path, metavar="FOLDER",
                   help="the CLIP model it was trained with (a transformers CLIPModel or CLIPVisionModel folder; "
                        "default: the pipeline folder's openclip/)")
    p.add_argument("--model", type=o.path,
                   help="only for a weights file without its config.json: the base model it was trained for "
                        "(its UNet gives the PromptNet's shape)")
    p.add_argument("--config", type=o.path, help="with --model as a single-file checkpoint: its diffusers folder")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the written weights")
    p.add_argument("--out", type=o.path, required=True, help="the PromptNet folder to write")
    p.set_defaults(func=run_promptnet, writes=("out",))


def run_promptnet(args) -> None:
    from ..profusion.official import convert_official, find_official

    given = Path(args.from_official)
    if not given.exists():
        raise UserError(f"--from-official {given} does not exist: pass the official pipeline folder, its "
                        "promptnet/ folder or its weights file")
    out = Path(args.out)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a PromptNet (config.json): pass a new --out folder (nothing was "
                        "changed)")
    source = find_official(given)
    if source is None:
        raise UserError(f"{given} is not an official ProFusion PromptNet (no model_index.json naming a promptnet, "
                        "no PromptNetModel config.json, no weights file): pass the folder train.py wrote")
    unet_config = None
    if source.config is None:
        if not args.model:
            raise UserError(f"{given} has no config.json next to it: pass --model, the base model it was trained "
                            "for (its UNet gives the PromptNet's shape)")
        from ..models.loading import load_pipeline

        unet_config = load_pipeline(args.model, config=args.config, device="cpu").unet.config
    converted = convert_official(source, unet_config=unet_config, image_encoder=args.image_encoder)
    if converted.image_encoder is None:
        raise UserError(f"{given} has no image encoder next to it (the pipeline folder's openclip/): pass "
                        "--image-encoder FOLDER, the CLIP model it was trained with (ProFusion's SD 2 one: "
                        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    import torch

    from ..profusion.saved import save_promptnet

    net = converted.promptnet.to({"fp32": torch.float32, "fp16": torch.float16}[args.dtype])
    meta = {**converted.meta, "base_model": args.model or ""}
    save_promptnet(out, net, converted.image_encoder, meta)
    print(f"wrote {out.resolve()}: the official PromptNet as a conceptkit PromptNet folder (residual heads dropped: "
          f"unused); use it with: conceptkit generate --promptnet {out} --image IMAGE --prompt 'a S* ...'")
