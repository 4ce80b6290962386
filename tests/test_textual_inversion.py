"""Textual Inversion (ALGORITHMS.md §1 and the §4 invariants) on the tiny SD-1.x fixture."""
import random

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.learn import templates
from conceptkit.learn.images import load_images
from conceptkit.learn.textual_inversion import (
    TIConfig,
    draw_batch,
    encode_latent_cache,
    freeze,
    initial_vectors,
    learn_textual_inversion,
    spliced,
    ti_loss,
    training_tokenizer,
)
from conceptkit.models.loading import load_pipeline
from conceptkit.shapes.concepts import CONCEPTS, concept_folder
from conceptkit.shapes.render import render
from conceptkit.shapes.world import Obj, Scene


def write_concept(folder, n=4, shape="star", color="red", pattern="striped", size=64):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        scene = Scene(rng.choice(["gray", "navy", "teal"]), (Obj(shape, color, pattern, "center", "large"),),
                      ((rng.randint(-2, 2), 0),))
        image = Image.fromarray(render(scene))
        image.resize((size, size)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return write_concept(tmp_path_factory.mktemp("concept") / "images")


@pytest.fixture
def pipe(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir))


def encode(pipe, prompt, tokenizer=None):
    tokenizer = tokenizer or pipe.tokenizer
    prompt = pipe.maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_changes_only_the_new_vectors(pipe, concept, tmp_path):
    unet, vae, text = snapshot(pipe.unet), snapshot(pipe.vae), snapshot(pipe.text_encoder)
    old_vocab = len(pipe.tokenizer)
    cfg = TIConfig(token="<cat-toy>", steps=3, lr=1e-2, batch=2, checkpoint_every=10)
    result = learn_textual_inversion(pipe, concept, tmp_path / "out", cfg, progress=False)
    for before, module in ((unet, pipe.unet), (vae, pipe.vae)):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    after = pipe.text_encoder.state_dict()
    table_key = [k for k in after if k.endswith("token_embedding.weight")][0]
    assert all(torch.equal(text[k], after[k]) for k in text if k != table_key)
    assert torch.equal(after[table_key][:old_vocab], text[table_key])  # every old row bitwise unchanged
    assert torch.equal(after[table_key][old_vocab:], result.embedding.vectors)  # the pipeline now knows the token
    start = text[table_key][pipe.tokenizer.convert_tokens_to_ids("object</w>")]
    assert not torch.allclose(result.embedding.vectors[0], start)  # and training moved it
    assert (tmp_path / "out" / "learned_embeds.safetensors").is_file()
    assert (tmp_path / "out" / "validation" / "step-000003" / "grid.png").is_file()


