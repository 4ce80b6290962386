"""Pivotal tuning: a LoRA trained with its trigger learned first as a word, the word bundled into the LoRA file
(AUTOMATIC1111 / kohya `bundle_emb`) and taught to the pipeline when the LoRA loads."""
import pytest
import torch
from safetensors.torch import load_file

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.learn.lora import ADAPTER, LoRAConfig, learn_lora
from conceptkit.models.embeddings import Embedding, bundled_embeddings, save_embedding
from conceptkit.models.loading import load_pipeline
from conceptkit.models.lora import load_lora, loaded_adapters, read_lora_info, save_lora
from test_lora import concept, outputs, random_lora, same  # noqa: F401  (concept: a fixture)

WORD = "<zq>"


def word_vector(pipe, seed=0):
    dim = pipe.text_encoder.get_input_embeddings().embedding_dim
    return torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))


def row(pipe, token):
    vocab = pipe.tokenizer.get_vocab()
    return pipe.text_encoder.get_input_embeddings().weight[vocab[token]].detach()


@pytest.fixture(scope="module")
def bundled(sd_tiny_dir, tmp_path_factory):
    """A LoRA file bundling WORD, and the same LoRA without it."""
    src = load_pipeline(str(sd_tiny_dir))
    random_lora(src)
    vector = word_vector(src)
    folder = tmp_path_factory.mktemp("pivotal")
    meta = {"trigger": WORD, "class_word": "star"}
    path = save_lora(folder / "bundled.safetensors", src.unet, src.text_encoder, adapter_name=ADAPTER, metadata=meta,
                     embeddings=[Embedding(WORD, vector, "test")])
    plain = save_lora(folder / "plain.safetensors", src.unet, src.text_encoder, adapter_name=ADAPTER, metadata=meta)
    return path, plain, vector


def test_the_word_is_stored_as_automatic1111_bundles_it(bundled):
    path, plain, vector = bundled
    state = load_file(path)
    assert torch.equal(state[f"bundle_emb.{WORD}.string_to_param.*"], vector)
    assert sorted(k for k in state if not k.startswith("bundle_emb.")) == sorted(load_file(plain))
    assert read_lora_info(path).embeddings == (WORD,) and read_lora_info(plain).embeddings == ()


def test_loading_the_lora_teaches_the_word_and_loads_the_same_layers(bundled, sd_tiny_dir):
    path, plain, vector = bundled
    prompt = f"a photo of {WORD} star"
    pipe = load_pipeline(str(sd_tiny_dir))
    size = len(pipe.tokenizer)
    load_lora(pipe, path, "pivotal")
    assert len(pipe.tokenizer) == size + 1 and torch.equal(row(pipe, WORD), vector[0])
    assert loaded_adapters(pipe) == ["pivotal"]
    with_bundle = outputs(pipe, prompt)
    # the same as the plain LoRA file plus the word added by hand
    ref = load_pipeline(str(sd_tiny_dir))
    ref.load_textual_inversion(vector, token=WORD)
    load_lora(ref, plain, "plain")
    assert same(outputs(ref, prompt), with_bundle)
    # a second load on the same pipeline (a composition run twice) reuses the word
    load_lora(pipe, path, "again")
    assert len(pipe.tokenizer) == size + 1


def test_another_word_under_a_taken_token_is_refused_in_one_line(bundled, sd_tiny_dir, tmp_path):
    path, _, vector = bundled
    pipe = load_pipeline(str(sd_tiny_dir))
    pipe.load_textual_inversion(vector + 1.0, token=WORD)
    with pytest.raises(UserError, match=r"already in the vocabulary with other vectors.*freshly loaded model"):
        load_lora(pipe, path, "pivotal")
    assert loaded_adapters(pipe) == []


