"""Own trained models in the loader (issue #15): the ``demo`` bundle preset and ``--unet``.

The bundle here is a tiny one written in the test (``own_checkpoints.write_bundle``): the
``tiny`` U-Net and VAE architectures with seeded weights whose constant tensors are redrawn (so
the U-Net's zero-initialised output layers do not hide which weights run), a seeded audio
encoder, resolution 128 and 20 frames per chunk in its manifest. The loader is pointed at it
through ``LoadOptions.bundle_dir`` and ``$LIPSYNC_DEMO_BUNDLE``, the two documented overrides of
the bundle shipped in ``lipsync/weights/demo``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lipsync
from lipsync.api import LipSync
from lipsync.audio import load_audio
from lipsync.cli import main
from lipsync.config import LoadOptions, bundle_dir, get_preset
from lipsync.errors import CheckpointNotFoundError, ConfigError
from lipsync.export.weights import randomize_constant_parameters
from lipsync.loading import check_unet_fits, load_models
from lipsync.media import read_frames
from lipsync.models.unet import random_unet
from lipsync.models.vae import TINY_VAE_CONFIG, random_vae
from lipsync.own_checkpoints import (
    MANIFEST,
    OwnUNetInfo,
    read_manifest,
    seeded_audio_spec,
    state_sha256,
    write_bundle,
)
from lipsync.pipeline import LipSyncPipeline, RunOptions
from lipsync.train.unet import export_unet
from tests.support.media_factory import make_audio, make_video
from tests.support.shared import MEDIA, demo_source_frames

TINY_UNET = get_preset("tiny").unet_config
N = 8  # frames of the real demo clip each run uses


@pytest.fixture(scope="module")
def parts():
    """The tiny architectures with seeded weights, every constant tensor redrawn."""
    unet = random_unet(TINY_UNET, seed=5)
    vae = random_vae(TINY_VAE_CONFIG, seed=7)
    assert randomize_constant_parameters(unet, seed=6) > 0
    assert randomize_constant_parameters(vae, seed=8) > 0
    return unet, vae


@pytest.fixture(scope="module")
def bundle(parts, tmp_path_factory) -> Path:
    unet, vae = parts
    return write_bundle(
        tmp_path_factory.mktemp("bundle") / "demo",
        unet_state=unet.state_dict(), unet_config=TINY_UNET,
        vae_state=vae.autoencoder.state_dict(), vae_config=TINY_VAE_CONFIG,
        vae_scaling_factor=0.5, audio_spec=seeded_audio_spec(3), resolution=128, num_frames=20,
        name="demo", max_shard_bytes=2**20,  # U-Net in several shards, as the real one
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(parts, tmp_path_factory) -> Path:
    """A ``lipsync train unet`` output folder: unet.safetensors (config and resolution in its
    metadata) + unet_config.json, fp32."""
    out = tmp_path_factory.mktemp("run")
    export_unet(out, TINY_UNET, parts[0].state_dict(), "fp32", step=3, resolution=128)
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """8 frames of the real demo clip from its first word (the 600 x 600 around the face at half
    size) and its speech, as arrays and as files."""
    folder = tmp_path_factory.mktemp("clip")
    start = 11  # the speech starts at 0.44 s
    frames = demo_source_frames(start + N)[start:, 380:980:2, 295:895:2].copy()  # (8, 300, 300, 3)
    wav = load_audio(MEDIA / "demo1_audio.wav")[start * 640 : (start + N) * 640]
    video = make_video(
        folder / "clip.mp4", seconds=N / 25, fps=25, size=(300, 300), crf=16,
        draw=lambda i, t: frames[min(int(t * 25 + 1e-6), N - 1)],
    )  # fmt: skip
    return frames, wav, video, make_audio(folder / "speech.wav", signal=wav)


def stored(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of a bundle part as its files hold them (fp16)."""
    state: dict[str, torch.Tensor] = {}
    for name in read_manifest(folder)[part]["files"]:
        state.update(load_file(str(folder / name)))
    return state


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        main([*map(str, argv)])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------
# the demo preset


