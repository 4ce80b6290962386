"""ProFusion (ALGORITHMS.md §3): PromptNet, the S* injection, fusion sampling and the trainers, pinned to the §4
invariants on the tiny SD-1.x fixture (float64 where possible) and the bundled toy model."""
import json
import math
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.attention_processor import Attention
from PIL import Image
from safetensors.torch import load_file

from promptnet_helpers import fixed_batch, write_noise_images

from conceptkit.errors import UserError
from conceptkit.learn import promptnet as promptnet_training
from conceptkit.learn.promptnet import (augment_copies, finetune_promptnet, mirrored_caption, pretrain_promptnet,
                                       promptnet_loss)
from conceptkit.learn.promptnet_config import FinetuneConfig, PretrainConfig
from conceptkit.models.loading import load_pipeline
from conceptkit.profusion import sampling
from conceptkit.profusion.fusion import fusion_sigma, fusion_two_stage, fusion_update, to_epsilon
from conceptkit.profusion.image_encoders import ClipVisionEncoder, LatentPatchEncoder, load_image_encoder
from conceptkit.profusion.promptnet import PromptNet
from conceptkit.profusion.prompts import encode_with_word, position_embedding, tokenize_with_slot, training_ids
from conceptkit.profusion.sampling import FusionConfig, generate_profusion, sample
from conceptkit.profusion.saved import (
    UNET_ATTENTION_FILE,
    SavedPromptNet,
    attention_weight_names,
    load_promptnet,
    save_promptnet,
    unet_attention_applied,
)

ENCODER_PARTS = ("conv_in", "time_embedding", "down_blocks", "mid_block")
PROMPTS = ["a S* on the grass", "S* in the snow at night"]  # slots 2 and 1


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def sd64(sd_tiny_dir):
    """The tiny SD fixture in float64 (UNet, VAE and text encoder)."""
    return load_pipeline(str(sd_tiny_dir), dtype=torch.float64, device="cpu")


@pytest.fixture(scope="module")
def sd32(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def toy64():
    return load_pipeline("toy", dtype=torch.float64, device="cpu")


def make_saved(pipe, seed=0, encoder=None):
    encoder = encoder or LatentPatchEncoder(pipe.vae.config.latent_channels, patch=2)
    torch.manual_seed(seed)
    text_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    net = PromptNet.from_unet(pipe.unet, encoder.embed_dim, text_dim).to(pipe.unet.dtype).eval()
    net.requires_grad_(False)
    return SavedPromptNet(net, encoder, {})


@pytest.fixture(scope="module")
def saved64(sd64):
    return make_saved(sd64)


@pytest.fixture(scope="module")
def reference():
    g = torch.Generator().manual_seed(7)
    return torch.rand(1, 3, 64, 64, generator=g) * 2 - 1


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def generator_noise(x, generators, cfg):
    """Fusion noise from each image's generator, whatever the execution (for batched == reference)."""
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device, x.dtype)


def encode(pipe, prompts):
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def by_hand(pipe, saved, reference, prompt, cfg, seed, extras=(), start=None):
    """ProFusion sampling of one image written out from §3.6 with the pipeline's parts, one UNet call per
    condition: fusion sub-steps (b) then the guided DDIM step (a); all noise from the image's generator in the
    order x_ref draw, initial latent, extra images' x_ref draws, fusion noises. extras: (image, weight) combined as
    the official pipeline does (ε̃·w1/Σ + ε̃_k·w_k/Σ in sub-steps, + w_k (ε_k(c) − ε(∅)) in the main step);
    start: the official `st` with the latents set to add_noise(x_ref, noise) at the first timestep kept."""
    g = torch.Generator().manual_seed(seed)
    unet, dtype = pipe.unet, pipe.unet.dtype
    dist = pipe.vae.encode(reference.to(dtype)).latent_dist
    x_ref = (dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=g).to(dtype)) \
        * pipe.vae.config.scaling_factor
    tokens = saved.image_encoder(reference, x_ref)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.steps)
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape[1:], generator=g)[None].to(dtype) * sched.init_noise_sigma
    more = []
    for image, weight in extras:
        d = pipe.vae.encode(image.to(dtype)).latent_dist
        xr = (d.mean + d.std * torch.randn(d.mean.shape[1:], generator=g).to(dtype)) * pipe.vae.config.scaling_factor
        more.append((xr, saved.image_encoder(image, xr), weight))
    timesteps = sched.timesteps
    if start is not None:
        timesteps = timesteps[timesteps <= start]
        x = sched.add_noise(x_ref, x, timesteps[:1])
    ids, slot = tokenize_with_slot(pipe.tokenizer, prompt)
    negative = encode(pipe, [cfg.negative_prompt])
    ref = encode(pipe, [prompt.replace("S*", cfg.class_word)])
    v_pred = sched.config.prediction_type == "v_prediction"

    def with_word(x, t, scale, image_latent=x_ref, image_tokens=tokens):
        words = saved.promptnet(image_latent, t, image_tokens, x)
        return encode_with_word(pipe.text_encoder, ids[None], torch.tensor([slot]), words, scale)

    def eps(out, x, a):
        return math.sqrt(a) * out + math.sqrt(1 - a) * x if v_pred else out

    gap = sched.config.num_train_timesteps // cfg.steps
    for t in timesteps:
        a = float(sched.alphas_cumprod[int(t)])
        a1 = float(sched.alphas_cumprod[int(t) - gap]) if int(t) >= gap else float(sched.final_alpha_cumprod)
        if cfg.refine_eta > 0:
            for _ in range(cfg.refine_steps):
                u = unet(x, t, negative).sample
                c = unet(x, t, with_word(x, t, cfg.refine_emb_scale)).sample
                e = u + cfg.refine_guidance_scale * (c - u)
                if more:
                    total = cfg.guidance_scale + sum(w for _, _, w in more)
                    e = e * cfg.guidance_scale / total
                    for xr, tk, w in more:
                        c_k = unet(x, t, with_word(x, t, cfg.refine_emb_scale, xr, tk)).sample
                        e = e + (u + cfg.refine_guidance_scale * (c_k - u)) * w / total
                e = eps(e, x, a)
                s2 = cfg.refine_eta ** 2 * (1 - a1) / (1 - a) * (1 - a / a1)
                z = torch.randn(shape[1:], generator=g)[None].to(dtype)
                x = x - e * s2 * math.sqrt(1 - a) / (1 - a1) \
                    + math.sqrt(s2) * z * math.sqrt((1 - a) * (2 - 2 * a1 - s2)) / (1 - a1)
        u = unet(x, t, negative).sample
        c = unet(x, t, with_word(x, t, cfg.emb_scale)).sample
        out = u + cfg.guidance_scale * (c - u)
        if cfg.ref_guidance_scale:
            out = out + cfg.ref_guidance_scale * (unet(x, t, ref).sample - u)
        for xr, tk, w in more:
            out = out + cfg.guidance_scale * w / cfg.guidance_scale * (unet(x, t, with_word(x, t, cfg.emb_scale, xr, tk)).sample - u)
        x = sched.step(out, t, x, eta=0.0).prev_sample
    return x


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def count_unet_samples(unet):
    """A forward pre-hook recording the batch size of every UNet call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0] if args else kwargs["sample"]).shape[0])

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------ PromptNet

@pytest.mark.parametrize("which", ["sd", "toy"])
def test_promptnet_gives_one_word_per_image(which, sd64, toy64):
    pipe = sd64 if which == "sd" else toy64
    saved = make_saved(pipe)
    net, size = saved.promptnet, pipe.unet.config.sample_size
    text_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    x_ref, x_t = (torch.randn(3, 4, size, size, generator=g, dtype=torch.float64) for _ in range(2))
    tokens = saved.image_encoder(None, x_ref)
    with torch.no_grad():
        words = net(x_ref, torch.tensor([5, 500, 900]), tokens, x_t)
    assert words.shape == (3, 1, text_dim)
    assert torch.isfinite(words).all()
    # every feature map is projected to the mid block's grid (§3.2: SD 2 at 64x64 → kernels 8,4,2,1,1,1)
    kernels = [p.kernel_size[0] for p in net.projections]
    assert kernels == ([8, 4, 2, 1, 1, 1] if which == "sd" else [4, 2, 1, 1, 1])


def promptnet_inputs(size=8, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(b, 4, size, size, generator=g, dtype=torch.float64)
    x_t = torch.randn(b, 4, size, size, generator=g, dtype=torch.float64)
    t = torch.tensor([100, 700])[:b]
    return x_ref, t, LatentPatchEncoder()(None, x_ref).double(), x_t


def test_promptnet_is_deterministic_and_per_image(saved64):
    net = saved64.promptnet
    x_ref, t, tokens, x_t = promptnet_inputs()
    with torch.no_grad():
        a = net(x_ref, t, tokens, x_t)
        b = net(x_ref, t, tokens, x_t)
        single = torch.cat([net(x_ref[i:i + 1], t[i], tokens[i:i + 1], x_t[i:i + 1]) for i in range(2)])
    assert torch.equal(a, b)
    close(single, a, 1e-12)


@pytest.mark.parametrize("which", ["x_ref", "timestep", "image_tokens", "x_t"])
def test_promptnet_depends_on_each_input(saved64, which):
    net = saved64.promptnet
    inputs = dict(zip(["x_ref", "timestep", "image_tokens", "x_t"], promptnet_inputs()))
    with torch.no_grad():
        before = net(*inputs.values())
        g = torch.Generator().manual_seed(1)
        if which == "timestep":
            inputs[which] = inputs[which] + 37
        else:
            inputs[which] = inputs[which] + 0.1 * torch.randn(inputs[which].shape, generator=g, dtype=torch.float64)
        after = net(*inputs.values())
    # both images' words move, by more than rounding
    assert ((after - before).abs().amax(dim=(1, 2)) > 1e-6).all()


def test_from_unet_copies_the_encoder_half_exactly_and_independently(sd32):
    torch.manual_seed(1234)  # not the fixture UNet's own seed (0): a fresh init would equal it
    net = PromptNet.from_unet(sd32.unet, 18, 768)
    for name in ENCODER_PARTS:
        mine, theirs = getattr(net, name).state_dict(), getattr(sd32.unet, name).state_dict()
        assert mine.keys() == theirs.keys() and len(mine) > 0
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"{name}.{key}"
    # a copy, not shared storage: training the PromptNet must not touch the UNet
    unet_before = sd32.unet.conv_in.weight.clone()
    with torch.no_grad():
        net.conv_in.weight.add_(1.0)
    assert torch.equal(sd32.unet.conv_in.weight, unet_before)
    # the new layers are trainable and not part of the UNet
    own = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert {"prompt_embedding", "context_proj", "projections", "to_word"} <= own


def test_promptnet_save_load_round_trip(saved64, sd32, tmp_path):
    net = saved64.promptnet
    net.save_pretrained(tmp_path / "pn")
    loaded = PromptNet.from_pretrained(tmp_path / "pn").double().eval()
    inputs = promptnet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), net(*inputs))
    # the conceptkit folder: save_promptnet / load_promptnet (float32, frozen)
    save_promptnet(tmp_path / "folder", net, saved64.image_encoder, {"stage": "test"})
    again = load_promptnet(tmp_path / "folder", sd32)
    assert again.meta == {"stage": "test"} and again.unet_attention is None
    assert again.image_encoder.describe() == saved64.image_encoder.describe()
    mine, theirs = net.state_dict(), again.promptnet.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k].float(), theirs[k]) for k in mine)
    assert not any(p.requires_grad for p in again.promptnet.parameters())


# ------------------------------------------------------------------------------------ injection (§3.3)

def word_embedding(pipe, word, slot):
    """Token + position embedding of a one-token word at `slot`: what the encoder itself would put there."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{word} is not one token"
    return pipe.text_encoder.get_input_embeddings().weight[ids[0]] + position_embedding(pipe.text_encoder).weight[slot]


