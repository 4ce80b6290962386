"""ProFusion sampling (ALGORITHMS.md §3.6): plain sampling with the encoded word S*, and fusion sampling.

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
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
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
    return torch.promote_types(pipe.unet.dtype, torch.float32)


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


@torch.no_grad()
def sample(pipe, saved: SavedPromptNet, reference: torch.Tensor, prompts: list[str], cfg: FusionConfig,
           generators: list[torch.Generator], progress: bool = False) -> torch.Tensor:
    """Final latents (B, C, h, w) for `prompts` (one image each, generator i for image i) given the reference
    image (1, 3, H, W) in [-1, 1]."""
    check_config(cfg)
    for p in prompts:
        check_placeholder(p, cfg.placeholder)
    device = pipe.unet.device
    b = len(prompts)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.steps, device=device)
    alphas = scheduler.alphas_cumprod
    prediction = scheduler.config.prediction_type
    step_gap = scheduler.config.num_train_timesteps // cfg.steps
    scaling = pipe.vae.config.scaling_factor
    pixels = reference.to(device, pipe.vae.dtype)
    dist = pipe.vae.encode(pixels).latent_dist
    # x_ref = vae.encode(ref).sample() · scaling, drawn from each image's own generator (batching-independent);
    # or the posterior mean, if that is what the PromptNet was trained with
    work = work_dtype(pipe)
    if saved.meta.get("latents", "sample") == "mean":
        x_ref = dist.mean.to(work).expand(b, -1, -1, -1) * scaling
    else:
        draws = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(device)
        x_ref = (dist.mean + dist.std * draws).to(work) * scaling
    tokens = saved.image_encoder(reference.float().to(device).expand(b, -1, -1, -1), x_ref)
    cond = encode_conditions(pipe, prompts, cfg)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, work) * scheduler.init_noise_sigma
    ev = Evaluator(pipe, saved, x_ref, tokens, cond, cfg)
    with unet_attention_applied(pipe.unet, saved.unet_attention):
        for t in tqdm(scheduler.timesteps, desc="profusion", disable=not progress, leave=False):
            a = float(alphas[int(t)])
            prev = int(t) - step_gap
            a_prev = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
            if cfg.refine_eta > 0:
                for _ in range(cfg.refine_steps):
                    eps = to_epsilon(ev.fusion_output(x, t), x, a, prediction)
                    x = fusion_update(x, eps, a, a_prev, cfg.refine_eta, fusion_noise(x, generators, cfg))
            out = ev.main_output(x, t)
            x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images.float(), output_type="pil")


def generate_profusion(pipe, saved: SavedPromptNet, reference: torch.Tensor, prompts: list[str] | str,
                       cfg: FusionConfig | None = None, *, seed: int = 0, num_images: int = 1, batch_size: int = 8,
                       out_dir: str | Path | None = None, progress: bool = True) -> ProFusionOutput:
    """`num_images` images per prompt (image j uses seed + j, its own generator), as PIL images."""
    cfg = cfg or FusionConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given: pass --prompt \"S* on a navy background\"")
    jobs = [(p, seed + j) for p in prompts for j in range(num_images)]
    images, latents = [], []
    for i in tqdm(range(0, len(jobs), batch_size), desc="profusion", disable=not progress or len(jobs) <= batch_size):
        chunk = jobs[i : i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        z = sample(pipe, saved, reference, [p for p, _ in chunk], cfg, gens, progress=progress)
        latents.append(z.cpu())
        images.extend(decode(pipe, z))
    result = ProFusionOutput(images, [p for p, _ in jobs], [s for _, s in jobs], torch.cat(latents))
    if out_dir is not None:
        from ..generate.images import save

        save(result, out_dir, columns=num_images)
    return result
