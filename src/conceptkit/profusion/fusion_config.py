"""ProFusion's sampling settings (ALGORITHMS.md §3.6, §3.7) as plain data, and what `generate --help` says about them.

No torch import: `conceptkit generate --help` builds its option texts from these defaults (and from the bundled
PromptNet's promptnet.json), and --help must stay fast (tests/test_startup_imports.py).

Which defaults apply to `generate --promptnet/--image` (profusion/sampling.py `generate_from_image`):
- fusion (the default): the PromptNet folder's recommended settings (promptnet.json `fusion_settings`; the bundled
  PromptNet and every fine-tune of it have them), on top of the notebook's fusion call (`FusionConfig()`);
- --no-fusion: the notebook's plain sampling (`FusionConfig.plain()`);
- an option given on the command line wins over both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from .. import values as v

DEFAULT_PLACEHOLDER = "S*"
BUNDLED_PROMPTNET_META = Path(__file__).resolve().parents[1] / "bundled" / "promptnet" / "promptnet.json"
START_TIMESTEP = v.Number(int, 1, 999)  # t ≤ T are sampled (the official `st`; 1000 = all, the default: None)


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
    # S*'s encoder-output scale in the main step (1: the notebook's; > 1 emphasises the image's word against the
    # prompt's other words, as AUTOMATIC1111's "(S*:1.3)"); plain sampling uses it too
    emb_scale: float = 1.0
    negative_prompt: str = ""
    class_word: str = "object"  # r = the prompt with S* replaced by this word ("a person" in the official code)
    ref_prompt: str | None = None  # overrides the derived r
    placeholder: str = DEFAULT_PLACEHOLDER
    execution: str = "batched"  # batched | reference
    scheduler: str = "ddim"  # fusion sub-steps are DDIM's: other schedulers (generate/schedulers.py) only without them
    # img2img from the reference (the official `st`): sample only the timesteps t ≤ start_timestep, starting from the
    # reference latent noised to the first of them; None samples every timestep from pure noise. DDIM only.
    start_timestep: int | None = None

    def __post_init__(self) -> None:
        """A bad setting fails here, naming the field, not in the sampler (tests/test_config_checks.py)."""
        v.check_config(self, {"steps": v.COUNT, "guidance_scale": v.GUIDANCE, "ref_guidance_scale": v.GUIDANCE,
                              "refine_steps": v.COUNT_OR_ZERO, "refine_eta": v.ETA,
                              "refine_emb_scale": v.SMALL_WEIGHT, "refine_guidance_scale": v.GUIDANCE,
                              "emb_scale": v.SMALL_WEIGHT, "start_timestep": START_TIMESTEP},
                       optional=("start_timestep",))
        v.check_text(self, ("class_word", "ref_prompt", "placeholder"), optional=("ref_prompt",))
        v.check_choice(self, "execution", ("batched", "reference"))
        v.check_choice(self, "scheduler", v.SCHEDULER_NAMES)

    @classmethod
    def plain(cls, **kw) -> "FusionConfig":
        return cls(**{"guidance_scale": 5.0, "ref_guidance_scale": 0.0, "refine_steps": 0, **kw})

    @classmethod
    def reference(cls, **kw) -> "FusionConfig":
        return cls(**{"execution": "reference", **kw})


# the settings a PromptNet folder may recommend (promptnet.json `fusion_settings`)
RECOMMENDABLE = ("guidance_scale", "ref_guidance_scale", "refine_steps", "refine_eta", "refine_emb_scale",
                 "refine_guidance_scale", "emb_scale")
# the recommended settings that plain sampling (--no-fusion) takes too: how strongly to read the folder's S*
PLAIN_RECOMMENDABLE = ("emb_scale",)


def bundled_recommendation() -> dict:
    """The bundled PromptNet's `fusion_settings` (read from its promptnet.json; {} if it is not there)."""
    try:
        meta = json.loads(BUNDLED_PROMPTNET_META.read_text())
    except (OSError, ValueError):
        return {}
    settings = meta.get("fusion_settings", {}) if isinstance(meta, dict) else {}
    known = {f.name for f in fields(FusionConfig)}
    return {k: val for k, val in settings.items() if k in known}


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_text(name: str) -> str:
    """What `generate --help` says a fusion setting's default is: the defaults that really apply, with fusion (the
    folder's recommendation, the bundled PromptNet's value, else the notebook's) and with --no-fusion."""
    notebook, plain = getattr(FusionConfig(), name), getattr(FusionConfig.plain(), name)
    bundled = bundled_recommendation().get(name, notebook)
    if name in PLAIN_RECOMMENDABLE:
        no_fusion = "; the same with --no-fusion"
    else:
        no_fusion = f"; --no-fusion: {_show(plain)}" if plain != notebook else ""
    return (f"default: the PromptNet folder's recommended value, {_show(bundled)} for the bundled PromptNet, "
            f"else {_show(notebook)} as in the notebook's fusion call{no_fusion}")
