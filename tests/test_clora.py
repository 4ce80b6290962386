"""CLoRA (ALGORITHMS.md §2) and its baselines: the §4 invariants, batched == sequential, prompt building."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft import LoraConfig

from conceptkit.compose.attention import AttentionStore, capturing
from conceptkit.compose.config import CLoRAConfig
from conceptkit.compose.contrastive import clora_loss, ntxent
from conceptkit.compose.masks import attention_masks, blend
from conceptkit.compose.prompts import ConceptSlot, branch_prompts
from conceptkit.compose.branches import BranchModel, Branches, encode_branches
from conceptkit.compose.sampler import method_branches, sample
from conceptkit.errors import UserError
from conceptkit.models.loading import load_pipeline, toy_model_path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_random_lora(pipe, name: str, seed: int, text_encoder: bool = True) -> None:
    """A LoRA with non-zero random up and down weights (PEFT's init_lora_weights=False), so it changes outputs."""
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False),
                          adapter_name=name)
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS,
                                                 init_lora_weights=False), adapter_name=name)


@pytest.fixture(scope="module")
def toy_two():
    pipe = load_pipeline("toy")
    add_random_lora(pipe, "a", 1)
    add_random_lora(pipe, "b", 2)
    bp = branch_prompts(pipe.tokenizer, "a {a} on the left and a {b} on the right, on a gray background",
                        [ConceptSlot("a", "zwx", "circle"), ConceptSlot("b", "qrv", "square")])
    return pipe, bp


@pytest.fixture(scope="module")
def sd_two(sd_tiny_dir):
    pipe = load_pipeline(str(sd_tiny_dir))
    add_random_lora(pipe, "a", 3)
    add_random_lora(pipe, "b", 4)
    bp = branch_prompts(pipe.tokenizer, "a {a} and a {b} on the grass",
                        [ConceptSlot("a", "sks", "cat"), ConceptSlot("b", "zwx", "dog")])
    return pipe, bp


# ---------------------------------------------------------------- prompts and token indices (§2.2)

def test_token_indices_follow_the_notebook_rule_with_the_clip_tokenizer(sd_two):
    pipe, bp = sd_two
    assert bp.prompts == ["a cat and a dog on the grass", "a sks cat and a dog on the grass",
                          "a cat and a zwx dog on the grass"]
    # concept "a" (cat): bare noun in P0 and P2, trigger+noun in P1; concept "b" (dog) likewise in P2
    # "sks" is one CLIP token, "zwx" two ("zw", "x"): a slot's span holds all of them
    assert bp.groups == [[[2], [2, 3], [2]], [[5], [6], [5, 6, 7]]]
    assert bp.mask_indices == [[], [2, 3], [5, 6, 7]]
    for c, word in enumerate(["cat", "dog"]):
        for p, prompt in enumerate(bp.prompts):
            ids = pipe.tokenizer(prompt).input_ids
            assert pipe.tokenizer.convert_ids_to_tokens(ids[bp.groups[c][p][-1]]) == word + "</w>"
    assert bp.merged_prompt == "a sks cat and a zwx dog on the grass"


def test_prompt_errors_are_one_line(sd_two):
    tok = sd_two[0].tokenizer
    cat = ConceptSlot("cat", "sks", "cat")
    for template, concepts, words in [
        ("a photo", [cat], "no concept slot"),
        ("a {cat} and a {cat}", [cat], "twice"),
        ("a {cat} and a {dog}", [cat], "{dog} has no concept"),
        ("a {cat}", [cat, ConceptSlot("dog", None, "dog")], "'dog' has no slot"),
        ("a {cat}s", [cat], "spaces around"),
    ]:
        with pytest.raises(UserError, match=words) as e:
            branch_prompts(tok, template, concepts)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- attention capture (§4 CLoRA 1)

@pytest.mark.parametrize("res, layers", [(8, 3), (4, 3), (2, 3)])
def test_capture_stores_exactly_the_layers_at_the_resolution_and_maps_sum_to_one(sd_two, res, layers):
    pipe, _ = sd_two
    store = AttentionStore((res, res))
    x = torch.randn(2, 4, 8, 8)
    emb = torch.randn(2, 77, 768)
    with capturing(pipe.unet, store), torch.no_grad():
        pipe.unet(x, 10, encoder_hidden_states=emb)
    assert len(store.maps) == layers
    assert all(m.shape == (2, 8, res * res, 77) for m in store.maps)  # (batch, heads, Q, tokens)
    maps = store.aggregate([[0], [0, 1]])
    assert maps.shape == (2, res, res, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, res, res))


def test_capture_changes_nothing_but_records(sd_two):
    pipe, _ = sd_two
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768)
    with torch.no_grad():
        plain = pipe.unet(x, 10, encoder_hidden_states=emb).sample
        with capturing(pipe.unet, AttentionStore((8, 8))):
            captured = pipe.unet(x, 10, encoder_hidden_states=emb).sample
        with capturing(pipe.unet, AttentionStore((8, 8)), explicit_everywhere=True):
            explicit = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, plain, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- NT-Xent (§4 CLoRA 2)

def ntxent_by_the_formula(e, labels, tau):
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = e @ e.T
    terms = []
    for i in range(len(labels)):
        negatives = [k for k in range(len(labels)) if labels[k] != labels[i]]
        for j in range(len(labels)):
            if j != i and labels[j] == labels[i]:
                num = math.exp(s[i, j] / tau)
                den = num + sum(math.exp(s[i, k] / tau) for k in negatives)
                terms.append(-math.log(num / den + torch.finfo(torch.float64).tiny))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("labels", [[0, 0, 1, 1], [0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 0, 2, 2, 0]])