def test_injected_embedding_of_a_word_gives_the_ordinary_encoding(sd64):
    rows = [tokenize_with_slot(sd64.tokenizer, p) for p in PROMPTS]
    ids, slots = torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    assert slots.tolist() == [2, 1]
    words = torch.stack([word_embedding(sd64, w, s) for w, s in zip(["cat", "dog"], slots.tolist())])
    with torch.no_grad():
        got = encode_with_word(sd64.text_encoder, ids, slots, words[:, None])
        want = encode(sd64, ["a cat on the grass", "dog in the snow at night"])
    assert got.shape == (2, sd64.tokenizer.model_max_length, 768)
    close(got, want, 1e-12)
    # a different word at the slot changes the encoding (the splice is not a no-op)
    with torch.no_grad():
        other = encode_with_word(sd64.text_encoder, ids, slots, words.flip(0))
    assert (other - want).abs().max() > 1e-3
    # the encoder's own token embedding is back in place afterwards
    assert isinstance(sd64.text_encoder.get_input_embeddings(), torch.nn.Embedding)


def test_scale_multiplies_only_the_slot_row(sd64):
    rows = [tokenize_with_slot(sd64.tokenizer, p) for p in PROMPTS]
    ids, slots = torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    words = torch.randn(2, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        one = encode_with_word(sd64.text_encoder, ids, slots, words, 1.0)
        scaled = encode_with_word(sd64.text_encoder, ids, slots, words, 0.6)
    for b, s in enumerate(slots.tolist()):
        keep = torch.ones(one.shape[1], dtype=torch.bool)
        keep[s] = False
        assert torch.equal(scaled[b, keep], one[b, keep])
        close(scaled[b, s], 0.6 * one[b, s], 1e-14)


def test_no_slot_is_the_ordinary_encoding(sd64):
    ids = sd64.tokenizer(["a cat on the grass"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(encode_with_word(sd64.text_encoder, ids, None, None), encode(sd64, ["a cat on the grass"]))


@pytest.mark.parametrize("which", ["sd", "toy"])
def test_tokenize_with_slot_is_the_padded_prompt_with_a_dummy_at_the_slot(which, sd64, toy64):
    pipe = sd64 if which == "sd" else toy64
    tok = pipe.tokenizer
    prompt, word = ("a S* on the grass", "cat") if which == "sd" else ("a S* on a navy background", "circle")
    ids, slot = tokenize_with_slot(tok, prompt)
    want = tok(prompt.replace("S*", word), padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length == len(want)
    assert slot == 2 and ids[slot] == 0 and want[slot] == tok(word, add_special_tokens=False).input_ids[0]
    assert ids[:slot].tolist() == want[:slot] and ids[slot + 1:].tolist() == want[slot + 1:]
    # another placeholder word works the same
    ids2, slot2 = tokenize_with_slot(tok, prompt.replace("S*", "holder"), placeholder="holder")
    assert torch.equal(ids2, ids) and slot2 == slot


@pytest.mark.parametrize("prompt", ["a cat on the grass", "a S* and a S*", ["a S*"]])
def test_placeholder_must_occur_exactly_once(sd64, prompt):
    with pytest.raises(UserError) as e:
        tokenize_with_slot(sd64.tokenizer, prompt)
    assert "\n" not in str(e.value)


def test_too_long_prompt_is_refused(sd64):
    with pytest.raises(UserError, match="tokens"):
        tokenize_with_slot(sd64.tokenizer, "a S* " + "very " * 80 + "big")


def test_training_ids_are_the_official_six_tokens(sd64):
    tok = sd64.tokenizer
    ids, slot = training_ids(tok)
    bos, a, photo, of, eos = tok("a photo of").input_ids
    assert ids.tolist() == [bos, a, photo, of, 0, eos] and slot == 4
    assert tok.convert_ids_to_tokens([a, photo, of]) == ["a</w>", "photo</w>", "of</w>"]
    # "A photo of" (train.py's default) lowercases to the same; pad=True gives the inference layout
    assert torch.equal(training_ids(tok, "A photo of")[0], ids)
    padded, slot_p = training_ids(tok, pad=True)
    assert len(padded) == tok.model_max_length and slot_p == 4 and torch.equal(padded[:6], ids)
    assert set(padded[6:].tolist()) == {tok.pad_token_id}


# ------------------------------------------------------------------------------------ fusion update (§3.6 b)

def sd_alphas():
    sched = DDIMScheduler.from_config({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                       "set_alpha_to_one": False, "steps_offset": 1})
    ac = sched.alphas_cumprod
    return [(float(ac[981]), float(ac[961])), (float(ac[501]), float(ac[481])), (float(ac[41]), float(ac[1])),
            (float(ac[1]), float(sched.final_alpha_cumprod))]


def fusion_inputs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("a, a_prev", sd_alphas())
def test_fusion_closed_form_equals_the_two_stage_definition_in_mean_and_variance(a, a_prev, eta):
    """Both are affine in their noises: equal means (noise 0) and, per element, the closed form's noise
    coefficient² equals the sum of the two stages' coefficients²."""
    x, eps = fusion_inputs()
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    closed0 = fusion_update(x, eps, a, a_prev, eta, zero)
    two0 = fusion_two_stage(x, eps, a, a_prev, eta, zero, zero)
    close(closed0, two0, 1e-12)
    assert (closed0 - x).abs().max() > 1e-6  # the mean moves along -ε
    c = fusion_update(x, eps, a, a_prev, eta, one) - closed0
    c1 = fusion_two_stage(x, eps, a, a_prev, eta, one, zero) - two0
    c2 = fusion_two_stage(x, eps, a, a_prev, eta, zero, one) - two0
    assert (c > 0).all() and (c1.abs() > 0).all() and (c2.abs() > 0).all()
    close(c ** 2, c1 ** 2 + c2 ** 2, 1e-12)
    # linear in the noise: twice the noise, twice the deviation
    close(fusion_two_stage(x, eps, a, a_prev, eta, 2 * one, -3 * one) - two0, 2 * c1 - 3 * c2, 1e-12)
    # and the closed-form variance is the formula of §3.6
    s2 = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    assert fusion_sigma(a, a_prev, eta) ** 2 == pytest.approx(s2, rel=1e-12)
    assert c[0].item() ** 2 == pytest.approx(s2 * (1 - a) * (2 - 2 * a_prev - s2) / (1 - a_prev) ** 2, rel=1e-10)


def test_fusion_closed_form_matches_two_stage_by_monte_carlo():
    a, a_prev = sd_alphas()[1]
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.full((n,), 0.7, dtype=torch.float64)
    eps = torch.full((n,), -1.3, dtype=torch.float64)
    closed = fusion_update(x, eps, a, a_prev, 1.0, torch.randn(n, generator=g, dtype=torch.float64))
    two = fusion_two_stage(x, eps, a, a_prev, 1.0, torch.randn(n, generator=g, dtype=torch.float64),
                           torch.randn(n, generator=g, dtype=torch.float64))
    std = closed.std().item()
    assert std > 0.01
    assert abs(closed.mean().item() - two.mean().item()) < 6 * std / math.sqrt(n)
    assert two.std().item() == pytest.approx(std, rel=0.02)


@pytest.mark.parametrize("a, a_prev", sd_alphas())
def test_fusion_with_eta_zero_is_the_identity(a, a_prev):
    x, eps = fusion_inputs()
    noise = torch.randn_like(x)
    assert torch.equal(fusion_update(x, eps, a, a_prev, 0.0, noise), x)
    close(fusion_two_stage(x, eps, a, a_prev, 0.0, noise, noise), x, 1e-12)


def test_fusion_refuses_eta_above_sqrt2_and_alpha_prev_one():
    x, eps = fusion_inputs()
    a, a_prev = sd_alphas()[0]
    fusion_update(x, eps, a, a_prev, math.sqrt(2), torch.zeros_like(x))  # the bound itself is allowed
    with pytest.raises(ValueError, match="sqrt"):
        fusion_update(x, eps, a, a_prev, 1.5, torch.zeros_like(x))
    with pytest.raises(ValueError):
        fusion_update(x, eps, a, 1.0, 1.0, torch.zeros_like(x))


@pytest.mark.parametrize("t", [10, 500, 990])
def test_to_epsilon_inverts_v_and_sample_prediction(t):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(t)
    x0, eps = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    tt = torch.tensor([t, t])
    x = sched.add_noise(x0, eps, tt)
    a = float(sched.alphas_cumprod[t])
    close(to_epsilon(sched.get_velocity(x0, eps, tt), x, a, "v_prediction"), eps, 1e-6)
    close(to_epsilon(x0, x, a, "sample"), eps, 1e-6)
    assert torch.equal(to_epsilon(eps, x, a, "epsilon"), eps)
    with pytest.raises(ValueError):
        to_epsilon(eps, x, a, "flow")


# ------------------------------------------------------------------------------------ sampling (§3.6)

# Random tiny models make sampling chaotic: the round-off of batched vs one-by-one UNet calls (1e-13) grows by up to
# ~10x per ε-evaluation at the notebook's guidance weights (7, 5, 7). With two DDIM steps and moderate weights W it
# stays below ~3e-9 here, while a 0.01 change of any guidance weight or of λ moves the result by more than 2e-3:
# SAMPLE_TOL sits orders of magnitude from both.
STEPS = 2
SAMPLE_TOL = 1e-6
W = {"guidance_scale": 3.0, "ref_guidance_scale": 1.5, "refine_guidance_scale": 2.5}


def test_fusion_config_defaults_are_the_notebook_fusion_call():
    cfg = FusionConfig()
    assert (cfg.steps, cfg.guidance_scale, cfg.ref_guidance_scale, cfg.refine_steps, cfg.refine_eta,
            cfg.refine_emb_scale, cfg.refine_guidance_scale, cfg.emb_scale) == (50, 7.0, 5.0, 1, 1.0, 0.6, 7.0, 1.0)
    plain = FusionConfig.plain()
    assert (plain.guidance_scale, plain.ref_guidance_scale, plain.refine_steps) == (5.0, 0.0, 0)
    assert FusionConfig.reference().execution == "reference" and cfg.execution == "batched"


def test_plain_sampling_is_cfg_ddim_with_the_word_recomputed_every_step(sd64, saved64, reference):
    cfg = FusionConfig.plain(steps=STEPS)
    assert (cfg.refine_steps, cfg.ref_guidance_scale, cfg.guidance_scale) == (0, 0.0, 5.0)
    got = sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(3))
    assert got.dtype == torch.float64
    with torch.no_grad():
        close(got, by_hand(sd64, saved64, reference, PROMPTS[0], cfg, 3), SAMPLE_TOL)


def test_ref_prompt_with_zero_weight_changes_nothing(sd64, saved64, reference):
    plain = sample(sd64, saved64, reference, PROMPTS[:1], FusionConfig.plain(steps=STEPS), gens(3))
    with_ref = sample(sd64, saved64, reference, PROMPTS[:1],
                      FusionConfig.plain(steps=STEPS, ref_prompt="a dog on the grass", ref_guidance_scale=0.0),
                      gens(3))
    close(with_ref, plain, 1e-12)
    weighted = sample(sd64, saved64, reference, PROMPTS[:1],
                      FusionConfig.plain(steps=STEPS, ref_prompt="a dog on the grass", ref_guidance_scale=3.0),
                      gens(3))
    assert (weighted - plain).abs().max() > 1e-4


@pytest.mark.parametrize("fusion", [False, True])
def test_emb_scale_scales_the_word_in_the_main_step(sd64, saved64, reference, fusion):
    base = FusionConfig(steps=STEPS, **W) if fusion else FusionConfig.plain(steps=STEPS)
    cfg = replace(base, emb_scale=1.3)
    got = sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(3))
    with torch.no_grad():
        close(got, by_hand(sd64, saved64, reference, PROMPTS[0], cfg, 3), SAMPLE_TOL)
    assert (got - sample(sd64, saved64, reference, PROMPTS[:1], base, gens(3))).abs().max() > 1e-4


@pytest.mark.parametrize("refine_steps", [1, 2])
def test_fusion_sampling_follows_section_3_6(sd64, saved64, reference, refine_steps):
    cfg = FusionConfig(steps=STEPS, refine_steps=refine_steps, **W)
    got = sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(3))
    with torch.no_grad():
        close(got, by_hand(sd64, saved64, reference, PROMPTS[0], cfg, 3), SAMPLE_TOL)
    plain = sample(sd64, saved64, reference, PROMPTS[:1], FusionConfig(steps=STEPS, refine_steps=0, **W), gens(3))
    assert (got - plain).abs().max() > 1e-3  # fusion does something


def test_fusion_sampling_on_the_v_prediction_toy(toy64, reference):
    saved = make_saved(toy64)
    prompt = "a S* on a navy background"
    cfg = FusionConfig(steps=3, class_word="circle")
    assert toy64.scheduler.config.prediction_type == "v_prediction"
    got = sample(toy64, saved, reference, [prompt], cfg, gens(5))
    with torch.no_grad():
        close(got, by_hand(toy64, saved, reference, prompt, cfg, 5), SAMPLE_TOL)


def test_refine_eta_zero_equals_no_refinement(sd64, saved64, reference):
    base = FusionConfig(steps=STEPS, refine_steps=0, **W)
    want = sample(sd64, saved64, reference, PROMPTS, base, gens(1, 2))
    for execution in ("batched", "reference"):
        got = sample(sd64, saved64, reference, PROMPTS,
                     FusionConfig(steps=STEPS, refine_steps=2, refine_eta=0.0, execution=execution, **W),
                     gens(1, 2))
        close(got, want, SAMPLE_TOL)


@pytest.mark.parametrize("refine_steps, ref_weight", [(0, 0.0), (1, 1.5), (2, 1.5)])
def test_batched_execution_equals_the_reference_execution(sd64, saved64, reference, monkeypatch, refine_steps,
                                                          ref_weight):
    monkeypatch.setattr(sampling, "fusion_noise", generator_noise)
    weights = {**W, "ref_guidance_scale": ref_weight}
    batched = sample(sd64, saved64, reference, PROMPTS, FusionConfig(steps=STEPS, refine_steps=refine_steps,
                                                                     **weights), gens(1, 2))
    official = sample(sd64, saved64, reference, PROMPTS, FusionConfig.reference(steps=STEPS, refine_steps=refine_steps,
                                                                                **weights), gens(1, 2))
    close(batched, official, SAMPLE_TOL)


@pytest.mark.parametrize("cfg, calls, samples", [
    (FusionConfig.plain(steps=STEPS), [2], 2),  # [∅, c]
    (FusionConfig(steps=STEPS, refine_steps=0), [3], 3),  # [∅, c, r]
    (FusionConfig(steps=STEPS), [2, 3], 5),  # fusion sub-step [∅, c_λ] (no r), then [∅, c, r]
    (FusionConfig(steps=STEPS, refine_steps=3), [2, 2, 2, 3], 9),  # 2m + 3
    (FusionConfig(steps=STEPS, refine_steps=3, refine_eta=0.0), [3], 3),  # η = 0 sub-steps are skipped
    (FusionConfig.reference(steps=STEPS), [1] * 6, 6),  # official: one call per condition, r also in sub-steps
    (FusionConfig.reference(steps=STEPS, refine_steps=2), [1] * 9, 9),
    (FusionConfig.plain(steps=STEPS, execution="reference"), [1, 1], 2),
], ids=["plain", "with-ref", "fusion", "fusion-m3", "fusion-eta0", "reference", "reference-m2", "reference-plain"])
def test_unet_evaluations_per_step(sd64, saved64, reference, cfg, calls, samples):
    batch = 2
    seen, handle = count_unet_samples(sd64.unet)
    try:
        sample(sd64, saved64, reference, PROMPTS, cfg, gens(1, 2))
    finally:
        handle.remove()
    per_image = [n // batch for n in seen]
    assert all(n % batch == 0 for n in seen)
    assert per_image == calls * STEPS
    assert sum(per_image) == samples * STEPS


def test_sampling_is_reproducible_from_generators(sd64, saved64, reference):
    cfg = FusionConfig(steps=STEPS)
    torch.manual_seed(100)
    a = sample(sd64, saved64, reference, PROMPTS, cfg, gens(1, 2))
    torch.manual_seed(200)  # the global RNG plays no part in batched execution
    b = sample(sd64, saved64, reference, PROMPTS, cfg, gens(1, 2))
    c = sample(sd64, saved64, reference, PROMPTS, cfg, gens(1, 3))
    assert torch.equal(a, b)
    close(c[0], a[0], SAMPLE_TOL)  # image 0 keeps its seed whatever image 1's is
    assert (c[1] - a[1]).abs().max() > 1e-3


def test_reference_execution_draws_fusion_noise_from_the_global_rng(sd64, saved64, reference):
    cfg = FusionConfig.reference(steps=STEPS)
    runs = []
    for seed in (100, 100, 200):
        torch.manual_seed(seed)
        runs.append(sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(1)))
    assert torch.equal(runs[0], runs[1]) and (runs[2] - runs[0]).abs().max() > 1e-3


def test_an_image_does_not_depend_on_its_batch(sd64, saved64, reference):
    cfg = FusionConfig(steps=STEPS, **W)
    together = sample(sd64, saved64, reference, PROMPTS, cfg, gens(1, 2))
    alone = torch.cat([sample(sd64, saved64, reference, [p], cfg, gens(s)) for p, s in zip(PROMPTS, (1, 2))])
    close(together, alone, SAMPLE_TOL)
    swapped = sample(sd64, saved64, reference, PROMPTS[::-1], cfg, gens(2, 1))
    close(swapped, together.flip(0), SAMPLE_TOL)


def test_generate_profusion_gives_image_j_seed_plus_j(sd64, saved64, reference, tmp_path):
    cfg = FusionConfig(steps=STEPS, **W)
    out = generate_profusion(sd64, saved64, reference, "a S* on the grass", cfg, seed=10, num_images=3, batch_size=2,
                             out_dir=tmp_path, progress=False)
    assert out.seeds == [10, 11, 12] and out.prompts == ["a S* on the grass"] * 3
    assert [im.size for im in out.images] == [(64, 64)] * 3
    want = sample(sd64, saved64, reference, ["a S* on the grass"] * 3, cfg, gens(10, 11, 12))
    close(out.latents.to(want.dtype), want, SAMPLE_TOL)
    assert len(out.paths) == 3 and all(p.is_file() for p in out.paths)


def test_sampling_refuses_bad_settings(sd64, saved64, reference):
    for bad in ({"refine_eta": 1.5}, {"execution": "fast"}):  # the config itself refuses a bad field
        with pytest.raises(ValueError, match=f"FusionConfig.{next(iter(bad))} = "):
            FusionConfig(steps=2, **bad)
    for cfg, prompts in [(FusionConfig(steps=2), ["a cat on the grass"]),
                         (FusionConfig(steps=2), ["a S* and a S*"])]:
        with pytest.raises(UserError) as e:
            sample(sd64, saved64, reference, prompts, cfg, gens(0))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        generate_profusion(sd64, saved64, reference, [], FusionConfig(steps=2), progress=False)


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_plain_sampling_takes_any_scheduler_and_fusion_refuses_all_but_ddim(sd64, saved64, reference, scheduler):
    # plain sampling with S* is a plug-in of the common loop: any scheduler; the fusion sub-step is DDIM's
    got = sample(sd64, saved64, reference, PROMPTS[:1], FusionConfig.plain(steps=3, scheduler=scheduler), gens(3))
    ddim = sample(sd64, saved64, reference, PROMPTS[:1], FusionConfig.plain(steps=3), gens(3))
    assert torch.isfinite(got).all() and (got - ddim).abs().max() > 1e-4
    with pytest.raises(UserError, match=re.escape(f"--scheduler {scheduler}: ProFusion samples with DDIM")) as e:
        sample(sd64, saved64, reference, PROMPTS[:1], FusionConfig(steps=3, scheduler=scheduler), gens(3))
    assert "\n" not in str(e.value) and "--no-fusion" in str(e.value)


# ------------------------------------------------------------------------------------ extra images, start timestep

@pytest.fixture(scope="module")
def second_reference():
    g = torch.Generator().manual_seed(8)
    return torch.rand(1, 3, 64, 64, generator=g) * 2 - 1


@pytest.mark.parametrize("refine_steps", [0, 1])
def test_extra_images_follow_the_official_weighting(sd64, saved64, reference, second_reference, refine_steps):
    cfg = FusionConfig(steps=STEPS, refine_steps=refine_steps, **W)
    extras = [(second_reference, 0.7), (reference.flip(-1), 1.3)]
    got = sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(3), extra_references=extras)
    with torch.no_grad():
        close(got, by_hand(sd64, saved64, reference, PROMPTS[0], cfg, 3, extras=extras), SAMPLE_TOL)
    alone = sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(3))
    assert (got - alone).abs().max() > 1e-3


