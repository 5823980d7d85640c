"""Strict checkpoint loading, wrong-file diagnostics, the download cache and presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lipsync.checkpoints import (
    check_state_dict,
    download,
    guess_checkpoint_kind,
    load_unet,
    read_checkpoint,
    require_checkpoints,
)
from lipsync.config import PRESETS, get_preset
from lipsync.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from tests.support.fake_hub import fake_hub
from tests.support.serving_stack import free_port
from tests.support.shared import REFERENCE

TINY_CFG = json.loads((REFERENCE / "unet_tiny/config.json").read_text())


@pytest.fixture(scope="module")
def tiny_state():
    return load_file(str(REFERENCE / "unet_tiny/weights.safetensors"))


def test_pt_with_state_dict_wrapper_and_bare_pt_load_identically(tmp_path, tiny_state):
    wrapped, bare = tmp_path / "wrapped.pt", tmp_path / "bare.pt"
    torch.save({"state_dict": tiny_state, "global_step": 123}, wrapped)
    torch.save(tiny_state, bare)
    a = load_unet(wrapped, TINY_CFG)
    b = load_unet(bare, TINY_CFG)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    # fp16 storage in the file, fp32 compute by default
    assert a.conv_in.weight.dtype == torch.float32
    assert torch.equal(a.conv_in.weight, tiny_state["conv_in.weight"].float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_maps_to_requested_dtype_with_nothing_left_on_meta(dtype):
    model = load_unet(REFERENCE / "unet_tiny/weights.safetensors", TINY_CFG, dtype=dtype)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.requires_grad for p in model.parameters())


def unet_load_error(tmp_path, state: dict) -> str:
    """The CheckpointError message of ``state``, saved as a safetensors file, as the tiny U-Net."""
    path = tmp_path / "state.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as e:
        load_unet(path, TINY_CFG)
    return str(e.value)


def test_missing_key_is_named_with_counts(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["conv_in.weight"]
    msg = unet_load_error(tmp_path, state)
    assert "1 missing keys (e.g. conv_in.weight)" in msg
    assert f"{len(state)} tensors in the file, {len(tiny_state)} in the model" in msg


def test_unexpected_and_misshaped_keys_are_named(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["extra.weight"] = torch.zeros(3)
    state["conv_out.bias"] = torch.zeros(7)
    msg = unet_load_error(tmp_path, state)
    assert "1 unexpected keys (e.g. extra.weight)" in msg
    assert "conv_out.bias: file [7] vs model [4]" in msg


def test_whisper_file_given_as_unet_says_so(reference):
    with pytest.raises(CheckpointError, match="this is a Whisper checkpoint"):
        load_unet(reference / "whisper_tiny/encoder_random.pt", TINY_CFG)


def test_stage2_config_with_a_checkpoint_without_motion_modules(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if ".motion_modules." not in k}
    assert "no (or fewer) motion-module weights" in unet_load_error(tmp_path, state)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        read_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(text)
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(bad_st)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": ValueError("x")}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(path)


def test_guess_kind():
    assert "Whisper" in guess_checkpoint_kind(["encoder.blocks.0.attn.query.weight"])
    assert "VAE" in guess_checkpoint_kind(["encoder.down_blocks.0.resnets.0.conv1.weight"])
    assert "SyncNet" in guess_checkpoint_kind(["audio_encoder.0.conv.weight"])
    assert guess_checkpoint_kind(["foo"]) is None


def test_check_state_dict_accepts_exact_match():
    check_state_dict({"a": (2, 3)}, {"a": torch.zeros(2, 3)}, "thing")


def test_load_does_not_hold_a_second_copy(tmp_path):
    # A ~80 MB fp32 checkpoint loaded as fp32: the file is memory-mapped and assigned in place,
    # so peak RSS grows by about one file size, not two.
    cfg = dict(TINY_CFG, block_out_channels=[128, 256, 256, 256])
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from lipsync.models.unet import UNet3D
        from lipsync.checkpoints import load_unet
        cfg = json.loads({json.dumps(json.dumps(cfg))})
        path = sys.argv[1]
        if sys.argv[2] == "save":
            torch.save({{"state_dict": UNet3D.from_config(cfg).state_dict()}}, path)
            sys.exit(0)
        import os
        def hwm():  # VmHWM: getrusage in a child starts at the parent's high-water mark
            line = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
            return int(line.split()[1]) * 1024
        before = hwm()
        model = load_unet(path, cfg)
        total = sum(float(p.sum()) for p in model.parameters())  # touch every weight page
        after = hwm()
        print(json.dumps({{"grow": after - before, "size": os.path.getsize(path)}}))
        """
    )
    path = tmp_path / "medium.pt"
    run = [sys.executable, "-c", script, str(path)]
    subprocess.run([*run, "save"], check=True)
    out = subprocess.run([*run, "load"], check=True, capture_output=True, text=True).stdout
    numbers = json.loads(out.strip().splitlines()[-1])
    print(numbers)
    assert numbers["size"] > 50e6
    assert numbers["grow"] < 1.5 * numbers["size"], numbers


