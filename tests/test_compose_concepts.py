"""Composing concepts of any kind (compose/concepts.py): LoRAs, Textual Inversion words and ProFusion images as
the slots of one CLoRA picture."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptkit.compose.branches import Branches, WordRows, encode_branches
from conceptkit.compose.concepts import EmbeddingSpec, ImageSpec, LoraSpec, WordsSpec, load_concepts
from conceptkit.compose.config import CLoRAConfig
from conceptkit.compose.prompts import WORD_ID, ConceptSlot, branch_prompts
from conceptkit.compose.run import compose
from conceptkit.errors import UserError
from conceptkit.models.embeddings import save_embedding
from conceptkit.models.loading import BUNDLED_PROMPTNET, load_pipeline
from conceptkit.profusion.prompts import encode_with_word, tokenize_with_slot
from conceptkit.profusion.sampling import recommended_plain
from conceptkit.profusion.saved import load_promptnet
from conceptkit.shapes.render import render
from conceptkit.shapes.world import Obj, Scene

STAR = BUNDLED_PROMPTNET.parent / "loras" / "red-striped-star.safetensors"
TEMPLATE = "a {star} on the left and a {moon} on the right, on a gray background"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("toy")


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("concepts")
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_embedding(folder / "moon.safetensors", "<moon>", torch.randn(2, dim, generator=torch.Generator().manual_seed(0)) * 0.02)
    scene = Scene("gray", (Obj("moon", "cyan", "dotted", "center", "large"),), ((0, 0),))
    Image.fromarray(render(scene)).save(folder / "moon.png")
    return {"embedding": folder / "moon.safetensors", "image": folder / "moon.png"}


def test_specs_parse_and_refuse_in_one_line():
    assert EmbeddingSpec.parse("moon=m.safetensors:<m>:moon") == EmbeddingSpec("moon", "m.safetensors", "<m>", "moon")
    assert EmbeddingSpec.parse("moon=m.safetensors") == EmbeddingSpec("moon", "m.safetensors")
    assert ImageSpec.parse("moon=m.png:moon") == ImageSpec("moon", "m.png", "moon")
    assert LoraSpec.parse("a=a.safetensors::cat") == LoraSpec("a", "a.safetensors", None, "cat")
    assert WordsSpec.parse("b=pink  striped cross") == WordsSpec("b", "pink striped cross")
    assert WordsSpec.parse("b=pink object:cross") == WordsSpec("b", "pink object", "cross")
    for cls, spec, words in [(EmbeddingSpec, "moon", "--embedding 'moon': write NAME=FILE[:TOKEN[:CLASS]]"),
                             (ImageSpec, "moon=m.png:a:b", "--image 'moon=m.png:a:b': too many ':' fields"),
                             (ImageSpec, "moon=", "--image 'moon=': write NAME=FILE[:CLASS]"),
                             (WordsSpec, "b= ", "--words 'b= ': write NAME=TEXT[:CLASS]"),
                             (WordsSpec, "pink cross", "--words 'pink cross': write NAME=TEXT[:CLASS]")]:
        with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]").replace("'", "'")) as e:
            cls.parse(spec)
        assert "\n" not in str(e.value)


def test_each_kind_has_its_phrase_and_its_tokens_in_the_groups(pipe):
    tok = pipe.tokenizer
    bp = branch_prompts(tok, "a {a} and a {b} and a {c}", [
        ConceptSlot("a", "z", "star", "lora"), ConceptSlot("b", "triangle", "circle", "embedding"),
        ConceptSlot("c", "S*", "object", "image")])
    assert bp.prompts == ["a star and a circle and a object", "a z star and a circle and a object",
                          "a star and a triangle and a object", "a star and a circle and a S*"]
    # the embedding's own branch says its token alone; the group points at it, and at the class word elsewhere
    ids = tok(bp.prompts[2]).input_ids
    assert tok.convert_ids_to_tokens([ids[i] for i in bp.groups[1][2]]) == ["triangle</w>"]
    assert tok.convert_ids_to_tokens([tok(bp.prompts[0]).input_ids[i] for i in bp.groups[1][0]]) == ["circle</w>"]
    # the image's own branch has one word slot, WORD_ID, which is its group and its mask
    slot = bp.words[3]["c"]
    assert bp.groups[2][3] == [slot] and bp.mask_indices[3] == [slot] and bp.ids[3][slot - 1] == WORD_ID
    assert bp.words[:3] == [{}, {}, {}] and bp.merged_words == {"c": bp.merged_spans[2][0]}
    # the same ids as ProFusion's tokenization of that prompt
    pf_ids, pf_slot = tokenize_with_slot(tok, bp.prompts[3])
    assert pf_slot == slot and pf_ids[1 : 1 + len(bp.ids[3])].tolist() == bp.ids[3]


def test_words_say_themselves_in_their_own_branch_and_their_class_word_elsewhere(pipe):
    tok = pipe.tokenizer
    a, b = load_concepts(pipe, [WordsSpec("a", "pink striped cross"), WordsSpec("b", "blue object", "circle")])
    assert (a.slot.class_word, b.slot.class_word, a.adapter, b.adapter) == ("cross", "circle", None, None)
    assert b.slot.description == "blue object"  # --method text writes it as given
    bp = branch_prompts(tok, "a {a} and a {b}", [a.slot, b.slot])
    assert bp.prompts == ["a cross and a circle", "a pink striped cross and a circle", "a cross and a blue object"]
    own = tok(bp.prompts[1]).input_ids
    # the group (and the mask) of the words' branch is all of its words; elsewhere it is the class word
    assert tok.convert_ids_to_tokens([own[i] for i in bp.groups[0][1]]) == ["pink</w>", "striped</w>", "cross</w>"]
    assert bp.mask_indices[1] == bp.groups[0][1]
    assert tok.convert_ids_to_tokens([tok(bp.prompts[2]).input_ids[i] for i in bp.groups[0][2]]) == ["cross</w>"]
    assert bp.text_prompt == "a pink striped cross and a blue object"
    with pytest.raises(UserError, match="<nowhere>") as e:
        load_concepts(pipe, [WordsSpec("a", "a <nowhere> cross")])
    assert "\n" not in str(e.value)


class FixedWord:
    """A word source that gives the same word for every latent, read at emb_scale (as an ImageWord is)."""

    def __init__(self, word, emb_scale):
        self.word, self.emb_scale = word, emb_scale

    def __call__(self, x, t):
        return self.word


@pytest.mark.parametrize("emb_scale", [1.0, 1.3])
@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_a_word_row_is_profusions_own_encoding_of_its_word(pipe, execution, emb_scale):
    bp = branch_prompts(pipe.tokenizer, "a {a} on the left", [ConceptSlot("a", "S*", "object", "image")])
    word = torch.randn(pipe.text_encoder.get_input_embeddings().weight.shape[1])
    branches = Branches(bp.prompts, ["", ""], [{}, {}], bp.words, bp.ids)
    cfg = CLoRAConfig(execution=execution)
    rows = WordRows(pipe, branches, cfg, None, {"a": FixedWord(word, emb_scale)})
    got = rows(encode_branches(pipe, branches, cfg, None), torch.zeros(1, 4, 16, 16), 500)
    ids, slot = tokenize_with_slot(pipe.tokenizer, bp.prompts[1])
    with torch.no_grad():  # ProFusion's plain sampling at scale s (profusion/sampling.py)
        want = encode_with_word(pipe.text_encoder, ids[None], torch.tensor([slot]), word[None], emb_scale)[0]
    torch.testing.assert_close(got[3], want)
    plain = encode_branches(pipe, branches, cfg, None)
    torch.testing.assert_close(got[:3], plain[:3])  # the other rows are untouched


def test_an_image_word_follows_the_latent(pipe, files):
    (concept,) = load_concepts(pipe, [ImageSpec("moon", str(files["image"]))], BUNDLED_PROMPTNET)
    # read as the folder recommends ProFusion's own sampling to read it
    assert concept.word.emb_scale == recommended_plain(load_promptnet(BUNDLED_PROMPTNET, pipe)).emb_scale != 1.0
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    assert concept.word(x1, 500).shape == (pipe.text_encoder.get_input_embeddings().weight.shape[1],)
    assert (concept.word(x1, 500) - concept.word(x2, 500)).abs().max() > 1e-4
    torch.testing.assert_close(concept.word(x1, 500), concept.word(x1, 500))


def test_loading_refuses_bad_concepts_in_one_line(pipe, files, tmp_path):
    cases = [
        ([ImageSpec("moon", str(files["image"]))], None, "needs a PromptNet"),
        ([EmbeddingSpec("moon", str(files["embedding"]))], None, "names no class word"),
        ([LoraSpec("a", str(STAR)), EmbeddingSpec("a", str(files["embedding"]), None, "moon")], None, "two concepts"),
        ([ImageSpec("moon", str(tmp_path / "missing.png"))], BUNDLED_PROMPTNET, "missing.png does not exist"),
    ]
    for specs, promptnet, words in cases:
        with pytest.raises(UserError, match=words) as e:
            load_concepts(pipe, specs, promptnet)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["embedding", "image"])
def test_mixed_kinds_compose_batched_like_sequential_and_are_recorded(pipe, files, kind, tmp_path):
    moon = EmbeddingSpec("moon", str(files["embedding"]), None, "moon") if kind == "embedding" else \
        ImageSpec("moon", str(files["image"]), "moon")
    concepts = [LoraSpec("star", str(STAR)), moon]
    latents = {}
    for execution in ("batched", "sequential"):
        cfg = CLoRAConfig(steps=3, iterative_steps=(0,), iterative_steps_steps=1, execution=execution)
        out = compose(pipe, TEMPLATE, concepts, methods=["clora", "merge"], seeds=[1], cfg=cfg,
                      promptnet=BUNDLED_PROMPTNET, out_dir=tmp_path / execution)
        latents[execution] = [np.asarray(out.images[m][0], np.int16) for m in ("clora", "merge")]
    for a, b in zip(latents["batched"], latents["sequential"]):
        assert np.abs(a - b).max() <= 2
    summary = json.loads((tmp_path / "batched" / "compose.json").read_text())
    token = "<moon>" if kind == "embedding" else "S*"
    assert [(c["name"], c["kind"], c["token"]) for c in summary["concepts"]] == [("star", "lora", "z"),
                                                                                ("moon", kind, token)]
    assert summary["concepts"][1]["file"] == str(files[kind])
    own = summary["branch_prompts"][2]
    assert own == ("a object on the left and a <moon> <moon>_1 on the right, on a gray background" if kind == "embedding"
                   else "a object on the left and a S* on the right, on a gray background")


def test_a_word_concept_changes_the_picture(pipe, files):
    cfg = CLoRAConfig(steps=3, latent_update=False)
    star = LoraSpec("star", str(STAR))
    with_image = compose(pipe, TEMPLATE, [star, ImageSpec("moon", str(files["image"]), "moon")], cfg=cfg,
                         promptnet=BUNDLED_PROMPTNET, seeds=[2])
    with_embedding = compose(pipe, TEMPLATE, [star, EmbeddingSpec("moon", str(files["embedding"]), None, "moon")],
                             cfg=cfg, seeds=[2])
    a, b = (np.asarray(r.images["clora"][0], np.int16) for r in (with_image, with_embedding))
    assert np.abs(a - b).max() > 10


def test_compose_cli_mixes_kinds(files, tmp_path, capsys):
    from conceptkit.cli import main

    out = tmp_path / "out"
    code = main(["compose", "--model", "toy", "--prompt", "a {star} and a {moon} and a {cross}, on a gray background",
                 "--lora", f"star={STAR}", "--embedding", f"moon={files['embedding']}:<moon>:moon",
                 "--image", f"cross={files['image']}", "--steps", "2", "--iterative-steps", "", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "compose.json").read_text())
    assert [c["kind"] for c in summary["concepts"]] == ["lora", "embedding", "image"]
    code = main(["compose", "--model", "toy", "--prompt", "a {star} on the left and a {cross} on the right",
                 "--lora", f"star={STAR}", "--words", "cross=pink dotted cross", "--steps", "2", "--iterative-steps",
                 "", "--out", str(tmp_path / "words")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "words" / "compose.json").read_text())
    assert [(c["kind"], c["token"]) for c in summary["concepts"]] == [("lora", "z"), ("words", "pink dotted cross")]
    assert summary["branch_prompts"][2] == "a object on the left and a pink dotted cross on the right"
    assert Image.open(out / "clora" / "s0.png").size == (64, 64)
    assert main(["compose", "--model", "toy", "--prompt", "a {moon}", "--embedding", "moon"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --embedding 'moon'") and "\n" not in err