def test_demo_preset_loads_every_model_from_the_bundle(bundle):
    models = load_models(LoadOptions(preset="demo", bundle_dir=bundle, device="cpu"))
    manifest = read_manifest(bundle)
    assert models.preset.name == "demo" and not models.random_weights
    # the manifest's geometry, not the preset's defaults (256 px, 16 frames)
    assert (models.preset.resolution, models.preset.num_frames) == (128, 20)
    assert len(manifest["unet"]["files"]) > 1
    assert_same_weights(models.unet, stored(bundle, "unet"))
    assert_same_weights(models.vae.autoencoder, stored(bundle, "vae"))
    assert models.vae.scaling_factor == 0.5
    # the audio encoder: seeded as the manifest says (its hash is checked at load, and here)
    assert manifest["audio"]["kind"] == "whisper-seeded" and manifest["audio"]["seed"] == 3
    assert state_sha256(models.audio.encoder.state_dict()) == manifest["audio"]["sha256"]
    tiny = load_models("tiny", device="cpu")  # and none of them is the tiny preset's
    assert not torch.equal(models.unet.conv_in.weight, tiny.unet.conv_in.weight)
    decoder, tiny_decoder = models.vae.autoencoder.decoder, tiny.vae.autoencoder.decoder
    assert not torch.equal(decoder.conv_in.weight, tiny_decoder.conv_in.weight)


def test_demo_preset_follows_lipsync_demo_bundle_and_runs_the_pipeline(bundle, clip, monkeypatch):
    monkeypatch.setenv("LIPSYNC_DEMO_BUNDLE", str(bundle))
    frames, wav, _, _ = clip
    pipeline = LipSyncPipeline(load_models("demo", device="cpu"))
    assert pipeline.resolution == 128
    options = RunOptions(steps=2, seed=4)
    out, report = pipeline.run_arrays(frames, wav, options)
    again, _ = pipeline.run_arrays(frames, wav, options)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert report.preset == "demo" and report.frames == report.frames_with_face == N
    assert np.array_equal(out, again)  # deterministic for a seed
    changed = np.abs(out.astype(np.int16) - frames.astype(np.int16)).reshape(N, -1).max(1)
    assert (changed > 20).all()  # every mouth was regenerated by the bundle's models


def test_a_student_bundle_runs_at_its_own_settings_unless_told_otherwise(
    parts, tmp_path, clip, monkeypatch, capsys
):
    """``lipsync run`` with a few-step student (``training.student`` in its manifest) uses the
    student's steps, guidance and scheduler; flags given on the command line still win."""
    unet, vae = parts
    student = write_bundle(
        tmp_path / "student",
        unet_state=unet.state_dict(), unet_config=TINY_UNET,
        vae_state=vae.autoencoder.state_dict(), vae_config=TINY_VAE_CONFIG,
        vae_scaling_factor=0.5, audio_spec=seeded_audio_spec(3), resolution=128, num_frames=20,
        name="demo", training={"student": {"steps": 1, "guidance": 1.0, "scheduler": "dpm++"}},
    )  # fmt: skip
    monkeypatch.setenv("LIPSYNC_DEMO_BUNDLE", str(student))
    _, _, video, audio = clip
    runs = {}
    for name, flags in (("own", []), ("told", ["--steps", "2", "--guidance", "1.5"])):
        out = tmp_path / f"{name}.mp4"
        code, stdout, err = cli(capsys, "run", video, audio, "-o", out, "-p", "demo",
                                "--device", "cpu", "--json", "-q", *flags)  # fmt: skip
        assert code == 0, err
        runs[name] = json.loads(stdout)["denoise"]
    assert (runs["own"]["steps"], runs["own"]["guidance"]) == (1, 1.0)
    assert runs["own"]["scheduler"] == "dpm++"
    assert (runs["told"]["steps"], runs["told"]["guidance"]) == (2, 1.5)
    assert runs["told"]["scheduler"] == "dpm++"  # not given: still the student's


