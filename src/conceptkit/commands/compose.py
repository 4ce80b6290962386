"""`conceptkit compose`: several concepts in one image, CLoRA and the baselines; the CLoRA settings."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from . import options as o
from .options import add_model


def register(sub) -> None:
    p = sub.add_parser("compose", help="several concepts (LoRAs, embeddings, images, words) in one image: CLoRA and the "
                                       "baselines")
    add_model(p)
    p.add_argument("--prompt", type=o.prompt, required=True, help='template with a slot per concept: "a {cat} and a {dog} on the grass"')
    g = p.add_argument_group("concepts, one per {slot}, of any kinds mixed")
    g.add_argument("--lora", type=o.spec, action="append", metavar="NAME=FILE[:TRIGGER[:CLASS]]",
                   help="a LoRA; trigger and class word default to the LoRA's metadata")
    g.add_argument("--embedding", type=o.spec, action="append", metavar="NAME=FILE[:TOKEN[:CLASS]]",
                   help="a Textual Inversion embedding: its branch's prompt says the token (default: the file's); "
                        "the class word defaults to the init word of a `learn ti` folder")
    g.add_argument("--image", type=o.spec, action="append", metavar="NAME=FILE[:CLASS]",
                   help="one image of the concept: its branch's prompt holds PromptNet's word S* for it (ProFusion; "
                        "class word default 'object')")
    g.add_argument("--words", type=o.spec, action="append", metavar="NAME=TEXT[:CLASS]",
                   help="a concept written in words, e.g. 'cross=pink striped cross': its branch's prompt says the "
                        "words and no adapter runs, so beside a learned concept the words' colour stays on their own "
                        "object (class word default: the last word)")
    g.add_argument("--promptnet", type=o.path, help="the PromptNet for --image (default with the bundled model: the bundled one)")
    p.add_argument("--style-lora", type=o.path, metavar="FILE[:WEIGHT]", help="a style LoRA on every branch (weight 0.8)")
    p.add_argument("--method", type=o.names, default="clora", help="clora, reference, merge, switch, composite, none, "
                                                      "text, regional; comma-separated for a side-by-side grid")
    p.add_argument("--regions", type=o.names, help="regional: each concept's region in slot order, left,right,top,bottom "
                                                   "or all (default: equal vertical strips, left to right)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=o.seed, default=0)
    p.add_argument("--num-images", type=o.count, default=1, help="seeds seed, seed+1, ...")
    p.add_argument("--height", type=o.size)
    p.add_argument("--width", type=o.size)
    p.add_argument("--save-maps", action="store_true", help="also write per-step attention maps and masks as PNG grids")
    p.add_argument("--out", type=o.path, default="outputs/compose")
    add_compose_settings(p)
    p.set_defaults(func=run, several_processes=True, writes=("out",))


def compose_config(args, defaults: dict | None = None):
    """CLoRAConfig from the command line's settings; `defaults` (in command-line form) where it gives none."""
    from dataclasses import fields

    from ..compose.config import CLoRAConfig

    values = dict(defaults or {})
    values.update({f.name: getattr(args, f.name) for f in fields(CLoRAConfig) if getattr(args, f.name, None) is not None})
    if "iterative_steps" in values:
        try:
            values["iterative_steps"] = tuple(int(v) for v in values["iterative_steps"].split(",") if v.strip())
            if any(v < 0 for v in values["iterative_steps"]):
                raise ValueError
        except ValueError:
            raise UserError(f"--iterative-steps {values['iterative_steps']!r}: pass step numbers separated by "
                            "commas, e.g. 0,10,20 ('' for none)") from None
    try:
        return CLoRAConfig(**values)
    except ValueError as e:  # the API's check; the CLI's options are checked when parsed, so this is rare
        raise UserError(str(e)) from None


def concept_specs(args) -> list:
    """The --lora, --embedding, --image and --words options as concept specs (compose/concepts.py)."""
    from ..compose.concepts import EmbeddingSpec, ImageSpec, LoraSpec, WordsSpec

    return ([LoraSpec.parse(s) for s in args.lora or []] + [EmbeddingSpec.parse(s) for s in args.embedding or []]
            + [ImageSpec.parse(s) for s in args.image or []] + [WordsSpec.parse(s) for s in args.words or []])


