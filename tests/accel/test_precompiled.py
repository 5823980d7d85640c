"""Precompiled artefacts (lipsync.accel.precompiled, `lipsync warmup`, `--compile auto`): keys and
their matching, what `auto` does with no, foreign or matching artefacts, which chunks run
compiled, and a real save -> load round trip that a fresh process finds in the caches (CPU)."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from lipsync.accel import precompiled
from lipsync.diffusion import DenoiseOptions
from lipsync.engine import LocalEngine
from lipsync.errors import ConfigError
from lipsync.face.mask import make_mask
from lipsync.loading import load_models


@functools.cache
def tiny_fingerprint() -> str:
    return load_models("tiny", device="cpu").fingerprint


def key(**changes) -> precompiled.ArtefactKey:
    base = precompiled.artefact_key(
        "tiny", torch.device("cpu"), "fp32", "regional", fp8=False, frames=16,
        models=tiny_fingerprint(),
    )  # fmt: skip
    return replace(base, **changes)


def fake_artefact(folder, k: precompiled.ArtefactKey, plans=("f16-guided-full",)) -> None:
    """A manifest and a .bin as `lipsync warmup` writes them (the .bin is not loadable)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": precompiled.FORMAT, "key": k.__dict__, "plans": list(plans)}
    (folder / f"{k.digest()}.json").write_text(json.dumps(manifest))
    (folder / f"{k.digest()}.bin").write_bytes(b"not an artefact")


def test_keys_match_only_what_the_compiled_code_depends_on(tmp_path):
    ours = key()
    assert ours.device.startswith("cpu (") and ours.code == precompiled.code_hash()
    assert ours.digest() == key().digest() and ours.digest() != key(dtype="bf16").digest()
    assert ours.differences(key(dtype="bf16", frames=8)) == ["dtype bf16 != fp32", "frames 8 != 16"]
    fake_artefact(tmp_path / "a", key(dtype="bf16"))
    fake_artefact(tmp_path / "b", key(compile="full"))
    (tmp_path / "b" / "junk.json").write_text("{not json")  # foreign files are skipped
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "missing"]
    match, others = precompiled.find(ours, dirs)
    assert match is None and len(others) == 2
    match, _ = precompiled.find(ours, dirs, any_compile=True)  # auto takes any compile mode
    assert match is not None and match.key.compile == "full"
    message = precompiled.mismatch_message(ours, others)
    assert "(dtype bf16 != fp32)" in message  # the closest one (the first of equals)
    assert "lipsync warmup --preset tiny --dtype fp32" in message


def test_compiled_dirs_look_in_the_explicit_folder_then_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPSYNC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(precompiled.ENV_DIR, str(tmp_path / "baked"))
    assert precompiled.compiled_dirs() == [tmp_path / "baked", tmp_path / "home" / "compiled"]
    assert precompiled.compiled_dirs(tmp_path / "x")[0] == tmp_path / "x"


def test_plan_items_name_every_kind_of_unet_call():
    fast = DenoiseOptions.for_mode("fast", steps=6)
    assert precompiled.plan_items(fast.plan(), fast.cache_branch, 16) == [
        "f16-cond-cached-b0", "f16-cond-full", "f16-guided-cached-b0", "f16-guided-full",
    ]  # fmt: skip
    exact = DenoiseOptions.for_mode("exact", steps=3)
    assert precompiled.plan_items(exact.plan(), 0, 16) == ["f16-guided-full"]


