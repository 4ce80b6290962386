"""Write CLIP BPE tokenizer folders (vocab.json, merges.txt, configs) from a list of merges.

Both our tokenizers are built this way: Stable Diffusion's real one (merges from open_clip's BPE table, see
models/fixtures.py) and the bundled shapes-world one (merges learned on the world's words, see shapes/tokenizer.py).
Load the result with CLIPTokenizer.from_pretrained(folder): in transformers 5.x, CLIPTokenizer(vocab_file=...,
merges_file=...) can silently build a 2-token vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable unicode character."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(point) for point in code_points)))


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes + '</w>', one token per merge, then the two special tokens."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge) for merge in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def write_clip_tokenizer(folder: str | Path, merges: list[tuple[str, str]], max_length: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [" ".join(merge) for merge in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special_tokens = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN,
                      "pad_token": END_TOKEN}
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                        "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
                        "clean_up_tokenization_spaces": False, **special_tokens}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return folder