def test_an_extra_image_equal_to_the_reference_adds_its_weight_to_w1(sd64, saved64, reference):
    """With the reference as its own extra image at weight w, the fusion sub-step's weighted mean is ε̃ itself and
    the main step gains w (ε(c) − ε(∅)): sampling at guidance w1 + w (posterior means: the same x_ref twice)."""
    means = SavedPromptNet(saved64.promptnet, saved64.image_encoder, {"latents": "mean"})
    for execution in ("batched", "reference"):
        cfg = FusionConfig(steps=STEPS, execution=execution, **W)
        torch.manual_seed(0)  # the reference execution's fusion noise
        got = sample(sd64, means, reference, PROMPTS[:1], cfg, gens(4), extra_references=[(reference, 2.0)])
        torch.manual_seed(0)
        want = sample(sd64, means, reference, PROMPTS[:1], replace(cfg, guidance_scale=W["guidance_scale"] + 2.0),
                      gens(4))
        close(got, want, SAMPLE_TOL)


def test_extra_images_batched_equals_the_reference_execution(sd64, saved64, reference, second_reference,
                                                             monkeypatch):
    monkeypatch.setattr(sampling, "fusion_noise", generator_noise)
    extras = [(second_reference, 0.5)]
    batched = sample(sd64, saved64, reference, PROMPTS, FusionConfig(steps=STEPS, **W), gens(1, 2),
                     extra_references=extras)
    official = sample(sd64, saved64, reference, PROMPTS, FusionConfig.reference(steps=STEPS, **W), gens(1, 2),
                      extra_references=extras)
    close(batched, official, SAMPLE_TOL)