def test_only_the_learned_tensor_gets_a_gradient(pipe, concept):
    cfg = TIConfig(token="<t>", batch=2)
    tok = training_tokenizer(pipe.tokenizer, cfg)
    freeze(pipe)
    learned = torch.nn.Parameter(initial_vectors(pipe.tokenizer, pipe.text_encoder, cfg))
    means, stds = encode_latent_cache(pipe.vae, torch.zeros(2, 3, 64, 64))
    ids = tok(["a photo of <t>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with spliced(pipe.text_encoder, learned, len(pipe.tokenizer)):
        batch = draw_batch(torch.Generator().manual_seed(0), means, stds, cfg, 1, 1000, 0.18215)
        ti_loss(pipe, pipe.scheduler, batch, ids).backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_at_initialisation_the_token_encodes_like_the_initializer_word(pipe):
    cfg = TIConfig(token="<t>", init_word="dog")
    tok = training_tokenizer(pipe.tokenizer, cfg)
    learned = initial_vectors(pipe.tokenizer, pipe.text_encoder, cfg)
    with spliced(pipe.text_encoder, learned, len(pipe.tokenizer)):
        ours = encode(pipe, "a photo of <t>", tok)
    assert torch.equal(ours, encode(pipe, "a photo of dog"))
    # the official code's quirk, behind its flag: the start vector carries position 0's embedding
    quirk = initial_vectors(pipe.tokenizer, pipe.text_encoder, TIConfig(token="<t>", init_word="dog",
                                                                       init_includes_pos0=True))
    assert torch.allclose(quirk - learned, pipe.text_encoder.embeddings.position_embedding.weight[0].detach())


def test_an_initialization_text_gives_one_vector_per_token_as_automatic1111(pipe):
    # "a photo of <t>" with <t> = 3 vectors started from "red striped dog" encodes as "a photo of red striped dog"
    cfg = TIConfig(token="<t>", init_word="red striped dog", vectors=3)
    tok = training_tokenizer(pipe.tokenizer, cfg)
    learned = initial_vectors(pipe.tokenizer, pipe.text_encoder, cfg)
    assert learned.shape == (3, 768) and not torch.equal(learned[0], learned[1])
    with spliced(pipe.text_encoder, learned, len(pipe.tokenizer)):
        ours = encode(pipe, "a photo of <t>", tok)  # (encode writes <t> as "<t> <t>_1 <t>_2")
    assert torch.equal(ours, encode(pipe, "a photo of red striped dog"))
    with pytest.raises(UserError, match=r"is 3 tokens.*--vectors 3"):
        initial_vectors(pipe.tokenizer, pipe.text_encoder, TIConfig(token="<t>", init_word="red striped dog",
                                                                    vectors=2))


@pytest.mark.parametrize("n", [1, 3])
def test_splicing_equals_a_resized_table(pipe, n):
    cfg = TIConfig(token="<t>", vectors=n)
    tok = training_tokenizer(pipe.tokenizer, cfg)
    learned = torch.randn(n, 768, generator=torch.Generator().manual_seed(1)) * 0.1
    with spliced(pipe.text_encoder, learned, len(pipe.tokenizer)):
        ours = encode(pipe, "a photo of <t> on a beach", tok)
    pipe.load_textual_inversion(learned, token="<t>")  # diffusers: resize the table, add tokens <t>, <t>_1, ...
    theirs = encode(pipe, "a photo of <t> on a beach")
    assert ours.shape == (1, 77, 768)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert pipe.maybe_convert_prompt("a <t>", pipe.tokenizer) == "a " + " ".join(
        ["<t>"] + [f"<t>_{i}" for i in range(1, n)])


def test_loss_falls_on_a_fixed_batch():
    # The bundled model, not the random fixture: a random tiny UNet hardly listens to the text at all.
    pipe = load_pipeline("toy")
    cfg = TIConfig(token="<t>", batch=8)
    tok = training_tokenizer(pipe.tokenizer, cfg)
    freeze(pipe)
    learned = torch.nn.Parameter(initial_vectors(pipe.tokenizer, pipe.text_encoder, cfg))
    opt = torch.optim.AdamW([learned], lr=1e-2)
    means, stds = encode_latent_cache(pipe.vae, load_images(concept_folder(CONCEPTS[0]), 64))
    batch = draw_batch(torch.Generator().manual_seed(0), means, stds, cfg, 1, 1000, pipe.vae.config.scaling_factor)
    ids = tok(["a photo of <t>"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    losses = []
    with spliced(pipe.text_encoder, learned, len(pipe.tokenizer)):
        for _ in range(50):
            loss = ti_loss(pipe, pipe.scheduler, batch, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.98 * losses[0]
    assert np.mean(losses[-10:]) < np.mean(losses[10:20]) < np.mean(losses[:10])
    # the loss is the plain MSE between the UNet's prediction and its target (ε, or v for v-prediction)
    sched = pipe.scheduler
    with torch.no_grad(), spliced(pipe.text_encoder, learned, len(pipe.tokenizer)):
        noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = pipe.unet(noisy, batch.timesteps, pipe.text_encoder(ids.repeat(8, 1))[0]).sample
        target = batch.noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(
            batch.latents, batch.noise, batch.timesteps)
        assert torch.isclose(ti_loss(pipe, sched, batch, ids), ((pred - target) ** 2).mean())


def test_mirrored_images_are_cached_after_the_originals(pipe):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    means, _ = encode_latent_cache(pipe.vae, images)
    direct, _ = encode_latent_cache(pipe.vae, images.flip(-1))
    assert means.shape[0] == 4 and torch.allclose(means[2:], direct[:2], atol=1e-5)


def test_resumed_run_equals_uninterrupted_run(sd_tiny_dir, concept, tmp_path):
    cfg = TIConfig(token="<t>", steps=4, batch=2, lr=1e-2, checkpoint_every=2, seed=5, validate_every=2)
    whole = learn_textual_inversion(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "a", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-000002.safetensors",
                                                                                  "step-000004.safetensors"]
    assert [p.name for p in sorted((tmp_path / "a" / "validation").iterdir())] == ["step-000002", "step-000004"]
    half = TIConfig(**{**cfg.__dict__, "steps": 2})
    learn_textual_inversion(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b", half, progress=False)
    resumed = learn_textual_inversion(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b", cfg, resume=True,
                                      progress=False)
    assert torch.equal(whole.embedding.vectors, resumed.embedding.vectors)
    assert whole.losses == resumed.losses
    with pytest.raises(UserError, match="--resume"):
        learn_textual_inversion(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b", cfg, progress=False)
    with pytest.raises(UserError, match="different settings"):
        learn_textual_inversion(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b",
                                TIConfig(**{**cfg.__dict__, "lr": 0.5}), resume=True, progress=False)


def test_written_embedding_loads_into_plain_diffusers(pipe, sd_tiny_dir, concept, tmp_path):
    cfg = TIConfig(token="<my-star>", vectors=2, steps=2, batch=2, lr=1e-2)
    learn_textual_inversion(pipe, concept, tmp_path / "out", cfg, progress=False)
    plain = StableDiffusionPipeline.from_pretrained(str(sd_tiny_dir), local_files_only=True)
    plain.load_textual_inversion(str(tmp_path / "out"))
    prompt = "an oil painting of <my-star> on the beach"
    a = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    b = plain.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, plain.encode_prompt("an oil painting of object on the beach", "cpu", 1, False)[0])


def test_template_lists_and_lr_scaling():
    assert len(templates.OBJECT) == 27 and len(templates.OBJECT_81) == 81 and len(templates.STYLE) == 19
    assert templates.OBJECT_81[27] == "an illustration of a {}" and templates.OBJECT_81[54] == "a depiction of a {}"
    assert templates.OBJECT_81[29] == templates.OBJECT[2]  # no "a photo of" in it: repeated unchanged
    assert all(t.count("{}") == 1 for t in templates.OBJECT_81 + templates.STYLE)
    assert TIConfig(lr=5e-4, batch=4, grad_accum=1, scale_lr=True).effective_lr == pytest.approx(2e-3)
    assert TIConfig(lr=5e-4, batch=4, scale_lr=False).effective_lr == 5e-4


def test_bad_inputs_are_clear_errors(pipe, concept, tmp_path):
    def learn(images, **kw):
        cfg = TIConfig(**{"token": "<t>", "steps": 1, "batch": 1, **kw})
        return learn_textual_inversion(pipe, images, tmp_path / "out", cfg, progress=False)

    with pytest.raises(UserError, match="does not exist"):
        learn(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("captions")
    with pytest.raises(UserError, match="holds no images"):
        learn(tmp_path / "empty")
    broken = write_concept(tmp_path / "broken", n=2)
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        learn(broken)
    small = write_concept(tmp_path / "small", n=2, size=32)
    with pytest.raises(UserError, match="--resolution 32"):
        learn(small)
    with pytest.raises(UserError, match="already in the model's vocabulary"):
        learn(concept, token="dog")
    with pytest.raises(UserError, match="is 3 tokens"):
        learn(concept, init_word="sks-dog")
    with pytest.raises(UserError, match="neither"):
        learn(concept, template="nope")


def test_cli_learns_then_generates_with_the_embedding(toy_model_env, concept, tmp_path, capsys):
    out = tmp_path / "ti"
    assert main(["learn", "ti", "--images", str(concept), "--token", "<s1>", "--steps", "2", "--batch", "1",
                 "--format", "a1111", "--out", str(out)]) == 0
    assert (out / "s1.pt").is_file() and (out / "metadata.json").is_file()
    assert main(["generate", "--embedding", str(out), "--embedding", f"{out / 's1.pt'}:<s2>", "--prompt",
                 "<s1> in the style of <s2>", "--steps", "2", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "grid.png").is_file()
    capsys.readouterr()
    assert main(["generate", "--prompt", "a photo of <nobody>", "--steps", "2", "--out", str(tmp_path / "g2")]) == 2
    assert "<nobody>" in capsys.readouterr().err
    image = np.asarray(Image.open(next((tmp_path / "gen").glob("000-*.png"))))
    assert image.shape == (64, 64, 3)
