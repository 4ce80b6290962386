"""`conceptkit compose` as a function: load the concepts (concepts.py), build the branch prompts, sample each method
and seed, write the images, grid and compose.json."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..files import atomic_write_text
from ..generate.loop import decode
from .branches import encode_branches
from .concepts import ConceptSpec, EmbeddingSpec, ImageSpec, LoraSpec, WordsSpec, load_concepts
from .config import METHODS, CLoRAConfig
from .prompts import branch_prompts
from .sampler import method_branches, sample
from .trace_images import trace_grids

__all__ = ["Composed", "EmbeddingSpec", "ImageSpec", "LoraSpec", "WordsSpec", "compose"]  # the specs: one kind of concept each


@dataclass
class Composed:
    images: dict[str, list[Image.Image]]  # method -> one image per seed
    seeds: list[int]
    prompts: dict[str, list[str]]  # method -> the prompts of its branches
    seconds: dict[str, float]  # method -> seconds per image
    unet_calls: dict[str, int]  # method -> UNet calls per image
    paths: dict[str, list[Path]] = field(default_factory=dict)
    traces: dict = field(default_factory=dict)  # (method, seed) -> Trace
    concepts: list[dict] = field(default_factory=list)  # each slot's kind, file, token and class word


def load_style(pipe, spec: str | None) -> tuple[str, float] | None:
    from ..models.lora import load_lora, loaded_adapters

    if not spec:
        return None
    path, _, weight = spec.rpartition(":") if re.search(r":[-+0-9.]+$", spec) else (spec, "", "")
    try:
        w = float(weight) if weight else 0.8
    except ValueError:
        raise UserError(f"--style-lora {spec!r}: the weight after ':' must be a number") from None
    if "style" in loaded_adapters(pipe):
        pipe.delete_adapters("style")
    load_lora(pipe, path, "style")
    return "style", w


def compose(pipe, template: str, concepts: list[ConceptSpec], *, methods: list[str] = ("clora",),
            seeds: list[int] = (0,), cfg: CLoRAConfig | None = None, negative_prompt: str = "",
            style_lora: str | None = None, promptnet=None, height: int | None = None, width: int | None = None,
            out_dir: str | Path | None = None, save_maps: bool = False, procs=None,
            regions: list[str] | None = None) -> Composed:
    """Every method at every seed. `concepts`: one LoraSpec, EmbeddingSpec or ImageSpec per {slot} of the template,
    of any kinds; `promptnet` (a PromptNet folder or SavedPromptNet) turns the ImageSpecs into words.

    regions: each concept's region for --method regional (compose/masks.py REGIONS, in slot order; None: equal
    vertical strips left to right).

    procs (learn/distributed.Processes, several processes): each process samples its contiguous share of the
    seeds, every process gets all images back in order, only the main one writes files."""
    cfg = cfg or CLoRAConfig()
    several = procs is not None and procs.several
    mine = procs.split(list(seeds)) if several else list(seeds)
    methods = list(methods)
    for m in methods:
        if m not in METHODS + ("reference",):
            raise UserError(f"unknown method {m!r}: choose from {', '.join(METHODS + ('reference',))}")
    if "regional" in methods and regions is not None:
        from .masks import REGIONS

        regions = list(regions)
        bad = [r for r in regions if r not in REGIONS]
        if bad or len(regions) != len(concepts):
            raise UserError(f"regions {','.join(regions)}: give one of {', '.join(REGIONS)} per concept, in slot "
                            f"order ({len(concepts)} concepts)")
    loaded = load_concepts(pipe, list(concepts), promptnet)
    style = load_style(pipe, style_lora)
    bp = branch_prompts(pipe.tokenizer, template, [c.slot for c in loaded])
    by_name = {c.slot.name: c for c in loaded}
    adapters = [by_name[slot.name].adapter for slot in bp.concepts]
    weights = [by_name[slot.name].weight for slot in bp.concepts]
    ends = {c.adapter: c.end for c in loaded if c.adapter and c.end is not None}
    words = {c.slot.name: c.word for c in loaded if c.word is not None}
    result = Composed({}, list(seeds), {}, {}, {}, concepts=[by_name[slot.name].describe() for slot in bp.concepts])
    for method in methods:
        run_cfg = cfg.as_reference() if method == "reference" else cfg
        sets, updates, masks, switch_every = method_branches("clora" if method == "reference" else method, bp,
                                                             adapters, run_cfg, negative_prompt, style,
                                                             weights=weights)
        images, seconds, calls = [], 0.0, 0
        style_name = style[0] if style else None
        embeddings = [encode_branches(pipe, b, run_cfg, style_name) for b in sets]  # once for every seed
        for seed in mine:
            g = torch.Generator(device="cpu").manual_seed(seed)
            r = sample(pipe, sets, run_cfg, groups=bp.groups if updates else None,
                       mask_indices=bp.mask_indices if masks else None, generator=g, embeddings=embeddings,
                       height=height, width=width, switch_every=switch_every, record=save_maps, style=style_name,
                       words=words, regions=regions, fixed_masks=method == "regional", lora_ends=ends)
            images.append(decode(pipe, r.latents)[0])
            seconds += r.seconds
            calls = r.unet_calls
            if save_maps and (masks or method == "regional"):
                result.traces[(method, seed)] = r.trace
        if several:
            images = procs.gather(images)
            seconds = sum(procs.gather([seconds]))
            calls = max(procs.gather([calls]))  # a process without seeds made no calls
        result.images[method] = images
        result.prompts[method] = sets[0].prompts
        result.seconds[method] = seconds / len(seeds)
        result.unet_calls[method] = calls
    if several and save_maps:
        result.traces = dict(procs.gather(list(result.traces.items())))
    if out_dir is not None and (not several or procs.main):
        write_outputs(result, Path(out_dir), bp, template, image_settings(pipe, result, bp, cfg, negative_prompt))
    if several:
        procs.barrier()
    return result


def image_settings(pipe, result: Composed, bp, cfg: CLoRAConfig, negative_prompt: str) -> dict:
    """(method, seed) -> the Settings its PNG records: the prompt with every concept's phrase, the sampling
    settings, the method and each slot's concept."""
    from ..generate.infotext import Settings, model_name

    concepts = ", ".join(f"{c['name']}: {c['kind']} {Path(str(c['file'])).name if c.get('file') else c.get('token')}"
                         for c in result.concepts)
    ends = ", ".join(f"{c['name']}: {c['end']:g}" for c in result.concepts if c.get("end") is not None)
    extra = {"Concepts": concepts, **({"LoRA end": f"{cfg.lora_end:g}"} if cfg.lora_end != 1 else {}),
             **({"LoRA ends": ends} if ends else {}),
             **({"Guidance rescale": f"{cfg.guidance_rescale:g}"} if cfg.guidance_rescale else {})}
    settings = {}
    for method, images in result.images.items():
        for seed, image in zip(result.seeds, images):
            settings[(method, seed)] = Settings(
                prompt=bp.merged_prompt, negative_prompt=negative_prompt or None, steps=cfg.steps,
                sampler=cfg.scheduler, cfg_scale=cfg.guidance_scale, seed=seed, width=image.width,
                height=image.height, model=model_name(pipe), extra={"Method": method, **extra})
    return settings