@pytest.mark.parametrize("execution, calls", [
    ("batched", [3, 4]),  # sub-step [∅, c_λ, c_λ of the extra image], main step [∅, c, r, c of the extra image]
    ("reference", [1] * 12),  # official: [∅, c, r] per image in the sub-step and in the main step, a call each
])
def test_unet_evaluations_per_step_with_an_extra_image(sd64, saved64, reference, second_reference, execution,
                                                       calls):
    seen, handle = count_unet_samples(sd64.unet)
    try:
        sample(sd64, saved64, reference, PROMPTS, FusionConfig(steps=STEPS, execution=execution), gens(1, 2),
               extra_references=[(second_reference, 1.0)])
    finally:
        handle.remove()
    assert [n // 2 for n in seen] == calls * STEPS


def test_extra_image_weights_must_be_positive(sd64, saved64, reference):
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--extra-image weight") as e:
            sample(sd64, saved64, reference, PROMPTS[:1], FusionConfig(steps=STEPS), gens(0),
                   extra_references=[(reference, weight)])
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("cfg", [FusionConfig(steps=4, **W), FusionConfig.plain(steps=4)], ids=["fusion", "plain"])
def test_start_timestep_samples_t_up_to_it_from_the_noised_reference(sd64, saved64, reference, cfg):
    start = 600
    kept = [int(t) for t in sampling.sampler("ddim", sd64, 4).timesteps if t <= start]
    assert 0 < len(kept) < 4
    seen, handle = count_unet_samples(sd64.unet)
    try:
        got = sample(sd64, saved64, reference, PROMPTS[:1], replace(cfg, start_timestep=start), gens(3))
    finally:
        handle.remove()
    assert len(seen) == len(kept) * (1 + cfg.refine_steps)  # batched: one call per stage, stages per kept step
    with torch.no_grad():
        close(got, by_hand(sd64, saved64, reference, PROMPTS[0], cfg, 3, start=start), SAMPLE_TOL)
    assert (got - sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(3))).abs().max() > 1e-3