def test_demo_preset_without_its_bundle_is_one_clear_error(tmp_path, clip, monkeypatch, capsys):
    _, _, video, audio = clip
    empty = tmp_path / "empty"
    empty.mkdir()  # a folder without manifest.json is as missing as no folder
    for missing in (tmp_path / "nowhere", empty):
        monkeypatch.setenv("LIPSYNC_DEMO_BUNDLE", str(missing))
        with pytest.raises(CheckpointNotFoundError, match="model bundle is missing"):
            load_models("demo", device="cpu")
        code, _, err = cli(capsys, "run", video, audio, "-o", tmp_path / "o.mp4", "-p", "demo")
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith("error: the demo preset's model bundle is missing: ")
        assert f"{missing} (from $LIPSYNC_DEMO_BUNDLE) has no {MANIFEST}" in err
    assert not (tmp_path / "o.mp4").exists()
    with pytest.raises(CheckpointNotFoundError, match=r"\(given\) has no manifest.json"):
        load_models(LoadOptions("demo", bundle_dir=empty, device="cpu"))
    # without an override: the folder shipped in the package
    monkeypatch.delenv("LIPSYNC_DEMO_BUNDLE")
    shipped = Path(lipsync.__file__).parent / "weights" / "demo"
    assert bundle_dir(get_preset("demo")) == shipped


def test_presets_lists_the_demo_bundle_and_where_it_is(bundle, tmp_path, monkeypatch, capsys):
    for folder, status in [(bundle, "bundle ready"), (tmp_path, f"missing bundle: {tmp_path}")]:
        monkeypatch.setenv("LIPSYNC_DEMO_BUNDLE", str(folder))
        code, stdout, _ = cli(capsys, "presets", "--json")
        demo = {row["name"]: row for row in json.loads(stdout)}["demo"]
        assert code == 0 and demo["checkpoints"] == status
        assert demo["paths"] == {"bundle": str(folder)} and demo["resolution"] == 256


def test_demo_preset_refuses_random_weights_and_other_presets_a_bundle_dir(bundle):
    with pytest.raises(ConfigError, match="--random-weights does not apply to the demo preset"):
        load_models(LoadOptions("demo", bundle_dir=bundle, random_weights=True))
    with pytest.raises(ConfigError, match="bundle_dir is for bundle presets"):
        load_models(LoadOptions("tiny", bundle_dir=bundle))


# --------------------------------------------------------------------------------------------
# --unet


def test_unet_option_takes_each_form_of_own_checkpoint(parts, bundle, run_dir, tmp_path):
    lone = tmp_path / "mine.safetensors"  # a copied file: its metadata carries config and size
    shutil.copyfile(run_dir / "unet.safetensors", lone)
    fp32 = parts[0].state_dict()
    tiny_vae = random_vae(TINY_VAE_CONFIG, seed=0).autoencoder.state_dict()  # the preset's
    for source, expected in [(bundle, stored(bundle, "unet")), (run_dir, fp32), (lone, fp32)]:
        models = load_models(LoadOptions("tiny", unet=source, device="cpu"))
        assert_same_weights(models.unet, expected)
        assert_same_weights(models.vae.autoencoder, tiny_vae)
    # in the demo preset: our U-Net, the bundle's VAE and audio encoder
    models = load_models(LoadOptions("demo", bundle_dir=bundle, unet=lone, device="cpu"))
    assert_same_weights(models.unet, fp32)
    assert_same_weights(models.vae.autoencoder, stored(bundle, "vae"))


