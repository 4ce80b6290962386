"""Build the bundled model's tokenizer: a standard CLIP BPE tokenizer (vocab.json + merges.txt) in which every
word of the shapes-world grammar is exactly one token, and any other text still tokenizes (byte fallback).

transformers 5.x trap: CLIPTokenizer(vocab_file=..., merges_file=...) can silently build a tiny vocabulary, so we
write the files and load them with CLIPTokenizer.from_pretrained(folder), and tests check the ids.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import regex

from ..models.clip_tokenizer import bytes_to_unicode, write_clip_tokenizer
from .captions import vocabulary

# CLIP's pre-tokenisation pattern (lower-cased text).
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE learning on the word list until every word is one symbol (each word counted once)."""
    b2u = bytes_to_unicode()
    seqs = {}
    for w in words:
        chars = [b2u[b] for b in w.encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        seqs[w] = chars
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter()
        for s in seqs.values():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        # most frequent pair; ties broken deterministically
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out


def world_words() -> list[str]:
    words = set()
    for w in vocabulary():
        words.update(t.lower() for t in CLIP_PATTERN.findall(w))
    return sorted(words)


def write_tokenizer(folder: str | os.PathLike, max_length: int = 40) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of the bundled tokenizer into `folder`."""
    return write_clip_tokenizer(folder, learn_merges(world_words()), max_length)
