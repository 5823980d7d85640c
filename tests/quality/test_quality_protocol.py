"""The quality protocol (issue 16) end to end on a CPU: a 64 px toy pack, a random tiny teacher,
a tiny SyncNet. The runner with worker processes (calibrated step budget, arms × seeds, the
reference rows, the student, the benchmark) and its output files; the CTC and TREPA arms as
in-process jobs; the statistics, tables and chart; the judges' metrics."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lipsync.errors import ConfigError
from lipsync.eval.lipread import accuracy, train_lipreader, viseme_ids
from lipsync.eval.mouth_metrics import mouth_flicker, region_psnr
from lipsync.eval.protocol import SMOKE, ProtocolConfig, run_protocol
from lipsync.eval.protocol_jobs import Job, prepare, run_job, work_paths, write_random_teacher
from lipsync.eval.protocol_report import markdown, summarise
from lipsync.own_checkpoints import bundle_denoise_defaults, load_bundle
from lipsync.train.config import from_dict
from tests.support.quality_fixtures import make_pack, toy_faces
from tests.support.train_fixtures import write_tiny_syncnet_16

METRIC_KEYS = {"dub.sync_confidence", "dub.sync_offset_acc", "dub.viseme_acc", "dub.flicker",
               "dub.outside_psnr", "recon.mouth_psnr", "recon.sync_confidence"}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    pack = make_pack(tmp)
    teacher = write_random_teacher(tmp / "teacher", 64)
    syncnet = write_tiny_syncnet_16(tmp / "syncnet.safetensors")
    return tmp, pack, teacher, syncnet


def config(tmp: Path, pack, teacher, syncnet, name: str, **changes) -> ProtocolConfig:
    data = {**SMOKE, "pack": str(pack), "teacher": str(teacher), "syncnet": str(syncnet),
            "out": str(tmp / name / "out"), "work": str(tmp / name / "work"), "device": "cpu",
            **changes}  # fmt: skip
    return from_dict(ProtocolConfig, data)


def test_the_runner_end_to_end(setup):
    tmp, pack, teacher, syncnet = setup
    cfg = config(tmp, pack, teacher, syncnet, "e2e", arms=["baseline", "dyncond"], steps=0,
                 calib_steps=1, parallel=0, train_seconds=4.0)  # fmt: skip
    summary = run_protocol(cfg, log=lambda _: None)
    assert summary["failures"] == {}
    out = Path(cfg.out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"results.jsonl", "results.md", "results.png", "summary.json",
            "student/manifest.json"} <= set(files) and len(files) <= 8  # fmt: skip
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    arms = [r for r in records if r["kind"] == "arm"]
    assert sorted((r["arm"], r["seed"]) for r in arms) == [
        ("baseline", 0), ("baseline", 1), ("dyncond", 0), ("dyncond", 1)]  # fmt: skip
    # one calibrated budget for every arm
    budget = json.loads(work_paths(Path(cfg.work))["steps"].read_text())["steps"]
    assert budget >= 2 and {r["steps"] for r in arms} == {budget}
    for r in arms:
        assert METRIC_KEYS <= set(r["metrics"])
        assert all(math.isfinite(v) for v in r["metrics"].values())
    refs = {r["name"]: r for r in records if r["kind"] in ("reference", "student", "fast")}
    assert {"teacher", "ground_truth", "ground_truth_dubbed", "student"} <= set(refs)
    assert refs["ground_truth"]["metrics"]["recon.viseme_acc"] >= 0
    bench = next(r for r in records if r["kind"] == "benchmark")
    names = [row["name"] for row in bench["rows"]]
    assert names[:2] == ["teacher", "student"] and any(n.startswith("fast") for n in names)
    assert all(row["fps"] > 0 for row in bench["rows"])
    assert [row["calls"] for row in bench["rows"][:2]] == [2 * cfg.eval_steps, cfg.student_steps]
    fast = [r for r in records if r["kind"] == "fast"]
    assert len(fast) == 1 and METRIC_KEYS <= set(fast[0]["metrics"])
    stats = summary["arms"]["dyncond"]["dub.sync_confidence"]
    assert stats["n"] == 2 and "exceeds" in stats and "paired_mean" in stats
    table = (out / "results.md").read_text()
    assert "| baseline (n=2) |" in table and "| dyncond |" in table and "student" in table
    student = load_bundle(out / "student")
    assert bundle_denoise_defaults(student.manifest) == {
        "steps": cfg.student_steps, "guidance": 1.0, "scheduler": "ddim"}  # fmt: skip


def test_ctc_and_trepa_arms_train_on_their_judges(setup):
    tmp, pack, teacher, syncnet = setup
    cfg = config(tmp, pack, teacher, syncnet, "inproc", steps=2)
    prepare(cfg, log=lambda _: None)
    for judge in ("lipreader", "ctc_head", "video"):
        result = run_job(cfg, Job(judge, judge, deadline=0.0))
        assert result["steps"] == 1 and math.isfinite(result["loss_last"])
    assert 0 <= result["loss_last"]
    for arm in ("phone_ctc", "mouth_trepa"):
        result = run_job(cfg, Job("arm", f"{arm}-s0", arm, 0))
        assert result["steps"] == 2 and METRIC_KEYS <= set(result["metrics"])
        part = "ctc" if arm == "phone_ctc" else "mtrepa"
        assert all(part in line for line in result["log"])
    assert result["quality"]["mouth_trepa"]["mouth_weight"] == cfg.mouth_weight
    with pytest.raises(ConfigError, match="unknown arm"):
        run_job(cfg, Job("arm", "x", "nonsense", 0))


def test_config_errors(setup):
    tmp, pack, teacher, syncnet = setup
    with pytest.raises(ConfigError, match="must include the baseline"):
        config(tmp, pack, teacher, syncnet, "x", arms=["dyncond"]).validate()
    with pytest.raises(ConfigError, match="unknown arm"):
        config(tmp, pack, teacher, syncnet, "x", arms=["baseline", "magic"]).validate()
    with pytest.raises(ConfigError, match="not a bundle"):
        config(tmp, pack, tmp, syncnet, "x").validate()
    with pytest.raises(ConfigError, match="needs every arm at once"):
        config(tmp, pack, teacher, syncnet, "x", steps=0, parallel=2).validate()
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'"):
        from_dict(ProtocolConfig, {"batchsize": 3})


def _record(arm, seed, value):
    return {"kind": "arm", "arm": arm, "seed": seed, "steps": 10,
            "metrics": {"dub.sync_confidence": value, "dub.flicker": 10 - value}}  # fmt: skip


def test_statistics_and_the_spread_rule():
    records = [_record("baseline", s, v) for s, v in enumerate([1.0, 1.1, 0.9])]
    records += [_record("a", s, v) for s, v in enumerate([2.0, 2.1, 1.9])]  # clearly better
    records += [_record("b", s, v) for s, v in enumerate([1.05, 0.8, 1.3])]  # within the noise
    records.append({"kind": "reference", "name": "teacher", "metrics": {"dub.flicker": 9.0}})
    summary = summarise(records)
    a, b = summary["arms"]["a"], summary["arms"]["b"]
    conf = a["dub.sync_confidence"]
    assert conf["mean"] == pytest.approx(2.0) and conf["std"] == pytest.approx(0.1)
    assert conf["delta"] == pytest.approx(1.0) and conf["spread"] == pytest.approx(0.2)
    assert conf["exceeds"] and conf["better"]
    assert conf["paired_mean"] == pytest.approx(1.0) and conf["paired_std"] == pytest.approx(0.0)
    assert a["dub.flicker"]["exceeds"] and a["dub.flicker"]["better"]  # lower flicker is better
    assert not b["dub.sync_confidence"]["exceeds"] and not b["dub.sync_confidence"]["better"]
    table = markdown(summary)
    assert "| a (n=3) |" in table and "**+1.000**" in table and "*teacher*" in table
    one = summarise([_record("baseline", 0, 1.0), _record("a", 0, 5.0)])
    assert not one["arms"]["a"]["dub.sync_confidence"]["exceeds"]  # one seed: no spread, no claim


def test_lipreader_flicker_and_region_psnr():
    def sample(step):
        return toy_faces(4, 16, seed=step)

    model, losses = train_lipreader(sample, 40, lr=3e-3)
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    faces, phones = toy_faces(2, 16, seed=123)
    vis, _ = model.predict(faces.reshape(-1, *faces.shape[2:]))
    acc, n = accuracy(vis, viseme_ids(phones.reshape(-1)))
    assert n == 32 and acc > 0.8
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[32:, :] = True
    still = faces[0, :1].expand(8, -1, -1, -1)
    assert mouth_flicker(still, region) == 0.0
    flick = still.clone()
    flick[::2, :, 40:50] += 0.2  # every other frame brighter: 0.2·127.5·4 levels where it shows
    assert mouth_flicker(flick, region) == pytest.approx(0.2 * 127.5 * 2 * 10 / 32, rel=1e-3)
    moved = faces[0, :1] + 0.1
    assert math.isinf(region_psnr(faces[0, :1], faces[0, :1], region))
    assert region_psnr(moved, faces[0, :1], region) == pytest.approx(
        20 * math.log10(1 / 0.05), abs=0.05)  # fmt: skip


def test_smoke_settings_are_valid(setup):
    tmp, pack, teacher, syncnet = setup
    cfg = config(tmp, pack, teacher, syncnet, "smoke")
    cfg.validate()
    assert replace(cfg, seeds=[0, 0]).seeds == [0, 0]
    with pytest.raises(ConfigError, match="distinct"):
        replace(cfg, seeds=[0, 0]).validate()


def test_limit_split_keeps_whole_leading_segments():
    import numpy as np

    from lipsync.train.pack import Pack, PackSegment, limit_split

    segs = [PackSegment("a", "train", 30, 0), PackSegment("b", "train", 40, 30),
            PackSegment("c", "train", 50, 70), PackSegment("t", "test", 10, 0)]  # fmt: skip
    n = 120
    pack = Pack(None, {}, segs, {"train": np.zeros((n, 2, 2, 3)), "test": np.zeros((10, 2, 2, 3))},
                {"train": np.zeros(n * 640), "test": np.zeros(6400)},
                {"train": np.zeros((n, 5)), "test": np.zeros((10, 5))},
                {"train": np.arange(n), "test": np.zeros(10)})  # fmt: skip
    cut = limit_split(pack, "train", max_minutes=75 / 1500)  # 75 frames: a and b
    assert [s.id for s in cut.split_segments("train")] == ["a", "b"]
    assert len(cut.frames["train"]) == 70 and len(cut.audio["train"]) == 70 * 640
    assert cut.phones["train"][-1] == 69 and cut.split_segments("test") == segs[3:]
    assert limit_split(pack, "train", max_segments=1).split_segments("train") == segs[:1]
    assert limit_split(pack, "train", max_minutes=1.0) is pack


def test_jobs_spread_over_the_listed_gpus(tmp_path):
    """With ``gpus``, each new job goes to the GPU running the fewest jobs (the protocol on a
    2-GPU host: one GPU could not hold every arm at once)."""
    from lipsync.eval.protocol import Runner
    from lipsync.train.config import apply_overrides

    cfg = from_dict(ProtocolConfig, apply_overrides({"work": str(tmp_path)}, ['gpus=["0","1"]']))
    assert cfg.gpus == ["0", "1"]
    runner = Runner(cfg, log=lambda m: None)

    class Proc:  # what Runner.running() asks of a process
        def __init__(self, alive: bool):
            self.alive = alive

        def poll(self):
            return None if self.alive else 0

    given = []
    for k in range(5):
        gpu = runner.pick_gpu()
        runner.gpu_of[f"j{k}"], runner.procs[f"j{k}"] = gpu, (Proc(True), None)
        given.append(gpu)
    assert given == ["0", "1", "0", "1", "0"]
    runner.procs["j1"] = (Proc(False), None)  # a job on GPU 1 ended: 3 on "0", 1 on "1"
    assert runner.pick_gpu() == "1"
    assert Runner(ProtocolConfig(work=str(tmp_path / "w")), log=print).pick_gpu() is None


def test_visible_gpus_without_cuda_is_empty(monkeypatch):
    from lipsync.eval.protocol import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus("cpu") == []
    if not torch.cuda.is_available():
        assert visible_gpus(None) == []
