"""ProFusion sampling (ALGORITHMS.md §3.6) as a plug-in of the denoising loop (generate/loop.py): plain sampling with
the encoded word S*, and fusion sampling.

Per DDIM step t (η = 0 for the main step):
  (b) fusion, `refine_steps` = m times: S* = PromptNet(x_ref, t, tokens, x_t);
      ε̃ = ε(x_t; ∅) + w_f [ε(x_t; c with S* scaled by λ) − ε(x_t; ∅)];  x_t ← fusion_update(x_t, ε̃, z ~ generator)
  (a) S* again on the (refined) x_t;  ε̂ = ε(∅) + w1 [ε(c) − ε(∅)] + w2 [ε(r) − ε(∅)];  x_{t−1} = DDIM(ε̂, t, x_t)
      (c with S*'s encoder output scaled by s = `emb_scale`: 1 in the official code; the bundled PromptNet
      recommends more, see its model card)
c is the prompt with S*, r the reference prompt (S* replaced by a class word), ∅ the negative prompt.

Execution (`batched`, the default): one UNet call per stage — [∅, c_λ] in a fusion sub-step (the reference branch,
whose output the official code discards there, is not computed), [∅, c, r] or [∅, c] in the main step; ∅ and r
are encoded once, c once per PromptNet call (S* changes with x_t); η = 0 sub-steps are skipped (identities); fusion
noise comes from each image's generator. `reference` follows the official code: one UNet call per condition, the
reference branch computed (and discarded) in fusion sub-steps, every prompt re-encoded at every call, fusion
noise from the global RNG.

Extra reference images (the official `extra_ref_image_*`), each with a weight w_k: in a fusion sub-step
ε̃ ← (w1 ε̃ + Σ_k w_k ε̃_k) / (w1 + Σ_k w_k), where ε̃_k is the sub-step's output with image k's S*; in the main step
ε̂ += Σ_k w_k [ε(c_k) − ε(∅)] (the official code's `s_1 · w_k / guidance_scale`, which is w_k). Batched, they ride
in the same UNet call as the main image's conditions.

`start_timestep` T (the official `st`): only the timesteps t ≤ T are sampled, starting from the reference latent
noised to the first of them (DDIM's add_noise; the official code noises to T itself, at most one step gap away).

Plain sampling (no fusion sub-step) works with every scheduler of generate/schedulers.py; fusion sub-steps are
defined on DDIM's steps (ᾱ_t, ᾱ_t' and the η-variance of a DDIM step), so fusion refuses other schedulers, and so
does a start from the noised reference (DDIM's timesteps and add_noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from ..generate.loop import Step, decode, denoise, initial_noise, sampler
from ..generate.loop import work_dtype as loop_work_dtype
from .fusion import MAX_ETA, fusion_update, to_epsilon
from .fusion_config import PLAIN_RECOMMENDABLE, FusionConfig
from .prompts import check_placeholder, encode_plain, encode_with_word, tokenize_with_slot
from .saved import SavedPromptNet, unet_attention_applied


def recommended_fusion(saved: SavedPromptNet) -> FusionConfig:
    """The notebook's fusion call with the settings the PromptNet's folder recommends on top (promptnet.json
    `fusion_settings`; the bundled one's model card says why it has its own)."""
    return replace(FusionConfig(), **saved.meta.get("fusion_settings", {}))


def recommended_plain(saved: SavedPromptNet) -> FusionConfig:
    """The notebook's plain sampling with the folder's recommended S* scale (`emb_scale`): how strongly its word must
    be read does not depend on the fusion sub-step."""
    settings = saved.meta.get("fusion_settings", {})
    return FusionConfig.plain(**{k: settings[k] for k in PLAIN_RECOMMENDABLE if k in settings})


@dataclass
class ProFusionOutput:
    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor | None = None
    paths: list[Path] = field(default_factory=list)
    grid_path: Path | None = None
    settings: list = field(default_factory=list)  # generate/infotext.Settings of each image


@dataclass
class Conditions:
    """Everything the loop needs about the prompts, encoded once."""
    ids: torch.Tensor  # (B, L) prompt ids with a dummy id at the slot
    slots: torch.Tensor  # (B,)
    negative: torch.Tensor  # (B, L, D)
    ref: torch.Tensor | None  # (B, L, D) or None (w2 = 0)
    prompts: list[str]
    ref_prompts: list[str]


@dataclass
class ExtraReference:
    """One more image of the concept in fusion sampling: its latent, its image tokens and its weight w_k."""
    x_ref: torch.Tensor  # (B, C, h, w)
    tokens: torch.Tensor  # (B, N, D)
    weight: float


def reference_prompt(prompt: str, cfg: FusionConfig) -> str:
    return cfg.ref_prompt if cfg.ref_prompt is not None else prompt.replace(cfg.placeholder, cfg.class_word)


def check_config(cfg: FusionConfig) -> None:
    if cfg.execution not in ("batched", "reference"):
        raise UserError(f"execution {cfg.execution!r}: pass batched or reference")
    if cfg.refine_steps < 0 or cfg.steps < 1:
        raise UserError("--steps must be >= 1 and --refine-steps >= 0")
    if not 0 <= cfg.refine_eta <= MAX_ETA:
        raise UserError(f"--refine-eta {cfg.refine_eta}: pass a value in [0, sqrt(2)] (the fusion variance is "
                        "negative beyond sqrt(2))")
    if cfg.start_timestep is not None and cfg.scheduler != "ddim":
        raise UserError(f"--start-timestep {cfg.start_timestep} with --scheduler {cfg.scheduler}: the start from the "
                        "noised reference is defined on DDIM's timesteps: pass --scheduler ddim, or leave "
                        "--start-timestep out")


def check_extra_weights(weights: list[float]) -> None:
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise UserError(f"--extra-image weight {w}: pass a number > 0 (FILE:WEIGHT, e.g. dog2.png:0.5)")


def encode_conditions(pipe, prompts: list[str], cfg: FusionConfig) -> Conditions:
    rows = [tokenize_with_slot(pipe.tokenizer, p, cfg.placeholder) for p in prompts]
    ids = torch.stack([r[0] for r in rows])
    slots = torch.tensor([r[1] for r in rows])
    refs = [reference_prompt(p, cfg) for p in prompts]
    with torch.no_grad():
        negative = encode_plain(pipe.text_encoder, pipe.tokenizer, [cfg.negative_prompt] * len(prompts))
        ref = encode_plain(pipe.text_encoder, pipe.tokenizer, refs) if cfg.ref_guidance_scale else None
    return Conditions(ids, slots, negative, ref, prompts, refs)


def work_dtype(pipe) -> torch.dtype:
    """The dtype of the latents and guided outputs: float32 for half-precision pipelines, float64 for float64 ones."""
    return loop_work_dtype(pipe.unet)


class Evaluator:
    """ε-evaluations for one batch of images: S* from PromptNet, prompts through the text encoder, the UNet."""

    def __init__(self, pipe, saved: SavedPromptNet, x_ref: torch.Tensor, tokens: torch.Tensor, cond: Conditions,
                 cfg: FusionConfig, extras: list[ExtraReference] = ()):
        self.pipe, self.saved, self.x_ref, self.tokens, self.cond, self.cfg = pipe, saved, x_ref, tokens, cond, cfg
        self.extras = list(extras)
        self.dtype = pipe.unet.dtype
        self.work = work_dtype(pipe)

    def word(self, x, t, extra: ExtraReference | None = None):
        """S* of the main reference image, or of an extra one, for the current latent x."""
        net = self.saved.promptnet
        x_ref, tokens = (self.x_ref, self.tokens) if extra is None else (extra.x_ref, extra.tokens)
        return net(x_ref.to(net.dtype), t, tokens, x.to(net.dtype))

    def prompts_with_words(self, x, t, scale) -> list[torch.Tensor]:
        """The prompt encoded with the main image's S*, then with each extra image's."""
        return [self.prompt(self.word(x, t, extra), scale) for extra in [None, *self.extras]]

    def prompt(self, words, scale):
        return encode_with_word(self.pipe.text_encoder, self.cond.ids, self.cond.slots, words, scale)

    def unet(self, x, t, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One UNet call on [x] * len(contexts) (batched), or one call per context (reference)."""
        if self.cfg.execution == "batched":
            n = len(contexts)
            out = self.pipe.unet(torch.cat([x] * n).to(self.dtype), t, torch.cat(contexts).to(self.dtype)).sample
            return list(out.to(self.work).chunk(n))
        return [self.pipe.unet(x.to(self.dtype), t, c.to(self.dtype)).sample.to(self.work) for c in contexts]

    def fresh(self, which: str) -> torch.Tensor:
        """The reference execution re-encodes ∅ and r at every call, as the official code does."""
        if which == "negative":
            return encode_plain(self.pipe.text_encoder, self.pipe.tokenizer, [self.cfg.negative_prompt] * len(self.cond.prompts))
        return encode_plain(self.pipe.text_encoder, self.pipe.tokenizer, self.cond.ref_prompts)

    def fusion_output(self, x, t):
        """w_f-guided output with S* scaled by λ (model-output space); with extra images, the weighted mean of each
        image's (weights w1 and w_k, as the official code)."""
        wf = self.cfg.refine_guidance_scale
        conds = self.prompts_with_words(x, t, self.cfg.refine_emb_scale)
        if self.cfg.execution == "batched":
            u, *outs = self.unet(x, t, [self.cond.negative, *conds])
            guided = [u + wf * (c - u) for c in outs]
        else:
            guided = []
            for c in conds:  # one ε-evaluation per image, the reference branch computed and discarded, as officially
                contexts = [self.fresh("negative"), c] + ([self.fresh("ref")] if self.cond.ref is not None else [])
                u, cl = self.unet(x, t, contexts)[:2]
                guided.append(u + wf * (cl - u))
        if not self.extras:
            return guided[0]
        weights = [self.cfg.guidance_scale] + [extra.weight for extra in self.extras]
        total = sum(weights)
        return sum(w / total * g for w, g in zip(weights, guided))

    def main_output(self, x, t):
        conds = self.prompts_with_words(x, t, self.cfg.emb_scale)
        weights = [extra.weight for extra in self.extras]
        if self.cfg.execution == "batched":
            ref = self.cond.ref
            outs = self.unet(x, t, [self.cond.negative, conds[0]] + ([ref] if ref is not None else []) + conds[1:])
            u, c = outs[0], outs[1]
            extra_pairs = [(u, e) for e in outs[len(outs) - len(weights):]] if weights else []
        else:
            ref = self.fresh("ref") if self.cond.ref is not None else None
            outs = self.unet(x, t, [self.fresh("negative"), conds[0]] + ([ref] if ref is not None else []))
            u, c = outs[0], outs[1]
            extra_pairs = []
            for cond in conds[1:]:  # the official call per extra image: [∅, c_k, r], r discarded
                u_k, c_k = self.unet(x, t, [self.fresh("negative"), cond] + ([self.fresh("ref")] if ref is not None
                                                                             else []))[:2]
                extra_pairs.append((u_k, c_k))
        guided = u + self.cfg.guidance_scale * (c - u)
        if ref is not None:
            guided = guided + self.cfg.ref_guidance_scale * (outs[2] - u)
        for w, (u_k, c_k) in zip(weights, extra_pairs):
            guided = guided + w * (c_k - u_k)
        return guided


def fusion_noise(x: torch.Tensor, generators: list[torch.Generator], cfg: FusionConfig) -> torch.Tensor:
    if cfg.execution == "reference":
        return torch.randn_like(x)  # the official code's global RNG
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device, x.dtype)


class FusionSampling:
    """ProFusion as a plug-in of the loop: `before_step` runs the fusion sub-steps on the latent, calling the object
    gives the main step's guided output (ε̂ = ε(∅) + w1 [ε(c) − ε(∅)] + w2 [ε(r) − ε(∅)])."""

    def __init__(self, ev: Evaluator, generators: list[torch.Generator], cfg: FusionConfig, scheduler):
        self.ev, self.generators, self.cfg = ev, generators, cfg
        self.fusing = cfg.refine_eta > 0 and cfg.refine_steps > 0
        if self.fusing and not isinstance(scheduler, DDIMScheduler):
            raise UserError(f"--scheduler {cfg.scheduler}: ProFusion samples with DDIM when fusion is on (the fusion "
                            "sub-step is a DDIM step and its reverse): pass --scheduler ddim, or --no-fusion to sample "
                            f"with {cfg.scheduler}")
        self.alphas = scheduler.alphas_cumprod
        self.final_alpha = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        self.prediction = scheduler.config.prediction_type
        self.step_gap = scheduler.config.num_train_timesteps // cfg.steps

    def before_step(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """η = 0 sub-steps are identities and are skipped."""
        if not self.fusing:
            return x
        t = step.t
        a = float(self.alphas[int(t)])
        prev = int(t) - self.step_gap
        a_prev = float(self.alphas[prev]) if prev >= 0 else self.final_alpha
        for _ in range(self.cfg.refine_steps):
            eps = to_epsilon(self.ev.fusion_output(x, t), x, a, self.prediction)
            x = fusion_update(x, eps, a, a_prev, self.cfg.refine_eta, fusion_noise(x, self.generators, self.cfg))
        return x

    def __call__(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        return self.ev.main_output(x, step.t)


def reference_latents(pipe, saved: SavedPromptNet, reference: torch.Tensor,
                      generators: list[torch.Generator]) -> torch.Tensor:
    """x_ref = vae.encode(ref).sample() · scaling, drawn from each image's own generator (batching-independent); or
    the posterior mean, if that is what the PromptNet was trained with. (B, C, h, w) in the work dtype."""
    device = pipe.unet.device
    dist = pipe.vae.encode(reference.to(device, pipe.vae.dtype)).latent_dist
    scaling = pipe.vae.config.scaling_factor
    work = work_dtype(pipe)
    if saved.meta.get("latents", "sample") == "mean":
        return dist.mean.to(work).expand(len(generators), -1, -1, -1) * scaling
    draws = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(device)
    return (dist.mean + dist.std * draws).to(work) * scaling


def start_from_reference(scheduler, x_ref: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
    """Keep the scheduler's timesteps t ≤ start and return the reference latent noised to the first of them (the
    latent DDIM expects at that timestep)."""
    if x_ref.shape != noise.shape:
        raise UserError(f"--start-timestep: the reference's latent is {tuple(x_ref.shape[-2:])}, the images' "
                        f"{tuple(noise.shape[-2:])}: leave --width/--height at the model's native size")
    kept = scheduler.timesteps[scheduler.timesteps <= start]
    if not len(kept):
        raise UserError(f"--start-timestep {start} is below every sampling timestep (the lowest is "
                        f"{int(scheduler.timesteps[-1])} with --steps {len(scheduler.timesteps)}): pass a larger one")
    scheduler.timesteps = kept
    return scheduler.add_noise(x_ref, noise, kept[:1])


@torch.no_grad()
def sample(pipe, saved: SavedPromptNet, reference: torch.Tensor, prompts: list[str], cfg: FusionConfig,
           generators: list[torch.Generator], progress: bool = False,
           latent_hw: tuple[int, int] | None = None,
           extra_references: list[tuple[torch.Tensor, float]] = ()) -> torch.Tensor:
    """Final latents (B, C, h, w) for `prompts` (one image each, generator i for image i) given the reference
    image (1, 3, H, W) in [-1, 1]. latent_hw: (h, w) of the latents (default: the model's native size).
    extra_references: (image (1, 3, H, W), weight w_k) of more images of the concept (their latents are drawn
    from each image's generator after its starting noise, so the main image's draws do not move)."""
    check_config(cfg)
    check_extra_weights([w for _, w in extra_references])
    for p in prompts:
        check_placeholder(p, cfg.placeholder)
    schedule = sampler(cfg.scheduler, pipe, cfg.steps)
    device, batch = pipe.unet.device, len(prompts)
    x_ref = reference_latents(pipe, saved, reference, generators)
    tokens = saved.image_encoder(reference.float().to(device).expand(batch, -1, -1, -1), x_ref)
    cond = encode_conditions(pipe, prompts, cfg)
    x = initial_noise(pipe, generators, latent_hw or (pipe.unet.config.sample_size,) * 2, schedule)
    extras = []
    for image, weight in extra_references:
        extra_x_ref = reference_latents(pipe, saved, image, generators)
        extra_tokens = saved.image_encoder(image.float().to(device).expand(batch, -1, -1, -1), extra_x_ref)
        extras.append(ExtraReference(extra_x_ref, extra_tokens, float(weight)))
    if cfg.start_timestep is not None:
        x = start_from_reference(schedule, x_ref, x, cfg.start_timestep)
    ev = Evaluator(pipe, saved, x_ref, tokens, cond, cfg, extras)
    method = FusionSampling(ev, generators, cfg, schedule)
    with unet_attention_applied(pipe.unet, saved.unet_attention), \
            tqdm(total=len(schedule.timesteps), desc="profusion", disable=not progress, leave=False) as bar:
        return denoise(method, x, schedule, before_step=method.before_step, generators=generators, progress=bar)


def generate_profusion(pipe, saved: SavedPromptNet, reference: torch.Tensor, prompts: list[str] | str,
                       cfg: FusionConfig | None = None, *, seed: int = 0, num_images: int = 1, batch_size: int = 8,
                       out_dir: str | Path | None = None, progress: bool = True,
                       latent_hw: tuple[int, int] | None = None,
                       extra_references: list[tuple[torch.Tensor, float]] = ()) -> ProFusionOutput:
    """`num_images` images per prompt (image j uses seed + j, its own generator), as PIL images; latent_hw: the
    latents' (h, w) (default: the model's native size); extra_references: (image, weight) of more images of the
    concept (see `sample`)."""
    cfg = cfg or FusionConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given: pass --prompt \"S* on a navy background\"")
    jobs = [(p, seed + j) for p in prompts for j in range(num_images)]
    images, latents = [], []
    for i in tqdm(range(0, len(jobs), batch_size), desc="profusion", disable=not progress or len(jobs) <= batch_size):
        chunk = jobs[i : i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        z = sample(pipe, saved, reference, [p for p, _ in chunk], cfg, gens, progress=progress, latent_hw=latent_hw,
                   extra_references=extra_references)
        latents.append(z.cpu())
        images.extend(decode(pipe, z))
    result = ProFusionOutput(images, [p for p, _ in jobs], [s for _, s in jobs], torch.cat(latents))
    from ..generate.infotext import settings_for

    method = f"ProFusion {'fusion' if cfg.refine_steps else 'plain'} sampling"
    weights = " ".join(f"{w:g}" for _, w in extra_references) or None
    result.settings = [settings_for(pipe, p, seed=s, steps=cfg.steps, sampler=cfg.scheduler,
                                    cfg_scale=cfg.guidance_scale, image=img, negative_prompt=cfg.negative_prompt,
                                    Method=method, PromptNet=saved.folder.name if saved.folder else None,
                                    **{"Extra image weights": weights, "Start timestep": cfg.start_timestep})
                       for (p, s), img in zip(jobs, images)]
    if out_dir is not None:
        from ..generate.images import save

        save(result, out_dir, columns=num_images)
    return result


def generate_from_image(pipe, prompts: list[str] | str, *, promptnet, image: str | Path | None = None,
                        fusion: bool = True, steps: int = 30, scheduler: str = "ddim", seed: int = 0,
                        num_images: int = 1, out_dir: str | Path | None = None, progress: bool = True,
                        extra_images: list[tuple[str | Path, float]] = (), **settings) -> ProFusionOutput:
    """ProFusion the way `conceptkit generate --promptnet/--image` runs it. `promptnet`: a PromptNet folder (or a
    loaded SavedPromptNet); `image`: the reference (default: the one the PromptNet was fine-tuned on); fusion
    sampling with the folder's recommended settings, or plain sampling (`fusion=False`); `extra_images`: (file,
    weight) of more images of the concept; `settings`: FusionConfig fields on top (guidance_scale=...,
    refine_steps=..., class_word=..., start_timestep=...)."""
    from ..learn.images import load_reference_image
    from ..models.sdxl import refuse_unless_sd
    from .saved import load_promptnet

    refuse_unless_sd(pipe, "ProFusion (PromptNet)")
    saved = promptnet if isinstance(promptnet, SavedPromptNet) else load_promptnet(promptnet, pipe)
    image = image or saved.reference_path
    if image is None:
        raise UserError(f"no reference image: pass --image FILE (the PromptNet in {saved.folder} was not "
                        "fine-tuned on one)")
    base = recommended_fusion(saved) if fusion else recommended_plain(saved)
    cfg = replace(base, steps=steps, scheduler=scheduler, **settings)
    check_config(cfg)
    check_extra_weights([w for _, w in extra_images])
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    reference = load_reference_image(image, size)
    extras = [(load_reference_image(path, size), weight) for path, weight in extra_images]
    return generate_profusion(pipe, saved, reference, prompts, cfg, seed=seed, num_images=num_images,
                              out_dir=out_dir, progress=progress, extra_references=extras)