def test_start_timestep_is_refused_off_ddim_and_below_every_timestep(sd64, saved64, reference):
    with pytest.raises(UserError, match="--start-timestep 500 with --scheduler euler: .*pass --scheduler ddim") as e:
        sample(sd64, saved64, reference, PROMPTS[:1], FusionConfig.plain(steps=3, scheduler="euler",
                                                                         start_timestep=500), gens(0))
    assert "\n" not in str(e.value)
    trailing = DDIMScheduler.from_config(sd64.scheduler.config, timestep_spacing="trailing")
    trailing.set_timesteps(3)  # 999, 666, 332
    x = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(UserError, match="--start-timestep 300 is below every sampling timestep \\(the lowest is 332") \
            as e:
        sampling.start_from_reference(trailing, x, x, 300)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="FusionConfig.start_timestep = "):
        FusionConfig(start_timestep=1000)


def test_finetuned_attention_weights_are_used_while_sampling_and_put_back(sd64, saved64, reference):
    names = attention_weight_names(sd64.unet)
    params = dict(sd64.unet.named_parameters())
    g = torch.Generator().manual_seed(0)
    tuned = {n: params[n].detach() + 0.2 * torch.randn(params[n].shape, generator=g, dtype=torch.float64)
             for n in names}
    before = {k: v.clone() for k, v in sd64.unet.state_dict().items()}
    with_tuned = SavedPromptNet(saved64.promptnet, saved64.image_encoder, {}, tuned)
    cfg = FusionConfig(steps=2)
    got = sample(sd64, with_tuned, reference, PROMPTS[:1], cfg, gens(0))
    after = sd64.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with unet_attention_applied(sd64.unet, tuned):
        want = sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(0))
    close(got, want, 1e-12)
    assert (got - sample(sd64, saved64, reference, PROMPTS[:1], cfg, gens(0))).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ trainers (§3.4, §3.5)

PRETRAIN = {"batch": 2, "validation_prompts": (), "checkpoint_every": 100, "lr": 1e-3}


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(before, module):
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def pretrained(sd32, images_dir, tmp_path_factory):
    """A 4-step pre-training run on the SD fixture, with the pipeline's weights before it."""
    before = {name: state(getattr(sd32, name)) for name in ("unet", "vae", "text_encoder")}
    out = tmp_path_factory.mktemp("pretrain") / "run"
    result = pretrain_promptnet(sd32, images_dir, out, PretrainConfig(steps=4, **PRETRAIN), progress=False)
    return out, before, result


def test_pretraining_trains_only_the_promptnet(sd32, pretrained):
    out, before, result = pretrained
    for name, weights in before.items():
        assert same_state(weights, getattr(sd32, name)), name
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    saved = load_promptnet(out, sd32)
    assert saved.meta["stage"] == "pretrained" and saved.meta["prefix"] == "a photo of"
    assert saved.unet_attention is None and not (out / UNET_ATTENTION_FILE).exists()
    # every PromptNet weight moved away from its start: the UNet's encoder half and the new layers' seeded init
    torch.manual_seed(PretrainConfig().seed)
    start = PromptNet.from_unet(sd32.unet, saved.image_encoder.embed_dim, 768).state_dict()
    trained = saved.promptnet.state_dict()
    assert start.keys() == trained.keys()
    unchanged = [k for k in start if torch.equal(start[k], trained[k])]
    assert unchanged == []