def test_ntxent_matches_the_reference_formula(labels):
    g = torch.Generator().manual_seed(len(labels))
    e = torch.rand(len(labels), 16, generator=g, dtype=torch.float64)
    got = ntxent(e, torch.tensor(labels), 0.5)
    assert got.item() == pytest.approx(ntxent_by_the_formula(e, labels, 0.5), rel=1e-10)


def test_ntxent_special_cases():
    e = torch.rand(6, 9, dtype=torch.float64).requires_grad_()
    # a single group: L = 0 with zero gradient
    loss = ntxent(e, torch.zeros(6, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.all(e.grad == 0)
    # identical embeddings: every term is log(1 + |N(i)|)
    same = torch.ones(6, 9, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert ntxent(same, labels).item() == pytest.approx(math.log(1 + 3))
    # swapping the group labels leaves L unchanged
    x = torch.rand(6, 9, dtype=torch.float64)
    assert ntxent(x, labels).item() == pytest.approx(ntxent(x, 1 - labels).item())


def test_clora_loss_is_invariant_to_scaling_and_shifting_a_map():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 4, 77, generator=g, dtype=torch.float64)
    groups = [[[2], [2, 3], [2]], [[5], [6], [5, 6]]]
    base = clora_loss(maps, groups)
    changed = maps.clone()
    changed[1, :, :, 3] = changed[1, :, :, 3] * 7.5 + 0.25
    assert clora_loss(changed, groups).item() == pytest.approx(base.item(), rel=1e-9)
    changed[1, :, :, 3] = changed[1, :, :, 3].flip(0)  # a real change moves it
    assert clora_loss(changed, groups).item() != pytest.approx(base.item(), rel=1e-6)


# ---------------------------------------------------------------- masks and blending (§4 CLoRA 4-6)

def test_masks_are_binary_cover_every_pixel_and_fall_back_to_the_base_branch():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 4, 4, 77, generator=g)
    indices = [[], [2, 3], [6]]
    m = attention_masks(maps, indices, (16, 16), threshold=0.6)
    assert m.shape == (3, 1, 4, 16, 16)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(m == m[:, :, :1])  # constant over channels
    assert torch.all(m.sum(0) >= 1)
    others_empty = m[1:].sum(0) == 0
    assert torch.all(m[0][others_empty] == 1)
    blocks = m[:, 0, 0].reshape(3, 4, 4, 4, 4)  # r | h: constant on (h/r)x(w/r) blocks
    assert torch.all(blocks == blocks[:, :, :1, :, :1])
    # alpha >= 1: every concept mask is empty, the base branch covers everything
    empty = attention_masks(maps, indices, (16, 16), threshold=1.0)
    assert torch.all(empty[1:] == 0) and torch.all(empty[0] == 1)
    # dilation ⊇ mask ⊇ erosion
    plain = attention_masks(maps, indices, (4, 4), threshold=0.6)[1:]
    assert torch.all(attention_masks(maps, indices, (4, 4), threshold=0.6, dilation=True)[1:] >= plain)
    assert torch.all(attention_masks(maps, indices, (4, 4), threshold=0.6, erosion=True)[1:] <= plain)


def test_or_masks_equal_each_token_thresholded_then_ored_and_sum_masks_weigh_tokens_by_attention():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 4, 4, 10, generator=g)
    indices = [[], [2, 3], [6]]
    ored = torch.zeros(4, 4)
    for k in (2, 3):
        ored = torch.maximum(ored, (maps[1, :, :, k] > 0.5 * maps[1, :, :, k].max()).float())
    assert torch.equal(attention_masks(maps, indices, (4, 4), threshold=0.5)[1, 0, 0], ored)
    # a token the model hardly attends to (an untrained trigger) adds its noise to "or", almost nothing to "sum"
    maps[1, :, :, 2] *= 0.01
    summed = maps[1, :, :, 2] + maps[1, :, :, 3]
    expected = (summed > 0.5 * summed.max()).float()
    assert torch.equal(attention_masks(maps, indices, (4, 4), threshold=0.5, combine="sum")[1, 0, 0], expected)


def test_exclusive_masks_never_overlap_and_give_each_pixel_to_the_highest_score():
    maps = torch.zeros(3, 4, 4, 10)
    maps[1, :, :2, 2] = 1.0  # concept 1 attends to the left half, a little everywhere
    maps[1, :, 2:, 2] = 0.3
    maps[2, :, 2:, 6] = 1.0  # concept 2 to the right half
    maps[2, :, :2, 6] = 0.2
    indices = [[], [2], [6]]
    shared = attention_masks(maps, indices, (4, 4), threshold=0.1)[:, 0, 0]
    assert (shared[1] * shared[2]).sum() == 16  # both masks cover everything: the branches are averaged
    alone = attention_masks(maps, indices, (4, 4), threshold=0.0, exclusive=True)[:, 0, 0]
    assert torch.all(alone[1, :, :2] == 1) and torch.all(alone[1, :, 2:] == 0)
    assert torch.all(alone[2, :, 2:] == 1) and torch.all(alone[2, :, :2] == 0)
    assert torch.all(alone[0] == 0)  # threshold 0: the concepts partition the image, nothing left to the base


