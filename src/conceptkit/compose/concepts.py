"""The concepts a composition holds, one per {slot} of the template, of any kind:

- a LoRA, `--lora NAME=FILE[:TRIGGER[:CLASS]][@WEIGHT[:END]]`: its branch runs the adapter (UNet, and the text
  encoder where the file has weights for it) at WEIGHT (default 1), its UNet layers on the first END share of the
  steps (default --lora-end's, 1), and its prompt says "TRIGGER CLASS";
- a Textual Inversion embedding, `--embedding NAME=FILE[:TOKEN[:CLASS]]`: the token is added to the tokenizer and
  text encoder (diffusers' loader), its branch's prompt says the token, and no adapter runs;
- a ProFusion image, `--image NAME=FILE[:CLASS]` with a PromptNet: its branch's prompt has a word slot where
  PromptNet's S* for the current latent is spliced in at every step (profusion/image_word.py);
- words, `--words NAME=TEXT[:CLASS]` ("cross=pink striped cross"): its branch's prompt says TEXT and no adapter
  runs. Beside a learned concept this keeps the words' attributes off the learned concept's object: in one prompt
  a written colour spreads onto a learned word's object (README, ProFusion, "What the pink is"), while here the
  learned concept's branch says only CLASS and the masks give each object's pixels to its own branch.
In every other branch a concept is its CLASS word. CLoRA's contrastive update and masks work on the branches'
attention maps, so they treat every kind alike.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from ..errors import UserError
from ..values import SHARE, SMALL_WEIGHT
from .prompts import ConceptSlot

MAX_CONCEPTS = 4
DEFAULT_IMAGE_CLASS = "object"  # ProFusion's default reference word (profusion/sampling.py FusionConfig.class_word)


def _parse(cls, spec: str, fields: int):
    name, sep, rest = spec.partition("=")
    example = cls.EXAMPLE
    if not sep or not name or not rest:
        raise UserError(f"{cls.OPTION} {spec!r}: write {cls.FORM}, e.g. {example}")
    parts = rest.split(":")
    path, words = parts[0], parts[1:]
    if not path:
        raise UserError(f"{cls.OPTION} {spec!r}: no file after '=': write {cls.FORM}, e.g. {example}")
    if len(words) > fields:
        raise UserError(f"{cls.OPTION} {spec!r}: too many ':' fields; write {cls.FORM}")
    return cls(name, path, *(w or None for w in words))


@dataclass(frozen=True)
class LoraSpec:
    """`name=path[:trigger[:class word]][@weight[:end]]` from the command line. `description`: the concept in plain
    words, for `--method text` (default: the LoRA file's `description` metadata). `weight`: the adapter's scale in
    every branch that runs it (A1111's <lora:name:0.8>). `end`: the share of the steps its UNet layers act on
    (None: CLoRAConfig.lora_end)."""
    name: str
    path: str
    trigger: str | None = None
    class_word: str | None = None
    description: str | None = None
    weight: float = 1.0
    end: float | None = None
    kind: ClassVar[str] = "lora"
    OPTION: ClassVar[str] = "--lora"
    FORM: ClassVar[str] = "NAME=FILE[:TRIGGER[:CLASS]][@WEIGHT[:END]]"
    EXAMPLE: ClassVar[str] = "cat=cat.safetensors:sks:cat@0.8"

    @classmethod
    def parse(cls, spec: str) -> "LoraSpec":
        head, at, tail = spec.rpartition("@")
        if not at or "/" in tail or "\\" in tail:  # no weight; an '@' inside the file's path
            return _parse(cls, spec, 2)
        weight, colon, end = tail.partition(":")
        try:
            weight = SMALL_WEIGHT.parse(weight)
        except ValueError as e:
            raise UserError(f"{cls.OPTION} {spec!r}: the weight after '@' must be a number: {e}") from None
        try:
            end = SHARE.parse(end) if colon else None
        except ValueError as e:
            raise UserError(f"{cls.OPTION} {spec!r}: the end after '@{tail.partition(':')[0]}:' is the share of the "
                            f"steps the LoRA acts on: {e}") from None
        return replace(_parse(cls, head, 2), weight=weight, end=end)


@dataclass(frozen=True)
class EmbeddingSpec:
    """`name=path[:token[:class word]]`: a Textual Inversion embedding (any layout models/embeddings.py reads)."""
    name: str
    path: str
    token: str | None = None
    class_word: str | None = None
    kind: ClassVar[str] = "embedding"
    OPTION: ClassVar[str] = "--embedding"
    FORM: ClassVar[str] = "NAME=FILE[:TOKEN[:CLASS]]"
    EXAMPLE: ClassVar[str] = "cat=learned_embeds.safetensors:<my-cat>:cat"

    @classmethod
    def parse(cls, spec: str) -> "EmbeddingSpec":
        return _parse(cls, spec, 2)


@dataclass(frozen=True)
class ImageSpec:
    """`name=path[:class word]`: one image of the concept, turned into a word by a PromptNet."""
    name: str
    path: str
    class_word: str | None = None
    kind: ClassVar[str] = "image"
    OPTION: ClassVar[str] = "--image"
    FORM: ClassVar[str] = "NAME=FILE[:CLASS]"
    EXAMPLE: ClassVar[str] = "cat=cat.png:cat"

    @classmethod
    def parse(cls, spec: str) -> "ImageSpec":
        return _parse(cls, spec, 1)


@dataclass(frozen=True)
class WordsSpec:
    """`name=text[:class word]`: a concept written in words; the class word defaults to the text's last word."""
    name: str
    text: str
    class_word: str | None = None
    kind: ClassVar[str] = "words"
    OPTION: ClassVar[str] = "--words"
    FORM: ClassVar[str] = "NAME=TEXT[:CLASS]"
    EXAMPLE: ClassVar[str] = "'cross=pink striped cross'"

    @classmethod
    def parse(cls, spec: str) -> "WordsSpec":
        name, sep, rest = spec.partition("=")
        text, _, class_word = rest.partition(":")
        if not sep or not name or not text.strip():
            raise UserError(f"{cls.OPTION} {spec!r}: write {cls.FORM}, e.g. {cls.EXAMPLE}")
        return cls(name, " ".join(text.split()), class_word.strip() or None)


ConceptSpec = LoraSpec | EmbeddingSpec | ImageSpec | WordsSpec


@dataclass
class Concept:
    """A loaded concept: its slot (phrases and kind), the file, and what its branch runs."""
    slot: ConceptSlot
    file: str
    token: str | None  # LoRA: its trigger; embedding: its token; image: the placeholder its word slot shows; words:
    # the text
    adapter: str | None = None  # LoRA: the adapter's name in the pipeline
    weight: float = 1.0  # LoRA: the adapter's scale
    end: float | None = None  # LoRA: the share of the steps its UNet layers act on (None: CLoRAConfig.lora_end)
    word: object | None = None  # image: its ImageWord

    def describe(self) -> dict:
        return {"name": self.slot.name, "kind": self.slot.kind, "file": self.file, "token": self.token,
                "class_word": self.slot.class_word, "description": self.slot.description,
                **({"end": self.end} if self.end is not None else {})}


def adapter_name(name: str) -> str:
    return "concept_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def load_concepts(pipe, specs: list[ConceptSpec], promptnet=None) -> list[Concept]:
    """Load every concept into `pipe` (LoRA adapters, embedding tokens; PromptNet words for images). `promptnet`: a
    PromptNet folder or a loaded SavedPromptNet, needed when an image is among the concepts."""
    if not specs:
        raise UserError("no concept given: pass --lora NAME=FILE (or --embedding / --image NAME=FILE, --words "
                        "NAME=TEXT) for each {NAME} slot of the prompt")
    if len(specs) > MAX_CONCEPTS:
        raise UserError(f"{len(specs)} concepts given; compose takes at most {MAX_CONCEPTS}")
    names = [s.name for s in specs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise UserError(f"two concepts are named '{twice}': give each {{slot}} one concept")
    saved = None
    if any(s.kind == "image" for s in specs):
        saved = _promptnet(pipe, promptnet)
    loaders = {"lora": _load_lora, "embedding": _load_embedding, "image": _load_image, "words": _load_words}
    return [loaders[s.kind](pipe, s, saved) for s in specs]


def _load_lora(pipe, spec: LoraSpec, _saved) -> Concept:
    from ..models.lora import load_lora, loaded_adapters

    adapter = adapter_name(spec.name)
    if adapter in loaded_adapters(pipe):  # a slot name reused with another file: replace it
        pipe.delete_adapters(adapter)
    info = load_lora(pipe, spec.path, adapter)
    trigger = spec.trigger or info.trigger
    if info.embeddings:  # a bundled word of several vectors is written "<t> <t>_1 ..." in the prompt
        trigger = pipe.maybe_convert_prompt(trigger, pipe.tokenizer)
    class_word = spec.class_word or info.class_word
    if not class_word:
        raise UserError(f"LoRA '{spec.name}' ({spec.path}) has no class word in its metadata: pass "
                        f"--lora {spec.name}={spec.path}:TRIGGER:CLASS (e.g. :sks:dog)")
    description = spec.description or info.metadata.get("description") or None
    return Concept(ConceptSlot(spec.name, trigger, class_word, "lora", None if description is None else str(description)),
                   spec.path, trigger, adapter=adapter, weight=spec.weight, end=spec.end)


def _embedding_class_word(path: Path) -> str | None:
    """The init word a `learn ti` run recorded next to its embedding (metadata.json), if any."""
    folder = path if path.is_dir() else path.parent
    meta = folder / "metadata.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("init_word") or None
    except (OSError, ValueError, AttributeError):
        return None


def _load_embedding(pipe, spec: EmbeddingSpec, _saved) -> Concept:
    from ..models.embeddings import ensure_embedding, read_embedding

    embedding = read_embedding(spec.path, spec.token)
    class_word = spec.class_word or _embedding_class_word(Path(spec.path))
    if not class_word:
        raise UserError(f"embedding '{spec.name}' ({spec.path}) names no class word: pass --embedding "
                        f"{spec.name}={spec.path}:{embedding.token}:CLASS (e.g. :{embedding.token}:dog)")
    # loaded before (a composition run twice on one pipeline) with the same vectors: reused
    ensure_embedding(pipe, embedding, f"pass --embedding {spec.name}={spec.path}:<another-token>")
    phrase = pipe.maybe_convert_prompt(embedding.token, pipe.tokenizer)  # "<t> <t>_1 ..." for several vectors
    return Concept(ConceptSlot(spec.name, phrase, class_word, "embedding"), spec.path, embedding.token)


def _promptnet(pipe, promptnet):
    from ..profusion.saved import SavedPromptNet, load_promptnet

    if promptnet is None:
        raise UserError("an --image concept needs a PromptNet: pass --promptnet DIR (with the bundled model, the "
                        "bundled one is the default)")
    saved = promptnet if isinstance(promptnet, SavedPromptNet) else load_promptnet(promptnet, pipe)
    if saved.unet_attention:
        # its fine-tuned to_q/to_k/to_v would change every branch's UNet, not only the image's
        print(f"note: {saved.folder} was fine-tuned with UNet attention weights; compose uses its PromptNet alone",
              file=sys.stderr)
    return saved


def _load_image(pipe, spec: ImageSpec, saved) -> Concept:
    from ..profusion.image_word import ImageWord
    from ..profusion.prompts import DEFAULT_PLACEHOLDER

    word = ImageWord(pipe, saved, spec.path)
    slot = ConceptSlot(spec.name, DEFAULT_PLACEHOLDER, spec.class_word or DEFAULT_IMAGE_CLASS, "image")
    return Concept(slot, spec.path, DEFAULT_PLACEHOLDER, word=word)


def _load_words(pipe, spec: WordsSpec, _saved) -> Concept:
    from ..models.embeddings import check_prompt_tokens

    check_prompt_tokens(pipe.tokenizer, [spec.text])
    class_word = spec.class_word or spec.text.split()[-1]
    return Concept(ConceptSlot(spec.name, spec.text, class_word, "words", spec.text), "", spec.text)
