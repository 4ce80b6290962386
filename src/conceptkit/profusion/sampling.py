"""ProFusion sampling (ALGORITHMS.md §3.6) as a plug-in of the denoising loop (generate/loop.py): plain sampling with
the encoded word S*, and fusion sampling.

Per DDIM step t (η = 0 for the main step):
  (b) fusion, `refine_steps` = m times: S* = PromptNet(x_ref, t, tokens, x_t);
      ε̃ = ε(x_t; ∅) + w_f [ε(x_t; c with S* scaled by λ) − ε(x_t; ∅)];  x_t ← fusion_update(x_t, ε̃, z ~ generator)
  (a) S* again on the (refined) x_t;  ε̂ = ε(∅) + w1 [ε(c) − ε(∅)] + w2 [ε(r) − ε(∅)];  x_{t−1} = DDIM(ε̂, t, x_t)
c is the prompt with S*, r the reference prompt (S* replaced by a class word), ∅ the negative prompt.

Execution (`batched`, the default): one UNet call per stage — [∅, c_λ] in a fusion sub-step (the reference branch,
whose output the official code discards there, is not computed), [∅, c, r] or [∅, c] in the main step; ∅ and r
are encoded once, c once per PromptNet call (S* changes with x_t); η = 0 sub-steps are skipped (identities); fusion
noise comes from each image's generator. `reference` follows the official code: one UNet call per condition, the
reference branch computed (and discarded) in fusion sub-steps, every prompt re-encoded at every call, fusion
noise from the global RNG.

Plain sampling (no fusion sub-step) works with every scheduler of generate/schedulers.py; fusion sub-steps are
defined on DDIM's steps (ᾱ_t, ᾱ_t' and the η-variance of a DDIM step), so fusion refuses other schedulers.
"""
from __future__ import annotations

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
from .prompts import DEFAULT_PLACEHOLDER, check_placeholder, encode_plain, encode_with_word, tokenize_with_slot
from .saved import SavedPromptNet, unet_attention_applied


@dataclass
class FusionConfig:
    """Defaults: the fusion call of [nb-PF] (§3.7). `plain()` gives its non-fusion sampling (CFG 5, no r)."""
    steps: int = 50
    guidance_scale: float = 7.0  # w1
    ref_guidance_scale: float = 5.0  # w2 (guidance_scale_ref)
    refine_steps: int = 1  # m; 0 = plain sampling
    refine_eta: float = 1.0
    refine_emb_scale: float = 0.6  # λ
    refine_guidance_scale: float = 7.0  # w_f
    negative_prompt: str = ""
    class_word: str = "object"  # r = the prompt with S* replaced by this word ("a person" in the official code)
    ref_prompt: str | None = None  # overrides the derived r
    placeholder: str = DEFAULT_PLACEHOLDER
    execution: str = "batched"  # batched | reference
    scheduler: str = "ddim"  # fusion sub-steps are DDIM's: other schedulers (generate/schedulers.py) only without them

    def __post_init__(self) -> None:
        """A bad setting fails here, naming the field, not in the sampler (tests/test_config_checks.py)."""
        from .. import values as v

        v.check_config(self, {"steps": v.COUNT, "guidance_scale": v.GUIDANCE, "ref_guidance_scale": v.GUIDANCE,
                              "refine_steps": v.COUNT_OR_ZERO, "refine_eta": v.ETA,
                              "refine_emb_scale": v.SMALL_WEIGHT, "refine_guidance_scale": v.GUIDANCE})
        v.check_text(self, ("class_word", "ref_prompt", "placeholder"), optional=("ref_prompt",))
        v.check_choice(self, "execution", ("batched", "reference"))
        v.check_choice(self, "scheduler", v.SCHEDULER_NAMES)

    @classmethod
    def plain(cls, **kw) -> "FusionConfig":
        return cls(**{"guidance_scale": 5.0, "ref_guidance_scale": 0.0, "refine_steps": 0, **kw})

    @classmethod
    def reference(cls, **kw) -> "FusionConfig":
        return cls(**{"execution": "reference", **kw})


def recommended_fusion(saved: SavedPromptNet) -> FusionConfig:
    """The notebook's fusion call with the settings the PromptNet's folder recommends on top (promptnet.json
    `fusion_settings`; the bundled one's model card says why it has its own)."""
    return replace(FusionConfig(), **saved.meta.get("fusion_settings", {}))


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
                 cfg: FusionConfig):
        self.pipe, self.saved, self.x_ref, self.tokens, self.cond, self.cfg = pipe, saved, x_ref, tokens, cond, cfg
        self.dtype = pipe.unet.dtype
        self.work = work_dtype(pipe)

    def word(self, x, t):
        net = self.saved.promptnet
        return net(self.x_ref.to(net.dtype), t, self.tokens, x.to(net.dtype))

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
        """w_f-guided output with S* scaled by λ (model-output space)."""
        c = self.prompt(self.word(x, t), self.cfg.refine_emb_scale)
        if self.cfg.execution == "batched":
            u, cl = self.unet(x, t, [self.cond.negative, c])
        else:
            contexts = [self.fresh("negative"), c] + ([self.fresh("ref")] if self.cond.ref is not None else [])
            u, cl = self.unet(x, t, contexts)[:2]  # the reference branch is computed and discarded, as officially
        return u + self.cfg.refine_guidance_scale * (cl - u)

    def main_output(self, x, t):
        c = self.prompt(self.word(x, t), 1.0)
        if self.cfg.execution == "batched":
            negative, ref = self.cond.negative, self.cond.ref
        else:
            negative, ref = self.fresh("negative"), self.fresh("ref") if self.cond.ref is not None else None
        outs = self.unet(x, t, [negative, c] + ([ref] if ref is not None else []))
        guided = outs[0] + self.cfg.guidance_scale * (outs[1] - outs[0])
        if ref is not None:
            guided = guided + self.cfg.ref_guidance_scale * (outs[2] - outs[0])
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