def test_presets_and_aliases():
    assert get_preset("1.6") is PRESETS["v1.6"] and get_preset("V1.5") is PRESETS["v1.5"]
    assert PRESETS["v1.6"].resolution == 512 and PRESETS["v1.5"].resolution == 256
    assert PRESETS["v1.6"].hf_repo == "ByteDance/LatentSync-1.6"
    assert PRESETS["tiny"].random_weights and PRESETS["tiny"].latent_size == 16
    with pytest.raises(ConfigError, match="unknown preset 'v2'"):
        get_preset("v2")


def test_missing_checkpoints_name_the_download_command(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="run: lipsync download --version 1.6"):
        require_checkpoints(get_preset("v1.6"), tmp_path)


def make_mirror(root):
    files = {
        "ByteDance/LatentSync-1.5/latentsync_unet.pt": b"unet-bytes",
        "ByteDance/LatentSync-1.5/whisper/tiny.pt": b"whisper-bytes",
        "stabilityai/sd-vae-ft-mse/config.json": b"{}",
        "stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors": b"vae-bytes",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_download_from_a_local_mirror_fills_the_cache(tmp_path):
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    make_mirror(mirror)
    paths = download("1.5", root=cache, mirror=mirror, progress=False)
    assert paths["unet"].read_bytes() == b"unet-bytes"
    assert paths["whisper"].read_bytes() == b"whisper-bytes"
    assert (paths["vae"] / "diffusion_pytorch_model.safetensors").read_bytes() == b"vae-bytes"
    assert require_checkpoints(get_preset("1.5"), cache) == paths
    # present files are kept, not fetched again
    paths["unet"].write_bytes(b"local")
    download("1.5", root=cache, mirror=mirror, progress=False)
    assert paths["unet"].read_bytes() == b"local"


def test_download_from_incomplete_mirror_is_clear(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="mirror has no file"):
        download("1.6", root=tmp_path / "c", mirror=tmp_path / "empty", progress=False)


def test_cli_download_offline_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", LIPSYNC_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "download", "--version", "1.6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot download ByteDance/LatentSync-1.6/latentsync_unet.pt")
    assert "HF_HUB_OFFLINE" in lines[0] and "lipsync download" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists()  # nothing made, nothing left


def cli_download(tmp_path, endpoint, *args):
    env = dict(os.environ, HF_ENDPOINT=endpoint, LIPSYNC_HOME=str(tmp_path / "home"))
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "download", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_download_from_an_unreachable_hub_fails_fast(tmp_path):
    """Nothing listens at the endpoint: one line at once, not huggingface_hub's five retries
    with back-off (23 s of sleeping and a warning each), and no folder or lock file left."""
    t = time.perf_counter()
    proc = cli_download(tmp_path, f"http://127.0.0.1:{free_port()}", "--version", "1.6")
    seconds = time.perf_counter() - t
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Retrying" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: cannot download ByteDance/LatentSync-1.6/latentsync_unet.pt")
    assert "unreachable" in lines[0] and "lipsync download --from DIR" in lines[0]
    assert seconds < 20, seconds  # the retries alone sleep 23 s
    assert not (tmp_path / "home").exists()


def test_cli_download_through_the_hub_client_leaves_no_lock_files(tmp_path):
    """The real hf_hub_download against a local Hub: files in the cache's layout, and none of
    the .lock files huggingface_hub leaves behind."""
    files = {
        "ByteDance/LatentSync-1.5/latentsync_unet.pt": b"u" * 1000,
        "ByteDance/LatentSync-1.5/whisper/tiny.pt": b"w" * 10,
        "stabilityai/sd-vae-ft-mse/config.json": b"{}",
        "stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors": b"v" * 50,
    }
    with fake_hub(files) as endpoint:
        proc = cli_download(tmp_path, endpoint, "--version", "1.5")
    assert proc.returncode == 0, proc.stderr
    home = tmp_path / "home"
    assert (home / "v1.5/latentsync_unet.pt").read_bytes() == b"u" * 1000
    assert (home / "v1.5/whisper/tiny.pt").read_bytes() == b"w" * 10
    assert (home / "sd-vae-ft-mse/diffusion_pytorch_model.safetensors").read_bytes() == b"v" * 50
    assert list(home.rglob("*.lock")) == []
    assert require_checkpoints(get_preset("1.5"), home)["unet"] == home / "v1.5/latentsync_unet.pt"
