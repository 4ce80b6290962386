"""The denoising loop: the one place in conceptkit that steps a scheduler, for every method.

Shaped like k-diffusion's samplers: a plain function of the model, the latents, the scheduler (its timesteps), a
hook and a callback. The loop owns what every method shares: the starting noise (one generator per image), the
scheduler's input scaling and stepping, classifier-free guidance (`guide`), progress, the trace and decoding.
A method plugs in by giving the loop two functions, and changes nothing else:

- `model(x, step) -> output` — *what the model is*: the prediction for the scaled latent `x` (plain prompt
  conditioning, CLoRA's branches and their masked blend, ProFusion's conditions), guidance included;
- `before_step(latents, step) -> latents` — *what happens to the latent before a step* (CLoRA's contrastive
  update, ProFusion's fusion sub-steps). It gets the latent the scheduler holds (unscaled: for sigma-scaled
  schedulers such as Euler, `step.model_input` scales it the way the model sees it) and returns the one the
  scheduler steps from.

*What gets recorded* (attention maps, masks, losses) goes into `step.trace`. Plain sampling, CLoRA and its
baselines (compose/sampler.py) and ProFusion (profusion/sampling.py) are such plug-ins; generate/plain.py is the
simplest one.

Latents, guidance and scheduler steps run in `work_dtype` (float32 for half-precision models, so that the
updates and the scheduler's arithmetic do not round in fp16); the model casts its input to its own dtype.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

from ..errors import UserError
from .schedulers import make_scheduler


@dataclass
class Trace:
    """What a user looks at to see what a method did: per recorded step the branches' attention maps and masks
    (only when `maps` is on), per latent-updating step the loss."""
    keep_maps: bool = False
    steps: list[int] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)  # (K, r_h, r_w, tokens) per recorded step
    masks: list[torch.Tensor] = field(default_factory=list)  # (K, latent h, latent w) per recorded step
    losses: list[float] = field(default_factory=list)

    def record(self, index: int, maps: torch.Tensor, masks: torch.Tensor) -> None:
        if self.keep_maps:
            self.steps.append(index)
            self.maps.append(maps.cpu())
            self.masks.append(masks.cpu())


@dataclass
class Step:
    """Where the loop is: the step's index and timestep, the scheduler, and the trace to record into."""
    index: int
    t: torch.Tensor
    scheduler: object
    trace: Trace

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent as the model sees it at this step (divided by sqrt(σ² + 1) for sigma-scaled schedulers;
        unchanged, the same tensor, for DDIM, DPM-Solver and PNDM). Differentiable."""
        return self.scheduler.scale_model_input(latents, self.t)


Model = Callable[[torch.Tensor, Step], torch.Tensor]
BeforeStep = Callable[[torch.Tensor, Step], torch.Tensor]


def work_dtype(unet) -> torch.dtype:
    """The dtype of latents, guidance and scheduler steps: float32 for half-precision models, else the model's."""
    return torch.promote_types(unet.dtype, torch.float32)


def sampler(name: str, pipe, steps: int):
    """A fresh scheduler `name` (generate/schedulers.py) built from the model's scheduler config, its timesteps set
    for `steps` steps on the model's device. The pipeline's own scheduler is left as it is."""
    scheduler = make_scheduler(name, pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=pipe.unet.device)
    return scheduler


def latent_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """(h, w) of the latents for an image of height x width (default: the model's native size)."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or native, width or native
    factor = pipe.vae_scale_factor
    if height % factor or width % factor or height < factor or width < factor:
        raise UserError(f"size {width}x{height} is not a positive multiple of {factor}: pass --width/--height "
                        f"divisible by {factor}")
    return height // factor, width // factor


def initial_noise(pipe, generators: list[torch.Generator], latent_hw: tuple[int, int], scheduler) -> torch.Tensor:
    """(B, C, h, w) starting latents: image i's noise from generators[i] alone (drawn in float32 on the CPU), so an
    image does not depend on what it was batched with; scaled by the scheduler's initial sigma."""
    shape = (1, pipe.unet.config.in_channels, *latent_hw)
    noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return noise.to(pipe.unet.device, work_dtype(pipe.unet)) * scheduler.init_noise_sigma


def lora_acts(step: int, steps: int, end: float) -> bool:
    """Whether a LoRA with end share `end` acts at step `step` (0-based) of `steps`: diffusers' control_guidance_end
    rule, (step + 1) / steps <= end."""
    return (step + 1) / steps <= end + 1e-9


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, with the optional rescale of Lin et al. (2023)."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        guided = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
    return guided


def step_options(scheduler, generators: list[torch.Generator] | None) -> dict:
    """η = 0 (deterministic DDIM) and the images' generators (Euler-ancestral's noise), where `step` takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {}
    if "eta" in accepted:
        options["eta"] = 0.0
    if "generator" in accepted and generators is not None:
        options["generator"] = generators
    return options


@torch.no_grad()
def denoise(model: Model, latents: torch.Tensor, scheduler, *, before_step: BeforeStep | None = None,
            generators: list[torch.Generator] | None = None, trace: Trace | None = None,
            callback: Callable[[Step, torch.Tensor], None] | None = None, progress=None) -> torch.Tensor:
    """Run every timestep of `scheduler` (set_timesteps already called) from `latents`; return the final latents.

    Autograd is off; a plug-in that needs it (CLoRA's update) turns it on for its own span. `progress`: anything
    with update(n) (a tqdm bar), advanced once per step; `callback(step, latents)` after each step."""
    trace = trace if trace is not None else Trace()
    options = step_options(scheduler, generators)
    for i, t in enumerate(scheduler.timesteps):
        step = Step(i, t, scheduler, trace)
        if before_step is not None:
            latents = before_step(latents, step)
        output = model(step.model_input(latents), step)
        latents = scheduler.step(output, t, latents, **options, return_dict=False)[0]
        if callback is not None:
            callback(step, latents)
        if progress is not None:
            progress.update(1)
    return latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """The VAE's images of `latents` (one batch; the VAE's slicing and tiling switches apply), as PIL images."""
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pil")