def write_outputs(result: Composed, out: Path, bp, template: str, settings: dict | None = None) -> None:
    """Each image (and its attention/mask pictures) as a PNG recording `settings[(method, seed)]`, the grid
    (recording the first image's), compose.json."""
    from diffusers.utils import make_image_grid

    from ..generate.infotext import save_png

    settings = settings or {}
    out.mkdir(parents=True, exist_ok=True)
    for method, images in result.images.items():
        result.paths[method] = []
        for seed, image in zip(result.seeds, images):
            path = save_png(image, out / method / f"s{seed}.png", settings.get((method, seed)))
            result.paths[method].append(path)
    methods = list(result.images)
    cells = [result.images[m][j] for j in range(len(result.seeds)) for m in methods]
    grid = make_image_grid(cells, rows=len(result.seeds), cols=len(methods))
    save_png(grid, out / "grid.png", settings.get((methods[0], result.seeds[0])) if methods else None)
    for (method, seed), trace in result.traces.items():
        maps_png, masks_png = trace_grids(trace, bp)
        save_png(maps_png, out / method / f"s{seed}-attention.png", settings.get((method, seed)))
        save_png(masks_png, out / method / f"s{seed}-masks.png", settings.get((method, seed)))
    summary = {"template": template, "concepts": result.concepts, "branch_prompts": bp.prompts, "groups": bp.groups,
               "mask_indices": bp.mask_indices, "merged_prompt": bp.merged_prompt, "seeds": result.seeds,
               "methods": {m: {"seconds_per_image": round(result.seconds[m], 3), "unet_calls": result.unet_calls[m],
                               "branch_prompts": result.prompts[m],
                               "images": [str(p.relative_to(out)) for p in result.paths[m]]} for m in methods},
               "grid": "grid.png (rows: seeds, columns: " + ", ".join(methods) + ")"}
    atomic_write_text(out / "compose.json", json.dumps(summary, indent=2) + "\n")
