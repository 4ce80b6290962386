"""Embedding files: every layout conceptkit reads, what it writes, and the errors (ALGORITHMS.md §1.6, §4 TI-8)."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conceptkit.errors import UserError
from conceptkit.generate.images import generate
from conceptkit.models.embeddings import (
    add_embedding,
    read_embedding,
    save_embedding,
    split_spec,
)
from conceptkit.models.loading import load_pipeline

VECTORS = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def pipe(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir))


def encode(pipe, prompt):
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def test_diffusers_layout_round_trips_in_both_file_types(tmp_path):
    a = read_embedding(save_embedding(tmp_path / "e.safetensors", "<x>", VECTORS))
    torch.save({"<x>": VECTORS[0]}, tmp_path / "learned_embeds.bin")
    b = read_embedding(tmp_path / "learned_embeds.bin")
    assert (a.token, a.layout) == ("<x>", "diffusers") and torch.equal(a.vectors, VECTORS)
    assert b.token == "<x>" and torch.equal(b.vectors, VECTORS[:1])  # a (d,) vector becomes (1, d)
    assert read_embedding(tmp_path / "e.safetensors", "<y>").token == "<y>"


def test_automatic1111_layouts(tmp_path):
    save_embedding(tmp_path / "cat.pt", "mycat", VECTORS, fmt="a1111", metadata={"steps": 7})
    a = read_embedding(tmp_path / "cat.pt")
    assert (a.token, a.layout) == ("mycat", "a1111") and torch.equal(a.vectors, VECTORS)
    save_file({"emb_params": VECTORS}, tmp_path / "kohya-style.safetensors")
    k = read_embedding(tmp_path / "kohya-style.safetensors")
    assert (k.token, k.layout) == ("kohya-style", "a1111_safetensors")  # the file name is the trigger word


def test_official_repo_embeddings_pt_without_a_name(tmp_path):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(VECTORS.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "embeddings.pt")
    e = read_embedding(tmp_path / "embeddings.pt", "<obj>")
    assert (e.token, e.layout) == ("<obj>", "textual_inversion_repo") and torch.equal(e.vectors, VECTORS)


def test_sdxl_files_on_sd_bare_tensors_and_pickles_with_code_are_refused(tmp_path, pipe):
    save_file({"clip_l": VECTORS, "clip_g": torch.zeros(2, 1280)}, tmp_path / "xl.safetensors")
    xl = read_embedding(tmp_path / "xl.safetensors")
    assert xl.is_sdxl and xl.token == "xl" and xl.vectors_2.shape == (2, 1280)
    with pytest.raises(UserError, match="is an SDXL embedding .* single text encoder"):
        add_embedding(pipe, xl)
    torch.save(VECTORS, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="bare.pt:<token>"):
        read_embedding(tmp_path / "bare.pt")
    assert read_embedding(tmp_path / "bare.pt", "<b>").token == "<b>"

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}))
    with pytest.raises(UserError, match="never unpickles"):
        read_embedding(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable"):
        read_embedding(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        read_embedding(tmp_path / "nothing.pt")


def test_spec_parsing():
    assert split_spec("a/b.pt:<tok>") == (split_spec("a/b.pt")[0], "<tok>")
    assert split_spec("a/b.pt")[1] is None


def test_adding_a_multi_vector_embedding_and_its_errors(pipe):
    add_embedding(pipe, read_embedding_from(VECTORS, "<two>"))
    assert pipe.maybe_convert_prompt("a <two>", pipe.tokenizer) == "a <two> <two>_1"
    assert not torch.equal(encode(pipe, "a photo of <two>"), encode(pipe, "a photo of"))
    with pytest.raises(UserError, match="already in the vocabulary"):
        add_embedding(pipe, read_embedding_from(VECTORS, "<two>"))
    with pytest.raises(UserError, match="size 1024"):
        add_embedding(pipe, read_embedding_from(torch.zeros(1, 1024), "<sd2>"))
    with pytest.raises(UserError, match="<missing>"):
        generate(pipe, "a photo of <two> and <missing>", steps=1, progress=False)


def read_embedding_from(vectors, token):
    from conceptkit.models.embeddings import Embedding

    return Embedding(token, vectors, "tensor")
