"""`conceptkit evaluate base|ti|clora|profusion|oracle`: the benchmarks on the shapes world."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..learn.promptnet_config import FinetuneConfig
from ..learn.ti_config import TIConfig
from .compose import add_compose_settings, compose_config
from .learn import FINETUNE_DEFAULTS, TI_DEFAULTS
from . import options as o
from .options import add_model, add_sampling

# evaluate clora's sampling settings where the command line leaves them (chosen on the tune split, README)
BENCHMARK_COMPOSE = dict(steps=30, iterative_steps="0", iterative_steps_steps=10)


def register(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="benchmarks on the shapes world").add_subparsers(
        dest="evaluate_command", required=True)
    p = evaluate.add_parser("base", help="oracle accuracy of a model on the held-out prompt set")
    add_model(p)
    add_sampling(p)
    p.add_argument("--seeds", type=o.count, default=2)
    p.add_argument("--split", choices=["test", "tune"], default="test",
                   help="test: the held-out prompts and seeds (report these); tune: training combinations and their "
                        "own seeds (choose recipes and settings on these)")
    p.add_argument("--json", type=o.path)
    p.add_argument("--images", type=o.path, help="also write the generated images here")
    p.set_defaults(func=run_base, several_processes=True, writes=("images",))
    p = evaluate.add_parser("ti", help="Textual Inversion on the bundled concept sets: fidelity and adherence")
    p.add_argument("--model", type=o.path, default="toy")
    p.add_argument("--concepts", type=o.names, help="comma-separated concept names (default: all bundled sets)")
    p.add_argument("--ti-steps", type=o.count, default=TI_DEFAULTS.steps)
    p.add_argument("--lr", type=o.rate, default=TI_DEFAULTS.lr)
    p.add_argument("--batch", type=o.count, default=TI_DEFAULTS.batch)
    p.add_argument("--vectors", type=o.vectors, default=TI_DEFAULTS.vectors)
    p.add_argument("--init-word", default=TI_DEFAULTS.init_word)
    p.add_argument("--seed", type=o.seed, default=0, help="training seed (sampling uses the held-out seeds)")
    p.add_argument("--seeds", type=o.count, default=4, help="held-out sampling seeds per prompt")
    p.add_argument("--out", type=o.path, default="outputs/evaluate-ti", help="embeddings, images and the picture grid")
    p.add_argument("--json", type=o.path)
    p.set_defaults(func=run_ti, writes=("out",))
    p = evaluate.add_parser("clora", help="compose pairs of concept LoRAs: success of CLoRA and the baselines")
    add_model(p)
    p.add_argument("--methods", type=o.names, help="comma-separated (default: clora,merge,switch,composite,none,text,"
                                                   "regional; reference too on request)")
    p.add_argument("--split", choices=["test", "tune"], default="test",
                   help="test: the test concepts and held-out seeds (report these); tune: the tuning concepts and "
                        "their own seeds (choose the LoRA recipe and the settings on these)")
    p.add_argument("--seeds", type=o.count, help="the split's first N seeds (default: all 8)")
    p.add_argument("--loras", type=o.path, metavar="DIR", help="use the concept LoRAs in DIR (<concept>.safetensors or "
                                                  "<concept>/ training runs) instead of the bundled ones")
    p.add_argument("--train-loras", type=o.path, metavar="DIR", help="train (or resume) the concept LoRAs of both "
                                                        "splits into DIR and use them instead of the bundled ones")
    p.add_argument("--train-only", action="store_true", help="with --train-loras: train, then stop")
    p.add_argument("--no-fidelity", dest="fidelity", action="store_false",
                   help="skip measuring each LoRA alone (the ceiling)")
    p.add_argument("--calibrate-lora-ends", dest="calibrate", action="store_true",
                   help="choose each LoRA's --lora-end (1, 0.67 or 0.5) on its own training captions at training-range "
                        "seeds first, then run every method with it")
    p.add_argument("--threads", type=o.threads)
    p.add_argument("--images", type=o.path, help="also write every image into this folder")
    p.add_argument("--json", type=o.path, help="write the results (keys <method>.success, <method>.seconds_per_image)")
    add_compose_settings(p, BENCHMARK_COMPOSE)
    p.set_defaults(func=run_clora, writes=("images", "train_loras"))
    p = evaluate.add_parser("profusion", help="ProFusion on held-out objects: detail preservation and prompt adherence")
    p.add_argument("--model", type=o.path, default="toy")
    p.add_argument("--promptnet", type=o.path, help="the pre-trained PromptNet (default: the bundled one)")
    p.add_argument("--methods", type=o.names, help="comma-separated (default: fusion,fusion_notebook,plain,pretrained,"
                                     "pretrained_plain,ti; also composed, pretrained_composed: plain sampling with a "
                                     "two-object prompt's second object composed beside S* by CLoRA)")
    p.add_argument("--objects", type=o.objects, default=8, help="held-out test objects (at most 8)")
    p.add_argument("--split", choices=["test", "tune"],
                   help="test (the default): 8 held-out objects and seeds, report these; tune: 4 objects seen in "
                        "pre-training and seeds of their own, for choosing settings (the default with --sweep, which "
                        "refuses test)")
    p.add_argument("--prompts", choices=["moved", "compositional"], default="moved",
                   help="moved (default): the 5 compositional prompts (size, position, background) and 4 two-object "
                        "prompts (S* on one side, a second, different object on the other); compositional: the 5 "
                        "compositional prompts only (the benchmark before)")
    p.add_argument("--seeds", type=o.count, default=4, help="held-out sampling seeds per prompt")
    p.add_argument("--steps", type=o.count, default=50, help="DDIM steps")
    p.add_argument("--finetune-steps", type=o.count)
    p.add_argument("--finetune-lr", type=o.rate)
    p.add_argument("--augment", choices=["none", "flip", "affine"])
    p.add_argument("--finetune-unet-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="profusion: fine-tune the UNet's to_q/to_k/to_v with PromptNet (default yes, as the paper)")
    p.add_argument("--finetune-caption", action="store_true",
                   help="profusion: fine-tune with each reference image's own caption (`learn promptnet --caption`) "
                        "instead of 'a photo of S*'")
    g = p.add_argument_group("fusion sampling settings (default: the notebook's fusion call, see generate --help)")
    g.add_argument("--guidance-scale", type=o.guidance_scale)
    g.add_argument("--ref-guidance-scale", type=o.guidance_scale)
    g.add_argument("--refine-steps", type=o.count_or_zero)
    g.add_argument("--refine-eta", type=o.eta)
    g.add_argument("--refine-emb-scale", type=o.small_weight)
    g.add_argument("--refine-guidance", type=o.guidance_scale)
    g.add_argument("--emb-scale", type=o.small_weight, help="s: S*'s output scale in the main step (plain sampling "
                                                            "too; default: the PromptNet's recommended value)")
    g.add_argument("--class-word", type=o.name)
    g.add_argument("--ref-prompt", type=o.prompt, help="a fixed reference prompt r (e.g. 'a photo of an object'; "
                                                       "default: the prompt with S* replaced by the class word)")
    p.add_argument("--sweep", action="append", type=o.sweep, metavar="KEY=V1,V2,...",
                   help="sample fusion (fine-tuned) at each value, on the tune split; repeat for a grid of every "
                        "combination. KEY: refine_emb_scale (lambda), refine_guidance_scale (w_f), emb_scale (s), "
                        "ref_guidance_scale (w2), guidance_scale (w1), refine_steps (m), refine_eta (eta), ref_prompt "
                        "(r: a fixed reference prompt, e.g. 'a photo of an object'; none = S* replaced by the class "
                        "word; only used when w2 > 0), class_word. Each object is fine-tuned once; plain sampling "
                        "is the baseline of the paired differences")
    p.add_argument("--threads", type=o.threads)
    p.add_argument("--out", type=o.path, default="outputs/evaluate-profusion", help="fine-tuned PromptNets, images, grid.png")
    p.add_argument("--json", type=o.path, help="write the results (keys <method>.preservation/.adherence/.sum/.sum_se/"
                                             ".seconds, fusion-<method>.sum_diff/.sum_diff_se; with --sweep a "
                                             "sweep list, one entry per setting)")
    p.set_defaults(func=run_profusion, writes=("out",))
    p = evaluate.add_parser("oracle", help="oracle accuracy on clean renders and a model's VAE reconstructions")
    p.add_argument("--model", default="toy", help="whose VAE to test; '' for clean renders only")
    p.add_argument("--config", type=o.path)
    p.add_argument("--device", type=o.device, default="auto")
    p.add_argument("--vae", type=o.path, help="a diffusers AutoencoderKL folder to test instead of --model's VAE")
    p.add_argument("--n", type=o.count, default=1000)
    p.add_argument("--json", type=o.path)
    p.set_defaults(func=run_oracle)
    p = evaluate.add_parser("images", help="CLIP-I, CLIP-T and DINO of generated images against real ones "
                                           "(local CLIP/DINO weights)")
    p.add_argument("--images", type=o.path, required=True, help="folder of generated images (grid.png is skipped)")
    p.add_argument("--reference", type=o.path, required=True, help="folder of real images of the subject")
    p.add_argument("--prompt", type=o.prompt, help="the prompt for CLIP-T (default: each image's recorded prompt, A1111's "
                                    "`parameters` chunk; none known: CLIP-T is null)")
    add_scorers(p)
    p.add_argument("--batch", type=o.count, default=16, help="images per encoder call")
    p.add_argument("--json", type=o.path, help="write per-image rows and the means with standard errors")
    p.set_defaults(func=run_images)
    p = evaluate.add_parser("dreambench", help="DreamBooth's protocol on a local DreamBench copy: learn each subject,"
                                               " generate its prompts, score CLIP-I, CLIP-T and DINO")
    add_model(p)
    p.add_argument("--data", type=o.path, required=True, help="DreamBench's dataset/ folder: subject folders + "
                                                 "prompts_and_classes.txt (or prompts.txt [+ classes.txt])")
    p.add_argument("--method", choices=["ti", "lora"], default="ti")
    add_scorers(p, device=False)
    p.add_argument("--subjects", type=o.names, help="comma-separated subject names (default: all)")
    p.add_argument("--prompts", type=o.count, help="only the first N prompt templates per subject (default: all 25)")
    p.add_argument("--images-per-prompt", type=o.count, default=4, help="seeds per prompt (DreamBooth: 4)")
    p.add_argument("--train-steps", type=o.count, help="training steps per subject (default: the method's recipe)")
    p.add_argument("--lr", type=o.rate, help="learning rate (default: the method's recipe)")
    p.add_argument("--steps", type=o.count, default=50, help="sampling steps")
    p.add_argument("--guidance-scale", type=o.guidance_scale, default=7.5)
    p.add_argument("--scheduler", type=o.scheduler, default="ddim")
    p.add_argument("--seed", type=o.seed, default=0)
    p.add_argument("--out", type=o.path, default="outputs/dreambench", help="learned concepts, images, dreambench.json")
    p.add_argument("--json", type=o.path, help="also write the results here")
    p.set_defaults(func=run_dreambench, writes=("out",))


def add_scorers(p, device: bool = True) -> None:
    p.add_argument("--clip", type=o.path, help="a CLIPModel folder or cached hub id (e.g. openai/clip-vit-large-patch14): CLIP-I, "
                                  "CLIP-T")
    p.add_argument("--dino", type=o.path, help="a DINOv2 / DINO ViT folder or cached hub id (e.g. facebook/dinov2-small): DINO")
    if device:
        p.add_argument("--device", type=o.device, default="auto", help="auto (CUDA when available), cpu, cuda, ...")


def scoring_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def run_images(args) -> None:
    from ..evaluate.base import write_json
    from ..evaluate.images import evaluate_images, table

    result = evaluate_images(args.images, args.reference, prompt=args.prompt, clip=args.clip, dino=args.dino,
                             batch_size=args.batch, device=scoring_device(args.device))
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def run_dreambench(args) -> None:
    from ..evaluate.base import write_json
    from ..evaluate.dreambench import evaluate_dreambench, read_dreambench, table
    from ..evaluate.images import load_scorers
    from ..models.loading import describe_model, load_pipeline

    read_dreambench(args.data)  # a bad folder fails before any model loads
    device = scoring_device(args.device)
    clip, dino = load_scorers(args.clip, args.dino, device)
    pipe = load_pipeline(args.model, config=args.config, device=device)
    result = evaluate_dreambench(pipe, args.data, method=args.method, clip=clip, dino=dino, out_dir=args.out,
                                 subjects=args.subjects.split(",") if args.subjects else None, prompts=args.prompts,
                                 images_per_prompt=args.images_per_prompt, train_steps=args.train_steps, lr=args.lr,
                                 steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                                 seed=args.seed, model_name=describe_model(args.model))
    print(table(result))
    print(f"wrote {Path(args.out) / 'dreambench.json'}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def run_base(args) -> None:
    from ..evaluate.base import evaluate_base, table, write_json
    from ..learn.distributed import process_device, processes
    from ..models.loading import load_pipeline

    pipe = load_pipeline(args.model, config=args.config, device=process_device(args.device))
    results = evaluate_base(pipe, seeds=args.seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                            scheduler=args.scheduler, image_dir=args.images, procs=processes(), split=args.split)
    if not processes().main:
        return
    results["model"] = args.model
    print(table(results))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")


def run_ti(args) -> None:
    from ..evaluate.base import write_json
    from ..evaluate.ti import evaluate_ti, table
    from ..shapes.concepts import CONCEPTS, by_name

    try:
        concepts = [by_name(n) for n in args.concepts.split(",")] if args.concepts else list(CONCEPTS)
    except KeyError as e:
        raise UserError(f"unknown concept {e}: pass some of {', '.join(c.name for c in CONCEPTS)}") from None
    cfg = TIConfig(steps=args.ti_steps, lr=args.lr, batch=args.batch, vectors=args.vectors,
                   init_word=args.init_word or None, seed=args.seed)
    results = evaluate_ti(args.model, cfg, concepts=concepts, seeds=args.seeds, out_dir=args.out)
    print(table(results))
    print(f"picture grid: {Path(args.out) / 'grid.png'}")
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")


def run_oracle(args) -> None:
    from ..evaluate.oracle_accuracy import oracle_accuracy, table
    from ..models.loading import load_pipeline

    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True)
    else:
        vae = load_pipeline(args.model, config=args.config, device=args.device).vae if args.model else None
    results = oracle_accuracy(args.n, vae)
    print(table(results))
    if args.json:
        from ..evaluate.base import write_json

        write_json(results, args.json)


def run_clora(args) -> None:
    from ..evaluate.base import write_json
    from ..evaluate.clora import METHODS, SPLIT_SEEDS, evaluate_clora, table, train_concept_loras
    from ..models.loading import load_pipeline

    if args.train_only and not args.train_loras:
        raise UserError("--train-only needs --train-loras DIR")
    if args.loras and args.train_loras:
        raise UserError("pass --loras DIR (use) or --train-loras DIR (train, then use), not both")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    known = METHODS + ("reference",)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}: pass some of {', '.join(known)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, config=args.config, device=args.device)
    loras = Path(args.loras) if args.loras else None
    if args.train_loras:
        train_concept_loras(pipe, Path(args.train_loras), model_name=args.model)
        loras = Path(args.train_loras)
        if args.train_only:
            print(f"trained the concept LoRAs into {loras}")
            return
    seeds = SPLIT_SEEDS[args.split][: args.seeds] if args.seeds else None
    result = evaluate_clora(pipe, compose_config(args, BENCHMARK_COMPOSE), methods=methods, split=args.split,
                            seeds=seeds, loras=loras, fidelity=args.fidelity, calibrate=args.calibrate,
                            out_dir=Path(args.images) if args.images else None)
    result["model"] = args.model
    print(table(result, methods))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def run_profusion(args) -> None:
    from ..evaluate.base import write_json
    from ..evaluate.profusion import DEFAULT_METHODS, METHODS, evaluate_profusion, table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..evaluate.profusion_sweep import grid, parse_sweep

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}: pass some of {', '.join(METHODS)}")
    sweep = grid(parse_sweep(args.sweep)) if args.sweep else None
    if sweep is not None and args.split == "test":
        raise UserError("--sweep with --split test: settings are chosen on the tune split only (the test split stays "
                        "held out): pass --split tune (the default with --sweep), then evaluate the chosen setting "
                        "once with --split test")
    if sweep is not None and args.methods:
        raise UserError("--sweep with --methods: a sweep samples fusion (fine-tuned) at each setting and plain "
                        "sampling once as its baseline: leave --methods out")
    d = FINETUNE_DEFAULTS
    finetune = FinetuneConfig(steps=args.finetune_steps or d.steps, lr=args.finetune_lr or d.lr,
                              augment=args.augment or d.augment, train_unet_attention=args.finetune_unet_attention)
    given = {"guidance_scale": args.guidance_scale, "ref_guidance_scale": args.ref_guidance_scale,
             "refine_steps": args.refine_steps, "refine_eta": args.refine_eta,
             "refine_emb_scale": args.refine_emb_scale, "refine_guidance_scale": args.refine_guidance,
             "emb_scale": args.emb_scale, "class_word": args.class_word, "ref_prompt": args.ref_prompt}
    overrides = {k: v for k, v in given.items() if v is not None}
    if sweep is not None:
        from ..evaluate.profusion import sweep_profusion

        result = sweep_profusion(args.model, args.promptnet, settings=sweep, seeds=args.seeds, steps=args.steps,
                                 finetune=finetune, fusion_overrides=overrides, objects=args.objects, split="tune",
                                 finetune_caption=args.finetune_caption,
                                 prompts=args.prompts, out_dir=args.out)
    else:
        result = evaluate_profusion(args.model, args.promptnet, methods=methods, seeds=args.seeds, steps=args.steps,
                                    finetune=finetune, fusion_overrides=overrides, objects=args.objects,
                                    split=args.split or "test", prompts=args.prompts, out_dir=args.out,
                                    finetune_caption=args.finetune_caption)
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
