"""CLIP-I, CLIP-T and DINO: how personalization papers score real concepts (DreamBooth's protocol, DreamBench).

Definitions (DreamBooth, Ruiz et al. 2023, §4.1; the same in Textual Inversion's, Custom Diffusion's and later tables):
- **CLIP-I** (subject fidelity): the mean, over every generated × reference image pair, of the cosine similarity of
  their CLIP image embeddings (`CLIPModel.get_image_features`: the vision tower's pooled output through the visual
  projection), each L2-normalised.
- **DINO** (subject fidelity, sensitive to the subject's own features rather than its class): the same mean pairwise
  cosine over the self-supervised ViT's embeddings; the embedding is the CLS token of the last layer
  (`last_hidden_state[:, 0]`, after the final layer norm: `Dinov2Model` for DINOv2 folders, `ViTModel` for DINO v1
  ones such as `facebook/dino-vits16`, DreamBooth's choice), L2-normalised.
- **CLIP-T** (prompt fidelity): the mean over generated images of the cosine between the image's CLIP embedding and
  its prompt's (`get_text_features`: the text tower's EOS-token output through the text projection; the prompt is
  tokenized as CLIP does, truncated at 77 tokens), both L2-normalised. Papers sometimes print it ×100; we do not.

Preprocessing is each model folder's own image processor, as its authors used it: CLIP's (shortest side resized to
224 bicubic, centre crop 224, CLIP's mean/std), DINOv2's (shortest side 256 bicubic, centre crop 224, ImageNet
mean/std), DINO v1's ViT processor (resize to 224, ImageNet mean/std). Images are read as RGB first (transparency
over white, EXIF orientation applied: learn/images.py).

Weights come from local folders or hub ids already in the Hugging Face cache; never the network.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UserError

CLIP_KINDS = ("clip",)
DINO_KINDS = ("dinov2", "vit", "dinov2_with_registers")


def resolve_weights(value: str | os.PathLike, option: str) -> Path:
    """A transformers model folder (config.json) for `--clip`/`--dino`: a local folder, or a hub id's snapshot in
    the local Hugging Face cache. Anything else is a one-line error naming what was tried."""
    from ..models.loading import HUB_REVISION, hub_cache_dir, looks_like_hub_id

    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{option} {value}: the folder has no config.json (not a transformers model folder); pass "
                            f"a folder saved with save_pretrained, or a hub id in the local cache")
        return path
    if path.is_file():
        raise UserError(f"{option} {value} is a file: pass the model's folder (config.json + weights)")
    if looks_like_hub_id(str(value)):
        repo = hub_cache_dir() / f"models--{str(value).replace('/', '--')}"
        ref = repo / "refs" / HUB_REVISION
        if ref.is_file():
            snapshot = repo / "snapshots" / ref.read_text().strip()
            if (snapshot / "config.json").is_file():
                return snapshot
        raise UserError(f"{option} {value}: not in the local Hugging Face cache ({hub_cache_dir()}); conceptkit never "
                        f"downloads: fetch it once elsewhere (`hf download {value}`) or pass a local folder")
    raise UserError(f"{option} {value}: no such folder; pass a transformers model folder or a cached hub id")


def model_type(folder: Path, option: str) -> str:
    import json

    try:
        return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    except (ValueError, OSError) as error:
        raise UserError(f"{option} {folder}: config.json is not readable JSON ({error})") from None


class quiet_loading:
    """Loading without transformers' progress bars and notices (e.g. that torchvision is absent and its PIL image
    processor is used: the same numbers); errors still surface."""

    def __enter__(self):
        from transformers.utils import logging as transformers_logging

        from ..models.loading import quiet_loading_bars

        self.bars = quiet_loading_bars()
        self.bars.__enter__()
        self.level = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(self.level)
        return self.bars.__exit__(*exc)


def _features(output) -> torch.Tensor:
    """get_image/text_features return a tensor (transformers 4) or an output with the projection in pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_checked(weights, option: str, kinds, not_kind: str, complete: str, load):
    """(folder, load(folder)) for a scorer's --clip/--dino weights, every failure a one-line UserError: a model of
    another kind ("a 'bert' model, not <not_kind>") or one that does not load ("pass <complete>")."""
    folder = resolve_weights(weights, option)
    kind = model_type(folder, option)
    if kind not in kinds:
        raise UserError(f"{option} {weights}: a '{kind}' model, not {not_kind}")
    try:
        with quiet_loading():
            return folder, load(folder)
    except (OSError, ValueError) as error:
        raise UserError(f"{option} {weights}: could not load it ({str(error).strip().splitlines()[0]}); pass "
                        f"{complete}") from None