def test_promptnet_loss_decreases_on_a_fixed_batch(sd32):
    encoder = LatentPatchEncoder()
    torch.manual_seed(0)
    net = PromptNet.from_unet(sd32.unet, encoder.embed_dim, 768)
    scheduler = DDPMScheduler.from_config(sd32.scheduler.config)
    ids, slot = training_ids(sd32.tokenizer)
    batch = fixed_batch(sd32, encoder)
    unet_before = state(sd32.unet)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    losses = []
    for _ in range(30):
        loss = promptnet_loss(sd32, scheduler, net, ids=ids, slot=slot, l2_reg=0.0, **batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.99 * losses[0]
    assert min(losses[-5:]) < min(losses[:5])
    assert same_state(unet_before, sd32.unet)


@pytest.mark.parametrize("which", ["sd", "toy"])
def test_promptnet_loss_is_the_mse_to_the_models_target_with_six_text_tokens(which, sd64, toy64):
    """ε-prediction (SD fixture) regresses the noise, v-prediction (toy) the velocity; the UNet sees x_t and the
    6-token unpadded "a photo of S*" (§3.3); l2_reg adds λ·mean(S*²)."""
    pipe = sd64 if which == "sd" else toy64
    saved = make_saved(pipe)
    net = saved.promptnet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids, slot = training_ids(pipe.tokenizer)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in fixed_batch(pipe, saved.image_encoder).items()}
    seen = {}

    def hook(module, args, output):
        seen["x"], seen["t"], seen["context"], seen["pred"] = args[0], args[1], args[2], output.sample

    handle = pipe.unet.register_forward_hook(hook)
    try:
        with torch.no_grad():
            loss = promptnet_loss(pipe, scheduler, net, ids=ids, slot=slot, l2_reg=0.0, **batch)
            loss_l2 = promptnet_loss(pipe, scheduler, net, ids=ids, slot=slot, l2_reg=0.5, **batch)
    finally:
        handle.remove()
    x_t = scheduler.add_noise(batch["target"], batch["noise"], batch["timesteps"])
    close(seen["x"], x_t, 1e-12)
    assert seen["context"].shape[:2] == (2, 6)
    velocity = scheduler.get_velocity(batch["target"], batch["noise"], batch["timesteps"])
    goal, other = (velocity, batch["noise"]) if which == "toy" else (batch["noise"], velocity)
    assert scheduler.config.prediction_type == ("v_prediction" if which == "toy" else "epsilon")
    # (the trainer takes the MSE in float32, whatever the pipeline's dtype)
    assert loss.item() == pytest.approx(((seen["pred"] - goal) ** 2).mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(((seen["pred"] - other) ** 2).mean().item(), rel=1e-3)
    with torch.no_grad():
        words = net(batch["reference"], batch["timesteps"], batch["tokens"], x_t)
    assert (loss_l2 - loss).item() == pytest.approx(0.5 * words.pow(2).mean().item(), rel=1e-5)


def test_pretraining_resumed_equals_uninterrupted(sd32, images_dir, pretrained, tmp_path):
    out, _, full = pretrained
    part = tmp_path / "resumed"
    pretrain_promptnet(sd32, images_dir, part, PretrainConfig(steps=2, **PRETRAIN), progress=False)
    resumed = pretrain_promptnet(sd32, images_dir, part, PretrainConfig(steps=4, **PRETRAIN), resume=True,
                                 progress=False)
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6)
    a = load_file(out / "diffusion_pytorch_model.safetensors")
    b = load_file(part / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)
    # the weights after 2 steps differ from those after 4: the comparison above is not vacuous
    two = load_file(part / "checkpoints" / "step-000002.safetensors")
    assert (two["param/to_word.weight"] - a["to_word.weight"]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ pre-training options

def run_pretrain(pipe, images_dir, out, steps, resume=False, **settings):
    return pretrain_promptnet(pipe, images_dir, out, PretrainConfig(steps=steps, **{**PRETRAIN, **settings}),
                              resume=resume, progress=False)


def test_ema_weights_are_what_is_saved_validated_and_exported(sd32, images_dir, tmp_path):
    """The saved folder holds the EMA (diffusers' EMAModel fed the weights after each step, as train.py --use_ema),
    each checkpoint holds it beside the raw weights, and --export-to writes it."""
    from diffusers.training_utils import EMAModel

    from conceptkit.learn.promptnet import export_pretrain_checkpoint

    out = tmp_path / "ema"
    run_pretrain(sd32, images_dir, out, 4, ema_decay=0.5, checkpoint_every=1, keep_checkpoints=10)
    steps = [load_file(out / "checkpoints" / f"step-{i:06d}.safetensors") for i in range(1, 5)]
    names = [k[len("param/"):] for k in steps[0] if k.startswith("param/")]
    torch.manual_seed(PretrainConfig().seed)
    start = dict(PromptNet.from_unet(sd32.unet, LatentPatchEncoder().embed_dim, 768).named_parameters())
    want = EMAModel([start[n].detach().clone() for n in names], decay=0.5)
    for tensors in steps:
        want.step([torch.nn.Parameter(tensors[f"param/{n}"]) for n in names])
    saved = load_file(out / "diffusion_pytorch_model.safetensors")
    raw = steps[-1]
    for n, average in zip(names, want.shadow_params):
        torch.testing.assert_close(saved[n], average, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(raw[f"ema/{n}"], average, atol=1e-6, rtol=1e-6)
    assert max((saved[n] - raw[f"param/{n}"]).abs().max().item() for n in names) > 1e-4  # not the raw weights
    assert int(raw["ema_optimization_step"].item()) == 4
    assert load_promptnet(out, sd32).meta["weights"] == {"ema_decay": 0.5, "ema_updates": 4}
    exported = export_pretrain_checkpoint(sd32, out, tmp_path / "exported")
    again = load_file(exported / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(again[n], raw[f"ema/{n}"]) for n in names)


def test_ema_run_resumed_equals_uninterrupted(sd32, images_dir, tmp_path):
    full = run_pretrain(sd32, images_dir, tmp_path / "full", 4, ema_decay=0.7)
    part = tmp_path / "part"
    run_pretrain(sd32, images_dir, part, 2, ema_decay=0.7)
    resumed = run_pretrain(sd32, images_dir, part, 4, resume=True, ema_decay=0.7)
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6)
    a = load_file(tmp_path / "full" / "diffusion_pytorch_model.safetensors")
    b = load_file(part / "diffusion_pytorch_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)


def test_an_old_run_without_ema_resumes_with_or_without_it(sd32, images_dir, tmp_path, capsys):
    """A run written before these options (its training.json names none of them, its checkpoints hold no EMA)
    resumes as it was; given --ema-decay, its EMA starts from the weights at the resumed step."""
    for name, ema in (("plain", None), ("ema", 0.5)):
        out = tmp_path / name
        run_pretrain(sd32, images_dir, out, 2)
        info = json.loads((out / "training.json").read_text())
        for key in ("mixed_precision", "gradient_checkpointing", "ema_decay", "crop"):
            del info["config"][key]
        (out / "training.json").write_text(json.dumps(info))
        capsys.readouterr()
        run_pretrain(sd32, images_dir, out, 4, resume=True, ema_decay=ema)
        meta = load_promptnet(out, sd32).meta
        if ema is None:
            assert "weights" not in meta
        else:
            assert "the EMA of the weights (--ema-decay 0.5) starts at step 2" in capsys.readouterr().err
            assert meta["weights"] == {"ema_decay": 0.5, "ema_updates": 2}
    with pytest.raises(UserError, match=r"different settings \(ema_decay\)"):  # an EMA's decay cannot change
        run_pretrain(sd32, images_dir, tmp_path / "ema", 5, resume=True, ema_decay=0.9)


def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing(sd32, images_dir, tmp_path):
    forwards = {"promptnet": 0, "unet": 0}

    def counter(key):
        def hook(module, args, output):
            forwards[key] += 1
        return hook

    # (a conv inside a block: checkpointing stops recomputing once the saved tensors are back, before the block's
    # own forward hook would run; in the UNet, after the first cross-attention, where the gradient to S* flows)
    handle = sd32.unet.down_blocks[1].resnets[0].conv1.register_forward_hook(counter("unet"))
    original = PromptNet.from_unet

    def counted(*args, **kw):
        net = original(*args, **kw)
        net.down_blocks[0].resnets[0].conv1.register_forward_hook(counter("promptnet"))
        return net

    runs = {}
    try:
        for flag in (False, True):
            forwards.update(promptnet=0, unet=0)
            PromptNet.from_unet = counted
            runs[flag] = run_pretrain(sd32, images_dir, tmp_path / str(flag), 2, gradient_checkpointing=flag)
            runs[flag, "forwards"] = dict(forwards)
    finally:
        PromptNet.from_unet = original
        handle.remove()
    # one forward per step without it; with it, the forward again in the backward pass
    assert runs[False, "forwards"] == {"promptnet": 2, "unet": 2}
    assert runs[True, "forwards"] == {"promptnet": 4, "unet": 4}
    np.testing.assert_allclose(runs[True].losses, runs[False].losses, rtol=1e-6)
    a = load_file(tmp_path / "False" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "True" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not sd32.unet.is_gradient_checkpointing  # the pipeline is given back as it was


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_autocasts_the_loss_and_keeps_fp32_weights(sd32, images_dir, pretrained, tmp_path,
                                                                   precision):
    _, _, full = pretrained
    out = tmp_path / precision
    result = run_pretrain(sd32, images_dir, out, 4, mixed_precision=precision)
    assert all(math.isfinite(x) for x in result.losses)
    # the same batches as the fp32 run: close losses, but not the same arithmetic
    np.testing.assert_allclose(result.losses, full.losses, rtol=0.05)
    assert result.losses != full.losses
    assert {v.dtype for v in load_file(out / "diffusion_pytorch_model.safetensors").values()} == {torch.float32}
    checkpoint = load_file(out / "checkpoints" / "step-000004.safetensors")
    assert ("amp/scale" in checkpoint) == (precision == "fp16")  # the loss scaler's state, for a resume
    if precision == "fp16":
        assert checkpoint["amp/scale"].item() > 1


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory):
    """Two 96x64 images: a square crop of either depends on where it is taken."""
    return write_noise_images(tmp_path_factory.mktemp("wide") / "images", 2, 64, 96, seed=1)


def pretrain_targets(pipe, images, out, monkeypatch, steps=3, resume=False, **settings):
    """The target latents of every training batch of a pre-training run (posterior means, no flips)."""
    from conceptkit.learn import promptnet as trainer

    seen = []
    real = trainer.promptnet_loss

    def spy(*args, **kw):
        seen.append(kw["target"].clone())
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "promptnet_loss", spy)
    run_pretrain(pipe, images, out, steps, resume=resume, latents="mean", **settings)
    monkeypatch.setattr(trainer, "promptnet_loss", real)
    return seen


def vae_mean(pipe, image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mean[0] * pipe.vae.config.scaling_factor


def crops_of(path, size=64):
    """Every square window of the image resized to a shorter side of `size` (bicubic), left to right."""
    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return [image.crop((x, 0, x + size, size)) for x in range(image.width - size + 1)]


@pytest.mark.parametrize("crop", ["squash", "center"])
def test_squash_and_center_crop_train_on_the_whole_image_or_its_centre(sd32, wide_images, tmp_path, monkeypatch,
                                                                       crop):
    targets = pretrain_targets(sd32, wide_images, tmp_path / crop, monkeypatch, steps=2, crop=crop)
    files = sorted(wide_images.iterdir())
    squashed = [vae_mean(sd32, Image.open(f).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
                for f in files]
    centred = [vae_mean(sd32, Image.open(f).convert("RGB").crop((16, 0, 80, 64))) for f in files]
    want = squashed if crop == "squash" else centred
    other = centred if crop == "squash" else squashed
    for batch in targets:
        for latent in batch:
            assert min((latent - w).abs().max().item() for w in want) < 1e-4
            assert min((latent - w).abs().max().item() for w in other) > 1e-2


def test_random_crops_are_windows_of_the_resized_image_at_drawn_offsets(sd32, wide_images, tmp_path, monkeypatch):
    targets = pretrain_targets(sd32, wide_images, tmp_path / "random", monkeypatch, steps=4, crop="random")
    windows = {(f.name, x): vae_mean(sd32, c) for f in sorted(wide_images.iterdir()) for x, c in enumerate(crops_of(f))}
    found = []
    for batch in targets:
        for latent in batch:
            key, distance = min(((k, (latent - w).abs().max().item()) for k, w in windows.items()),
                                key=lambda kv: kv[1])
            assert distance < 1e-4  # exactly one of the windows
            found.append(key)
    assert len({x for _, x in found}) > 2  # at several offsets, not always the centre (16)
    assert not (tmp_path / "random" / "latent_cache.safetensors").exists()  # encoded per step, never cached


def test_random_crop_run_resumed_takes_the_same_crops(sd32, wide_images, tmp_path, monkeypatch):
    full = pretrain_targets(sd32, wide_images, tmp_path / "full", monkeypatch, steps=4, crop="random")
    pretrain_targets(sd32, wide_images, tmp_path / "part", monkeypatch, steps=2, crop="random")
    rest = pretrain_targets(sd32, wide_images, tmp_path / "part", monkeypatch, steps=4, resume=True, crop="random")
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:]))


