"""The model on a real Triton server (PyTriton, CPU, ``tiny`` preset): ``lipsync serve triton``
and :class:`lipsync.serving.triton.client.TritonEngine` (docs/TRITON.md).

A module fixture starts the server in this process (free ports, dynamic batching with a 100 ms
queue delay so concurrent requests meet in one batch); one test starts ``lipsync serve triton``
as a subprocess and stops it under a client's feet.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.media_factory import make_audio, make_video, speechlike
from tests.support.shared import MEDIA

pytest.importorskip("pytriton", reason="the serve extra is not installed")

from lipsync.config import LoadOptions  # noqa: E402
from lipsync.diffusion import DenoiseOptions  # noqa: E402
from lipsync.engine import LocalEngine  # noqa: E402
from lipsync.face.align import crops_to_model_input  # noqa: E402
from lipsync.face.mask import make_mask  # noqa: E402
from lipsync.loading import load_models  # noqa: E402
from lipsync.media import read_frames  # noqa: E402
from lipsync.serving.triton.backend_env import python_backend_env  # noqa: E402
from lipsync.serving.triton.client import (  # noqa: E402
    TritonEngine,
    TritonError,
    TritonUnavailableError,
    make_triton_runner,
    parse_url,
)
from lipsync.serving.triton.server import (  # noqa: E402
    ModelHost,
    ServerOptions,
    start_server,
)
from lipsync.tools.procs import free_ports, stop_process  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.slow]

TOKEN = "lipsync-test-token"
STEPS = DenoiseOptions(steps=3)


@pytest.fixture(scope="module")
def bundle():
    return load_models("tiny")


@pytest.fixture(scope="module")
def server(bundle):
    http, grpc, metrics = free_ports(3)
    options = ServerOptions(
        load=LoadOptions(preset="tiny", device="cpu"), http_port=http, grpc_port=grpc,
        metrics_port=metrics,
        max_batch_size=4, queue_delay_us=100_000, access_token=TOKEN,
    )  # fmt: skip
    t = time.perf_counter()
    service = start_server(options, ModelHost(bundle))
    print(f"Triton started in {time.perf_counter() - t:.1f} s")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def local(bundle):
    return LocalEngine(bundle)


def make_chunk(resolution: int, seed: int, frames: int = 16):
    """Faces as the pipeline makes them (8-bit crops through crops_to_model_input) + windows."""
    g = torch.Generator().manual_seed(seed)
    crops = torch.randint(0, 256, (frames, 150, 130, 3), dtype=torch.uint8, generator=g)
    faces = crops_to_model_input(crops, resolution)
    windows = torch.randn(frames, 50, 384, generator=g)
    return faces, windows


def engine(server, protocol="grpc", shared_memory="none", token=TOKEN, **kw) -> TritonEngine:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    url = f"{protocol}://{url}"
    return TritonEngine(url, shared_memory=shared_memory, access_token=token, **kw)


def test_engine_reads_the_server_and_urls_parse(server):
    with engine(server) as e:
        assert (e.preset_name, e.dtype_name, e.resolution) == ("tiny", "float32", 128)
        assert e.server_device == "cpu" and e.device == torch.device("cpu")
        assert e.max_batch_size == 4 and e.has_audio and not e.fp8
    assert parse_url("gpu-host") == ("gpu-host:8001", "grpc")
    assert parse_url("http://gpu-host") == ("gpu-host:8000", "http")
    assert parse_url("grpc://10.0.0.1:9001/") == ("10.0.0.1:9001", "grpc")
    assert parse_url("gpu-host:9000", "http") == ("gpu-host:9000", "http")


@pytest.mark.parametrize(
    "protocol,shared_memory",
    [("grpc", "none"), ("grpc", "system"), ("http", "none"), ("http", "system")],
)
def test_remote_denoise_equals_local(server, local, protocol, shared_memory):
    """Same seed and chunk -> bit-identical faces, whatever the transport (faces travel as
    8-bit levels, outputs as FP32 from an fp32 server)."""
    faces, windows = make_chunk(local.resolution, seed=1, frames=13)
    mask = torch.from_numpy(make_mask(local.resolution))
    expected = local.denoise(faces, windows, mask, 7, 3, STEPS)
    with engine(server, protocol, shared_memory) as e:
        assert e.shared_memory == shared_memory
        got = e.denoise(faces, windows, mask, 7, 3, STEPS)
        other_chunk = e.denoise(faces, windows, mask, 7, 4, STEPS)
    assert got.dtype == torch.float32 and got.shape == faces.shape
    assert torch.equal(got, expected)
    assert not torch.equal(other_chunk, expected)  # the chunk index reaches the server


def test_shared_memory_regions_are_reused_and_cleaned_up(server, local):
    faces, windows = make_chunk(local.resolution, seed=2)
    mask = torch.from_numpy(make_mask(local.resolution))
    e = engine(server, "grpc", "auto")
    assert e.shared_memory == "system"  # same host + token: auto picks shared memory
    first = e.denoise(faces, windows, mask, 1, 0, STEPS)
    names = e.shared_memory_regions
    assert len(names) == 2  # one input and one output region
    second = e.denoise(faces, windows, mask, 1, 0, STEPS)
    want = local.denoise(faces, windows, mask, 1, 0, STEPS)
    assert e.shared_memory_regions == names  # reused
    # the server's cached denoiser must not keep a view of an earlier request's mask buffer
    assert torch.equal(first, want) and torch.equal(second, want)
    status = e._client().get_system_shared_memory_status(
        headers=e._restricted_headers(), as_json=True
    )
    registered = {r["name"] for r in status.get("regions", {}).values()}
    assert set(names) <= registered
    e.close()
    status = TritonEngine(server.grpc_url, shared_memory="none", access_token=TOKEN)
    left = status._client().get_system_shared_memory_status(
        headers=status._restricted_headers(), as_json=True
    )
    status.close()
    assert not set(names) & {r["name"] for r in left.get("regions", {}).values()}
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(names[0].rsplit("_", 1)[0])]


def test_shared_memory_needs_the_token(server):
    with engine(server, "grpc", "auto", token=None) as e:
        assert e.shared_memory == "none"  # falls back to the messages
    with pytest.raises(TritonError, match="LIPSYNC_TRITON_ACCESS_TOKEN"):
        engine(server, "grpc", "system", token=None)


def test_audio_features_equal_local(server, bundle):
    """Short clip (one request, the server finds the log-mel maximum) and a 65 s clip (three
    30 s windows, the client sends the clip's maximum): the same numbers as the local encoder."""
    rng = np.random.default_rng(0)
    with engine(server) as e:
        for seconds in (2.5, 65.0):
            wav = speechlike(seconds, seed=3)
            wav[: len(wav) // 3] *= 0.1  # the loudest part is not in the first window
            wav += (0.001 * rng.standard_normal(len(wav))).astype(np.float32)
            remote = e.lazy_features(wav)
            expected = bundle.audio.features(wav)
            assert remote.shape == tuple(expected.shape)
            idx = torch.arange(expected.shape[0])
            assert torch.equal(remote[idx], expected), seconds


def test_concurrent_requests_share_one_batch(server, local):
    """Four chunks sent at once run as one model call (the server's counter and Triton's own
    metrics say so); each result equals its unbatched local result within float tolerance."""
    mask = torch.from_numpy(make_mask(local.resolution))
    chunks = [make_chunk(local.resolution, seed=10 + i) for i in range(4)]
    expected = [local.denoise(f, w, mask, 5, i, STEPS) for i, (f, w) in enumerate(chunks)]
    before = dict(server.host.batch_sizes)
    results: list = [None] * 4
    with engine(server, "grpc", "system") as e:

        def work(i):
            f, w = chunks[i]
            results[i] = e.denoise(f, w, mask, 5, i, STEPS)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    calls = {k: v - before.get(k, 0) for k, v in server.host.batch_sizes.items()}
    print("chunks per model call -> calls:", calls)
    assert max(k for k, v in calls.items() if v > 0) > 1
    for got, want in zip(results, expected, strict=True):
        # batched convolutions sum in another order: measured max difference ~7e-6
        assert (got - want).abs().max() < 1e-4
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts = {
        name: float(line.split()[-1])
        for line in text.splitlines()
        for name in ("nv_inference_count", "nv_inference_exec_count")
        if line.startswith(name + '{model="lipsync"')
    }
    assert counts["nv_inference_count"] > counts["nv_inference_exec_count"], counts


def test_two_instances_run_requests_side_by_side(bundle, local):
    """--instances 2 without batching: two model calls overlap, and every result equals the
    in-process one bit for bit (the instances share one ModelHost and its denoisers)."""
    http, grpc, metrics = free_ports(3)
    options = ServerOptions(
        load=LoadOptions(preset="tiny", device="cpu"), http_port=http, grpc_port=grpc,
        metrics_port=metrics,
        max_batch_size=1, queue_delay_us=0, instances=2,
    )  # fmt: skip
    service = start_server(options, ModelHost(bundle))
    try:
        mask = torch.from_numpy(make_mask(local.resolution))
        chunks = [make_chunk(local.resolution, seed=30 + i, frames=8) for i in range(4)]
        expected = [local.denoise(f, w, mask, 9, i, STEPS) for i, (f, w) in enumerate(chunks)]
        results: list = [None] * 4

        def work(i):
            with TritonEngine(f"grpc://{service.grpc_url}", shared_memory="none") as e:
                results[i] = e.denoise(*chunks[i], mask, 9, i, STEPS)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert dict(service.host.batch_sizes) == {1: 4}  # no batching: 4 separate calls
        assert service.host.max_active_calls == 2  # ... two at a time
        for got, want in zip(results, expected, strict=True):
            assert torch.equal(got, want)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """0.8 s of the demo's face (320x320) and 0.8 s of speech-like audio."""
    folder = tmp_path_factory.mktemp("triton-clip")
    frames = read_frames(MEDIA / "demo1_video.mp4", stop=20)[:, 380:980, 295:895]
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    small = torch.nn.functional.interpolate(t, size=(320, 320), mode="area")
    small = small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    video = make_video(
        folder / "face.mp4", seconds=0.8, size=(320, 320), crf=16,
        draw=lambda i, _: small[min(i, len(small) - 1)],
    )  # fmt: skip
    audio = make_audio(folder / "speech.wav", signal=speechlike(0.8, seed=1))
    return video, audio


@pytest.mark.e2e
def test_full_run_through_triton_equals_in_process(server, bundle, short_clip, tmp_path):
    """LipSync.run with the model on Triton writes the same frames as in-process."""
    from lipsync.api import LipSync
    from lipsync.pipeline import LipSyncPipeline

    video, audio = short_clip
    options = {"steps": 2, "seed": 3, "chunk_frames": 8}
    ours = LipSync(LipSyncPipeline(bundle)).run(video, audio, tmp_path / "local.mp4", **options)
    settings = type("Settings", (), {"triton_url": "grpc://" + server.grpc_url, "preset": "tiny"})
    os.environ["LIPSYNC_TRITON_ACCESS_TOKEN"] = TOKEN
    try:
        runner = make_triton_runner(settings())
    finally:
        del os.environ["LIPSYNC_TRITON_ACCESS_TOKEN"]
    with runner:
        assert runner.pipeline.engine.shared_memory == "system"
        remote = runner.run(video, audio, tmp_path / "triton.mp4", **options)
        arrays, _ = runner.run_arrays(read_frames(video), speechlike(0.8, seed=1), **options)
    assert remote.frames == ours.frames == 20, (remote, ours)
    assert remote.frames_with_face == ours.frames_with_face == 20, (remote, ours)
    assert remote.preset == "tiny"
    a, b = read_frames(tmp_path / "local.mp4"), read_frames(tmp_path / "triton.mp4")
    assert np.array_equal(a, b), _differ(a, b)
    local_arrays, _ = LipSync(LipSyncPipeline(bundle)).run_arrays(
        read_frames(video), speechlike(0.8, seed=1), **options
    )
    assert np.array_equal(arrays, local_arrays), _differ(arrays, local_arrays)


def _differ(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    frames = sorted({int(i) for i in np.argwhere(d > 0)[:, 0]})
    return f"{int((d > 0).sum())} values differ (max {int(d.max())}) in frames {frames}"


def test_server_down_is_one_clear_error():
    (port,) = free_ports(1)
    for url in (f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        with pytest.raises(TritonUnavailableError) as info:
            TritonEngine(url, connect_timeout_s=3)
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message and "unreachable" in message
        assert "\n" not in message and info.value.retryable
    with pytest.raises(TritonUnavailableError, match="unreachable"):
        make_triton_runner(f"127.0.0.1:{port}")


def test_python_backend_env_puts_our_libpython_first_and_pytriton_libs_last():
    import sysconfig

    import pytriton

    env = python_backend_env({"LD_LIBRARY_PATH": "/opt/x:/usr/lib"})
    parts = env["LD_LIBRARY_PATH"].split(os.pathsep)
    # PyTriton's bundled libraries (libcudart, libtritonserver...), found even when it is
    # installed with `pip install --target` (PyTriton itself then looks in the wrong place)
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    assert parts[-1] == str(libs) and libs.is_dir()
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert parts[:-1] == [sysconfig.get_config_var("LIBDIR"), "/opt/x", "/usr/lib"]


class TritonProcess:
    """``lipsync serve triton`` (tiny, CPU, one thread) as a subprocess in its own session, so
    that a test can crash the whole server (tritonserver and its Python stubs included) with
    one SIGKILL to the group, and start it again on the same ports."""

    def __init__(self, tmp_path: Path, token: str = TOKEN):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.tmp_path = tmp_path
        self.env = dict(os.environ, LIPSYNC_TRITON_ACCESS_TOKEN=token, PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}"

    @property
    def log(self) -> Path:
        return self.tmp_path / f"triton-{self.starts}.log"

    def start(self) -> TritonProcess:
        self.starts += 1
        args = [
            sys.executable, "-m", "lipsync.cli", "serve", "triton", "--preset", "tiny",
            "--device", "cpu", "--http-port", str(self.http), "--grpc-port", str(self.grpc),
            "--metrics-port", str(self.metrics), "--cpu-threads", "1",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def ready(self) -> bool:
        """Both models loaded. (``/v2/health/ready`` is not enough: PyTriton starts
        tritonserver with no model and loads them afterwards, so it answers 200 a moment early.)
        """
        base = f"http://127.0.0.1:{self.http}/v2/models"
        try:
            return all(
                urllib.request.urlopen(f"{base}/{model}/ready", timeout=2).status == 200
                for model in ("lipsync", "audio_features")
            )
        except OSError:
            return False

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Triton did not start:\n{self.tail()}")
            time.sleep(0.2)

    def crash(self, shm_before: set[str]) -> None:
        """SIGKILL to the server's process group; returns once nothing listens on its ports.
        Then removes the /dev/shm segments the dead server leaves behind (PyTriton's
        ``pytrtion<pid>-*`` and ``psm_*`` made since ``shm_before``, mapped by no process)."""
        pid = self.proc.pid
        os.killpg(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_listening(p) for p in (self.http, self.grpc, self.metrics)):
            assert time.monotonic() < deadline, "the killed server's ports are still open"
            time.sleep(0.1)
        left = {
            n for n in set(os.listdir("/dev/shm")) - shm_before
            if n.startswith((f"pytrtion{pid}-", "psm_"))
        }  # fmt: skip
        for name in left - _mapped_shm():
            Path("/dev/shm", name).unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)


def _mapped_shm() -> set[str]:
    """Names of the /dev/shm files some process has mapped now."""
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names.update(m.split("/dev/shm/", 1)[1].split()[0] for m in maps.splitlines()
                     if "/dev/shm/" in m)  # fmt: skip
    return names


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_server_then_server_goes_away(local, tmp_path):
    """``lipsync serve triton`` in a subprocess: a client connects and denoises; the server is
    stopped (SIGINT, then again with SIGTERM: both exit 0); the next call is one
    TritonUnavailableError naming the URL."""
    server = TritonProcess(tmp_path).start()
    try:
        server.wait_ready()
        e = TritonEngine(server.grpc_url, access_token=TOKEN, connect_timeout_s=2)
        assert e.preset_name == "tiny" and e.shared_memory == "system"
        faces, windows = make_chunk(local.resolution, seed=4, frames=4)
        mask = torch.from_numpy(make_mask(local.resolution))
        got = e.denoise(faces, windows, mask, 2, 0, DenoiseOptions(steps=1))
        want = local.denoise(faces, windows, mask, 2, 0, DenoiseOptions(steps=1))
        assert (got - want).abs().max() < 1e-4  # 1 CPU thread there, 2 here: same up to rounding
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0, server.tail()
        with pytest.raises(TritonUnavailableError) as info:
            e.denoise(faces, windows, mask, 2, 0, DenoiseOptions(steps=1))
        assert f"127.0.0.1:{server.grpc}" in str(info.value)
        # restarted on the same ports: the same engine carries on (it registers new
        # shared-memory regions: the new server knows none of the old ones)
        server.start().wait_ready()
        again = e.denoise(faces, windows, mask, 2, 0, DenoiseOptions(steps=1))
        assert torch.equal(again, got) and e.shared_memory == "system"
        server.proc.send_signal(signal.SIGTERM)  # what Kubernetes sends: a clean stop, 0
        assert server.proc.wait(timeout=60) == 0, server.tail()
        e.close()  # unregistering fails quietly; our /dev/shm files are still removed
        assert not e.shared_memory_regions
    finally:
        server.stop()


@pytest.mark.postgres
@pytest.mark.e2e
def test_triton_restarted_mid_job_the_job_is_retried_and_completes(
    postgres_server, serving_media, tmp_path
):
    """The job service with ``--runner triton``: a real PostgreSQL, the API, one worker and
    ``lipsync serve triton``, all subprocesses, started together (the worker waits for Triton).
    The Triton server crashes (SIGKILL to all its processes) while a job is past its first
    chunk: the attempt fails as ``TritonUnavailableError``, is recorded as a retry, and the
    worker waits for the server instead of taking more jobs. Triton starts again on the same
    ports; the job's second attempt completes with one valid result."""
    from tests.support.serving_stack import Stack, check_output, free_port, submit, wait_until

    shm_before = set(os.listdir("/dev/shm"))
    triton = TritonProcess(tmp_path).start()
    metrics_port = free_port()
    stack = Stack(
        postgres_server, "triton_restart", tmp_path,
        LIPSYNC_RUNNER="triton", LIPSYNC_TRITON_URL=triton.grpc_url,
        LIPSYNC_TRITON_ACCESS_TOKEN=TOKEN, LIPSYNC_TRITON_WAIT_S="120",
        LIPSYNC_RETRY_BACKOFF_S="0.4", LIPSYNC_MAX_ATTEMPTS="3",
        LIPSYNC_WORKER_METRICS_PORT=str(metrics_port),
    )  # fmt: skip
    try:
        stack.start_api()
        worker = stack.start_worker()
        triton.wait_ready()
        stack.wait_api()
        stack.wait_workers()
        with stack.client(stack.create_key("triton-restart")) as c:
            m = serving_media
            job = submit(c, m.long_video, m.long_audio, steps=4).json()

            def past_first_chunk():
                row = stack.job_row(job["id"])
                assert row["status"] in ("queued", "running"), (row["error"], row["history"],
                                                                worker.tail(6000))  # fmt: skip
                return row["status"] == "running" and row["progress"] >= 0.12

            wait_until(past_first_chunk, 90, 0.05, "the job to be past its first chunk")
            triton.crash(shm_before)
            t0 = time.monotonic()
            row = wait_until(
                lambda: (r := stack.job_row(job["id"]))["failures"] >= 1 and r,
                60, 0.1, "the failed attempt to be recorded",
            )  # fmt: skip
            assert row["status"] == "queued", row  # waiting for its retry
            time.sleep(1.0)  # Triton down: the worker must not burn attempts meanwhile
            assert stack.job_row(job["id"])["attempts"] == 1
            triton.start().wait_ready()
            row = stack.wait_status(job["id"], ("succeeded", "failed"), timeout=90)
            print(f"job done {time.monotonic() - t0:.1f} s after the crash")
            assert row["status"] == "succeeded", row
            assert row["attempts"] == 2 and row["failures"] == 1, row
            retries = [e for e in row["history"] if e["event"] == "retry"]
            assert len(retries) == 1, row["history"]
            assert retries[0]["error_kind"] == "TritonUnavailableError", retries
            assert "unreachable" in retries[0]["error"]
            assert row["error"] is None
            with c.stream("GET", f"/v1/jobs/{job['id']}/result") as r:
                assert r.status_code == 200
                (tmp_path / "out.mp4").write_bytes(r.read())
            check_output(tmp_path / "out.mp4", 50, 2.0)
        objects = [k for k in stack.storage().list() if job["id"] in k]
        assert [k for k in objects if k.startswith("results/")] == [f"results/{job['id']}.mp4"]
        stack.wait_queue_status(job["id"], "succeeded")
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert 'lipsync_job_retries_total{reason="unavailable"} 1.0' in text
        log = worker.tail(200000)
        assert "model server unreachable: waiting" in log and "model server is back" in log
    finally:
        stack.close()
        triton.stop()
