"""CLoRA's branches (§2.1): what the model is when K prompts, each with its own adapters, denoise one latent.

A branch is a prompt, a negative prompt and a set of adapter weights. `encode_branches` encodes every branch's
prompts with its own text-encoder adapters; `BranchModel` gives every branch's ε at both CFG halves and its
aggregated cross-attention map. `execution="batched"` runs all 2K rows as one call with per-row adapters
(row_lora.py); `"sequential"` is the official structure (one batch-2 call per branch with PEFT adapter switching).
On SDXL (models/sdxl.py) both text encoders carry the branches' adapters, and every UNet call also gets each row's
pooled embedding and the time ids.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from ..generate.loop import work_dtype
from ..models.sdxl import added_conditioning, encode_ids, encoders, is_sdxl, time_ids
from ..models.sdxl import tokenize as tokenize_for
from .attention import AttentionStore, MapsComplete
from .config import CLoRAConfig
from .row_lora import per_row_adapters


@dataclass
class Branches:
    prompts: list[str]
    negatives: list[str]
    adapters: list[dict[str, float]]  # per branch: {adapter name: weight}; {} = base model
    # branches whose prompt has word slots (ProFusion images): {concept name: token position}, and the prompt's
    # token ids (no BOS/EOS, compose/prompts.py's WORD_ID at the slots); None: no branch has any
    words: list[dict[str, int]] | None = None
    ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def row_weights(adapters: list[dict[str, float]], halves: int = 1) -> dict[str, list[float]]:
    """{adapter: its weight in each row}, the rows being `adapters` repeated `halves` times."""
    names = sorted({a for b in adapters for a in b})
    return {a: [b.get(a, 0.0) for b in adapters] * halves for a in names}


def plan_rows(branches: Branches, halves: int = 2) -> dict[str, list[float]]:
    """Per-row adapter weights for a batch laid out [uncond_0..uncond_{K-1}, cond_0..cond_{K-1}]."""
    return row_weights(branches.adapters, halves)


def text_adapters(branch: dict[str, float], style: str | None, use_text_encoder_lora: bool) -> dict[str, float]:
    # the style LoRA is in the text encoder even without text-encoder LoRAs, as in the official code (§5)
    return {a: w for a, w in branch.items() if use_text_encoder_lora or a == style}


@contextlib.contextmanager
def active_adapters(pipe, adapters: dict[str, float], text_encoder: bool = True):
    """PEFT's own adapter switching (the sequential path): only `adapters` active, at their weights."""
    if not adapters:
        pipe.disable_lora()
        try:
            yield
        finally:
            pipe.enable_lora()
        return
    names = list(adapters)
    pipe.unet.set_adapters(names, [adapters[n] for n in names])
    disabled = []
    for _, encoder in encoders(pipe) if text_encoder else []:
        te_names = [n for n in names if n in getattr(encoder, "peft_config", {})]
        if te_names:
            from diffusers.utils.peft_utils import set_weights_and_activate_adapters
            set_weights_and_activate_adapters(encoder, te_names, [adapters[n] for n in te_names])
        elif getattr(encoder, "peft_config", None):
            # none of these adapters has weights in this encoder: it runs plain (else the previous branch's
            # text-encoder adapter would still be active)
            from diffusers.loaders.lora_base import disable_lora_for_text_encoder
            disable_lora_for_text_encoder(encoder)
            disabled.append(encoder)
    try:
        yield
    finally:
        from diffusers.loaders.lora_base import enable_lora_for_text_encoder
        for encoder in disabled:
            enable_lora_for_text_encoder(encoder)


