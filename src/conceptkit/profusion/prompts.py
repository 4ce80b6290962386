"""How S* enters the text encoder (ALGORITHMS.md §3.3).

S* replaces the whole input embedding (token + position) at one slot, so it carries no positional embedding; after
the encoder, the output row at that slot is multiplied by `scale` (the fusion sub-step's `refine_emb_scale`).
The splice is done by swapping the text encoder's token-embedding module for one call: at the slot it returns
S* − pos_emb[slot], so that the encoder's own "+ position" gives exactly S*. The encoder itself (causal mask,
layers, final LN) runs unchanged, whatever the transformers version.

Prompts name the slot with a placeholder word (default `S*`); it must occur exactly once. Training uses the official
6-token sequence [BOS, a, photo, of, S*, EOS] without padding (`training_ids(pad=False)`), inference the padded one.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UserError
from ..values import check_placeholder_text
from .fusion_config import DEFAULT_PLACEHOLDER  # noqa: F401 - where callers have always found it


class _WordAtSlot(nn.Module):
    def __init__(self, base: nn.Embedding, rows: torch.Tensor | None, slots: torch.Tensor, words: torch.Tensor,
                 positions: nn.Embedding):
        super().__init__()
        self.base, self.rows, self.slots, self.words, self.positions = base, rows, slots, words, positions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        rows = torch.arange(ids.shape[0], device=ids.device) if self.rows is None else self.rows.to(ids.device)
        spliced = (self.words.to(out.dtype) - self.positions.weight[self.slots].to(out.dtype))
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        mask[rows, self.slots] = True
        full = torch.zeros_like(out)
        full[rows, self.slots] = spliced
        return torch.where(mask[..., None], full, out)


def position_embedding(text_encoder) -> nn.Embedding:
    return getattr(text_encoder, "text_model", text_encoder).embeddings.position_embedding  # transformers 4.x / 5.x


@contextlib.contextmanager
def words_spliced(text_encoder, slots: torch.Tensor, words: torch.Tensor, rows: torch.Tensor | None = None):
    """Within the block, the text encoder reads words[k] (d,) at token position slots[k] of batch row rows[k]
    (rows None: row k) instead of that token's embedding plus its position: S* carries no position (§3.3)."""
    base = text_encoder.get_input_embeddings()
    slots = slots.to(text_encoder.device)
    text_encoder.set_input_embeddings(_WordAtSlot(base, rows, slots, words, position_embedding(text_encoder)))
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(base)


def encode_with_word(text_encoder, ids: torch.Tensor, slots: torch.Tensor | None, words: torch.Tensor | None,
                     scale: float = 1.0) -> torch.Tensor:
    """Encoder output (B, L, D) for `ids` with S* (`words`, (B, d) or (B, 1, d)) spliced in at `slots` (B,), and the
    output row at each slot multiplied by `scale`. With slots None the prompt is encoded normally."""
    device = text_encoder.device
    ids = ids.to(device)
    if slots is None:
        return text_encoder(ids)[0]
    slots = slots.to(device)
    words = words.reshape(ids.shape[0], -1)
    with words_spliced(text_encoder, slots, words):
        out = text_encoder(ids)[0]
    if scale != 1.0:
        factor = torch.ones(out.shape[:2] + (1,), dtype=out.dtype, device=out.device)
        factor[torch.arange(ids.shape[0], device=device), slots] = scale
        out = out * factor
    return out


def check_placeholder(prompt: str, placeholder: str) -> None:
    if not isinstance(prompt, str):
        raise UserError(f"prompt must be text, got {type(prompt).__name__}")
    try:
        check_placeholder_text(prompt, placeholder)
    except ValueError as e:
        raise UserError(f"prompt {prompt!r} {e}") from None


def tokenize_with_slot(tokenizer, prompt: str, placeholder: str = DEFAULT_PLACEHOLDER,
                       pad: bool = True) -> tuple[torch.Tensor, int]:
    """(ids (L,), slot): the prompt's ids with one dummy id where the placeholder is, and that id's index."""
    check_placeholder(prompt, placeholder)
    before, after = prompt.split(placeholder)
    pre = tokenizer(before.strip(), add_special_tokens=False).input_ids if before.strip() else []
    post = tokenizer(after.strip(), add_special_tokens=False).input_ids if after.strip() else []
    ids = [tokenizer.bos_token_id] + pre + [0] + post + [tokenizer.eos_token_id]
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise UserError(f"prompt {prompt!r} is {len(ids)} tokens, more than the text encoder's {limit}: shorten it")
    if pad:
        ids = ids + [tokenizer.pad_token_id] * (limit - len(ids))
    return torch.tensor(ids), 1 + len(pre)


def training_ids(tokenizer, prefix: str = "a photo of", pad: bool = False) -> tuple[torch.Tensor, int]:
    """The training sequence: tokenize(prefix) without padding, a dummy slot before EOS (§3.3)."""
    return tokenize_with_slot(tokenizer, f"{prefix} {DEFAULT_PLACEHOLDER}", DEFAULT_PLACEHOLDER, pad=pad)


def prompt_batch_ids(tokenizer, prompts: list[str], placeholder: str = DEFAULT_PLACEHOLDER,
                     pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), slots (B,)): each prompt as `tokenize_with_slot` gives it (unpadded, or padded to the
    tokenizer's length with `pad`), the shorter rows then padded with the pad id to the batch's longest row (as
    inference pads; rows of one length, such as one-object scene captions, are left exactly as they are)."""
    rows = [tokenize_with_slot(tokenizer, p, placeholder, pad=pad) for p in prompts]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    for k, (row, _) in enumerate(rows):
        ids[k, : len(row)] = row
    return ids, torch.tensor([slot for _, slot in rows])


def encode_plain(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]