def test_lipsync_run_unet_equals_the_api(run_dir, clip, tmp_path, capsys):
    _, _, video, audio = clip
    out = tmp_path / "cli.mp4"
    code, stdout, err = cli(
        capsys, "run", video, audio, "-o", out, "--preset", "tiny", "--unet",
        run_dir / "unet.safetensors", "--steps", "2", "--seed", "4", "--quiet", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["frames"] == N
    api_out = tmp_path / "api.mp4"
    ls = LipSync.from_pretrained("tiny", unet=run_dir / "unet.safetensors", device="cpu")
    ls.run(video, audio, api_out, steps=2, seed=4)
    plain_out = tmp_path / "plain.mp4"  # the preset's own U-Net paints other mouths
    LipSync.from_pretrained("tiny", device="cpu").run(video, audio, plain_out, steps=2, seed=4)
    got, api, plain = read_frames(out), read_frames(api_out), read_frames(plain_out)
    assert got.shape == (N, 300, 300, 3) and np.array_equal(got, api)
    assert np.abs(got.astype(np.int16) - plain.astype(np.int16)).max() > 20


def test_unet_that_does_not_fit_the_preset_is_one_clear_error(bundle, tmp_path, capsys):
    # v1.5 runs 256 px faces; the bundle's U-Net was trained at 128 px. The check reads the
    # config alone, before any weights: v1.5's checkpoints are not needed to be told.
    options = LoadOptions("v1.5", unet=bundle, checkpoint_dir=tmp_path, device="cpu")
    with pytest.raises(ConfigError, match=r"trained at 128 px \(the preset's faces: 256 px\)"):
        load_models(options)
    other = tmp_path / "other"
    # real inputs: run checks its paths and media before it loads anything
    REAL_INPUTS = (str(MEDIA / "demo1_video.mp4"), str(MEDIA / "demo1_audio.wav"))
    config = dict(TINY_UNET, in_channels=9, cross_attention_dim=256)
    export_unet(other, config, random_unet(config).state_dict(), "fp32", step=1)
    code, _, err = cli(capsys, "run", *REAL_INPUTS, "-o", tmp_path / "o.mp4", "-p", "tiny",
                       "--unet", other)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: --unet {other} does not fit the tiny preset: ")
    assert "in_channels 9 (the preset's: 13)" in err
    assert "cross_attention_dim 256 (the preset's: 384)" in err
    code, _, err = cli(capsys, "run", *REAL_INPUTS, "-o", tmp_path / "o.mp4", "--unet",
                       tmp_path / "absent.safetensors")  # fmt: skip
    assert code == 2 and err.startswith("error: U-Net checkpoint not found")


def test_check_unet_fits_names_every_geometry_problem():
    tiny = get_preset("tiny")
    check_unet_fits(OwnUNetInfo(TINY_UNET, 128), TINY_UNET, tiny)  # fits: no error
    check_unet_fits(OwnUNetInfo(TINY_UNET, None), TINY_UNET, tiny)  # size not recorded
    odd = replace(tiny, resolution=136)  # 17 x 17 latents: three halvings do not divide them
    with pytest.raises(ConfigError, match=r"4 down blocks need latents divisible by 8 \(the "
                       r"preset's: 17\)"):  # fmt: skip
        check_unet_fits(OwnUNetInfo(TINY_UNET, None), TINY_UNET, odd)
    short = dict(TINY_UNET, motion_module_kwargs=dict(
        TINY_UNET["motion_module_kwargs"], temporal_position_encoding_max_len=8))  # fmt: skip
    with pytest.raises(ConfigError, match=r"motion modules of at most 8 frames \(the preset's "
                       r"chunks: 16\); choose the preset"):  # fmt: skip
        check_unet_fits(OwnUNetInfo(short, 128), TINY_UNET, tiny, "mine")
    with pytest.raises(ConfigError, match="--unet mine: its config is not a U-Net config"):
        check_unet_fits(OwnUNetInfo({"bogus": 1}, 128), TINY_UNET, tiny, "mine")