@torch.no_grad()
def sample(pipe, saved: SavedPromptNet, reference: torch.Tensor, prompts: list[str], cfg: FusionConfig,
           generators: list[torch.Generator], progress: bool = False,
           latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Final latents (B, C, h, w) for `prompts` (one image each, generator i for image i) given the reference
    image (1, 3, H, W) in [-1, 1]. latent_hw: (h, w) of the latents (default: the model's native size)."""
    check_config(cfg)
    for p in prompts:
        check_placeholder(p, cfg.placeholder)
    schedule = sampler(cfg.scheduler, pipe, cfg.steps)
    x_ref = reference_latents(pipe, saved, reference, generators)
    tokens = saved.image_encoder(reference.float().to(pipe.unet.device).expand(len(prompts), -1, -1, -1), x_ref)
    ev = Evaluator(pipe, saved, x_ref, tokens, encode_conditions(pipe, prompts, cfg), cfg)
    method = FusionSampling(ev, generators, cfg, schedule)
    x = initial_noise(pipe, generators, latent_hw or (pipe.unet.config.sample_size,) * 2, schedule)
    with unet_attention_applied(pipe.unet, saved.unet_attention), \
            tqdm(total=cfg.steps, desc="profusion", disable=not progress, leave=False) as bar:
        return denoise(method, x, schedule, before_step=method.before_step, generators=generators, progress=bar)


def generate_profusion(pipe, saved: SavedPromptNet, reference: torch.Tensor, prompts: list[str] | str,
                       cfg: FusionConfig | None = None, *, seed: int = 0, num_images: int = 1, batch_size: int = 8,
                       out_dir: str | Path | None = None, progress: bool = True,
                       latent_hw: tuple[int, int] | None = None) -> ProFusionOutput:
    """`num_images` images per prompt (image j uses seed + j, its own generator), as PIL images; latent_hw: the
    latents' (h, w) (default: the model's native size)."""
    cfg = cfg or FusionConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given: pass --prompt \"S* on a navy background\"")
    jobs = [(p, seed + j) for p in prompts for j in range(num_images)]
    images, latents = [], []
    for i in tqdm(range(0, len(jobs), batch_size), desc="profusion", disable=not progress or len(jobs) <= batch_size):
        chunk = jobs[i : i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        z = sample(pipe, saved, reference, [p for p, _ in chunk], cfg, gens, progress=progress, latent_hw=latent_hw)
        latents.append(z.cpu())
        images.extend(decode(pipe, z))
    result = ProFusionOutput(images, [p for p, _ in jobs], [s for _, s in jobs], torch.cat(latents))
    from ..generate.infotext import settings_for

    method = f"ProFusion {'fusion' if cfg.refine_steps else 'plain'} sampling"
    result.settings = [settings_for(pipe, p, seed=s, steps=cfg.steps, sampler=cfg.scheduler,
                                    cfg_scale=cfg.guidance_scale, image=img, negative_prompt=cfg.negative_prompt,
                                    Method=method, PromptNet=saved.folder.name if saved.folder else None)
                       for (p, s), img in zip(jobs, images)]
    if out_dir is not None:
        from ..generate.images import save

        save(result, out_dir, columns=num_images)
    return result


def generate_from_image(pipe, prompts: list[str] | str, *, promptnet, image: str | Path | None = None,
                        fusion: bool = True, steps: int = 30, scheduler: str = "ddim", seed: int = 0,
                        num_images: int = 1, out_dir: str | Path | None = None, progress: bool = True,
                        **settings) -> ProFusionOutput:
    """ProFusion the way `conceptkit generate --promptnet/--image` runs it. `promptnet`: a PromptNet folder (or a
    loaded SavedPromptNet); `image`: the reference (default: the one the PromptNet was fine-tuned on); fusion
    sampling with the folder's recommended settings, or plain sampling (`fusion=False`); `settings`: FusionConfig
    fields on top (guidance_scale=..., refine_steps=..., class_word=...)."""
    from ..learn.images import load_reference_image
    from ..models.sdxl import refuse_unless_sd
    from .saved import load_promptnet

    refuse_unless_sd(pipe, "ProFusion (PromptNet)")
    saved = promptnet if isinstance(promptnet, SavedPromptNet) else load_promptnet(promptnet, pipe)
    image = image or saved.reference_path
    if image is None:
        raise UserError(f"no reference image: pass --image FILE (the PromptNet in {saved.folder} was not "
                        "fine-tuned on one)")
    base = recommended_fusion(saved) if fusion else FusionConfig.plain()
    cfg = replace(base, steps=steps, scheduler=scheduler, **settings)
    reference = load_reference_image(image, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    return generate_profusion(pipe, saved, reference, prompts, cfg, seed=seed, num_images=num_images,
                              out_dir=out_dir, progress=progress)
