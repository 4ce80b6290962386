"""`conceptkit compose` as a function: load the LoRAs, build the branch prompts, sample each method and seed."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..files import atomic_write, atomic_write_text
from .config import CLoRAConfig, METHODS
from .prompts import ConceptSlot, branch_prompts
from ..generate.loop import decode
from .branches import encode_branches
from .sampler import method_branches, sample
from .trace_images import trace_grids

MAX_CONCEPTS = 4


@dataclass(frozen=True)
class LoraSpec:
    """`name=path[:trigger[:class word]]` from the command line."""
    name: str
    path: str
    trigger: str | None = None
    class_word: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "LoraSpec":
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise UserError(f"--lora {spec!r}: write NAME=FILE[:TRIGGER[:CLASS]], e.g. cat=cat.safetensors:sks:cat")
        parts = rest.split(":")
        path, words = parts[0], parts[1:]
        if not path:
            raise UserError(f"--lora {spec!r}: no file after '=': write NAME=FILE[:TRIGGER[:CLASS]], "
                            "e.g. cat=cat.safetensors:sks:cat")
        if len(words) > 2:
            raise UserError(f"--lora {spec!r}: too many ':' fields; write NAME=FILE[:TRIGGER[:CLASS]]")
        return cls(name, path, *(w or None for w in words))


@dataclass
class Composed:
    images: dict[str, list[Image.Image]]  # method -> one image per seed
    seeds: list[int]
    prompts: dict[str, list[str]]  # method -> the prompts of its branches
    seconds: dict[str, float]  # method -> seconds per image
    unet_calls: dict[str, int]  # method -> UNet calls per image
    paths: dict[str, list[Path]] = field(default_factory=dict)
    traces: dict = field(default_factory=dict)  # (method, seed) -> Trace


def adapter_name(name: str) -> str:
    return "concept_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def load_concepts(pipe, specs: list[LoraSpec]) -> list[tuple[ConceptSlot, str]]:
    from ..models.lora import load_lora, loaded_adapters

    if not specs:
        raise UserError("no LoRA given: pass --lora NAME=FILE for each {NAME} slot of the prompt")
    if len(specs) > MAX_CONCEPTS:
        raise UserError(f"{len(specs)} concept LoRAs given; compose takes at most {MAX_CONCEPTS}")
    loaded = loaded_adapters(pipe)
    out = []
    for spec in specs:
        adapter = adapter_name(spec.name)
        if adapter in loaded:  # a slot name reused with another file: replace it
            pipe.delete_adapters(adapter)
        info = load_lora(pipe, spec.path, adapter)
        trigger = spec.trigger or info.trigger
        class_word = spec.class_word or info.class_word
        if not class_word:
            raise UserError(f"LoRA '{spec.name}' ({spec.path}) has no class word in its metadata: pass "
                            f"--lora {spec.name}={spec.path}:TRIGGER:CLASS (e.g. :sks:dog)")
        out.append((ConceptSlot(spec.name, trigger, class_word), adapter))
    return out


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


def compose(pipe, template: str, loras: list[LoraSpec], *, methods: list[str] = ("clora",), seeds: list[int] = (0,),
            cfg: CLoRAConfig | None = None, negative_prompt: str = "", style_lora: str | None = None,
            height: int | None = None, width: int | None = None, out_dir: str | Path | None = None,
            save_maps: bool = False, procs=None) -> Composed:
    """Every method at every seed. procs (learn/distributed.Processes, several processes): each process samples its
    contiguous share of the seeds, every process gets all images back in order, only the main one writes files."""
    cfg = cfg or CLoRAConfig()
    several = procs is not None and procs.several
    mine = procs.split(list(seeds)) if several else list(seeds)
    methods = list(methods)
    for m in methods:
        if m not in METHODS + ("reference",):
            raise UserError(f"unknown method {m!r}: choose from {', '.join(METHODS + ('reference',))}")
    concepts = load_concepts(pipe, loras)
    style = load_style(pipe, style_lora)
    bp = branch_prompts(pipe.tokenizer, template, [c for c, _ in concepts])
    adapters = [dict((c.name, a) for c, a in concepts)[slot.name] for slot in bp.concepts]
    result = Composed({}, list(seeds), {}, {}, {})
    for method in methods:
        run_cfg = cfg.as_reference() if method == "reference" else cfg
        sets, updates, masks, switch_every = method_branches("clora" if method == "reference" else method, bp,
                                                             adapters, run_cfg, negative_prompt, style)
        images, seconds, calls = [], 0.0, 0
        style_name = style[0] if style else None
        embeddings = [encode_branches(pipe, b, run_cfg, style_name) for b in sets]  # once for every seed
        for seed in mine:
            g = torch.Generator(device="cpu").manual_seed(seed)
            r = sample(pipe, sets, run_cfg, groups=bp.groups if updates else None,
                       mask_indices=bp.mask_indices if masks else None, generator=g, embeddings=embeddings,
                       height=height, width=width, switch_every=switch_every, record=save_maps)
            images.append(decode(pipe, r.latents)[0])
            seconds += r.seconds
            calls = r.unet_calls
            if save_maps and masks:
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
        write_outputs(result, Path(out_dir), bp, template)
    if several:
        procs.barrier()
    return result


def write_outputs(result: Composed, out: Path, bp, template: str) -> None:
    from diffusers.utils import make_image_grid

    out.mkdir(parents=True, exist_ok=True)
    for method, images in result.images.items():
        result.paths[method] = []
        for seed, image in zip(result.seeds, images):
            path = out / method / f"s{seed}.png"
            atomic_write(path, lambda p, image=image: image.save(p, format="PNG"))
            result.paths[method].append(path)
    methods = list(result.images)
    cells = [result.images[m][j] for j in range(len(result.seeds)) for m in methods]
    grid = make_image_grid(cells, rows=len(result.seeds), cols=len(methods))
    atomic_write(out / "grid.png", lambda p: grid.save(p, format="PNG"))
    for (method, seed), trace in result.traces.items():
        maps_png, masks_png = trace_grids(trace, bp)
        atomic_write(out / method / f"s{seed}-attention.png", lambda p, im=maps_png: im.save(p, format="PNG"))
        atomic_write(out / method / f"s{seed}-masks.png", lambda p, im=masks_png: im.save(p, format="PNG"))
    summary = {"template": template, "branch_prompts": bp.prompts, "groups": bp.groups,
               "mask_indices": bp.mask_indices, "merged_prompt": bp.merged_prompt, "seeds": result.seeds,
               "methods": {m: {"seconds_per_image": round(result.seconds[m], 3), "unet_calls": result.unet_calls[m],
                               "branch_prompts": result.prompts[m],
                               "images": [str(p.relative_to(out)) for p in result.paths[m]]} for m in methods},
               "grid": "grid.png (rows: seeds, columns: " + ", ".join(methods) + ")"}
    atomic_write_text(out / "compose.json", json.dumps(summary, indent=2) + "\n")
