"""load_pipeline: every `--model` form loads the same weights, offline, and bad input gives a clear UserError."""
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conceptkit.errors import UserError
from conceptkit.models import loading
from conceptkit.models.fixtures import build_tiny_sd, write_single_file
from conceptkit.models.loading import bundled_model_path, describe_model, load_pipeline

HUB_ID = "conceptkit-test/tiny-sd"
COMPONENTS = ("unet", "vae", "text_encoder")


def sample(pipe, seed=0, steps=2):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe("a photo of a sks dog", num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=generator).images


def assert_same_weights(pipe_a, pipe_b):
    for name in COMPONENTS:
        weights_a = getattr(pipe_a, name).state_dict()
        weights_b = getattr(pipe_b, name).state_dict()
        assert weights_a.keys() == weights_b.keys(), name
        for key, tensor in weights_a.items():
            assert torch.equal(tensor, weights_b[key]), f"{name}.{key}"


def fake_hub_cache(root: Path, repo_id: str, model_folder: Path) -> Path:
    """Lay out `model_folder` as huggingface_hub does: models--org--name/{refs/main, snapshots/<hash>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_folder, repo_folder / "snapshots" / commit, copy_function=lambda src, dst: Path(
        dst).symlink_to(Path(src).resolve()))
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)
    return root


@pytest.fixture(scope="module")
def folder_pipe(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir))


@pytest.fixture
def hub_cache(sd_tiny_dir, tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", HUB_ID, sd_tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# --- the fixture model itself --------------------------------------------------------------------------------

def test_fixture_has_stable_diffusion_1_architecture(folder_pipe):
    unet, vae, text_encoder = folder_pipe.unet, folder_pipe.vae, folder_pipe.text_encoder
    assert unet.config.cross_attention_dim == 768 == text_encoder.config.hidden_size
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet.config.up_block_types == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert folder_pipe.vae_scale_factor == 8 and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert text_encoder.config.vocab_size == 49408 and text_encoder.config.max_position_embeddings == 77
    scheduler = folder_pipe.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert scheduler.steps_offset == 1 and scheduler.num_train_timesteps == 1000
    assert folder_pipe.safety_checker is None
    assert folder_pipe.tokenizer("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]


def build_tiny_sd_unet(folder, seed):
    return build_tiny_sd(folder, seed=seed) / "unet" / "diffusion_pytorch_model.safetensors"


def test_fixture_build_is_seeded(sd_tiny_dir, tmp_path):
    same = load_file(str(build_tiny_sd_unet(tmp_path / "same", seed=0)))
    other = load_file(str(build_tiny_sd_unet(tmp_path / "other", seed=1)))
    reference = load_file(str(sd_tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(reference[key], same[key]) for key in reference)
    assert not torch.equal(reference["conv_in.weight"], other["conv_in.weight"])


def test_single_file_uses_original_ldm_layout(sd_tiny_single_file):
    keys = load_file(str(sd_tiny_single_file)).keys()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in keys)
    assert all(any(key.startswith(prefix) for key in keys) for prefix in prefixes)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert not any("down_blocks" in key or "resnets" in key for key in keys)


# --- each --model form ----------------------------------------------------------------------------------------

def test_folder_samples_deterministically_under_a_seed(folder_pipe):
    first, again, other_seed = sample(folder_pipe, seed=0), sample(folder_pipe, seed=0), sample(folder_pipe, seed=1)
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)


def test_toy_uses_the_override_folder(toy_model_env, folder_pipe):
    pipe = load_pipeline()
    assert_same_weights(pipe, folder_pipe)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"


def test_missing_bundled_toy_model_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.delenv("CONCEPTKIT_TOY_MODEL", raising=False)
    monkeypatch.setattr(loading, "bundled_model_path", lambda: tmp_path / "bundled" / "shapes-base")
    with pytest.raises(UserError, match="conceptkit shapes train-base"):
        load_pipeline("toy")


def test_bundled_model_lives_inside_the_package():
    import conceptkit

    assert bundled_model_path() == Path(conceptkit.__file__).parent / "bundled" / "shapes-base"


def test_single_file_loads_the_same_weights_as_the_folder(sd_tiny_single_file, sd_tiny_dir, folder_pipe):
    pipe = load_pipeline(str(sd_tiny_single_file), config=str(sd_tiny_dir))
    assert_same_weights(pipe, folder_pipe)


def test_ckpt_loads_with_weights_only(sd_tiny_single_file, sd_tiny_dir, folder_pipe, tmp_path):
    ckpt = tmp_path / "sd-tiny.ckpt"
    torch.save({"state_dict": load_file(str(sd_tiny_single_file)), "global_step": 7}, ckpt)
    pipe = load_pipeline(str(ckpt), config=str(sd_tiny_dir))
    assert_same_weights(pipe, folder_pipe)


class CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_malicious_ckpt(path: Path, marker: Path, zip_format: bool) -> None:
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)},
               "callback": CreatesFileWhenUnpickled(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "plain-pickle"])
def test_malicious_ckpt_is_refused_without_running_its_code(zip_format, sd_tiny_dir, tmp_path):
    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    write_malicious_ckpt(ckpt, marker, zip_format)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_pipeline(str(ckpt), config=str(sd_tiny_dir))
    assert not marker.exists()


def test_malicious_ckpt_payload_really_runs_code_when_fully_unpickled(tmp_path):
    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    write_malicious_ckpt(ckpt, marker, zip_format=True)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()  # so the test above would notice if the payload were unpickled


def test_hub_id_in_the_local_cache_loads(hub_cache, folder_pipe):
    pipe = load_pipeline(HUB_ID)
    assert_same_weights(pipe, folder_pipe)


def test_single_file_config_may_be_a_cached_hub_id(hub_cache, sd_tiny_single_file, folder_pipe):
    pipe = load_pipeline(str(sd_tiny_single_file), config=HUB_ID)
    assert_same_weights(pipe, folder_pipe)


def parameter_dtypes(pipe, name):
    return {parameter.dtype for parameter in getattr(pipe, name).parameters()}


def test_stored_fp16_weights_load_as_float32(sd_tiny_dir, tmp_path):
    half_pipe = load_pipeline(str(sd_tiny_dir), dtype=torch.float16)
    half_folder, half_file = tmp_path / "half", tmp_path / "half.safetensors"
    half_pipe.save_pretrained(half_folder)
    write_single_file(half_pipe, half_file)
    assert load_file(str(half_file))["model.diffusion_model.out.2.weight"].dtype == torch.float16
    for model, config in [(half_folder, None), (half_file, half_folder)]:
        pipe = load_pipeline(str(model), config=config and str(config), dtype=torch.float32)
        for name in COMPONENTS:
            assert parameter_dtypes(pipe, name) == {torch.float32}, (model, name)


def test_requested_dtype_is_applied(sd_tiny_dir):
    pipe = load_pipeline(str(sd_tiny_dir), dtype=torch.bfloat16)
    for name in COMPONENTS:
        assert parameter_dtypes(pipe, name) == {torch.bfloat16}, name


def test_loading_leaves_library_progress_bars_as_they_were(sd_tiny_dir):
    from diffusers.utils import logging as diffusers_logging

    assert diffusers_logging.is_progress_bar_enabled()
    pipe = load_pipeline(str(sd_tiny_dir))
    assert diffusers_logging.is_progress_bar_enabled()
    assert pipe._progress_bar_config == {"disable": True}


def test_describe_model_names_each_form(sd_tiny_dir, monkeypatch):
    assert describe_model("toy") == "toy"
    assert describe_model(HUB_ID) == HUB_ID
    monkeypatch.chdir(sd_tiny_dir.parent)
    assert describe_model(sd_tiny_dir.name) == str(sd_tiny_dir.resolve())


# --- errors ---------------------------------------------------------------------------------------------------

def test_unknown_name_says_what_was_tried(hub_cache):
    with pytest.raises(UserError) as error:
        load_pipeline("no-such-org/no-such-model")
    message = str(error.value)
    assert "not a diffusers folder" in message and ".safetensors/.ckpt" in message
    assert f"HF_HUB_CACHE={hub_cache}" in message and "\n" not in message


@pytest.mark.parametrize("model", ["definitely-not-a-model", "/nonexistent/folder", "/nonexistent/model.safetensors"])
def test_missing_paths_and_names_are_user_errors(model):
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_pipeline(model)


def test_single_file_without_config_asks_for_config(sd_tiny_single_file):
    with pytest.raises(UserError, match="--config"):
        load_pipeline(str(sd_tiny_single_file))


def test_config_that_is_not_a_diffusers_folder_is_refused(sd_tiny_single_file, tmp_path):
    with pytest.raises(UserError, match="--config"):
        load_pipeline(str(sd_tiny_single_file), config=str(tmp_path))


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_file_with_another_suffix_is_refused(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match=r"not \.safetensors or \.ckpt"):
        load_pipeline(str(weights))


def test_config_with_a_folder_model_is_refused(sd_tiny_dir):
    with pytest.raises(UserError, match="--config is only used"):
        load_pipeline(str(sd_tiny_dir), config=str(sd_tiny_dir))


def test_broken_diffusers_folder_is_a_user_error(sd_tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_tiny_dir, broken, ignore=shutil.ignore_patterns("diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match="could not load"):
        load_pipeline(str(broken))


# --- offline --------------------------------------------------------------------------------------------------

class NetworkUsed(Exception):
    pass


@pytest.fixture
def network_calls(monkeypatch):
    """Record (and block) every attempt to open a network connection or resolve a host name."""
    calls = []

    def refuse(name):
        def record(*args, **kwargs):
            calls.append((name, args))
            raise NetworkUsed(name)
        return record

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return calls


def test_network_guard_catches_connections(network_calls):
    with pytest.raises(NetworkUsed):
        socket.create_connection(("huggingface.co", 443))
    with pytest.raises(NetworkUsed):
        socket.socket().connect(("127.0.0.1", 9))
    assert [name for name, _ in network_calls] == ["create_connection", "connect"]


def test_loading_and_sampling_never_open_a_socket(network_calls, hub_cache, sd_tiny_dir, sd_tiny_single_file):
    forms = [(str(sd_tiny_dir), None), (str(sd_tiny_single_file), str(sd_tiny_dir)), (HUB_ID, None),
             (str(sd_tiny_single_file), HUB_ID)]
    for model, config in forms:
        images = sample(load_pipeline(model, config=config))
        assert images.shape == (1, 64, 64, 3)
    assert network_calls == []


def test_the_sd15_width_fixture_has_sd15s_parameter_counts(tmp_path):
    """benchmarks/gpu_speed.sh times SD 1.5-sized work on this random-weight model: its UNet, VAE and text encoder
    must be SD 1.5's sizes (built on the meta device: no memory, no weights)."""
    import torch

    from conceptkit.models.fixtures import sd15_width_pipeline, write_sd_clip_tokenizer

    tokenizer = write_sd_clip_tokenizer(tmp_path / "tokenizer")
    with torch.device("meta"):
        pipe = sd15_width_pipeline(tokenizer)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512
