"""Training building blocks on their own: configs (ours and the reference's layout), the losses'
pretrained-model loaders, the seeded audio encoder, EMA, and the diffusion arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from lipsync.config import load_packaged_config
from lipsync.errors import CheckpointError, ConfigError
from lipsync.models.whisper import WhisperDims
from lipsync.own_checkpoints import (
    seeded_audio_encoder,
    seeded_audio_spec,
    seeded_uniform,
    seeded_whisper_state,
    state_sha256,
)
from lipsync.train.config import load_unet_config, resolve_config_path
from lipsync.train.losses import (
    LpipsVgg,
    TrepaLoss,
    VideoMaeDims,
    VideoMaeEncoder,
    add_noise,
    predict_x0,
    training_noise,
)
from lipsync.train.unet import build_unet, train_unet
from tests.support.train_fixtures import TOY_FACTORY, unet_config_dict

# The reference's configs/unet/stage2.yaml (ByteDance), data paths shortened.
REFERENCE_STAGE2 = """
data:
  syncnet_config_path: configs/syncnet/syncnet_16_pixel_attn.yaml
  train_output_dir: debug/unet
  train_fileslist: /data/fileslist.txt
  train_data_dir: ""
  audio_embeds_cache_dir: /data/embeds
  audio_mel_cache_dir: /data/mel
  val_video_path: assets/demo1_video.mp4
  val_audio_path: assets/demo1_audio.wav
  batch_size: 1 # 4
  num_workers: 12 # 12
  num_frames: 16
  resolution: 256
  mask_image_path: latentsync/utils/mask.png
  audio_sample_rate: 16000
  video_fps: 25
  audio_feat_length: [2, 2]
ckpt:
  resume_ckpt_path: checkpoints/latentsync_unet.pt
  save_ckpt_steps: 10000
run:
  pixel_space_supervise: true
  use_syncnet: true
  sync_loss_weight: 0.05
  perceptual_loss_weight: 0.1 # 0.1
  recon_loss_weight: 1 # 1
  guidance_scale: 1.5 # [1.0 - 3.0]
  trepa_loss_weight: 10
  inference_steps: 20
  trainable_modules:
    - motion_modules.
    - attentions.
  seed: 1247
  use_mixed_noise: true
  mixed_noise_alpha: 1 # 1
  mixed_precision_training: true
  enable_gradient_checkpointing: true
  max_train_steps: 10000000
  max_train_epochs: -1
optimizer:
  lr: 1e-5
  scale_lr: false
  max_grad_norm: 1.0
  lr_scheduler: constant
  lr_warmup_steps: 0
