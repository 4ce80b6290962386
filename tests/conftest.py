"""Shared pytest fixtures: a tiny offline Stable Diffusion 1.x-architecture model, as a folder and as a single file."""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings


from conceptkit.models.fixtures import build_tiny_sd, write_single_file
from conceptkit.models.sdxl_fixture import TEXT_WIDTH_2_FOR_SINGLE_FILE, build_tiny_sdxl, write_sdxl_single_file

# Another process may be training on the same machine: keep each test to one core.
torch.set_num_threads(1)

# Property tests draw the same examples on every run, so a red CI can be reproduced; HYPOTHESIS_PROFILE=explore
# searches anew (run it when changing a parser, and keep what it finds as a fix plus an @example).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def sd_tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-weight StableDiffusionPipeline diffusers folder (seed 0)."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd-tiny") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def sd_tiny_single_file(sd_tiny_dir, tmp_path_factory) -> Path:
    """The same model as one LDM-layout .safetensors checkpoint (load it with config=sd_tiny_dir)."""
    return write_single_file(sd_tiny_dir, tmp_path_factory.mktemp("sd-tiny-single") / "sd-tiny.safetensors")


@pytest.fixture(scope="session")
def sdxl_tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-weight StableDiffusionXLPipeline diffusers folder (seed 0; diffusers' SDXL test widths)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-tiny") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def sdxl_tiny_wide_dir(tmp_path_factory) -> Path:
    """The tiny SDXL folder with a wider second encoder (32 and 48 wide, as SDXL's are 768 and 1280): diffusers'
    single-file loader tells CLIP-L from OpenCLIP-bigG by width, so equal widths would load one into the other."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-tiny-wide") / "pipeline", seed=0,
                           text_width_2=TEXT_WIDTH_2_FOR_SINGLE_FILE)


@pytest.fixture(scope="session")
def sdxl_tiny_single_file(sdxl_tiny_wide_dir, tmp_path_factory) -> Path:
    """sdxl_tiny_wide_dir as one original-layout SDXL .safetensors checkpoint (load it with config=that folder)."""
    return write_sdxl_single_file(sdxl_tiny_wide_dir,
                                  tmp_path_factory.mktemp("sdxl-tiny-single") / "sdxl-tiny.safetensors")


@pytest.fixture
def toy_model_env(sd_tiny_dir, monkeypatch) -> Path:
    """Make `--model toy` resolve to the tiny fixture instead of the (separately trained) bundled model."""
    monkeypatch.setenv("CONCEPTKIT_TOY_MODEL", str(sd_tiny_dir))
    return sd_tiny_dir


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    """Four 64 px random-noise images, no metadata: a PromptNet pre-training domain for tests."""
    from promptnet_helpers import write_noise_images

    return write_noise_images(tmp_path_factory.mktemp("domain") / "images", 4, 64, 64, seed=0)