def test_auto_without_artefacts_is_eager_and_silent(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lipsync"):
        bundle = load_models("tiny", device="cpu", compile="auto", compiled_dir=tmp_path)
    assert bundle.compile_mode == "none" and not bundle.compiled
    assert bundle.precompiled is None and bundle.notes == [] and caplog.records == []


def test_auto_with_foreign_artefacts_is_eager_with_one_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("LIPSYNC_HOME", str(tmp_path / "home"))
    fake_artefact(tmp_path / "baked", key(dtype="bf16"))
    with caplog.at_level(logging.WARNING, logger="lipsync"):
        bundle = load_models("tiny", device="cpu", compile="auto", compiled_dir=tmp_path / "baked")
    assert bundle.compile_mode == "none"
    (note,) = bundle.notes
    assert "dtype bf16 != fp32" in note and "running eagerly" in note
    assert [r.getMessage() for r in caplog.records] == [note]


def test_auto_with_a_damaged_matching_artefact_falls_back_to_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPSYNC_HOME", str(tmp_path / "home"))
    fake_artefact(tmp_path / "baked", key())  # matches, but the .bin is not an artefact
    bundle = load_models("tiny", device="cpu", compile="auto", compiled_dir=tmp_path / "baked")
    assert bundle.compile_mode == "none" and bundle.precompiled is None
    assert any("cannot load precompiled artefacts" in n for n in bundle.notes)
    with pytest.raises(ConfigError, match="needs a compile mode"):
        from lipsync.config import LoadOptions
        from lipsync.tools.warmup import warmup

        warmup(LoadOptions(preset="tiny", device="cpu", compile="auto"), ["exact"])


def stances(monkeypatch) -> list:
    seen = []
    real = torch.compiler.set_stance

    def spy(stance, **kwargs):
        seen.append(stance)
        return real(stance, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", spy)
    return seen


def denoise_chunk(engine, k, options):
    g = torch.Generator().manual_seed(k)
    faces = torch.rand(k, 3, 128, 128, generator=g) * 2 - 1
    windows = torch.randn(k, 50, 384, generator=g)
    mask = torch.from_numpy(make_mask(128))
    return engine.denoise(faces, windows, mask, 1, 0, options)


def test_which_chunks_run_compiled(monkeypatch, tmp_path):
    """Compiled models (the stance is what torch.compile is told; the tiny models here are not
    really compiled, which changes nothing about the decision): a chunk shorter than one already
    run goes eager instead of recompiling; with `auto`, only what the artefact covers runs
    compiled and a plan it lacks warns once."""
    seen = stances(monkeypatch)
    bundle = load_models("tiny", device="cpu")
    bundle.compile_mode = "regional"
    engine = LocalEngine(bundle)
    exact = DenoiseOptions.for_mode("exact", steps=1)
    denoise_chunk(engine, 16, exact)
    denoise_chunk(engine, 5, exact)  # the short last chunk of a video
    assert seen == ["eager_on_recompile"]

    seen.clear()
    bundle.precompiled = precompiled.Artefact(tmp_path / "a.bin", key(), ["f16-guided-full"], {})
    bundle.precompiled_only = True
    engine = LocalEngine(bundle)
    denoise_chunk(engine, 16, exact)  # covered: compiled (no stance)
    denoise_chunk(engine, 5, exact)  # shorter than the artefact's chunk: eager
    fast = DenoiseOptions.for_mode("fast", steps=6)
    denoise_chunk(engine, 16, fast)  # not covered: eager, one warning
    denoise_chunk(engine, 16, fast)
    assert seen == ["force_eager", "force_eager", "force_eager"]
    notes = [n for n in bundle.notes if "do not cover" in n]
    assert len(notes) == 1 and "f16-cond-cached-b0" in notes[0]


ROUND_TRIP = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from lipsync.accel import precompiled
    phase, folder = sys.argv[1], sys.argv[2]
    k = precompiled.artefact_key("tiny", torch.device("cpu"), "fp32", "regional", False, 16)
    if phase == "load":
        art, _ = precompiled.find(k, [Path(folder)])
        loaded = precompiled.load(art)
    f = torch.compile(lambda x: torch.sin(x) * 2 + x.cos())
    before = precompiled.compile_counters()
    y = f(torch.arange(64.0))
    after = precompiled.compile_counters()
    if phase == "save":
        precompiled.save(folder, k, ["f16-guided-full"])
        loaded = 0
    print(json.dumps({"loaded": loaded, **{n: after[n] - before[n] for n in after},
                      "y": float(y.sum())}))
    """
)


@pytest.mark.slow
def test_saved_artefacts_are_found_by_a_fresh_process(tmp_path):
    """Process 1 compiles and saves; process 2, with an empty inductor cache, loads the artefact
    and its compile is an FX-graph cache hit (nothing compiled from scratch)."""

    def run(phase, cache):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / cache))
        proc = subprocess.run(
            [sys.executable, "-c", ROUND_TRIP, phase, str(tmp_path / "art")],
            capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    saved = run("save", "cache1")
    assert saved["fxgraph_cache_miss"] >= 1 and saved["fxgraph_cache_hit"] == 0
    (manifest,) = (tmp_path / "art").glob("*.json")
    assert json.loads(manifest.read_text())["plans"] == ["f16-guided-full"]
    loaded = run("load", "cache2")
    assert loaded["loaded"] >= 1
    assert loaded["fxgraph_cache_hit"] >= 1 and loaded["fxgraph_cache_miss"] == 0
    assert loaded["y"] == saved["y"]


def test_workers_take_auto_from_their_settings():
    """The job service's engine workers load like everyone else: LIPSYNC_COMPILE=auto reaches
    their LoadOptions (the Triton server takes --compile auto the same way)."""
    from lipsync.serving.settings import ServeSettings

    settings = ServeSettings.from_env({"LIPSYNC_COMPILE": "auto"})
    assert settings.load_options().compile == "auto"
    with pytest.raises(ConfigError, match="LIPSYNC_COMPILE.*'auto'"):
        ServeSettings.from_env({"LIPSYNC_COMPILE": "sometimes"})