"""


def test_reference_yaml_translates_field_by_field(tmp_path):
    ref = yaml.safe_load(REFERENCE_STAGE2)
    ref["model"] = load_packaged_config("unet_stage2_config.json")
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(ref))
    overrides = ["data.root=/corpus", "syncnet.path=/s.pt", "losses.lpips_weights=/l.pth",
                 "losses.trepa_weights=/t.pth", "vae.path=/vae", "audio.path=/tiny.pt"]  # fmt: skip
    cfg = load_unet_config(path, overrides)
    assert cfg.stage == 2
    assert cfg.train.trainable == ["motion_modules.", "attentions."]
    assert (cfg.losses.recon, cfg.losses.sync, cfg.losses.lpips, cfg.losses.trepa) == (
        1.0, 0.05, 0.1, 10.0)  # fmt: skip
    assert cfg.losses.pixel_space and cfg.noise.mixed and cfg.noise.alpha == 1.0
    assert cfg.optimizer.lr == 1e-5 and cfg.optimizer.max_grad_norm == 1.0
    assert cfg.init.path == "checkpoints/latentsync_unet.pt"
    assert cfg.init.allow_missing == ["motion_modules."]
    assert cfg.checkpoint.every == cfg.validation.every == 10000
    assert cfg.model.resolution == 256 and cfg.model.num_frames == 16
    assert cfg.train.precision == "bf16" and cfg.train.gradient_checkpointing


@pytest.mark.parametrize(
    ("name", "config", "resolution", "stage", "trainable"),
    [
        ("stage1", "unet_stage1_config.json", 256, 1, []),
        ("stage2", "unet_stage2_config.json", 256, 2, ["motion_modules.", "attentions."]),
        ("stage2_efficient", "unet_stage2_efficient_config.json", 256, 2,
         ["motion_modules.", "attn2."]),
        ("stage1_512", "unet_stage1_config.json", 512, 1, []),
        ("stage2_512", "unet_stage2_512_config.json", 512, 2, ["motion_modules.", "attentions."]),
    ],
)  # fmt: skip
def test_shipped_reference_configs(name, config, resolution, stage, trainable):
    paths = ["data.root=/corpus", "losses.lpips_weights=/l.pth", "losses.trepa_weights=/t.pth"]
    cfg = load_unet_config(resolve_config_path(name), paths)
    assert (cfg.model.unet_config, cfg.model.resolution, cfg.stage) == (config, resolution, stage)
    assert cfg.train.trainable == trainable
    unet = load_packaged_config(config)
    assert unet["use_motion_module"] == (stage == 2)


def test_init_exceptions_are_listed_and_everything_else_strict(tmp_path):
    from lipsync.train.unet import export_unet

    stage2 = load_unet_config(unet_config_dict(tmp_path / "a", stage=2))
    model, _ = build_unet(stage2)
    folder = tmp_path / "stage2_weights"
    folder.mkdir()
    unet2 = stage2.model.unet_config
    export_unet(folder, unet2, model.state_dict(), "fp32", 0)
    # a stage-2 file for a stage-1 run: the motion modules are dropped (listed), the rest loads
    init = {"source": "own", "path": str(folder), "allow_unexpected": ["motion_modules."]}
    stage1 = load_unet_config(unet_config_dict(tmp_path / "b", stage=1, init=init))
    model1, report = build_unet(stage1)
    assert report["unexpected_dropped"] > 0 and report["missing_allowed"] == 0
    assert torch.equal(model1.state_dict()["conv_in.weight"], model.state_dict()["conv_in.weight"])
    # without the exception the same file is refused, naming the cause
    strict = load_unet_config(unet_config_dict(tmp_path / "c", stage=1, init={
        "source": "own", "path": str(folder)}))  # fmt: skip
    with pytest.raises(CheckpointError, match="motion modules the config lacks"):
        build_unet(strict)


def test_adamw8bit_without_bitsandbytes_is_one_clear_error(tmp_path):
    cfg = load_unet_config(unet_config_dict(tmp_path, optimizer={"kind": "adamw8bit"}))
    try:
        import bitsandbytes  # noqa: F401

        pytest.fail("this test expects bitsandbytes to be absent (CPU CI)")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        train_unet(cfg, device="cpu", show_progress=False)


def test_ema_weights_are_exported(tmp_path):
    from safetensors.torch import load_file

    from lipsync.train.checkpointing import CheckpointDir

    out = tmp_path / "run"
    cfg = load_unet_config(unet_config_dict(out, train={"max_steps": 2},
                                            ema={"enabled": True, "decay": 0.5}))  # fmt: skip
    train_unet(cfg, device="cpu", show_progress=False)
    state = CheckpointDir(out / "checkpoints").load_latest()
    exported = load_file(str(out / "unet.safetensors"))
    key = "conv_in.weight"
    assert torch.equal(exported[key], state["ema"][key])
    assert not torch.equal(state["ema"][key], state["model"][key])


def test_lpips_loads_the_lpips_package_layout_strictly(tmp_path):
    torch.manual_seed(0)
    model = LpipsVgg()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("scaling_layer")}
    state = {k: v.abs() if k.startswith("lin") else v for k, v in state.items()}  # as trained
    path = tmp_path / "lpips_vgg.pth"
    torch.save(state, path)
    lpips = LpipsVgg.from_file(path)
    a = torch.rand(2, 3, 32, 64) * 2 - 1
    b = torch.rand(2, 3, 32, 64) * 2 - 1
    assert torch.allclose(lpips(a, a), torch.zeros(2), atol=1e-6)
    assert (lpips(a, b) > 0).all()
    state.pop("lin0.model.1.weight")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="1 missing keys"):
        LpipsVgg.from_file(path)


def test_trepa_loads_videomae_checkpoints_strictly(tmp_path):
    dims = {"embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_hidden": 64, "patch_size": 8,
            "image_size": 32, "num_frames": 4, "num_classes": 5}  # fmt: skip
    torch.manual_seed(0)
    encoder = VideoMaeEncoder(VideoMaeDims.named(dims))
    path = tmp_path / "videomae.pth"
    torch.save({"module": encoder.state_dict()}, path)  # the official files nest the weights
    trepa = TrepaLoss.from_file(path, dims, checkpointing=False)
    x = torch.rand(1, 3, 4, 48, 48) * 2 - 1
    y = torch.rand(1, 3, 4, 48, 48) * 2 - 1
    assert float(trepa(x, x)) == pytest.approx(0.0, abs=1e-7)
    fake = x.clone().requires_grad_(True)
    loss = trepa(fake, y)
    loss.backward()
    assert loss > 0 and fake.grad.abs().sum() > 0
    with pytest.raises(CheckpointError, match="VideoMAE"):
        TrepaLoss.from_file(path, {**dims, "depth": 3})


def test_seeded_audio_encoder_is_reproducible_and_hash_checked():
    dims = WhisperDims()
    a, b = seeded_whisper_state(dims, 0), seeded_whisper_state(dims, 0)
    assert state_sha256(a) == state_sha256(b) == seeded_audio_spec(0)["sha256"]
    assert state_sha256(seeded_whisper_state(dims, 1)) != state_sha256(a)
    # the generator is pinned: fixed numbers for (seed, name), not numpy's or torch's RNG
    u = seeded_uniform(0, "x", 3)
    assert u.tolist() == pytest.approx([0.82677, 0.49724, 0.74800], abs=5e-6)
    w = a["blocks.0.attn.query.weight"]
    assert float(w.abs().max()) <= 1 / math.sqrt(384) and float(w.std()) > 0.02
    with pytest.raises(CheckpointError, match="seeded audio encoder"):
        seeded_audio_encoder(0, expected_sha256="0" * 64)


def test_noise_and_one_step_prediction_invert_each_other():
    alphas = torch.linspace(0.99, 0.01, 1000)
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    x0 = torch.randn(2, 4, 3, 5, 5)
    noise = training_noise((2, 4, 3, 5, 5), g, torch.device("cpu"), mixed=True, alpha=1.0)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(predict_x0(alphas, add_noise(alphas, x0, noise, t), noise, t), x0,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    # unmixed noise is one draw repeated over the frames (how inference starts)
    flat = training_noise((1, 4, 3, 5, 5), g[:1], torch.device("cpu"), mixed=False, alpha=1.0)
    assert torch.equal(flat[:, :, 0], flat[:, :, 2])
    # mixed noise keeps unit variance
    big = training_noise((1, 4, 64, 32, 32), [torch.Generator().manual_seed(3)],
                         torch.device("cpu"), mixed=True, alpha=1.0)  # fmt: skip
    assert float(big.std()) == pytest.approx(1.0, abs=0.05)


def test_vae_training_raises_psnr_and_exports_a_loadable_vae(tmp_path):
    from lipsync.own_checkpoints import load_own_vae
    from lipsync.train.config import load_vae_config
    from lipsync.train.metrics import read_jsonl
    from lipsync.train.vae import train_vae

    out = tmp_path / "vae"
    cfg = load_vae_config({
        "output_dir": str(out), "resolution": 64,
        "autoencoder": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
                        "norm_num_groups": 8, "latent_channels": 4},
        "data": {"factory": TOY_FACTORY, "batch_size": 2, "num_workers": 0},
        "train": {"max_steps": 8, "precision": "fp32", "gradient_checkpointing": False,
                  "log_every": 1},
        "optimizer": {"lr": 3e-3, "fused": False},
        "checkpoint": {"every": 8},
        "validation": {"every": 8, "at_start": True, "windows": 2},
    })  # fmt: skip
    summary = train_vae(cfg, device="cpu", show_progress=False)
    val = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "val"}
    assert set(val) == {0, 8} and val[8]["psnr"] > val[0]["psnr"] + 1.0
    assert summary["val"]["psnr"] == pytest.approx(val[8]["psnr"], abs=1e-6)
    vae = load_own_vae(out)
    assert vae.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert vae.scaling_factor == pytest.approx(1.0 / summary["val"]["latent_std"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert vae.decode(vae.encode(x)).shape == x.shape


def test_weight_shards_stay_under_the_limit_with_their_headers(tmp_path):
    """Every shard file, header and metadata included, stays within ``max_shard_bytes`` (the GPU
    machine refuses files past 16 MiB; a shard whose tensors alone filled the budget did not)."""
    from lipsync.own_checkpoints import save_weights

    limit = 64 * 1024
    # many small tensors with long names: their header entries are a large share of the file
    state = {
        f"block.{i:03d}.a_rather_long_parameter_name.weight": torch.ones(500) for i in range(90)
    }
    names = save_weights(state, tmp_path, "w", dtype="fp32", metadata={"config": "x" * 2000},
                         max_shard_bytes=limit)  # fmt: skip
    sizes = [(tmp_path / n).stat().st_size for n in names]
    assert len(names) > 1 and max(sizes) <= limit, sizes
    assert sum(sizes) > 90 * 2000  # everything was written