def test_random_crop_refuses_an_unreadable_or_small_image_before_training(sd32, wide_images, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(wide_images, folder)
    (folder / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read bad\.png") as e:
        run_pretrain(sd32, folder, tmp_path / "out", 2, crop="random")
    (folder / "bad.png").unlink()
    Image.new("RGB", (80, 40)).save(folder / "small.png")
    with pytest.raises(UserError, match=r"small\.png \(80x40\) smaller than the training resolution 64") as e:
        run_pretrain(sd32, folder, tmp_path / "out", 2, crop="random")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_second_run_into_the_same_folder_needs_resume(sd32, images_dir, pretrained):
    out, _, _ = pretrained
    with pytest.raises(UserError, match="--resume") as e:
        pretrain_promptnet(sd32, images_dir, out, PretrainConfig(steps=4, **PRETRAIN), progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="different settings"):
        pretrain_promptnet(sd32, images_dir, out, PretrainConfig(steps=4, **{**PRETRAIN, "lr": 5e-4}), resume=True,
                           progress=False)


def test_load_promptnet_refuses_another_architecture(pretrained, toy64, tmp_path):
    out, _, _ = pretrained
    with pytest.raises(UserError) as e:
        load_promptnet(out, toy64)
    assert "\n" not in str(e.value) and "model" in str(e.value)
    with pytest.raises(UserError):
        load_promptnet(tmp_path, toy64)  # not a PromptNet folder


@pytest.fixture(scope="module")
def finetuned(sd32, pretrained, images_dir, tmp_path_factory):
    """A 3-step fine-tuning run, with which UNet weights differed from the pipeline's at any UNet call during it."""
    base = load_promptnet(pretrained[0], sd32)
    base_state = state(base.promptnet)
    before = {name: state(getattr(sd32, name)) for name in ("unet", "vae", "text_encoder")}
    originals = dict(sd32.unet.named_parameters())
    changed = set()

    def hook(module, args, kwargs):
        changed.update(n for n, p in originals.items() if not torch.equal(p, before["unet"][n]))

    handle = sd32.unet.register_forward_pre_hook(hook, with_kwargs=True)
    out = tmp_path_factory.mktemp("finetune") / "run"
    try:
        finetune_promptnet(sd32, base, images_dir / "0.png", out,
                           FinetuneConfig(steps=3, batch=2, copies=4, lr=1e-3), progress=False)
    finally:
        handle.remove()
    return out, base, base_state, before, changed


def test_finetuning_trains_promptnet_and_qkv_only_and_restores_the_pipeline(sd32, finetuned):
    out, base, base_state, before, changed = finetuned
    names = set(attention_weight_names(sd32.unet))
    # every to_q/to_k/to_v of every attention layer (self and cross), nothing else
    attention_layers = [n for n, m in sd32.unet.named_modules() if isinstance(m, Attention)]
    assert names == {f"{layer}.{p}.weight" for layer in attention_layers for p in ("to_q", "to_k", "to_v")}
    assert changed == names
    for name, weights in before.items():
        assert same_state(weights, getattr(sd32, name)), name
    assert not any(p.requires_grad for p in sd32.unet.parameters())
    assert same_state(base_state, base.promptnet)  # the pre-trained PromptNet is not modified
    tuned = load_file(out / UNET_ATTENTION_FILE)
    assert set(tuned) == names and not any("to_out" in n for n in tuned)
    assert all(not torch.equal(tuned[n], before["unet"][n]) for n in names)
    saved = load_promptnet(out, sd32)
    assert saved.meta["stage"] == "finetuned" and saved.reference_path is not None
    assert set(saved.unet_attention) == names
    trained = saved.promptnet.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in base_state.items())
    with pytest.raises(UserError, match="already fine-tuned"):
        finetune_promptnet(sd32, saved, saved.reference_path, out.parent / "again", FinetuneConfig(steps=1),
                           progress=False)
    assert same_state(before["unet"], sd32.unet)


class Interrupted(Exception):
    pass


def test_finetuning_interrupted_then_resumed_equals_uninterrupted(sd32, finetuned, images_dir, tmp_path):
    out, base, _, before, _ = finetuned
    cfg = FinetuneConfig(steps=3, batch=2, copies=4, lr=1e-3, checkpoint_every=1)
    calls = []

    def interrupt(module, args, kwargs):  # one UNet call per step: stop during step 3
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    handle = sd32.unet.register_forward_pre_hook(interrupt, with_kwargs=True)
    try:
        with pytest.raises(Interrupted):
            finetune_promptnet(sd32, base, images_dir / "0.png", tmp_path / "r", cfg, progress=False)
    finally:
        handle.remove()
    assert same_state(before["unet"], sd32.unet)  # put back even when the run dies
    assert (tmp_path / "r" / "checkpoints" / "step-000002.safetensors").is_file()
    finetune_promptnet(sd32, base, images_dir / "0.png", tmp_path / "r", cfg, resume=True, progress=False)
    for file in ("diffusion_pytorch_model.safetensors", UNET_ATTENTION_FILE):
        a, b = load_file(out / file), load_file(tmp_path / "r" / file)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)
    assert same_state(before["unet"], sd32.unet)