def tokenize(pipe, texts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_branches(pipe, branches: Branches, cfg: CLoRAConfig, style: str | None):
    """(2K, L, d): negative prompts then prompts, each encoded with its branch's text-encoder adapters. (A branch
    with word slots is encoded here with its placeholder text; WordRows replaces it at every call.) On SDXL a pair
    (hidden states (2K, L, d1 + d2), pooled (2K, d2)) from both encoders."""
    per_branch = [text_adapters(b, style, cfg.use_text_encoder_lora) for b in branches.adapters]
    if is_sdxl(pipe):
        return encode_branches_sdxl(pipe, branches, cfg, per_branch)
    ids = tokenize(pipe, branches.negatives + branches.prompts)
    if cfg.execution == "batched":
        plan = plan_rows(Branches(branches.prompts, branches.negatives, per_branch))
        with per_row_adapters([pipe.text_encoder], plan):
            return pipe.text_encoder(ids)[0]
    K = len(branches)
    out = [None] * (2 * K)
    for p, adapters in enumerate(per_branch):
        with active_adapters(pipe, adapters):
            e = pipe.text_encoder(ids[[p, K + p]])[0]
        out[p], out[K + p] = e[0], e[1]
    return torch.stack(out)


def encode_branches_sdxl(pipe, branches: Branches, cfg: CLoRAConfig, per_branch: list[dict[str, float]]):
    texts = branches.negatives + branches.prompts
    ids = [tokenize_for(tokenizer, texts, encoder.device) for tokenizer, encoder in encoders(pipe)]
    if cfg.execution == "batched":
        plan = plan_rows(Branches(branches.prompts, branches.negatives, per_branch))
        with per_row_adapters([encoder for _, encoder in encoders(pipe)], plan):
            return encode_ids(pipe, ids)
    K = len(branches)
    hidden, pooled = [None] * (2 * K), [None] * (2 * K)
    for p, adapters in enumerate(per_branch):
        with active_adapters(pipe, adapters):
            h, e = encode_ids(pipe, [i[[p, K + p]] for i in ids])
        hidden[p], hidden[K + p], pooled[p], pooled[K + p] = h[0], h[1], e[0], e[1]
    return torch.stack(hidden), torch.stack(pooled)


class WordRows:
    """The branches whose prompt holds word slots, re-encoded at every model call: each slot gets its image's word
    for the latent of that call (profusion/image_word.py), with the branch's own text-encoder adapters."""

    def __init__(self, pipe, branches: Branches, cfg: CLoRAConfig, style: str | None, sources: dict):
        from ..profusion.prompts import words_spliced

        self.spliced = words_spliced
        self.pipe, self.cfg, self.K = pipe, cfg, len(branches)
        self.branch_rows = [p for p, w in enumerate(branches.words) if w]
        missing = sorted({n for p in self.branch_rows for n in branches.words[p]} - set(sources))
        if missing:
            raise ValueError(f"no image word for concept(s) {missing}")
        tok = pipe.tokenizer
        length = tok.model_max_length
        rows = [[tok.bos_token_id] + branches.ids[p] + [tok.eos_token_id] for p in self.branch_rows]
        self.ids = torch.tensor([r + [tok.pad_token_id] * (length - len(r)) for r in rows],
                                device=pipe.text_encoder.device)
        self.adapters = [text_adapters(branches.adapters[p], style, cfg.use_text_encoder_lora) for p in self.branch_rows]
        self.slots = [(i, position, name) for i, p in enumerate(self.branch_rows)
                      for name, position in branches.words[p].items()]
        self.sources = {name: sources[name] for _, _, name in self.slots}
        # how strongly the word is read: the encoder's output row at the slot times the source's emb_scale (an
        # ImageWord: its PromptNet folder's recommended s, as ProFusion's own sampling reads it)
        self.scales = {name: getattr(source, "emb_scale", 1.0) for name, source in self.sources.items()}

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """`embeddings` (2K, L, d) with the conditional rows of the word branches encoded for latent x at t."""
        words = {name: source(x, t) for name, source in self.sources.items()}
        te = self.pipe.text_encoder
        if self.cfg.execution == "batched":
            rows = torch.tensor([i for i, _, _ in self.slots])
            positions = torch.tensor([pos for _, pos, _ in self.slots])
            vectors = torch.stack([words[name] for _, _, name in self.slots])
            with self.spliced(te, positions, vectors, rows), per_row_adapters([te], row_weights(self.adapters)):
                encoded = list(te(self.ids)[0])
        else:
            encoded = []
            for i, adapters in enumerate(self.adapters):
                mine = [(pos, words[name]) for row, pos, name in self.slots if row == i]
                positions = torch.tensor([pos for pos, _ in mine])
                with active_adapters(self.pipe, adapters), \
                        self.spliced(te, positions, torch.stack([w for _, w in mine]), torch.zeros_like(positions)):
                    encoded.append(te(self.ids[i : i + 1])[0][0])
        for i, position, name in self.slots:
            if self.scales[name] != 1.0:
                encoded[i] = encoded[i].clone()
                encoded[i][position] *= self.scales[name]
        out = embeddings.clone()
        for p, e in zip(self.branch_rows, encoded):
            out[self.K + p] = e.to(out.dtype)
        return out


class BranchModel:
    """ε of every branch at both CFG halves, and each branch's aggregated cross-attention map."""

    def __init__(self, pipe, branches: Branches, embeddings: torch.Tensor, cfg: CLoRAConfig, store: AttentionStore,
                 word_rows: WordRows | None = None):
        # SDXL: (hidden states, pooled embeddings), both (2K, …)
        self.embeddings, self.pooled = embeddings if isinstance(embeddings, tuple) else (embeddings, None)
        self.pipe, self.branches, self.cfg, self.store = pipe, branches, cfg, store
        self.word_rows = word_rows
        self.without: dict[frozenset, Branches] = {frozenset(): branches}  # the branches with some adapters off
        self.calls = 0
        self.work_dtype = work_dtype(pipe.unet)  # latent updates and blending in fp32+

    def __call__(self, z: torch.Tensor, t, cond_only: bool = False, maps_only: bool = False,
                 off: frozenset = frozenset()):
        """z (1, C, h, w) -> (ε_uncond (K, C, h, w) or None, ε_cond (K, C, h, w), maps (K, r_h, r_w, L)).

        cond_only: run the conditional rows alone (the latent update's forward, when maps come from the
        conditional half and ε is recomputed after the update: the unconditional half would be thrown away).
        maps_only (batched, with cond_only): stop the UNet once the maps are in; ε_cond is then None.
        off: adapters whose UNet layers are off at this call (past their CLoRAConfig.lora_end); the prompts, as
        encoded, unchanged."""
        unet, K = self.pipe.unet, len(self.branches)
        if off not in self.without:
            self.without[off] = replace(self.branches, adapters=[{a: w for a, w in b.items() if a not in off}
                                                                 for b in self.branches.adapters])
        branches = self.without[off]
        halves = 1 if cond_only else 2
        added = self.added_conditioning(z)
        all_embeddings = self.embeddings if self.word_rows is None else self.word_rows(self.embeddings, z, t)
        if self.cfg.execution == "batched":
            self.store.reset()
            x = z.to(unet.dtype).expand(halves * K, *z.shape[1:])
            embeddings = all_embeddings[K:] if cond_only else all_embeddings
            rows = list(range(K, 2 * K)) if cond_only else list(range(2 * K))
            stop = self.store.maps_only() if (maps_only and cond_only) else contextlib.nullcontext()
            try:
                with per_row_adapters([unet], plan_rows(branches, halves)), stop:
                    eps = unet(x, t, encoder_hidden_states=embeddings,
                               added_cond_kwargs=added(rows)).sample.to(self.work_dtype)
                self.store.complete()
            except MapsComplete:
                eps = None
            self.calls += 1
            if cond_only:
                return None, eps, self.store.aggregate([[p] for p in range(K)])
            rows = [[K + p] if self.cfg.cond_only_maps else [p, K + p] for p in range(K)]
            return eps[:K], eps[K:], self.store.aggregate(rows)
        uncond, cond, maps = [], [], []
        for p, adapters in enumerate(branches.adapters):
            self.store.reset()
            index = [K + p] if cond_only else [p, K + p]
            with active_adapters(self.pipe, adapters, text_encoder=False):
                e = unet(z.to(unet.dtype).expand(halves, *z.shape[1:]), t, encoder_hidden_states=all_embeddings[index],
                         added_cond_kwargs=added(index)).sample.to(self.work_dtype)
            self.calls += 1
            uncond.append(None if cond_only else e[0])
            cond.append(e[-1])
            own = [[0]] if cond_only else [[1] if self.cfg.cond_only_maps else [0, 1]]
            maps.append(self.store.aggregate(own)[0])
        return None if cond_only else torch.stack(uncond), torch.stack(cond), torch.stack(maps)

    def added_conditioning(self, z: torch.Tensor):
        """rows -> SDXL's added_cond_kwargs for those rows (pooled embeddings, time ids of z's image size); None
        on other models."""
        if self.pooled is None:
            return lambda rows: None
        height, width = (side * self.pipe.vae_scale_factor for side in z.shape[-2:])
        ids = time_ids(self.pipe, height, width, 1)
        dtype = self.pipe.unet.dtype
        return lambda rows: added_conditioning(self.pooled[rows], ids.expand(len(rows), -1), dtype)
