"""LoRA files (models/lora.py) and the DreamBooth-style LoRA trainer (learn/lora.py) on the tiny SD-1.x fixture."""
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from conceptkit.cli import main
from conceptkit.generate.loading import load_loras
from conceptkit.errors import UserError
from conceptkit.learn.lora import ADAPTER, LoRAConfig, add_training_adapters, learn_lora
from conceptkit.learn.textual_inversion import draw_batch, encode_latent_cache, freeze, ti_loss
from conceptkit.models.loading import load_pipeline
from conceptkit.models.lora import (
    adapter_name_for,
    check_lora_fits,
    load_lora,
    lora_file,
    read_lora_info,
    save_lora,
)
from conceptkit.shapes.concepts import CONCEPTS, concept_folder

PROMPT = "a photo of zwx star on a beach"


@pytest.fixture
def pipe(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir))


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept") / "images"
    shutil.copytree(concept_folder(CONCEPTS[0]), folder)  # four 64x64 renders: the tiny model's native size
    return folder


def outputs(pipe, prompt=PROMPT):
    """(prompt embeddings, UNet output) for fixed inputs: what a LoRA on the text encoder / UNet changes."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        return embeds, pipe.unet(latents, torch.tensor([500]), embeds).sample


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b, atol=0.0):
    return all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b))


def random_lora(pipe, rank=4, alpha=8.0, seed=0):
    """Add a LoRA adapter with random (non-zero) up weights, as a trained one would have."""
    add_training_adapters(pipe, LoRAConfig(rank=rank, alpha=alpha), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def saved(sd_tiny_dir, tmp_path_factory):
    """A LoRA file (rank 4, alpha 8: scale 2) and the outputs of the model it was saved from, adapter active."""
    src = load_pipeline(str(sd_tiny_dir))
    base = outputs(src)
    random_lora(src, rank=4, alpha=8.0)
    want = outputs(src)
    folder = tmp_path_factory.mktemp("lora") / "zwx-star"
    path = save_lora(folder, src.unet, src.text_encoder, adapter_name=ADAPTER, metadata={
        "trigger": "zwx", "class_word": "star", "base_model": "tiny", "rank": 4, "alpha": 8.0})
    return path, base, want


def rewrite(path, out, change):
    state = load_file(path)
    change(state)
    save_file(state, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def test_saved_lora_loads_in_plain_diffusers_like_ours(saved, sd_tiny_dir, pipe):
    path, base, want = saved
    assert path.name == "pytorch_lora_weights.safetensors"
    plain = StableDiffusionPipeline.from_pretrained(str(sd_tiny_dir), local_files_only=True)
    plain.load_lora_weights(str(path.parent))
    theirs = outputs(plain)
    info = load_lora(pipe, path.parent, "zwx")
    ours = outputs(pipe)
    assert same(ours, theirs)  # our loader is diffusers' loader
    # alpha 8 != rank 4 round-trips: a plain load rebuilds scale 2 and reproduces the model the file came from
    assert plain.unet.peft_config["default_0"].lora_alpha == 8 and plain.unet.peft_config["default_0"].r == 4
    assert same(theirs, want, atol=1e-5)
    assert not same(theirs, base, atol=1e-3)  # and the LoRA changes both the text embeddings and the UNet
    assert not torch.allclose(theirs[0], base[0], atol=1e-3) and not torch.allclose(theirs[1], base[1], atol=1e-3)
    assert (info.trigger, info.class_word, info.base_model, info.rank, info.alpha, info.has_text_encoder) == (
        "zwx", "star", "tiny", 4, 8.0, True)


def test_kohya_layout_loads_like_the_diffusers_file(saved, sd_tiny_dir, tmp_path):
    path, _, want = saved

    def to_kohya(state):
        for key in list(state):
            component, rest = key.split(".", 1)
            for old, new in ((".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up"),
                             (".lora_linear_layer.down.weight", "lora_down"),
                             (".lora_linear_layer.up.weight", "lora_up")):
                if rest.endswith(old):
                    module = rest[: -len(old)]
                    break
            else:
                raise AssertionError(f"unexpected key {key}")
            prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
            name = prefix + module.replace(".", "_")
            state[f"{name}.{new}.weight"] = state.pop(key)
            state[f"{name}.alpha"] = torch.tensor(8.0)

    kohya = rewrite(path, tmp_path / "zwx_kohya.safetensors", to_kohya)
    keys = load_file(kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert not any(k.startswith(("unet.", "text_encoder.")) for k in keys)
    pipe = load_pipeline(str(sd_tiny_dir))
    assert len(check_lora_fits(pipe, kohya)) == len(check_lora_fits(pipe, path))
    info = load_lora(pipe, kohya, adapter_name_for(kohya))
    assert info.has_text_encoder and info.trigger is None and (info.rank, info.alpha) == (4, 8.0)
    assert same(outputs(pipe), want, atol=1e-5)


def test_tensor_only_pickles_load_and_code_pickles_are_refused(saved, sd_tiny_dir, pipe, tmp_path):
    path, base, _ = saved
    torch.save(load_file(path), tmp_path / "zwx.bin")  # no header, so no alpha: loads at alpha = rank, like diffusers
    load_lora(pipe, tmp_path / "zwx.bin", "zwx")
    plain = StableDiffusionPipeline.from_pretrained(str(sd_tiny_dir), local_files_only=True)
    plain.load_lora_weights(str(tmp_path / "zwx.bin"))
    assert same(outputs(pipe), outputs(plain)) and not same(outputs(pipe), base, atol=1e-3)
    torch.save({"weights": Exception("not a tensor")}, tmp_path / "code.bin")
    with pytest.raises(UserError, match="never unpickles code"):
        check_lora_fits(pipe, tmp_path / "code.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable .safetensors") as error:
        load_lora(pipe, tmp_path / "broken.safetensors", "broken")
    assert "\n" not in str(error.value)
    save_file({"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, tmp_path / "full.safetensors")
    with pytest.raises(UserError, match="no LoRA layers|layout"):
        check_lora_fits(pipe, tmp_path / "full.safetensors")


def test_a_lora_for_another_architecture_is_refused_in_one_line(saved, sd_tiny_dir, pipe, tmp_path, capsys,
                                                                monkeypatch):
    path, base, _ = saved
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight"

    def wider_context(state):  # SD 2.x's cross-attention reads 1024-dim text embeddings, SD 1.x's 768
        assert state[key].shape == (4, 768)
        state[key] = torch.zeros(4, 1024)

    other = rewrite(path, tmp_path / "sd2-style.safetensors", wider_context)
    with pytest.raises(UserError) as error:
        load_lora(pipe, other, "sd2")
    message = str(error.value)
    assert "\n" not in message
    assert "sd2-style.safetensors does not fit this model" in message
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in message
    assert "(4, 1024)" in message and "768" in message and "another architecture (SD 2.x)" in message
    # the refusal left the pipeline alone
    assert not getattr(pipe.unet, "peft_config", None) and not getattr(pipe.text_encoder, "peft_config", None)
    assert same(outputs(pipe), base)

    def extra_block(state):
        state[key.replace("down_blocks.0", "down_blocks.7")] = state[key].clone()

    missing = rewrite(path, tmp_path / "deeper.safetensors", extra_block)
    with pytest.raises(UserError, match=r"down_blocks\.7\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k, a "
                                        "layer this model does not have"):
        check_lora_fits(pipe, missing)

    def second_text_encoder(state):  # SDXL LoRAs carry text_encoder_2 weights
        state["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 1280)
        state["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(1280, 4)

    sdxl = rewrite(path, tmp_path / "sdxl.safetensors", second_text_encoder)
    with pytest.raises(UserError, match="'text_encoder_2'.*does not have"):
        check_lora_fits(pipe, sdxl)

    monkeypatch.setenv("CONCEPTKIT_TOY_MODEL", str(sd_tiny_dir))
    capsys.readouterr()
    assert main(["generate", "--lora", str(other), "--prompt", "zwx", "--steps", "1", "--out",
                 str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: LoRA sd2-style.safetensors does not fit this model")
    assert not (tmp_path / "gen").exists()


def test_file_and_name_errors(saved, pipe, tmp_path):
    path, _, _ = saved
    assert lora_file(path.parent) == path and lora_file(path) == path
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no pytorch_lora_weights.safetensors"):
        lora_file(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        load_lora(pipe, tmp_path / "nope.safetensors", "nope")
    load_lora(pipe, path, "zwx")
    with pytest.raises(UserError, match="'zwx' is already loaded"):
        load_lora(pipe, path, "zwx")
    with pytest.raises(UserError, match="cannot be used"):
        load_lora(pipe, path, "train")  # an nn.Module attribute: peft could not register it
    assert adapter_name_for(path) == "zwx-star"  # the folder's name for our standard file name
    assert adapter_name_for(tmp_path / "train.safetensors") == "lora_train"
    assert adapter_name_for(tmp_path / "my lora.v2.safetensors", ["my_lora_v2"]) == "my_lora_v2_2"


def test_info_falls_back_to_the_sidecar_then_to_nothing(saved, tmp_path):
    path, _, _ = saved
    bare = tmp_path / "bare"
    bare.mkdir()
    state = load_file(path)
    save_file(state, bare / "pytorch_lora_weights.safetensors")
    info = read_lora_info(bare)  # no header: only what the tensors say (the rank: the down matrices' rows)
    assert (info.trigger, info.class_word, info.base_model, info.rank, info.alpha) == (None, None, None, 4, None)
    (bare / "metadata.json").write_text(json.dumps({"trigger": "qwe", "rank": 8, "alpha": 4, "base_model": "toy"}))
    info = read_lora_info(bare)
    assert (info.trigger, info.rank, info.alpha, info.base_model, info.has_text_encoder) == ("qwe", 8, 4.0, "toy",
                                                                                             True)


def test_weights_on_the_command_line_scale_the_lora(saved, sd_tiny_dir, capsys):
    path, base, want = saved
    halves = load_pipeline(str(sd_tiny_dir))
    load_loras(halves, [f"{path}:0.5", f"{path}:0.5"])  # two adapters at half weight add up to one at full
    assert sorted(halves.unet.peft_config) == ["zwx-star", "zwx-star_2"]
    assert same(outputs(halves), want, atol=1e-5)
    off = load_pipeline(str(sd_tiny_dir))
    load_loras(off, [f"{path}:0"])
    assert same(outputs(off), base, atol=1e-6)
    assert "loaded LoRA" in capsys.readouterr().err
    with pytest.raises(UserError, match="must be a number"):
        load_loras(off, [f"{path}:heavy"])


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def test_training_changes_only_lora_weights_and_leaves_the_pipeline_clean(pipe, concept, tmp_path):
    parts = {"unet": snapshot(pipe.unet), "vae": snapshot(pipe.vae), "text_encoder": snapshot(pipe.text_encoder)}
    grads = [p.requires_grad for p in pipe.unet.parameters()]
    scheduler = pipe.scheduler
    before = outputs(pipe)
    cfg = LoRAConfig(trigger="zwx", class_word="star", prompt="a photo of {}", steps=3, lr=1e-2, batch=2,
                     alpha=2.0)
    result = learn_lora(pipe, concept, tmp_path / "out", cfg, model_name="tiny", progress=False)
    for name, snap in parts.items():
        after = getattr(pipe, name).state_dict()
        assert sorted(after) == sorted(snap)  # no LoRA layer left behind
        assert all(torch.equal(snap[k], after[k]) for k in snap)  # every base weight bitwise unchanged
    assert not getattr(pipe.unet, "peft_config", None) and not getattr(pipe.text_encoder, "peft_config", None)
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads and pipe.scheduler is scheduler
    assert same(outputs(pipe), before)
    out = tmp_path / "out"
    assert result.path == out / "pytorch_lora_weights.safetensors" and result.path.is_file()
    assert (out / "validation" / "step-000003" / "grid.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003.safetensors"]
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["trigger"], meta["class_word"], meta["rank"], meta["alpha"], meta["steps"]) == ("zwx", "star", 4,
                                                                                                 2.0, 3)
    assert meta["captions"] == ["a photo of zwx star"] * 4 and meta["final_loss"] == result.losses[-1]
    assert (result.info.trigger, result.info.rank, result.info.alpha, result.info.base_model) == ("zwx", 4, 2.0, "tiny")
    load_lora(pipe, out, "zwx")  # and the trained LoRA does something
    assert not same(outputs(pipe), before, atol=1e-6)


def test_only_lora_weights_get_gradients(pipe, concept):
    freeze(pipe)
    add_training_adapters(pipe, LoRAConfig(), seed=0)
    means, stds = encode_latent_cache(pipe.vae, torch.rand(2, 3, 64, 64) * 2 - 1)
    ids = pipe.tokenizer(["a zwx object"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    batch = draw_batch(torch.Generator().manual_seed(0), means, stds, LoRAConfig(batch=2), 1, 1000, 0.18215)
    assert batch.image_ids is not None and batch.image_ids.shape == (2,)
    ti_loss(pipe, pipe.scheduler, batch, ids).backward()
    lora, base = [], []
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        for name, p in model.named_parameters():
            (lora if f".{ADAPTER}." in name else base).append((name, p))
    assert {n.split(".")[-3] for n, _ in lora} == {"lora_A", "lora_B"}
    assert all(p.grad is None and not p.requires_grad for _, p in base)
    assert all(p.grad is not None for _, p in lora)
    # B starts at zero (the adapter starts as the identity), so the first gradient reaches B, in both models
    for model in ("unet", "text_encoder"):
        b = [p for n, p in lora if ".lora_B." in n and any(q is p for q in getattr(pipe, model).parameters())]
        assert b and any(p.grad.abs().sum() > 0 for p in b)


def test_loss_falls_on_a_fixed_batch(pipe, concept):
    from conceptkit.learn.images import load_images

    freeze(pipe)
    params = add_training_adapters(pipe, LoRAConfig(), seed=0)
    opt = torch.optim.AdamW([p for named in params.values() for _, p in named], lr=1e-2)
    means, stds = encode_latent_cache(pipe.vae, load_images(concept, 64))
    batch = draw_batch(torch.Generator().manual_seed(0), means, stds, LoRAConfig(batch=4), 1, 1000, 0.18215)
    ids = pipe.tokenizer(["a photo of zwx"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    losses = []
    for _ in range(30):
        loss = ti_loss(pipe, pipe.scheduler, batch, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5


def test_resumed_run_equals_uninterrupted_run(sd_tiny_dir, concept, tmp_path):
    cfg = LoRAConfig(trigger="zwx", prompt="a zwx object", steps=4, batch=2, lr=1e-2, checkpoint_every=2, seed=3,
                     validate_every=2, validation_seeds=1)
    whole = learn_lora(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "a", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-000002.safetensors",
                                                                                  "step-000004.safetensors"]
    assert [p.name for p in sorted((tmp_path / "a" / "validation").iterdir())] == ["step-000002", "step-000004"]
    half = LoRAConfig(**{**cfg.__dict__, "steps": 2})
    learn_lora(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b", half, progress=False)
    resumed = learn_lora(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b", cfg, resume=True, progress=False)
    a, b = load_file(whole.path), load_file(resumed.path)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".up." in k and a[k].abs().sum() > 0 for k in a)  # it trained
    assert whole.losses == resumed.losses and len(whole.losses) == 4
    with pytest.raises(UserError, match="--resume"):
        learn_lora(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b", cfg, progress=False)
    with pytest.raises(UserError, match="different settings.*rank"):
        learn_lora(load_pipeline(str(sd_tiny_dir)), concept, tmp_path / "b", LoRAConfig(**{**cfg.__dict__, "rank": 8}),
                   resume=True, progress=False)


def test_captions_come_from_sidecar_files(pipe, concept, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(concept, images)
    cfg = LoRAConfig(trigger="zwx", steps=1, batch=1, validation_prompts=())
    with pytest.raises(UserError, match=r"no caption for 0\.png: write .*0\.txt.*or pass --prompt") as error:
        learn_lora(pipe, images, tmp_path / "out", cfg, progress=False)
    assert "\n" not in str(error.value)
    assert not getattr(pipe.unet, "peft_config", None)
    for i, image in enumerate(sorted(images.glob("*.png"))):
        image.with_suffix(".txt").write_text(f"a photo of zwx star,  view {i}\n")
    learn_lora(pipe, images, tmp_path / "out", cfg, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["captions"] == [f"a photo of zwx star, view {i}" for i in range(4)]
    assert not (tmp_path / "out" / "validation").exists()


def test_cli_learns_a_lora_then_generates_with_it(toy_model_env, concept, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["learn", "lora", "--images", str(concept), "--prompt", "a photo of zwx star", "--trigger", "zwx",
                 "--class-word", "star", "--rank", "2", "--alpha", "4", "--steps", "2", "--batch", "1",
                 "--no-text-encoder", "--out", str(out)]) == 0
    assert "conceptkit generate --model toy --lora" in capsys.readouterr().out
    info = read_lora_info(out)
    assert (info.trigger, info.class_word, info.rank, info.alpha, info.has_text_encoder, info.base_model) == (
        "zwx", "star", 2, 4.0, False, "toy")
    assert main(["generate", "--lora", f"{out}:0.8", "--prompt", "a photo of zwx star", "--steps", "2", "--out",
                 str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert "loaded LoRA" in capsys.readouterr().err
    assert main(["learn", "lora", "--images", str(concept), "--prompt", "a photo of zwx star", "--steps", "2",
                 "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