def test_finetuning_keeps_the_pretrained_folders_recommended_fusion_settings(sd32, pretrained, images_dir, tmp_path):
    """`generate --promptnet FINETUNED` must sample with what the pre-trained folder recommends, as evaluate does."""
    import json
    import shutil

    folder = tmp_path / "pretrained"
    shutil.copytree(pretrained[0], folder)
    meta = json.loads((folder / "promptnet.json").read_text())
    meta["fusion_settings"] = {"guidance_scale": 5.0, "ref_guidance_scale": 0.0}
    (folder / "promptnet.json").write_text(json.dumps(meta))
    base = load_promptnet(folder, sd32)
    finetune_promptnet(sd32, base, images_dir / "0.png", tmp_path / "ft", FinetuneConfig(steps=1, batch=1, copies=2),
                       progress=False)
    tuned = load_promptnet(tmp_path / "ft", sd32)
    assert sampling.recommended_fusion(tuned) == sampling.recommended_fusion(base) != FusionConfig()


def test_augment_copies(sd32):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    none = augment_copies(image, FinetuneConfig(copies=5, augment="none"), 0)
    assert none.shape == (5, 3, 32, 32) and all(torch.equal(c, image[0]) for c in none)
    flips = augment_copies(image, FinetuneConfig(copies=16, augment="flip"), 0)
    assert all(torch.equal(c, image[0]) or torch.equal(c, image[0].flip(-1)) for c in flips)
    assert any(torch.equal(c, image[0].flip(-1)) for c in flips)
    affine = augment_copies(image, FinetuneConfig(copies=6), 3)
    assert torch.equal(affine[0], image[0]) and torch.equal(affine, augment_copies(image, FinetuneConfig(copies=6), 3))
    assert all((c - image[0]).abs().max() > 1e-3 for c in affine[1:])
    assert affine.min() >= image.min() - 1e-6 and affine.max() <= image.max() + 1e-6  # border fill, no new colours
    with pytest.raises(ValueError, match="FinetuneConfig.augment = 'mixup'"):
        FinetuneConfig(copies=3, augment="mixup")
    flipped = []
    flips_again = augment_copies(image, FinetuneConfig(copies=16, augment="flip"), 0, flipped)
    assert torch.equal(flips_again, flips) and len(flipped) == 16 and not flipped[0]
    assert flipped == [torch.equal(c, image[0].flip(-1)) for c in flips]


def test_mirrored_caption_swaps_left_and_right_words_only():
    assert mirrored_caption("a S* on the left and a square on the right, on a navy background") == \
        "a S* on the right and a square on the left, on a navy background"
    assert mirrored_caption("a large S* in the center, on a brown background, leftover") == \
        "a large S* in the center, on a brown background, leftover"
    with pytest.raises(ValueError, match="names S\\* 0 times"):
        FinetuneConfig(caption="a photo of an object")


def test_captioned_finetuning_trains_on_each_copy_s_own_caption(sd32, pretrained, images_dir, tmp_path, monkeypatch):
    """--caption: every row's prompt is the caption of its target copy (mirrored copies: left and right swapped),
    never the prefix prompt."""
    seen = []
    loss = promptnet_training.promptnet_loss

    def spy(pipe, scheduler, promptnet, *, ids, slot, **kw):
        seen.append((ids.clone(), slot))
        return loss(pipe, scheduler, promptnet, ids=ids, slot=slot, **kw)

    monkeypatch.setattr(promptnet_training, "promptnet_loss", spy)
    caption = "a large S* on the left, on a gray background"
    base = load_promptnet(pretrained[0], sd32)
    finetune_promptnet(sd32, base, images_dir / "0.png", tmp_path / "run",
                       FinetuneConfig(steps=3, batch=4, copies=8, augment="flip", caption=caption), progress=False)
    texts = [sd32.tokenizer.decode([t for t in row.tolist() if t not in (sd32.tokenizer.bos_token_id,
                                                                         sd32.tokenizer.pad_token_id,
                                                                         sd32.tokenizer.eos_token_id)])
             for ids, _ in seen for row in ids]
    assert len(seen) == 3 and all(ids.ndim == 2 and len(ids) == 4 for ids, _ in seen)
    words = [set(t.split()) for t in texts]
    assert all({"large", "gray", "background"} <= w and "photo" not in w for w in words), texts
    assert any("left" in w for w in words) and any("right" in w for w in words), texts  # mirrored copies drawn


# ------------------------------------------------------------------------------------ CLIP vision encoder

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=30, patch_size=10))
    folder = tmp_path_factory.mktemp("clip") / "vision"
    model.save_pretrained(folder)
    return folder


def test_clip_vision_encoder_gives_last_hidden_state_of_normalised_pixels(clip_dir):
    encoder = ClipVisionEncoder(clip_dir)
    assert encoder.embed_dim == 32
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 30, 30, generator=g) * 2 - 1
    tokens = encoder(pixels, None)
    assert tokens.shape == (2, 10, 32)  # 3x3 patches + CLS
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = encoder.model(pixel_values=((pixels + 1) / 2 - mean) / std).last_hidden_state
    close(tokens, want, 1e-5)
    assert encoder(torch.rand(1, 3, 64, 64) * 2 - 1, None).shape == (1, 10, 32)  # resized to the model's size
    again = load_image_encoder(encoder.describe())
    assert torch.equal(again(pixels, None), tokens)


def test_clip_vision_encoder_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="CLIP vision") as e:
        ClipVisionEncoder(tmp_path)
    assert "\n" not in str(e.value)


def test_promptnet_on_clip_tokens_samples_on_the_sd_fixture(sd64, clip_dir, reference):
    saved = make_saved(sd64, encoder=ClipVisionEncoder(clip_dir))
    assert saved.promptnet.config.image_embed_dim == 32
    cfg = FusionConfig(steps=STEPS, **W)
    got = sample(sd64, saved, reference, PROMPTS[:1], cfg, gens(3))
    with torch.no_grad():
        close(got, by_hand(sd64, saved, reference, PROMPTS[0], cfg, 3), SAMPLE_TOL)

    class Blank:
        def __call__(self, pixels, latents):
            return torch.zeros(pixels.shape[0], 10, 32)

    blank = sample(sd64, SavedPromptNet(saved.promptnet, Blank(), {}), reference, PROMPTS[:1], cfg, gens(3))
    assert (blank - got).abs().max() > 1e-3  # the image tokens reach S*