def test_bundles_of_either_layout_are_read_and_malformed_ones_refused(tmp_path):
    one = bundled_embeddings({"bundle_emb.<a>.string_to_param.*": torch.ones(2, 4), "unet.x.lora_A.weight":
                              torch.zeros(1, 1)}, tmp_path)
    assert [(e.token, tuple(e.vectors.shape), e.is_sdxl) for e in one] == [("<a>", (2, 4), False)]
    sdxl = bundled_embeddings({"bundle_emb.<b>.clip_l": torch.ones(1, 4), "bundle_emb.<b>.clip_g": torch.ones(1, 6)},
                              tmp_path)
    assert [(e.token, tuple(e.vectors.shape), tuple(e.vectors_2.shape)) for e in sdxl] == [("<b>", (1, 4), (1, 6))]
    with pytest.raises(UserError, match="bundled embedding '<c>'"):
        bundled_embeddings({"bundle_emb.<c>.something": torch.ones(1, 4)}, tmp_path)


def test_pivotal_training_bundles_the_word_unchanged_and_leaves_the_pipeline_as_it_was(sd_tiny_dir, concept,
                                                                                     tmp_path):
    pipe = load_pipeline(str(sd_tiny_dir))
    vector = word_vector(pipe, seed=1)
    words = save_embedding(tmp_path / "word.safetensors", WORD, vector)
    size = len(pipe.tokenizer)
    cfg = LoRAConfig(trigger=WORD, class_word="star", prompt="a photo of {}", steps=2, batch=2, lr=1e-2,
                     embedding=str(words), validation_prompts=())
    result = learn_lora(pipe, concept, tmp_path / "out", cfg, progress=False)
    assert len(pipe.tokenizer) == size and WORD not in pipe.tokenizer.get_vocab()  # taken out again
    assert result.info.embeddings == (WORD,) and result.info.trigger == WORD
    (bundle,) = bundled_embeddings(load_file(result.path), result.path)
    assert torch.equal(bundle.vectors, vector)  # fixed while the LoRA trained
    # the captions read the word: without it the trigger is the three tokens '<', 'zq', '>' and training differs
    without = learn_lora(pipe, concept, tmp_path / "without", LoRAConfig(**{**cfg.__dict__, "embedding": None}),
                         progress=False)
    layers, other = load_file(result.path), load_file(without.path)
    assert not all(torch.equal(other[k], v) for k, v in layers.items() if not k.startswith("bundle_emb."))


