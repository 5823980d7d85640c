"""One loading function for every caller: the default policy, and a job-service worker with
``--runner engine`` that honours compile and FP8 (it used to load without either)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lipsync.accel.fp8 as fp8_module
import lipsync.loading as loading
from lipsync.accel.compile import REGIONS
from lipsync.config import LoadOptions, Preset
from lipsync.errors import ConfigError
from lipsync.loading import load_models, parse_dtype
from lipsync.models.vae import random_vae
from lipsync.serving.settings import ServeSettings
from lipsync.serving.worker import make_runner
from tests.support.model_files import write_vae_folder
from tests.support.shared import REFERENCE


def compiled(module: torch.nn.Module) -> bool:
    """``module.compile()`` was called on it (torch keeps the compiled forward beside it)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def test_default_policy_on_this_cpu_machine():
    assert not torch.cuda.is_available()
    assert loading.resolve_device(None) == torch.device("cpu")
    assert loading.resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert loading.resolve_dtype(None, torch.device("cuda")) is torch.float16
    assert loading.resolve_dtype("BF16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        loading.resolve_device("cuda")
    bundle = loading.load_models("tiny")
    assert (bundle.device, bundle.dtype) == (torch.device("cpu"), torch.float32)
    assert torch.get_num_threads() == max(1, (os.cpu_count() or 2) - 1)
    assert bundle.random_weights and not bundle.fp8
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        loading.load_models("tiny", dtype="int8")
    with pytest.raises(ConfigError, match="unknown compile mode 'fast'"):
        LoadOptions(compile="fast").validate()


def test_worker_engine_runner_compiles_like_lipsync_run(monkeypatch):
    monkeypatch.setenv("LIPSYNC_COMPILE", "regional")  # what the Kubernetes manifests set
    settings = ServeSettings.from_env(runner="engine", preset="tiny", device="cpu")
    assert settings.load_options().compile == "regional"
    runner = make_runner(settings)
    regions = [m for m in runner.models.unet.modules() if isinstance(m, REGIONS)]
    assert regions and all(compiled(m) for m in regions)
    vae = runner.models.vae.autoencoder
    assert compiled(vae.encoder) and compiled(vae.decoder)
    plain = make_runner(ServeSettings(runner="engine", preset="tiny", device="cpu"))
    assert not any(compiled(m) for m in plain.models.unet.modules())


def test_worker_engine_runner_converts_to_fp8(monkeypatch):
    # This machine has no FP8 GPU: the option reaches the loader and is refused there, before
    # any weights are read ...
    settings = ServeSettings(runner="engine", preset="tiny", device="cpu", dtype="bf16", fp8=True)
    with pytest.raises(ConfigError, match="FP8 needs an NVIDIA GPU"):
        make_runner(settings)
    # ... and with the device check out of the way the U-Net's linear layers are converted (the
    # tiny net's are 32-64 wide, under the 128 of the real ones: the threshold follows)
    monkeypatch.setattr(loading, "require_fp8_device", lambda device: None)
    monkeypatch.setattr(fp8_module, "require_fp8_device", lambda device: None)
    convert = fp8_module.convert_unet_to_fp8
    monkeypatch.setattr(loading, "convert_unet_to_fp8", lambda unet: convert(unet, min_features=32))
    runner = make_runner(settings)
    linears = [m for m in runner.models.unet.modules() if isinstance(m, fp8_module.FP8Linear)]
    assert len(linears) > 10 and runner.models.fp8 and runner.pipeline.engine.fp8
    assert not make_runner(settings.model_copy(update={"fp8": False})).models.fp8


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("FP16") is torch.float16
    with pytest.raises(ConfigError):
        parse_dtype("int4")


def test_load_models_reads_a_downloaded_cache_layout(tmp_path):
    # A preset whose files are laid out exactly as `lipsync download` leaves them.
    preset = Preset(
        name="vtest",
        resolution=128,
        unet_config_file="unet_tiny_config.json",
        hf_repo="ByteDance/LatentSync-test",
    )
    base = tmp_path / "vtest"
    (base / "whisper").mkdir(parents=True)

    torch.save(
        {"state_dict": load_file(str(REFERENCE / "unet_tiny/weights.safetensors"))},
        base / "latentsync_unet.pt",
    )
    shutil.copy(REFERENCE / "whisper_tiny/encoder_random.pt", base / "whisper/tiny.pt")
    vae_state = {k: v.contiguous() for k, v in random_vae().autoencoder.state_dict().items()}
    write_vae_folder(tmp_path / "sd-vae-ft-mse", vae_state)
    bundle = load_models(preset, checkpoint_dir=tmp_path, dtype="bf16")
    assert bundle.unet.dtype == torch.bfloat16
    assert bundle.vae.dtype == torch.bfloat16
    assert bundle.audio.dims.n_audio_state == 384