class ClipScorer:
    """A CLIP model for CLIP-I and CLIP-T: L2-normalised image and text embeddings."""

    def __init__(self, weights: str | os.PathLike, device: str = "cpu"):
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

        self.folder, (self.model, self.processor, self.tokenizer) = load_checked(
            weights, "--clip", CLIP_KINDS, "CLIP; pass a CLIPModel folder such as openai/clip-vit-large-patch14",
            "a complete CLIPModel folder (weights, preprocessor_config.json, tokenizer)",
            lambda folder: (CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device),
                            AutoImageProcessor.from_pretrained(folder, local_files_only=True),
                            CLIPTokenizer.from_pretrained(folder, local_files_only=True)))
        self.device = device
        self.name = str(weights)

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        limit = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)


class DinoScorer:
    """A self-supervised ViT (DINOv2, or DINO v1 as a ViTModel) for DINO: the L2-normalised CLS token."""

    def __init__(self, weights: str | os.PathLike, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.folder, (self.model, self.processor) = load_checked(
            weights, "--dino", DINO_KINDS, "DINO; pass a DINOv2 (Dinov2Model) or DINO ViT folder such as "
            "facebook/dinov2-small or facebook/dino-vits16", "a complete model folder (weights and "
            "preprocessor_config.json)",
            lambda folder: (AutoModel.from_pretrained(folder, local_files_only=True).eval().to(device),
                            AutoImageProcessor.from_pretrained(folder, local_files_only=True)))
        self.device = device
        self.name = str(weights)

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1)


def embed(encode, images: list, batch_size: int, bar=None) -> torch.Tensor:
    """encode(images) in batches of `batch_size`, concatenated."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(encode(images[i : i + batch_size]).cpu())
        if bar is not None:
            bar.update(len(images[i : i + batch_size]))
    return torch.cat(out)


def pairwise_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N,) each generated image's mean cosine to every reference: their mean is the mean over all N × M pairs."""
    return (F.normalize(generated.float(), dim=-1) @ F.normalize(references.float(), dim=-1).T).mean(dim=1)


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N,) cosine of image i's embedding with its prompt's."""
    return (F.normalize(images.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(dim=-1)


def mean_se(values: list[float | None]) -> dict:
    """{"mean", "se" (sample std / sqrt(n); null below 2 values), "n"} over the non-null values (all null: nulls)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "se": None, "n": 0}
    mean = sum(xs) / len(xs)
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else None
    return {"mean": mean, "se": se, "n": len(xs)}


def score(images: list, prompts: list[str | None], references: list, *, clip: ClipScorer | None = None,
          dino: DinoScorer | None = None, batch_size: int = 16, progress: bool = True) -> list[dict]:
    """One row per generated image: clip_i, clip_t (null without a prompt or CLIP), dino (null without DINO)."""
    if not images or not references:
        raise UserError("nothing to score: no generated images or no reference images")
    encoders = [e for e in (clip, dino) if e is not None]
    if not encoders:
        raise UserError("no scoring model: pass --clip FOLDER and/or --dino FOLDER")
    total = len(encoders) * (len(images) + len(references))
    rows = [{"clip_i": None, "clip_t": None, "dino": None} for _ in images]
    with tqdm(total=total, desc="embed", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        if clip is not None:
            gen = embed(clip.images, images, batch_size, bar)
            ref = embed(clip.images, references, batch_size, bar)
            for row, value in zip(rows, pairwise_similarity(gen, ref).tolist()):
                row["clip_i"] = value
            known = [i for i, p in enumerate(prompts) if p]
            if known:
                text = embed(clip.texts, [prompts[i] for i in known], batch_size)
                for i, value in zip(known, text_similarity(gen[known], text).tolist()):
                    rows[i]["clip_t"] = value
        if dino is not None:
            gen = embed(dino.images, images, batch_size, bar)
            ref = embed(dino.images, references, batch_size, bar)
            for row, value in zip(rows, pairwise_similarity(gen, ref).tolist()):
                row["dino"] = value
    return rows


METRICS = ("clip_i", "clip_t", "dino")


def summarise(rows: list[dict]) -> dict:
    """{metric: {"mean", "se", "n"}} over the rows."""
    return {m: mean_se([r.get(m) for r in rows]) for m in METRICS}
