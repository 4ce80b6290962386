"""The Python API's config objects refuse bad values when built, with a ValueError naming the class and field.
Fields are walked from the dataclasses, so a field added later is tried too (a number field without a check fails)."""
from __future__ import annotations

import dataclasses
import math

import pytest

from conceptkit.compose.config import CLoRAConfig
from conceptkit.learn.lora_config import LoRAConfig
from conceptkit.learn.promptnet_config import FinetuneConfig, PretrainConfig
from conceptkit.learn.ti_config import TIConfig
from conceptkit.profusion.sampling import FusionConfig

CONFIGS = (TIConfig, LoRAConfig, PretrainConfig, FinetuneConfig, CLoRAConfig, FusionConfig)
BAD_NUMBERS = {"wrong type": "abc", "bool": True, "zero": 0, "negative": -1, "NaN": math.nan, "inf": math.inf,
               "-inf": -math.inf, "huge float": 1e30, "huge int": 10**30}
# fields where 0 is a meaningful setting, and why
ZERO_MEANS = {
    "seed": "seed 0 is a seed", "validate_every": "0: only at the end", "flip_p": "0: no mirroring",
    "weight_decay": "0: plain Adam", "l2_reg": "0: the official objective", "guidance_scale": "0: unconditional",
    "guidance_rescale": "0: no rescale (the default)", "step_size": "0: the latent does not move",
    "max_iter_to_alter": "0: no latent update", "iterative_steps_steps": "0: no refinements",
    "minmax_eps": "0: the reference quirk", "apply_mask_after": "0: the default", "mask_threshold": "0: any map > 0",
    "style_weight": "0: the style LoRA off", "merge_weight": "0: the base model", "ref_guidance_scale": "0: no r",
    "refine_steps": "0: plain sampling", "refine_eta": "η 0: deterministic", "refine_emb_scale": "λ 0: no S*",
    "emb_scale": "s 0: no S* in the main step",
    "refine_guidance_scale": "0: unguided sub-step", "validation_images": "0: no validation images",
    "rotate": "0: no rotation", "translate": "0: no translation",
}
# text fields where '' is meaningful (or checked later with a UserError), and why
EMPTY_MEANS = {"negative_prompt": "no negative prompt", "prefix": "S* alone as the training prompt",
               "token": "checked by training_tokenizer with a one-line UserError (tests/test_input_properties.py)"}


def number_fields(cls):
    """(field name, default) of the int/float fields, None-able ones included (by their annotation)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = str(f.type)
        if isinstance(default, bool) or "bool" in kind:
            continue
        if isinstance(default, (int, float)) or kind.replace(" | None", "") in ("int", "float"):
            yield f.name


def text_fields(cls):
    for f in dataclasses.fields(cls):
        if str(f.type).replace(" | None", "") == "str":
            yield f.name


CASES = [(cls, name, kind, value) for cls in CONFIGS for name in number_fields(cls)
         for kind, value in BAD_NUMBERS.items()]


def test_every_config_has_number_fields_to_try():
    assert all(list(number_fields(cls)) for cls in CONFIGS)
    assert len({(c, n) for c, n, _, _ in CASES}) >= 70


@pytest.mark.parametrize("cls, name, kind, value", CASES,
                         ids=[f"{c.__name__}.{n}-{k}" for c, n, k, _ in CASES])
def test_bad_number_is_refused_naming_the_field(cls, name, kind, value):
    if kind == "zero" and name in ZERO_MEANS:
        assert getattr(cls(**{name: value}), name) == 0  # valid: ZERO_MEANS says why
        return
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} = .*: pass "):
        cls(**{name: value})


@pytest.mark.parametrize("cls, name", [(c, n) for c in CONFIGS for n in text_fields(c)])
def test_empty_text_is_refused_naming_the_field(cls, name):
    if name in EMPTY_MEANS:
        cls(**{name: ""})
        return
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} = '': pass "):
        cls(**{name: ""})


@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_and_presets_are_valid(cls):
    cls()
    CLoRAConfig.reference()
    FusionConfig.plain()
    FusionConfig.reference()


def test_clora_iterative_steps_are_step_numbers():
    with pytest.raises(ValueError, match="CLoRAConfig.iterative_steps"):
        CLoRAConfig(iterative_steps=(0, -1))
    with pytest.raises(ValueError, match="CLoRAConfig.iterative_steps"):
        CLoRAConfig(iterative_steps=(0.5,))