def run(args) -> None:
    from ..compose.run import compose
    from ..learn.distributed import process_device, processes
    from ..models.loading import bundled_promptnet_path, load_pipeline

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    specs = concept_specs(args)
    promptnet = args.promptnet or (bundled_promptnet_path(args.model) if args.image else None)
    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    result = compose(pipe, args.prompt, specs, methods=methods, seeds=[args.seed + i for i in range(args.num_images)],
                     cfg=compose_config(args), negative_prompt=args.negative_prompt, style_lora=args.style_lora,
                     promptnet=promptnet, height=args.height, width=args.width, out_dir=args.out,
                     save_maps=args.save_maps, procs=processes(),
                     regions=[r.strip() for r in args.regions.split(",")] if args.regions else None)
    if not processes().main:
        return
    for m in methods:
        print(f"{m}: {len(result.images[m])} image(s), {result.seconds[m]:.2f} s/image, "
              f"{result.unet_calls[m]} UNet calls/image")
    print(f"wrote {Path(args.out).resolve()} (grid.png: rows seeds, columns methods; compose.json)")


def add_compose_settings(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The CLoRA settings; `defaults` (in command-line form) replace CLoRAConfig's in the help where given."""
    from ..compose.config import CLoRAConfig

    given = dict(defaults or {})
    if "iterative_steps" in given:
        given["iterative_steps"] = tuple(int(s) for s in given["iterative_steps"].split(",") if s.strip())
    d = CLoRAConfig(**given)
    g = p.add_argument_group("CLoRA (ALGORITHMS.md §2; defaults fix the official quirks, --method reference keeps them)")
    g.add_argument("--steps", type=o.count, help=f"denoising steps (default {d.steps})")
    g.add_argument("--guidance-scale", type=o.guidance_scale, help=f"default {d.guidance_scale}")
    g.add_argument("--guidance-rescale", type=o.probability,
                   help=f"rescale the guided prediction toward the conditional one's std (default {d.guidance_rescale})")
    g.add_argument("--step-size", type=o.weight, help=f"latent update step (default {d.step_size})")
    g.add_argument("--temperature", type=o.positive, help=f"the contrastive loss's temperature τ (default {d.temperature})")
    g.add_argument("--no-text-encoder-lora", dest="use_text_encoder_lora", action="store_false", default=None,
                   help="run each LoRA on the UNet only, its text-encoder layers off (default: both, where the file "
                        "has them)")
    g.add_argument("--lora-end", type=o.share,
                   help="the concept LoRAs' UNet layers act on this first share of the steps, the base UNet after "
                        f"it, the prompts unchanged (diffusers' control_guidance_end rule; default {d.lora_end:g})")
    g.add_argument("--max-iter-to-alter", type=o.count_or_zero, help="update the latent on the first N steps (default: half)")
    g.add_argument("--iterative-steps", type=o.step_list, help="steps with extra refinement, comma-separated (default "
                                             f"{','.join(map(str, d.iterative_steps))}; '' for none)")
    g.add_argument("--iterative-steps-steps", type=o.count_or_zero, help=f"refinements at those steps (default {d.iterative_steps_steps})")
    g.add_argument("--no-latent-update", dest="latent_update", action="store_false", default=None)
    g.add_argument("--mask-threshold", type=o.probability, help=f"alpha: mask where a map > alpha*max (default {d.mask_threshold})")
    g.add_argument("--mask-combine", choices=["or", "sum"], help=f"a concept's tokens: each thresholded then OR-ed "
                   f"(or, the official code) or their maps summed then thresholded (sum; default {d.mask_combine})")
    g.add_argument("--mask-exclusive", action="store_true", default=None,
                   help="a pixel goes to the one concept whose mask score is highest there, instead of averaging "
                        "the concepts whose masks overlap (ours, not in the paper)")
    g.add_argument("--apply-mask-after", type=o.count_or_zero, help="blend uniformly before this step (default 0)")
    g.add_argument("--attn-res", type=o.attn_res, help="side of the attention maps used (default: latent/4, at least 8)")
    for name in ("dilate", "erode", "opening", "closing"):
        g.add_argument(f"--{name}", action="store_true", default=None, help=f"{name} the masks (3x3)")
    g.add_argument("--execution", choices=["batched", "sequential"], help="default batched (one UNet call a step)")
    g.add_argument("--scheduler", type=o.scheduler, help=f"default {d.scheduler}: ddim, dpm++, euler, euler-a, pndm (the latent update "
                                       "moves the latent the scheduler holds)")
    g.add_argument("--merge-weight", type=o.small_weight, help=f"merge: weight of every LoRA (default {d.merge_weight})")
    g.add_argument("--switch-every", type=o.count, help=f"switch: steps per LoRA (default {d.switch_every})")