def test_an_embedding_for_another_trigger_is_refused(sd_tiny_dir, concept, tmp_path):
    pipe = load_pipeline(str(sd_tiny_dir))
    words = save_embedding(tmp_path / "word.safetensors", WORD, word_vector(pipe))
    cfg = LoRAConfig(trigger="zwx", class_word="star", steps=1, embedding=str(words), validation_prompts=())
    with pytest.raises(UserError, match=r"teaches '<zq>'.*pass --trigger '<zq>'"):
        learn_lora(pipe, concept, tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_missing_embedding_before_loading_the_model(concept, tmp_path, capsys):
    assert main(["learn", "lora", "--images", str(concept), "--trigger", WORD, "--embedding",
                 str(tmp_path / "missing"), "--no-validation", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--embedding" in err[0] and "learn ti --token '<zq>'" in err[0]


def test_generate_with_a_bundling_lora_knows_its_word(bundled, sd_tiny_dir, tmp_path, capsys):
    path, _, _ = bundled
    prompt = f"a photo of {WORD} star"
    assert main(["generate", "--model", str(sd_tiny_dir), "--prompt", prompt, "--steps", "2", "--out",
                 str(tmp_path / "refused")]) == 2  # without the LoRA the word is unknown
    assert WORD in capsys.readouterr().err
    assert main(["generate", "--model", str(sd_tiny_dir), "--lora", str(path), "--prompt", prompt, "--steps", "2",
                 "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "grid.png").is_file()


def test_a_word_of_several_vectors_trains_into_the_captions_bundles_and_composes(sd_tiny_dir, concept, tmp_path):
    from conceptkit.compose.concepts import LoraSpec, load_concepts

    pipe = load_pipeline(str(sd_tiny_dir))
    dim = pipe.text_encoder.get_input_embeddings().embedding_dim
    vectors = torch.randn(2, dim, generator=torch.Generator().manual_seed(3))
    words = save_embedding(tmp_path / "word.safetensors", WORD, vectors)
    size = len(pipe.tokenizer)
    cfg = LoRAConfig(trigger=WORD, class_word="star", prompt="a photo of {}", steps=2, batch=2, lr=1e-2,
                     embedding=str(words), validation_prompts=())
    result = learn_lora(pipe, concept, tmp_path / "out", cfg, progress=False)
    vocab = pipe.tokenizer.get_vocab()
    assert len(pipe.tokenizer) == size and WORD not in vocab and f"{WORD}_1" not in vocab  # both taken out again
    (bundle,) = bundled_embeddings(load_file(result.path), result.path)
    assert torch.equal(bundle.vectors, vectors)
    # the captions hold both vectors ("<zq> <zq>_1"): with the first vector alone training differs
    first = save_embedding(tmp_path / "first.safetensors", WORD, vectors[:1])
    one = learn_lora(pipe, concept, tmp_path / "one", LoRAConfig(**{**cfg.__dict__, "embedding": str(first)}),
                     progress=False)
    layers, other = load_file(result.path), load_file(one.path)
    assert not all(torch.equal(other[k], v) for k, v in layers.items() if not k.startswith("bundle_emb."))
    # a composition slot writes the trigger as all its vectors
    (loaded,) = load_concepts(pipe, [LoraSpec("x", str(result.path))])
    assert loaded.slot.trigger == f"{WORD} {WORD}_1"


def test_pivotal_steps_learn_the_word_then_the_lora_with_it_bundled(sd_tiny_dir, concept, tmp_path):
    from conceptkit.learn.pivotal import learn_pivotal_lora
    from conceptkit.models.embeddings import read_embedding

    pipe = load_pipeline(str(sd_tiny_dir))
    size = len(pipe.tokenizer)
    cfg = LoRAConfig(trigger=WORD, class_word="star", prompt="a photo of {}", steps=2, batch=2, lr=1e-2,
                     validation_prompts=())
    result = learn_pivotal_lora(pipe, concept, tmp_path / "out", cfg, 3, "red striped star", progress=False)
    assert len(pipe.tokenizer) == size  # the word taken out again
    word = read_embedding(tmp_path / "out" / "word")
    assert word.token == WORD and word.vectors.shape[0] == 3  # one vector per word it started from
    start = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer("red striped star", add_special_tokens=False).input_ids].detach()
    assert not torch.equal(word.vectors, start)  # trained
    (bundle,) = bundled_embeddings(load_file(result.path), result.path)
    assert torch.equal(bundle.vectors, word.vectors) and result.info.trigger == WORD
    # the same as the two commands: learn ti, then learn lora --embedding
    two = learn_lora(pipe, concept, tmp_path / "two", LoRAConfig(**{**cfg.__dict__,
                                                                   "embedding": str(tmp_path / "out" / "word")}),
                     progress=False)
    assert all(torch.equal(v, load_file(two.path)[k]) for k, v in load_file(result.path).items())


def test_pivotal_steps_refuse_a_trigger_the_vocabulary_has_before_writing(sd_tiny_dir, concept, tmp_path):
    from conceptkit.learn.pivotal import learn_pivotal_lora

    pipe = load_pipeline(str(sd_tiny_dir))
    cfg = LoRAConfig(trigger="star", class_word="star", prompt="a photo of {}", steps=1, validation_prompts=())
    with pytest.raises(UserError, match=r"--trigger 'star' is already in the model's vocabulary.*'<star>'"):
        learn_pivotal_lora(pipe, concept, tmp_path / "out", cfg, 2, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_pivotal_steps_with_an_embedding_is_one_line_before_loading(concept, tmp_path, capsys):
    assert main(["learn", "lora", "--images", str(concept), "--trigger", WORD, "--pivotal-steps", "2",
                 "--embedding", str(tmp_path), "--no-validation", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--embedding and --pivotal-steps" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_pivotal_steps_writes_a_lora_bundling_the_learned_word(sd_tiny_dir, concept, tmp_path):
    assert main(["learn", "lora", "--model", str(sd_tiny_dir), "--images", str(concept), "--trigger", WORD,
                 "--class-word", "star", "--prompt", "a photo of {}", "--pivotal-steps", "2", "--steps", "1",
                 "--batch", "2", "--no-validation", "--out", str(tmp_path / "out")]) == 0
    info = read_lora_info(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert info.embeddings == (WORD,) and (tmp_path / "out" / "word" / "learned_embeds.safetensors").is_file()
