"""The offline SD 1.x CLIP tokenizer rebuilt from open_clip's BPE table matches the real one."""
import json

import pytest
from transformers import CLIPTokenizer

from conceptkit.errors import UserError
from conceptkit.models import fixtures

START, END = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return fixtures.write_sd_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return CLIPTokenizer.from_pretrained(str(tokenizer_folder))


def test_known_prompt_ids_match_stable_diffusion(tokenizer):
    assert tokenizer("a photo of a sks dog").input_ids == [START, 320, 1125, 539, 320, 48136, 1929, END]
    assert tokenizer("a photo of a cat").input_ids == [START, 320, 1125, 539, 320, 2368, END]


def test_vocab_has_clip_size_and_special_tokens(tokenizer, tokenizer_folder):
    vocab = json.loads((tokenizer_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert len(tokenizer) == 49408
    assert vocab["<|startoftext|>"] == START and vocab["<|endoftext|>"] == END
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # byte alphabet first, then the same with </w>
    merges = (tokenizer_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 49152 - 256 - 2


def test_padding_matches_stable_diffusion(tokenizer):
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[:4] == [START, 320, 2368, END] and set(ids[4:]) == {END}


def test_lowercases_and_decodes_back(tokenizer):
    ids = tokenizer("A Photo of a SKS Dog").input_ids
    assert ids == tokenizer("a photo of a sks dog").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a sks dog"


def test_missing_open_clip_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(fixtures.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps open_clip_torch"):
        fixtures.write_sd_clip_tokenizer(tmp_path)