def test_mask_settings_are_checked():
    for bad in (dict(mask_combine="and"), dict(mask_combine="")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CLoRAConfig(**bad)


def test_blend_of_equal_predictions_is_that_prediction():
    eps = torch.randn(1, 4, 8, 8).expand(3, 4, 8, 8)
    masks = (torch.rand(3, 1, 4, 8, 8) > 0.5).float()
    masks[0] = torch.where(masks.sum(0) == 0, 1.0, masks[0])
    torch.testing.assert_close(blend(eps, masks), eps[:1])


# ---------------------------------------------------------------- the sampler

def run(pipe, bp, method, cfg, seed=0, adapters=("a", "b"), lora_ends=None):
    sets, updates, masks, switch = method_branches(method, bp, list(adapters), cfg)
    return sample(pipe, sets, cfg, groups=bp.groups if updates else None,
                  mask_indices=bp.mask_indices if masks else None, generator=torch.Generator().manual_seed(seed),
                  switch_every=switch, lora_ends=lora_ends)


def test_batched_path_equals_the_sequential_path_on_the_bundled_model(toy_two):
    pipe, bp = toy_two
    cfg = CLoRAConfig(steps=6, iterative_steps=(0,), iterative_steps_steps=2, step_size=20.0)
    batched = run(pipe, bp, "clora", cfg)
    sequential = run(pipe, bp, "clora", CLoRAConfig(**{**cfg.__dict__, "execution": "sequential"}))
    assert batched.trace.losses == pytest.approx(sequential.trace.losses, rel=1e-5)
    torch.testing.assert_close(batched.latents, sequential.latents, atol=1e-4, rtol=1e-4)
    assert batched.unet_calls < sequential.unet_calls


def test_stopping_the_update_forward_after_the_maps_changes_nothing_and_skips_later_blocks(toy_two):
    pipe, bp = toy_two
    cfg = CLoRAConfig(steps=6, iterative_steps=(0,), iterative_steps_steps=2, step_size=20.0)
    ran = []  # the last up block runs in whole forwards only
    hook = pipe.unet.up_blocks[-1].register_forward_hook(lambda *_: ran.append(1))
    try:
        stopped = run(pipe, bp, "clora", cfg)
        stopped_calls, ran_stopped = stopped.unet_calls, len(ran)
        ran.clear()
        whole = run(pipe, bp, "clora", dataclasses.replace(cfg, stop_after_maps=False))
    finally:
        hook.remove()
    assert stopped.trace.losses == whole.trace.losses  # the same maps, so the same loss and gradient: bitwise
    assert torch.equal(stopped.latents, whole.latents)
    # 3 updates + 2 refinements: 5 forwards stop early (the first runs whole: it counts the mapped layers)
    assert stopped_calls == whole.unet_calls and len(ran) - ran_stopped == 4
    assert CLoRAConfig.reference().stop_after_maps is False


def test_lora_end_is_diffusers_control_guidance_end_rule():
    from conceptkit.generate.loop import lora_acts

    assert [lora_acts(i, 30, 0.5) for i in range(30)] == [True] * 15 + [False] * 15
    assert all(lora_acts(i, 30, 1.0) for i in range(30))
    assert [lora_acts(i, 6, 1 / 3) for i in range(6)] == [True, True] + [False] * 4
    with pytest.raises(ValueError, match="lora_end"):
        CLoRAConfig(lora_end=0)


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_a_branch_model_with_an_adapter_off_runs_the_others_as_before(toy_two, execution):
    pipe, _ = toy_two
    cfg = CLoRAConfig(execution=execution)
    prompts = ["a circle on the left", "a zwx circle on the left"]
    both = Branches(prompts, ["", ""], [{"b": 0.8}, {"a": 1.0, "b": 0.8}])  # b plays a style LoRA
    b_only = Branches(prompts, ["", ""], [{"b": 0.8}, {"b": 0.8}])
    embeddings = encode_branches(pipe, both, cfg, "b")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def eps(branches, **kw):
        store = AttentionStore((8, 8))
        with capturing(pipe.unet, store), torch.no_grad():
            return BranchModel(pipe, branches, embeddings, cfg, store)(z, torch.tensor(500), **kw)[:2]

    off, reference, on = eps(both, off=frozenset({"a"})), eps(b_only), eps(both)
    for got, want in zip(off, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (on[1][1] - off[1][1]).abs().max() > 1e-3  # concept a's branch: its LoRA was on, then off
    torch.testing.assert_close(on[1][0], off[1][0], atol=1e-5, rtol=1e-5)  # the base branch never had it


def test_the_sampler_turns_each_lora_off_after_its_end(toy_two, monkeypatch):
    pipe, bp = toy_two
    cfg = CLoRAConfig(steps=6, max_iter_to_alter=2, iterative_steps=())
    calls = []
    call = BranchModel.__call__
    monkeypatch.setattr(BranchModel, "__call__", lambda self, *a, **kw: calls.append(kw.get("off", frozenset())) or
                        call(self, *a, **kw))

    def offs(cfg, **kw):
        calls.clear()
        result = run(pipe, bp, "clora", cfg, **kw)
        return [sorted(o) for o in calls], result

    # steps 0 and 1: the latent update's forward, then the prediction; steps 2-5: the prediction only
    got, half = offs(dataclasses.replace(cfg, lora_end=0.5))
    assert got == [[]] * 5 + [["a", "b"]] * 3
    got, _ = offs(cfg, lora_ends={"b": 0.5})  # one LoRA's own end; the other at the config's (1)
    assert got == [[]] * 5 + [["b"]] * 3
    got, _ = offs(dataclasses.replace(cfg, lora_end=0.5), lora_ends={"a": 1.0})  # its own end wins
    assert got == [[]] * 5 + [["b"]] * 3
    got, whole = offs(cfg)
    assert got == [[]] * 8
    assert not torch.allclose(whole.latents, half.latents, atol=1e-3)


def test_generate_lora_end_runs_the_unet_without_its_loras_after_it(toy_two):
    from conceptkit.generate.loop import Step
    from conceptkit.generate.plain import PromptModel, adapters_disabled

    pipe, _ = toy_two
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ended = PromptModel(pipe, ["a circle on the left"], None, 7.5, lora_end=0.5, steps=4)
    plain = PromptModel(pipe, ["a circle on the left"], None, 7.5)

    def at(model, i):
        with torch.no_grad():
            return model(z, Step(i, torch.tensor(500), pipe.scheduler, None))

    with adapters_disabled(pipe.unet):
        base = at(plain, 3)
    lora = at(plain, 3)
    assert (lora - base).abs().max() > 1e-3  # the LoRA is on outside the context
    torch.testing.assert_close(at(ended, 1), lora)  # step 2 of 4: inside the first half
    torch.testing.assert_close(at(ended, 2), base)  # step 3 of 4: past it
    with pytest.raises(ValueError, match="steps"):
        PromptModel(pipe, ["a circle"], None, 7.5, lora_end=0.5)


def loss_and_gradient(pipe, bp, execution):
    cfg = CLoRAConfig(execution=execution)
    sets, *_ = method_branches("clora", bp, ["a", "b"], cfg)
    store = AttentionStore((8, 8))
    model = BranchModel(pipe, sets[0], encode_branches(pipe, sets[0], cfg, None), cfg, store)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with capturing(pipe.unet, store):
        eps_u, eps_c, maps = model(z, torch.tensor(900))
        loss = clora_loss(maps, bp.groups)
        (grad,) = torch.autograd.grad(loss, z)
    return eps_u.detach(), eps_c.detach(), loss.detach(), grad


def test_batched_path_equals_the_sequential_path_on_the_sd_fixture(sd_two):
    pipe, bp = sd_two
    # float32: one step's predictions, loss and latent gradient agree
    for got, want in zip(loss_and_gradient(pipe, bp, "batched"), loss_and_gradient(pipe, bp, "sequential")):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_batched_path_equals_the_sequential_path_on_the_sd_fixture_in_float64(sd_tiny_dir):
    # Whole runs: the random fixture is not a denoiser, so sampling it amplifies any rounding difference about
    # tenfold per step (CPU kernels round differently at batch 6 and batch 2); the whole-run comparison is made in
    # float64 without latent updates (masks on), where the two paths agree to ~1e-10. With updates, the min-max
    # normalisation of this model's near-uniform maps has near-tied argmin/argmax pixels, so runs part after a
    # step; the one-step gradient test above and the bundled model's whole-run test cover the update path.
    pipe = load_pipeline(str(sd_tiny_dir))
    add_random_lora(pipe, "a", 3)
    add_random_lora(pipe, "b", 4)
    pipe.to(torch.float64)
    bp = branch_prompts(pipe.tokenizer, "a {a} and a {b} on the grass",
                        [ConceptSlot("a", "sks", "cat"), ConceptSlot("b", "zwx", "dog")])
    for method in ["clora", "composite"]:
        cfg = CLoRAConfig(steps=3, latent_update=False)
        batched = run(pipe, bp, method, cfg)
        sequential = run(pipe, bp, method, CLoRAConfig(**{**cfg.__dict__, "execution": "sequential"}))
        torch.testing.assert_close(batched.latents, sequential.latents, atol=1e-7, rtol=1e-7)


def test_one_branch_with_a_lora_equals_plain_diffusers_sampling(toy_two):
    # §4 CLoRA 5: K=1 (one prompt, its LoRA active in the UNet and the text encoder), no update, no masks
    pipe, _ = toy_two
    cfg = CLoRAConfig(steps=5, guidance_scale=6.0)
    branches = Branches(["a photo of a red circle"], [""], [{"a": 1.0}])
    ours = sample(pipe, [branches], cfg, groups=None, mask_indices=None, generator=torch.Generator().manual_seed(3))
    plain = StableDiffusionPipeline.from_pretrained(toy_model_path(), torch_dtype=torch.float32)
    add_random_lora(plain, "a", 1)
    plain.set_adapters(["a"])
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    seen = {}

    def keep(_pipe, _i, _t, kwargs):
        seen["latents"] = kwargs["latents"]
        return kwargs

    plain("a photo of a red circle", num_inference_steps=5, guidance_scale=6.0,
          generator=torch.Generator().manual_seed(3), output_type="latent", callback_on_step_end=keep)
    torch.testing.assert_close(ours.latents, seen["latents"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheduler", ["dpm++", "euler", "euler-a", "pndm"])
def test_one_plain_branch_equals_plain_generation_with_every_scheduler(scheduler):
    # the composition runs on the same loop as `generate`: sigma-scaled schedulers see the scaled latent, Euler-a
    # draws its noise from the image's generator
    from conceptkit.generate.images import generate
    from conceptkit.generate.loop import decode

    pipe = load_pipeline("toy")  # no adapters: generate() would run any loaded one
    cfg = CLoRAConfig(steps=4, guidance_scale=6.0, scheduler=scheduler)
    ours = sample(pipe, [Branches(["a red circle"], [""], [{}])], cfg, groups=None, mask_indices=None,
                  generator=torch.Generator().manual_seed(3))
    plain = generate(pipe, "a red circle", seed=3, steps=4, guidance_scale=6.0, scheduler=scheduler, progress=False)
    a, b = np.asarray(decode(pipe, ours.latents)[0], np.int16), np.asarray(plain.images[0], np.int16)
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_latent_updates_work_with_other_schedulers(toy_two, scheduler):
    pipe, bp = toy_two
    on = run(pipe, bp, "clora", CLoRAConfig(steps=4, iterative_steps=(), scheduler=scheduler))
    off = run(pipe, bp, "clora", CLoRAConfig(steps=4, latent_update=False, scheduler=scheduler))
    assert torch.isfinite(on.latents).all() and len(on.trace.losses) == 2
    assert (on.latents - off.latents).abs().max() > 1e-3


def test_the_update_moves_the_models_input_as_under_ddim_with_a_sigma_scaled_scheduler(toy_two):
    # Euler holds z = x * sqrt(σ² + 1); the step is taken on the model's input x and carried back to z
    from conceptkit.compose.sampler import Composition
    from conceptkit.generate.loop import Step, Trace, sampler

    pipe, bp = toy_two
    cfg = CLoRAConfig(steps=4)
    sets, *_ = method_branches("clora", bp, ["a", "b"], cfg)
    store = AttentionStore((8, 8))
    model = BranchModel(pipe, sets[0], encode_branches(pipe, sets[0], cfg, None), cfg, store)
    method = Composition([model], cfg, groups=bp.groups, mask_indices=bp.mask_indices, latent_hw=(16, 16))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    moved = {}
    t = sampler("euler", pipe, 4).timesteps[0]  # the same timestep for both
    for name in ("ddim", "euler"):
        schedule = sampler(name, pipe, 4)
        step = Step(0, t, schedule, Trace())
        k = float(schedule.init_noise_sigma) if name == "euler" else 1.0  # z = k x at the first Euler step
        with capturing(pipe.unet, store):
            z, *_ = method.gradient_step(x * k, model, step)
        moved[name] = step.model_input(z) - x
    assert moved["ddim"].abs().max() > 1e-3
    torch.testing.assert_close(moved["euler"], moved["ddim"], atol=1e-4, rtol=1e-3)


def test_single_concept_group_gives_no_update(toy_two):
    pipe, bp = toy_two
    one = branch_prompts(pipe.tokenizer, "a {a} on a gray background", [ConceptSlot("a", "zwx", "circle")])
    on = run(pipe, one, "clora", CLoRAConfig(steps=4), adapters=("a",))
    off = run(pipe, one, "clora", CLoRAConfig(steps=4, latent_update=False), adapters=("a",))
    torch.testing.assert_close(on.latents, off.latents)
    assert on.trace.losses and all(v == 0 for v in on.trace.losses)


def test_no_update_settings_leave_the_latent_alone_and_updates_move_it(toy_two):
    pipe, bp = toy_two
    off = run(pipe, bp, "clora", CLoRAConfig(steps=4, latent_update=False))
    zero = run(pipe, bp, "clora", CLoRAConfig(steps=4, max_iter_to_alter=0))
    on = run(pipe, bp, "clora", CLoRAConfig(steps=4, iterative_steps=()))
    torch.testing.assert_close(off.latents, zero.latents)
    assert (on.latents - off.latents).abs().max() > 1e-3


def test_a_small_latent_step_lowers_the_loss(toy_two):
    pipe, bp = toy_two
    cfg = CLoRAConfig()
    sets, *_ = method_branches("clora", bp, ["a", "b"], cfg)
    store = AttentionStore((8, 8))
    model = BranchModel(pipe, sets[0], encode_branches(pipe, sets[0], cfg, None), cfg, store)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    t = torch.tensor(700)
    with capturing(pipe.unet, store):
        loss = clora_loss(model(z, t)[2], bp.groups)
        (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            after = clora_loss(model(z - 1.0 * grad, t)[2], bp.groups)
    assert after < loss


def test_two_branches_without_masks_average_and_late_masks_average_too(toy_two):
    pipe, bp = toy_two
    cfg = CLoRAConfig(steps=3, latent_update=False)
    two = Branches(bp.prompts[:2], ["", ""], [{}, {"a": 1.0}])
    averaged = sample(pipe, [two], cfg, groups=None, mask_indices=None, generator=torch.Generator().manual_seed(0))
    late = sample(pipe, [two], CLoRAConfig(steps=3, latent_update=False, apply_mask_after=99), groups=None,
                  mask_indices=bp.mask_indices[:2], generator=torch.Generator().manual_seed(0))
    lora_only = sample(pipe, [Branches(bp.prompts[1:2], [""], [{"a": 1.0}])], cfg, groups=None, mask_indices=None,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(late.latents, averaged.latents)
    assert (averaged.latents - lora_only.latents).abs().max() > 1e-3


def test_unet_calls_per_step_and_weights_untouched(toy_two):
    pipe, bp = toy_two
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    T, R = 6, 2
    cfg = CLoRAConfig(steps=T, max_iter_to_alter=3, iterative_steps=(1,), iterative_steps_steps=R,
                      execution="sequential", fresh_predictions=False)
    K = 3
    got = run(pipe, bp, "clora", cfg)
    # §2.8: K forwards per step, R·K more on an iterative step
    assert got.unet_calls == T * K + R * K
    fresh = run(pipe, bp, "clora", CLoRAConfig(**{**cfg.__dict__, "fresh_predictions": True}))
    assert fresh.unet_calls == got.unet_calls + 3 * K  # one more forward after each of the 3 updating steps
    batched = run(pipe, bp, "clora", CLoRAConfig(**{**cfg.__dict__, "execution": "batched"}))
    assert batched.unet_calls == T + R  # one call per forward, whatever K
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_baselines_differ_and_are_deterministic(toy_two):
    pipe, bp = toy_two
    cfg = CLoRAConfig(steps=4)
    results = {m: run(pipe, bp, m, cfg).latents for m in ["clora", "merge", "switch", "composite", "none"]}
    again = run(pipe, bp, "merge", cfg).latents
    assert torch.equal(results["merge"], again)
    names = list(results)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert (results[names[i]] - results[names[j]]).abs().max() > 1e-4, (names[i], names[j])


def test_reference_preset_switches_the_quirks_on():
    ref = CLoRAConfig.reference(steps=100)
    assert (ref.cond_only_maps, ref.fresh_predictions, ref.minmax_eps, ref.execution, ref.explicit_attention,
            ref.graphs_every_step) == (False, False, 0.0, "sequential", True, True)
    assert ref.steps == 100 and CLoRAConfig().cond_only_maps and CLoRAConfig().fresh_predictions
    assert np.isclose(CLoRAConfig(steps=50).alter_until(), 25)


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def fixture_lora_files(sd_tiny_dir, tmp_path_factory):
    from conceptkit.models.lora import save_lora

    folder = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline(str(sd_tiny_dir))
    paths = {}
    for seed, (name, trigger, word) in enumerate([("cat", "sks", "cat"), ("dog", "zwx", "dog")]):
        add_random_lora(pipe, name, 10 + seed)
        paths[name] = save_lora(folder / f"{name}.safetensors", pipe.unet, pipe.text_encoder, adapter_name=name,
                                metadata={"trigger": trigger, "class_word": word} if name == "cat" else None)
    return paths


def test_compose_cli_writes_images_grid_maps_and_masks(sd_tiny_dir, fixture_lora_files, tmp_path, capsys):
    import json

    from PIL import Image

    from conceptkit.cli import main

    out = tmp_path / "out"
    code = main(["compose", "--model", str(sd_tiny_dir), "--prompt", "a {cat} and a {dog} on the grass",
                 "--lora", f"cat={fixture_lora_files['cat']}", "--lora", f"dog={fixture_lora_files['dog']}:zwx:dog",
                 "--method", "clora,merge", "--steps", "3", "--num-images", "2", "--save-maps", "--out", str(out)])
    assert code in (0, None)
    summary = json.loads((out / "compose.json").read_text())
    # trigger and class word of "cat" come from the file's metadata, "dog"'s from the command line
    assert summary["branch_prompts"] == ["a cat and a dog on the grass", "a sks cat and a dog on the grass",
                                         "a cat and a zwx dog on the grass"]
    assert summary["methods"]["merge"]["branch_prompts"] == ["a sks cat and a zwx dog on the grass"]
    for method in ("clora", "merge"):
        for seed in (0, 1):
            assert Image.open(out / method / f"s{seed}.png").size == (64, 64)
    assert Image.open(out / "grid.png").size == (128, 128)  # rows: seeds, columns: methods
    for kind in ("attention", "masks"):
        assert (out / "clora" / f"s0-{kind}.png").exists()
    assert not (out / "merge" / "s0-masks.png").exists()  # merge has no masks


def test_compose_cli_errors_are_one_line(sd_tiny_dir, fixture_lora_files, tmp_path, capsys):
    from conceptkit.cli import main

    base = ["compose", "--model", str(sd_tiny_dir), "--steps", "2", "--out", str(tmp_path / "o")]
    cases = [
        (["--prompt", "a {cat} and a {dog}", "--lora", f"cat={fixture_lora_files['cat']}", "--lora",
          f"dog={fixture_lora_files['dog']}"], "no class word"),
        (["--prompt", "a {cat}", "--lora", f"cat={tmp_path / 'missing.safetensors'}"], "missing.safetensors"),
        (["--prompt", "a {cat}", "--lora", f"cat={fixture_lora_files['cat']}", "--method", "blend"],
         "unknown method"),
    ]
    for args, words in cases:
        assert main(base + args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and "\n" not in err, err


# ---------------------------------------------------------------- side-path bugs found in review

def test_per_row_adapters_use_the_adapters_own_scale_after_set_adapters(sd_tiny_dir):
    # The sequential path (and `--method reference`) leaves PEFT's `scaling` multiplied by the weight it set; the
    # batched path must apply its own weight to the adapter's base scale, not to that product (0.8 * 0.8 = 0.64).
    from conceptkit.compose.row_lora import per_row_adapters

    pipe = load_pipeline(str(sd_tiny_dir))
    add_random_lora(pipe, "style", 5)
    x, emb = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 77, 768)
    with torch.no_grad():
        pipe.unet.set_adapters(["style"], [0.8])
        want = pipe.unet(x, 10, encoder_hidden_states=emb).sample  # PEFT's own path at weight 0.8
        with per_row_adapters([pipe.unet], {"style": [0.8, 0.8]}):
            got = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compose_style_weight_does_not_depend_on_the_methods_run_before(sd_tiny_dir, fixture_lora_files):
    # `--method reference,clora --style-lora X:0.8` gave the clora image a style LoRA at 0.64
    from conceptkit.compose.run import LoraSpec, compose

    pipe = load_pipeline(str(sd_tiny_dir))
    concepts = [LoraSpec("cat", str(fixture_lora_files["cat"])), LoraSpec("dog", str(fixture_lora_files["dog"]), "zwx", "dog")]
    style = f"{fixture_lora_files['dog']}:0.8"
    cfg = CLoRAConfig(steps=2, iterative_steps=())
    alone = compose(pipe, "a {cat} and a {dog}", concepts, methods=["clora"], cfg=cfg, style_lora=style)
    after = compose(pipe, "a {cat} and a {dog}", concepts, methods=["reference", "clora"], cfg=cfg, style_lora=style)
    a, b = (np.asarray(r.images["clora"][0], dtype=np.int16) for r in (alone, after))
    assert np.abs(a - b).max() <= 1


def test_sequential_text_encoding_turns_off_the_previous_branchs_text_encoder_lora(sd_tiny_dir):
    # a concept LoRA without text-encoder weights: its branch's prompt is encoded by the plain text encoder, not
    # with the adapter the branch before it switched on
    pipe = load_pipeline(str(sd_tiny_dir))
    add_random_lora(pipe, "a", 3)
    add_random_lora(pipe, "unet_only", 4, text_encoder=False)
    branches = Branches(["a cat", "a sks cat", "a zwx cat"], ["", "", ""], [{}, {"a": 1.0}, {"unet_only": 1.0}])
    batched = encode_branches(pipe, branches, CLoRAConfig(execution="batched"), None)
    sequential = encode_branches(pipe, branches, CLoRAConfig(execution="sequential"), None)
    with torch.no_grad():
        pipe.disable_lora()
        plain = pipe.text_encoder(pipe.tokenizer(["a zwx cat"], padding="max_length", return_tensors="pt").input_ids)[0]
        pipe.enable_lora()
    torch.testing.assert_close(sequential[5], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sequential, batched, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- text and regional (the benchmark's references)

def test_region_masks_are_halves_with_the_base_branch_where_no_region_reaches():
    from conceptkit.compose.masks import region_masks

    m = region_masks(["right", "left"], 2, (8, 8), channels=4)
    assert m.shape == (3, 1, 4, 8, 8) and torch.all(m == m[:, :, :1])
    assert torch.all(m[1, 0, 0, :, 4:] == 1) and torch.all(m[1, 0, 0, :, :4] == 0)  # concept 1: the right half
    assert torch.all(m[2, 0, 0, :, :4] == 1) and torch.all(m[2, 0, 0, :, 4:] == 0)  # concept 2: the left half
    assert torch.all(m[0] == 0)  # the halves cover everything: the base prompt holds nowhere
    top = region_masks(["top"], 1, (8, 8))
    assert torch.all(top[1, 0, 0, :4] == 1) and torch.all(top[0, 0, 0, 4:] == 1) and torch.all(top[0, 0, 0, :4] == 0)
    strips = region_masks(None, 3, (6, 6))  # default: equal vertical strips in slot order
    assert [int(strips[i, 0, 0, 0].argmax()) for i in (1, 2, 3)] == [0, 2, 4]
    with pytest.raises(ValueError, match="region 'middle'"):
        region_masks(["left", "middle"], 2, (8, 8))
    with pytest.raises(ValueError, match="one per concept"):
        region_masks(["left"], 2, (8, 8))


def test_regional_blend_takes_each_branch_on_its_own_half():
    from conceptkit.compose.masks import region_masks
    from conceptkit.compose.sampler import Composition
    from conceptkit.generate.loop import Step, Trace

    K = 3
    eps_c = torch.stack([torch.full((4, 8, 8), float(p)) for p in range(K)])

    class Stub:
        work_dtype = torch.float32

        def __call__(self, x, t, cond_only=False, off=frozenset()):
            return eps_c - 5, eps_c, torch.rand(K, 8, 8, 77)  # attention maps that would give other masks

    comp = Composition([Stub()], CLoRAConfig(guidance_scale=1.0), groups=None, mask_indices=[[], [1], [2]],
                       latent_hw=(8, 8), fixed_masks=region_masks(["right", "left"], 2, (8, 8)))
    out = comp(torch.zeros(1, 4, 8, 8), Step(0, torch.tensor(500), None, Trace()))
    assert torch.all(out[0, :, :, 4:] == 1) and torch.all(out[0, :, :, :4] == 2)


def test_text_and_regional_branches(toy_two):
    pipe, _ = toy_two
    slots = [ConceptSlot("a", "zwx", "circle", description="yellow checkered circle"),
             ConceptSlot("b", "qrv", "square", description="blue plain square")]
    bp = branch_prompts(pipe.tokenizer, "a {a} on the left and a {b} on the right, on a gray background", slots)
    assert bp.text_prompt == "a yellow checkered circle on the left and a blue plain square on the right, on a gray background"
    sets, updates, masks, switch = method_branches("text", bp, ["a", "b"], CLoRAConfig())
    assert sets[0].prompts == [bp.text_prompt] and sets[0].adapters == [{}] and not updates and not masks
    sets, updates, masks, switch = method_branches("regional", bp, ["a", "b"], CLoRAConfig())
    assert sets[0].prompts == bp.prompts and sets[0].adapters == [{}, {"a": 1.0}, {"b": 1.0}]
    assert not updates and not masks and switch is None
    undescribed = branch_prompts(pipe.tokenizer, "a {a} and a {b}", [slots[0], ConceptSlot("b", "qrv", "square")])
    assert undescribed.text_prompt is None
    with pytest.raises(UserError, match="concept 'b' has no description"):
        method_branches("text", undescribed, ["a", "b"], CLoRAConfig())


def test_per_concept_weights_scale_each_adapter_in_every_method(toy_two):
    pipe, bp = toy_two
    w = [0.5, 1.25]
    sets, *_ = method_branches("clora", bp, ["a", "b"], CLoRAConfig(), weights=w)
    assert sets[0].adapters == [{}, {"a": 0.5}, {"b": 1.25}]
    sets, *_ = method_branches("merge", bp, ["a", "b"], CLoRAConfig(merge_weight=0.8), weights=w)
    assert sets[0].adapters == [{"a": 0.4, "b": 1.0}]
    sets, *_ = method_branches("switch", bp, ["a", "b"], CLoRAConfig(), weights=w)
    assert [s.adapters for s in sets] == [[{"a": 0.5}], [{"b": 1.25}]]
    sets, *_ = method_branches("composite", bp, ["a", "b"], CLoRAConfig())
    assert sets[0].adapters == [{"a": 1.0}, {"b": 1.0}]  # no weights: 1


def test_lora_spec_weight_after_at_and_compose_options_reach_the_config():
    from conceptkit.commands.compose import compose_config
    from conceptkit.compose.concepts import LoraSpec
    from conceptkit.cli import build_parser

    assert LoraSpec.parse("a=a.safetensors:zwx:circle@0.8") == LoraSpec("a", "a.safetensors", "zwx", "circle", weight=0.8)
    assert LoraSpec.parse("a=a.safetensors@1.5").weight == 1.5 and LoraSpec.parse("a=a.safetensors").weight == 1.0
    assert LoraSpec.parse("a=runs@v2/a.safetensors") == LoraSpec("a", "runs@v2/a.safetensors")
    with pytest.raises(UserError, match="weight after '@'"):
        LoraSpec.parse("a=a.safetensors@heavy")
    assert LoraSpec.parse("a=a.safetensors:zwx@0.8:0.5") == LoraSpec("a", "a.safetensors", "zwx", weight=0.8, end=0.5)
    assert LoraSpec.parse("a=a.safetensors@0.8").end is None
    for bad in ("0", "1.5", "late"):
        with pytest.raises(UserError, match="share of the steps"):
            LoraSpec.parse(f"a=a.safetensors@0.8:{bad}")
    args = build_parser().parse_args(["compose", "--prompt", "a {a}", "--lora", "a=a.safetensors", "--out", "x",
                                      "--temperature", "0.2", "--guidance-rescale", "0.7", "--no-text-encoder-lora",
                                      "--mask-exclusive", "--mask-combine", "sum", "--lora-end", "0.6"])
    cfg = compose_config(args)
    assert (cfg.temperature, cfg.guidance_rescale, cfg.use_text_encoder_lora, cfg.lora_end) == (0.2, 0.7, False, 0.6)
    assert (cfg.mask_exclusive, cfg.mask_combine) == (True, "sum")
    default = compose_config(build_parser().parse_args(["compose", "--prompt", "a {a}", "--lora", "a=x", "--out", "x"]))
    assert default == CLoRAConfig()


def test_regional_sampling_differs_from_attention_masks_and_is_deterministic(toy_two):
    pipe, bp = toy_two
    cfg = CLoRAConfig(steps=4, latent_update=False)
    sets, *_ = method_branches("regional", bp, ["a", "b"], cfg)

    def regional(regions):
        return sample(pipe, sets, cfg, groups=None, mask_indices=None, generator=torch.Generator().manual_seed(0),
                      regions=regions, fixed_masks=True, record=True)

    lr, again, rl = regional(["left", "right"]), regional(["left", "right"]), regional(["right", "left"])
    assert torch.equal(lr.latents, again.latents)
    assert (lr.latents - rl.latents).abs().max() > 1e-4  # the regions decide the picture
    assert torch.all(lr.trace.masks[0][1, :, :8] == 1) and torch.all(lr.trace.masks[0][1, :, 8:] == 0)
    attention = run(pipe, bp, "clora", cfg)
    assert (lr.latents - attention.latents).abs().max() > 1e-4


def test_compose_reads_the_description_from_the_lora_file_and_refuses_bad_regions(sd_tiny_dir, tmp_path):
    from conceptkit.compose.run import LoraSpec, compose
    from conceptkit.models.lora import save_lora

    pipe = load_pipeline(str(sd_tiny_dir))
    add_random_lora(pipe, "c", 20)
    path = save_lora(tmp_path / "c.safetensors", pipe.unet, pipe.text_encoder, adapter_name="c",
                     metadata={"trigger": "sks", "class_word": "cat", "description": "small grey cat"})
    pipe = load_pipeline(str(sd_tiny_dir))
    out = compose(pipe, "a {c} on the grass", [LoraSpec("c", str(path))], methods=["text"], seeds=[0],
                  cfg=CLoRAConfig(steps=2))
    assert out.prompts["text"] == ["a small grey cat on the grass"] and out.concepts[0]["description"] == "small grey cat"
    with pytest.raises(UserError, match="regions"):
        compose(pipe, "a {c} on the grass", [LoraSpec("c", str(path))], methods=["regional"], seeds=[0],
                cfg=CLoRAConfig(steps=2), regions=["left", "right"])
