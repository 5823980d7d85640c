"""StableSyncNet: official key layout, parity with the reference on the tiny fixture, strict
loading, config checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lipsync.checkpoints import load_syncnet, read_safetensors_metadata, save_syncnet
from lipsync.config import load_packaged_config
from lipsync.errors import CheckpointError, ConfigError
from lipsync.models.syncnet import StableSyncNet, SyncNetConfig, cosine_loss
from tests.support.shared import REFERENCE

SYNCNET = REFERENCE / "syncnet"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (SYNCNET / "syncnet_16_pixel_attn_state_dict.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(json.loads(shape))))
    return rows


def test_official_config_has_exactly_the_official_keys_and_shapes():
    cfg = json.loads((SYNCNET / "syncnet_16_pixel_attn_config.json").read_text())
    assert load_packaged_config("syncnet_16_pixel_attn_config.json") == cfg
    with torch.device("meta"):
        model = StableSyncNet.from_config(cfg)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys()  # same keys, shapes and order
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(401.3e6, rel=1e-3)
    assert model.config.image_size == (128, 256) and model.config.mel_window == 52


@pytest.fixture(scope="module")
def tiny() -> StableSyncNet:
    cfg = json.loads((SYNCNET / "syncnet_tiny_config.json").read_text())
    assert load_packaged_config("syncnet_tiny_config.json") == cfg
    model, info = load_syncnet(SYNCNET / "syncnet_tiny.safetensors", config=cfg)
    assert info["name"] == "syncnet_tiny.safetensors"
    return model


def test_tiny_parity_with_reference(tiny):
    io = load_file(str(SYNCNET / "syncnet_tiny_io.safetensors"))
    image = io["image_u8"].float() / 127.5 - 1
    with torch.no_grad():
        vision, audio = tiny(image, io["audio"])
        loss = cosine_loss(vision, audio, io["y"])
    assert vision.shape == audio.shape == (2, 64)
    assert rel_err(vision, io["vision_embeds"]) <= 1e-4
    assert rel_err(audio, io["audio_embeds"]) <= 1e-4
    assert loss.shape == (2,) and rel_err(loss, io["cosine_loss"]) <= 1e-4
    assert torch.allclose(vision.norm(dim=1), torch.ones(2)) and (vision >= 0).all()


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    io = load_file(str(SYNCNET / "syncnet_tiny_io.safetensors"))
    image = io["image_u8"].float() / 127.5 - 1

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        model = StableSyncNet.from_config(tiny.config)
        model.load_state_dict(tiny.state_dict())
        model.train().set_gradient_checkpointing(enabled)
        cosine_loss(*model(image, io["audio"]), io["y"]).mean().backward()
        return {k: p.grad for k, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for key in plain:
        assert torch.allclose(plain[key], ckpt[key], atol=1e-6, rtol=1e-5), key


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(tmp_path):
    cfg = load_packaged_config("syncnet_tiny_config.json")
    state = load_file(str(SYNCNET / "syncnet_tiny.safetensors"))

    missing = dict(state)
    del missing["visual_encoder.down_blocks.5.attn.to_q.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e.g. visual_encoder"):
        load_syncnet(tmp_path / "missing.safetensors", config=cfg)

    extra = {**state, "visual_encoder.extra.weight": torch.zeros(3)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="1 unexpected keys"):
        load_syncnet(tmp_path / "extra.safetensors", config=cfg)

    # the tiny file against the official (401 M) config: wrong shapes, with the likely cause
    with pytest.raises(CheckpointError, match="keys of the wrong shape.*--syncnet-config"):
        load_syncnet(SYNCNET / "syncnet_tiny.safetensors")


def test_a_unet_file_is_named_as_such(tmp_path):
    unet = load_file(str(REFERENCE / "unet_tiny/weights.safetensors"))
    save_file(unet, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="this is a U-Net checkpoint, not a SyncNet"):
        load_syncnet(tmp_path / "unet.safetensors")


def test_official_style_pt_file_loads_with_the_official_config(tmp_path):
    # stable_syncnet.pt is {"global_step": n, "state_dict": {...}} without a config: the
    # official architecture is assumed (checked here through the error, the tiny weights being
    # of another size), and a given config overrides it
    state = load_file(str(SYNCNET / "syncnet_tiny.safetensors"))
    torch.save({"global_step": 3, "state_dict": state}, tmp_path / "stable_syncnet.pt")
    with pytest.raises(CheckpointError, match=r"SyncNet \(official config\)"):
        load_syncnet(tmp_path / "stable_syncnet.pt")
    model, info = load_syncnet(
        tmp_path / "stable_syncnet.pt", config=load_packaged_config("syncnet_tiny_config.json")
    )
    assert info["name"] == "stable_syncnet.pt"


def test_saved_file_carries_config_and_name(tiny, tmp_path):
    path = save_syncnet(tiny, tmp_path / "ours.safetensors", name="lipsync test SyncNet")
    meta = read_safetensors_metadata(path)
    assert meta["format"] == "lipsync.syncnet/1" and meta["name"] == "lipsync test SyncNet"
    model, info = load_syncnet(path)  # no config given: the stored one is used
    assert info["name"] == "lipsync test SyncNet"
    assert model.config == tiny.config
    for key, value in tiny.state_dict().items():  # fp16 storage
        assert torch.allclose(model.state_dict()[key], value.half().float())
    assert not (tmp_path / "ours.safetensors.part").exists()


def test_small_config_fits_in_the_repository():
    cfg = load_packaged_config("syncnet_small_config.json")
    with torch.device("meta"):
        model = StableSyncNet.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert 2 * params < 10 * 2**20  # fp16 bytes
    assert model.config.embed_dim == 128


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["audio_encoder"].update(block_out_channels=[32] * 7), "same channel count"),
        (lambda c: c["visual_encoder"].update(attn_blocks=[0] * 7), "one entry per block"),
        (lambda c: c["visual_encoder"].update(downsample_factors=[1] * 8), "not 1×1"),
        (lambda c: c["audio_encoder"].update(block_out_channels=[48] * 7), "not divisible"),
        (lambda c: c.update(colour="red"), "unknown SyncNet config keys: colour"),
        (lambda c: c.update(num_frames=5), "3 × num_frames"),
    ],
)
def test_bad_configs_are_config_errors(change, message):
    cfg = json.loads(json.dumps(load_packaged_config("syncnet_tiny_config.json")))
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        SyncNetConfig.from_dict(cfg)


def test_wrong_input_shapes_are_named(tiny):
    with pytest.raises(ValueError, match=r"image must be \(b, 48, 128, 256\)"):
        tiny(torch.zeros(1, 48, 64, 128), torch.zeros(1, 1, 80, 52))
    with pytest.raises(ValueError, match=r"audio must be \(b, 1, 80, 52\)"):
        tiny(torch.zeros(1, 48, 128, 256), torch.zeros(1, 1, 80, 40))
