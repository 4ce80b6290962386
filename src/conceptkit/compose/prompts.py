"""From one template prompt with a slot per concept to the branch prompts, concept groups and mask tokens (§2.1-2.2).

"a {cat} and a {dog} on the grass" with concepts cat=(trigger sks, class cat) and dog=(trigger zwx, class dog):
- branch 0 (no LoRA):   "a cat and a dog on the grass"
- branch 1 (LoRA cat):  "a sks cat and a dog on the grass"
- branch 2 (LoRA dog):  "a cat and a zwx dog on the grass"
Concept c's group holds its trigger+class tokens in its own branch and its class tokens in every other branch;
branch p's mask tokens are its own concept's trigger+class tokens (none for branch 0). Token positions come from
the tokenizer, segment by segment, and are checked against the whole prompt's tokenization, so users never type
indices (the official notebook's hand-written indices are off by one in two places, §2.2).

A concept's kind decides its phrase in its own branch: a LoRA's is "trigger class" (the adapter does the rest), a
Textual Inversion word's is its token alone ("a <my-star> and a dog"), a ProFusion image's is one *word slot*
(shown as S*): a single dummy token where PromptNet's word S* is spliced in at every step. In the other branches
every concept is its class word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

SLOT = re.compile(r"\{([^{}]*)\}")


WORD_ID = 0  # the dummy token id at a word slot (as profusion/prompts.py's tokenize_with_slot)
KINDS = ("lora", "embedding", "image", "words")


@dataclass(frozen=True)
class ConceptSlot:
    name: str  # the slot name in the template
    trigger: str | None  # LoRA: its trigger word(s), e.g. "sks"; embedding: its token(s); image: the placeholder;
    # words: the text ("pink striped cross")
    class_word: str  # the plain noun, e.g. "cat"
    kind: str = "lora"  # lora | embedding | image | words
    description: str | None = None  # the concept in plain words ("yellow checkered circle"), for --method text

    def phrase(self, with_trigger: bool) -> str:
        if not (with_trigger and self.trigger):
            return self.class_word
        return f"{self.trigger} {self.class_word}" if self.kind == "lora" else self.trigger

    @property
    def is_word_slot(self) -> bool:
        return self.kind == "image"


@dataclass
class BranchPrompts:
    prompts: list[str]  # K = N+1: base prompt, then one per concept
    groups: list[list[list[int]]]  # groups[c][p] = token positions (BOS = 0) of concept c in prompt p
    mask_indices: list[list[int]]  # mask_indices[p]; [] for the base prompt
    merged_prompt: str  # every concept with its trigger (for merge / switch / composite)
    merged_spans: list[list[int]]  # token positions of each concept in merged_prompt
    concepts: list[ConceptSlot]  # in slot order: branch i+1 belongs to concepts[i]
    ids: list[list[int]] = None  # each prompt's token ids (no BOS/EOS), WORD_ID at word slots
    words: list[dict[str, int]] = None  # each prompt's word slots: {concept name: token position (BOS = 0)}
    merged_ids: list[int] = None
    merged_words: dict[str, int] = None
    text_prompt: str | None = None  # every concept written out in words (None: some concept has no description)


def template_slots(template: str) -> list[str]:
    names = SLOT.findall(template)
    if not names:
        raise UserError(f"prompt {template!r} has no concept slot: write one {{name}} per concept, "
                        "e.g. --prompt \"a {cat} and a {dog}\" --lora cat=cat.safetensors --lora dog=dog.safetensors")
    if len(set(names)) != len(names):
        raise UserError(f"prompt {template!r} names a slot twice: use each {{name}} once")
    return names


def fill(template: str, phrases: dict[str, str]) -> list[tuple[str, str | None]]:
    """Split the template into (text, slot name or None) segments with the slots replaced by their phrases."""
    segments, pos = [], 0
    for m in SLOT.finditer(template):
        segments.append((template[pos : m.start()], None))
        segments.append((phrases[m.group(1)], m.group(1)))
        pos = m.end()
    segments.append((template[pos:], None))
    return [(text, name) for text, name in segments if text or name]


def token_ids(tokenizer, segments: list[tuple[str, str | None]],
              word_slots: frozenset[str] = frozenset()) -> tuple[str, dict[str, list[int]], list[int]]:
    """(prompt, token positions of each slot (BOS = 0), the prompt's token ids without BOS/EOS). Slots named in
    `word_slots` are one WORD_ID each; the rest is checked against the tokenization of the whole text between them."""
    prompt = "".join(text for text, _ in segments)
    ids, spans, whole, run = [], {}, [], ""

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    for text, name in segments:
        if name is not None and name in word_slots:
            whole += tokens(run) + [WORD_ID]
            run, piece = "", [WORD_ID]
        else:
            run += text
            piece = tokens(text)
        if name is not None:
            spans[name] = list(range(1 + len(ids), 1 + len(ids) + len(piece)))
        ids += piece
    whole += tokens(run)
    if whole != ids:
        raise UserError(f"cannot locate the concepts' tokens in {prompt!r}: put spaces around each {{slot}}")
    limit = tokenizer.model_max_length - 2
    if len(whole) > limit:
        raise UserError(f"prompt {prompt!r} is {len(whole)} tokens; the model reads {limit}: shorten it")
    return prompt, spans, ids


def token_spans(tokenizer, segments: list[tuple[str, str | None]]) -> tuple[str, dict[str, list[int]]]:
    """The prompt and the token positions of each slot (BOS = 0), checked against the whole prompt's tokens."""
    prompt, spans, _ = token_ids(tokenizer, segments)
    return prompt, spans


def branch_prompts(tokenizer, template: str, concepts: list[ConceptSlot]) -> BranchPrompts:
    names = template_slots(template)
    by_name = {c.name: c for c in concepts}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"slot {{{missing[0]}}} has no concept: pass --lora {missing[0]}=FILE (or --embedding "
                        f"{missing[0]}=FILE, --image {missing[0]}=FILE)")
    unused = [c.name for c in concepts if c.name not in names]
    if unused:
        raise UserError(f"concept '{unused[0]}' has no slot in the prompt: add {{{unused[0]}}} to --prompt")
    order = [by_name[n] for n in names]
    prompts, spans, ids, words = [], [], [], []
    for p in range(len(order) + 1):
        phrases = {c.name: c.phrase(with_trigger=(i + 1 == p)) for i, c in enumerate(order)}
        slots = frozenset(c.name for i, c in enumerate(order) if i + 1 == p and c.is_word_slot)
        prompt, span, row = token_ids(tokenizer, fill(template, phrases), slots)
        prompts.append(prompt)
        spans.append(span)
        ids.append(row)
        words.append({n: span[n][0] for n in slots})
    groups = [[spans[p][c.name] for p in range(len(prompts))] for c in order]
    mask_indices = [[]] + [spans[i + 1][c.name] for i, c in enumerate(order)]
    slots = frozenset(c.name for c in order if c.is_word_slot)
    merged, merged_span, merged_ids = token_ids(tokenizer, fill(template, {c.name: c.phrase(True) for c in order}),
                                                slots)
    text_prompt = None
    if all(c.description for c in order):
        text_prompt, _ = token_spans(tokenizer, fill(template, {c.name: c.description for c in order}))
    return BranchPrompts(prompts, groups, mask_indices, merged, [merged_span[c.name] for c in order], order, ids,
                         words, merged_ids, {n: merged_span[n][0] for n in slots}, text_prompt)
