"""The model on Triton (``lipsync serve triton``): what the transport costs and what dynamic
batching gives, on a 16-frame chunk at the preset's resolution (512 px for v1.6). One JSON
line per result on stdout (and in ``--out``). docs/TRITON.md explains the numbers.

Parts (``--parts``, all by default, in this order):

``transfer``  A server whose ``lipsync`` model does nothing (it returns zeros of the output's
              shape and dtype): a round trip is then only the transport -- the client's
              request, Triton, PyTriton's hand-over to the Python model and back. Per mode
              (gRPC + system shared memory, gRPC, HTTP + system shared memory, HTTP; CUDA
              shared memory when a GPU and cuda-python are there): ms per chunk for the call
              alone (``infer_ms``, inputs already 8-bit levels) and for the whole
              ``TritonEngine.denoise`` (``denoise_ms``: + turning the faces into levels and the
              FP16 output back into float32 on the client).
``model``     The real architecture (seeded random weights unless ``--real-weights``): one
              chunk with ``--steps`` denoising steps in this process (``LocalEngine``, no
              Triton), then through Triton per mode: what the transport adds to a real chunk.
``batching``  ``--clients`` (1, 2, 4) threads, each sending ``--chunks-per-client`` chunks one
              after the other (``--batch-steps`` steps each, 4 by default to keep the run
              short), to a server with ``max_batch_size`` 1 and then 4 (``--batch-sizes``):
              frames per second, and the mean chunks per model call from Triton's own
              metrics (``nv_inference_count / nv_inference_exec_count``).

Each server is this script run again as a subprocess (``--serve``) on free ports, stopped with
SIGTERM at the end. ``--budget-s`` (default 270) skips what is left once it has run that long.

    # on an H100 (about 3-4 minutes; the wheels: benchmarks/fetch_triton_wheels.py):
    python benchmarks/triton_transport.py --preset v1.6 --device cuda --dtype fp16 \\
        [--stub-site /tmp/stub] --out triton.jsonl
    # smoke test on a CPU (about a minute):
    python benchmarks/triton_transport.py --preset tiny --device cpu --frames 4 --repeats 3 \\
        --model-repeats 1 --steps 2 --batch-steps 1 --clients 1,2 --chunks-per-client 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import common
import numpy as np
import torch

from lipsync.config import LoadOptions
from lipsync.diffusion import DenoiseOptions
from lipsync.engine import LocalEngine
from lipsync.face.align import levels_to_unit_table
from lipsync.face.mask import make_mask
from lipsync.loading import dtype_name, resolve_device, resolve_dtype
from lipsync.serving.triton.client import TritonEngine
from lipsync.serving.triton.protocol import ChunkRequest
from lipsync.serving.triton.server import ChunkHost, ServerOptions, load_bundle, serve
from lipsync.tools.procs import free_ports, stop_process

TOKEN = "lipsync-bench-token"
T0 = time.monotonic()
OUT: Path | None = None
COMMON: dict = {}


def emit(record: dict) -> None:
    common.emit({**record, **COMMON}, OUT)


STUB_ENV = "LIPSYNC_TRITON_STUB_SITE"  # set in the server process only (after its start)
PTH_NAME = "zz_lipsync_triton_stub.pth"


def stub_paths(args) -> list[str]:
    """What Triton's Python-backend stub must see first: ``--stub-site`` (numpy < 2: the stub
    misreads numpy 2 arrays) and PyTriton's folder when it is not in site-packages (installed
    with ``pip install --target`` + PYTHONPATH, which the stub ignores: it embeds Python in
    isolated mode)."""
    import site

    import pytriton

    folder = Path(pytriton.__file__).resolve().parent.parent
    sites = [Path(p).resolve() for p in site.getsitepackages()]
    paths = [str(Path(args.stub_site).resolve())] if args.stub_site else []
    if folder not in sites:
        paths.append(str(folder))
    return paths


def install_stub_pth(args) -> str | None:
    """A ``.pth`` file in site-packages that prepends ``$LIPSYNC_TRITON_STUB_SITE`` to sys.path:
    only the stubs see it (the server sets it after its own start, so its tritonserver and
    their stubs inherit it); removed at exit. None when the stub needs nothing."""
    import atexit
    import site

    if not stub_paths(args):
        return None
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0" and not args.stub_site:
        raise SystemExit(
            f"numpy {np.__version__} here: Triton's Python-backend stub needs numpy < 2; install "
            ".whl_triton/stub/*.whl with pip --target DIR and pass --stub-site DIR"
        )
    pth = Path(site.getsitepackages()[0]) / PTH_NAME
    pth.write_text(
        f"import os, sys; sys.path[0:0] = [p for p in os.environ.get({STUB_ENV!r}, '')"
        f".split(os.pathsep) if p]\n"
    )
    atexit.register(lambda: pth.unlink(missing_ok=True))
    return str(pth)


stats_ms = common.stats_ms


# -- the server side (this script with --serve) ------------------------------------------------


class NullHost(ChunkHost):
    """The ``lipsync`` model's inputs and outputs, and no work at all."""

    def infer_lipsync(self, requests):
        return [{"faces_out": np.zeros(r["faces"].shape, self.out_dtype)} for r in requests]


def load_options(args) -> LoadOptions:
    return LoadOptions(
        preset=args.preset, device=args.device, dtype=args.dtype, cpu_threads=args.cpu_threads,
        compile=args.compile, random_weights=not args.real_weights,
    )  # fmt: skip


def run_server(args) -> None:
    http, grpc, metrics = (int(p) for p in args.ports.split(","))
    options = ServerOptions(
        load=load_options(args), http_port=http, grpc_port=grpc, metrics_port=metrics,
        max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us,
        access_token=TOKEN,
    )  # fmt: skip
    paths = stub_paths(args)
    if paths:  # for tritonserver and its stubs only: this process has its sys.path already
        os.environ[STUB_ENV] = os.pathsep.join(paths)
    host = None
    if args.serve == "null":  # the dtype a real server would use: the loading policy's
        load = options.load
        dtype = resolve_dtype(load.dtype, resolve_device(load.device))
        host = NullHost(load.resolve_preset().resolution, torch.device("cpu"), dtype, "null")
    serve(options, host)


class Server:
    """This script with ``--serve`` as a subprocess (own session), on free ports."""

    def __init__(self, args, kind: str, max_batch_size: int, log_dir: Path):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.kind = kind
        self.log = log_dir / f"server-{kind}-{max_batch_size}.log"
        cmd = [
            sys.executable, __file__, "--serve", kind, "--ports",
            f"{self.http},{self.grpc},{self.metrics}", "--preset", args.preset,
            "--max-batch-size", str(max_batch_size), "--queue-delay-us",
            str(args.queue_delay_us), "--compile", args.compile,
        ]  # fmt: skip
        for flag in ("device", "dtype", "cpu_threads"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        if args.real_weights:
            cmd.append("--real-weights")
        if args.stub_site:
            cmd += ["--stub-site", args.stub_site]
        env = dict(os.environ, PYTHONUNBUFFERED="1", LIPSYNC_TRITON_ACCESS_TOKEN=TOKEN)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        t = time.monotonic()
        self.wait_ready(args.server_timeout_s)
        self.start_s = round(time.monotonic() - t, 1)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def ready(self) -> bool:
        base = f"http://127.0.0.1:{self.http}/v2/models"
        models = ["lipsync"] + (["audio_features"] if self.kind == "model" else [])
        try:
            return all(
                urllib.request.urlopen(f"{base}/{m}/ready", timeout=2).status == 200 for m in models
            )
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.kind} server did not start:\n{self.tail()}")
            time.sleep(0.25)

    def url(self, protocol: str) -> str:
        return f"{protocol}://127.0.0.1:{self.grpc if protocol == 'grpc' else self.http}"

    def counts(self) -> dict[str, float]:
        """Triton's own counters for the lipsync model (requests, model executions)."""
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics}/metrics", timeout=10
        ).read().decode()  # fmt: skip
        out = {}
        names = ("nv_inference_count", "nv_inference_exec_count")
        for line in text.splitlines():
            for name in names:
                if line.startswith(name + '{model="lipsync"'):
                    out[name] = float(line.split()[-1])
        return out

    def stop(self) -> None:
        stop_process(self.proc, timeout=40)


# -- inputs -------------------------------------------------------------------------------------


def make_chunk(resolution: int, frames: int, seed: int):
    """8-bit face levels (as the pipeline's crops are), their [-1, 1] faces, windows, mask."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (frames, 3, resolution, resolution), dtype=torch.uint8,
                           generator=g)  # fmt: skip
    faces = levels_to_unit_table()[levels.long()]
    windows = torch.randn(frames, 50, 384, generator=g)
    mask = torch.from_numpy(make_mask(resolution))
    return levels, faces, windows, mask


def over_budget(args, what: str) -> bool:
    elapsed = time.monotonic() - T0
    if elapsed > args.budget_s:
        emit({"what": what, "skipped": f"over the {args.budget_s:.0f} s budget ({elapsed:.0f} s)"})
        return True
    return False


# -- the parts ------------------------------------------------------------------------------------


def transport_modes(args) -> list[tuple[str, str]]:
    modes = [("grpc", "system"), ("grpc", "none"), ("http", "system"), ("http", "none")]
    if torch.cuda.is_available() and args.device != "cpu":
        modes.append(("grpc", "cuda"))  # last: untested here, it must not spoil the others
    return modes


def part_transfer(args, log_dir: Path) -> None:
    server = Server(args, "null", 1, log_dir)
    try:
        emit({"what": "server_start", "kind": "null", "seconds": server.start_s})
        for protocol, shm in transport_modes(args):
            if over_budget(args, "transfer"):
                return
            mode = f"{protocol}+{shm}" if shm != "none" else protocol
            try:
                device = "cuda" if shm == "cuda" else "cpu"
                engine = TritonEngine(server.url(protocol), shared_memory=shm, device=device,
                                      access_token=TOKEN, timeout_s=60)  # fmt: skip
            except Exception as exc:  # e.g. CUDA shared memory without cuda-python
                emit({"what": "transfer", "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                continue
            try:
                r, k = engine.resolution, args.frames
                levels, faces, windows, mask = make_chunk(r, k, seed=1)
                if shm == "cuda":
                    levels, faces, windows, mask = (
                        levels.cuda(), faces.cuda(), windows.cuda(), mask.cuda()
                    )  # fmt: skip
                request = ChunkRequest(levels, windows, mask, 1, 0, DenoiseOptions())
                for _ in range(3):
                    engine.infer(request)
                infer = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    engine.infer(request)
                    infer.append(time.perf_counter() - t)
                full = []
                for i in range(max(3, args.repeats // 2)):
                    t = time.perf_counter()
                    engine.denoise(faces, windows, mask, 1, i, DenoiseOptions())
                    full.append(time.perf_counter() - t)
                in_mb = (levels.numel() + 4 * windows.numel() + 4 * mask.numel()) / 1e6
                out_mb = levels.numel() * np.dtype(engine.output_dtype).itemsize / 1e6
                emit({
                    "what": "transfer", "mode": mode, "frames": k, "resolution": r,
                    "in_mb": round(in_mb, 2), "out_mb": round(out_mb, 2),
                    "out_dtype": np.dtype(engine.output_dtype).name,
                    "infer_ms": stats_ms(infer), "denoise_ms": stats_ms(full),
                    "shared_memory": engine.shared_memory,
                })  # fmt: skip
            except Exception as exc:
                emit({"what": "transfer", "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                engine.close()
    finally:
        server.stop()


def model_record(args, mode: str, resolution: int, times: list[float]) -> dict:
    """One ``model`` result: the first chunk (warm-up) apart, then the others."""
    return {
        "what": "model", "mode": mode, "steps": args.steps, "frames": args.frames,
        "resolution": resolution, "first_ms": round(1000 * times[0], 1),
        "chunk_ms": stats_ms(times[1:]),
        "frames_per_s": round(args.frames / statistics.median(times[1:]), 2),
    }  # fmt: skip


def part_model_local(args) -> None:
    """The same chunk in this process, no Triton (the baseline for ``model``)."""
    bundle = load_bundle(ServerOptions(load=load_options(args)))
    engine = LocalEngine(bundle)
    _, faces, windows, mask = make_chunk(engine.resolution, args.frames, seed=2)
    faces, windows = faces.to(engine.device), windows.to(engine.device)
    opts = DenoiseOptions(steps=args.steps)
    times = []
    for i in range(args.model_repeats + 1):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.denoise(faces, windows, mask, 1, i, opts)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    emit(model_record(args, "in-process (no Triton)", engine.resolution, times))
    del engine, bundle
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_model_remote(args, server: Server) -> None:
    opts = DenoiseOptions(steps=args.steps)
    for protocol, shm in [("grpc", "system"), ("grpc", "none"), ("http", "none")]:
        if over_budget(args, "model"):
            return
        mode = f"{protocol}+{shm}" if shm != "none" else protocol
        with TritonEngine(
            server.url(protocol), shared_memory=shm, access_token=TOKEN, timeout_s=300
        ) as engine:
            _, faces, windows, mask = make_chunk(engine.resolution, args.frames, seed=2)
            times = []
            for i in range(args.model_repeats + 1):
                t = time.perf_counter()
                engine.denoise(faces, windows, mask, 1, i, opts)
                times.append(time.perf_counter() - t)
            emit(model_record(args, mode, engine.resolution, times))


def part_batching(args, server: Server, max_batch_size: int) -> None:
    opts = DenoiseOptions(steps=args.batch_steps)
    with TritonEngine(
        server.url("grpc"), shared_memory="auto", access_token=TOKEN, timeout_s=300
    ) as engine:
        chunks = [make_chunk(engine.resolution, args.frames, seed=10 + i)
                  for i in range(max(args.clients))]  # fmt: skip

        def burst(n: int, per_client: int) -> float:
            errors: list[BaseException] = []

            def client(c: int) -> None:
                _, faces, windows, mask = chunks[c]
                try:
                    for j in range(per_client):
                        engine.denoise(faces, windows, mask, 3, 100 * c + j, opts)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if errors:
                raise errors[0]
            return time.perf_counter() - t

        for n in args.clients:
            if over_budget(args, "batching"):
                return
            burst(n, 1)  # warm-up: this batch shape once
            before = server.counts()
            wall = burst(n, args.chunks_per_client)
            after = server.counts()
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            chunks_done = n * args.chunks_per_client
            execs = delta.get("nv_inference_exec_count") or 0
            emit({
                "what": "batching", "max_batch_size": max_batch_size,
                "queue_delay_us": args.queue_delay_us, "clients": n,
                "chunks": chunks_done, "frames": chunks_done * args.frames,
                "steps": args.batch_steps, "wall_s": round(wall, 3),
                "frames_per_s": round(chunks_done * args.frames / wall, 2),
                "model_calls": int(execs),
                "chunks_per_call": round(delta.get("nv_inference_count", 0) / execs, 2)
                if execs else None,
                "shared_memory": engine.shared_memory,
            })  # fmt: skip


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="v1.6")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if any)")
    ap.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on cuda)")
    ap.add_argument("--compile", default="none", help="none, regional, full (slow to start)")
    ap.add_argument("--real-weights", action="store_true", help="checkpoints, not random")
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20, help="transfer: timed round trips")
    ap.add_argument("--steps", type=int, default=20, help="model: denoising steps")
    ap.add_argument("--model-repeats", type=int, default=2, help="model: timed chunks")
    ap.add_argument("--batch-steps", type=int, default=4, help="batching: denoising steps")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--chunks-per-client", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,4", help="max_batch_size values to compare")
    ap.add_argument("--queue-delay-us", type=int, default=20_000)
    ap.add_argument("--parts", default="transfer,model,batching")
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--server-timeout-s", type=float, default=240.0)
    ap.add_argument("--out", default=None, help="also append the JSON lines here")
    ap.add_argument("--stub-site", default=None,
                    help="a folder with numpy < 2 for Triton's Python-backend stub (needed when "
                    "this interpreter has numpy 2; benchmarks/fetch_triton_wheels.py)")  # fmt: skip
    # internal: run a server
    ap.add_argument("--serve", choices=["null", "model"], help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch-size", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.serve:
        run_server(args)
        return
    args.clients = [int(c) for c in args.clients.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    parts = set(args.parts.split(","))
    OUT = Path(args.out) if args.out else None
    COMMON.update({
        "preset": args.preset, "device": args.device,
        "dtype": args.dtype or dtype_name(resolve_dtype(None, torch.device(args.device))),
        "weights": "checkpoints" if args.real_weights else "random",
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    })  # fmt: skip
    log_dir = Path(tempfile.mkdtemp(prefix="triton-bench-"))
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    emit({"what": "start", "parts": sorted(parts), "logs": str(log_dir),
          "python": sys.version.split()[0], "numpy": np.__version__,
          "libpython": os.path.join(libdir, soname),  # the stub needs it
          "libpython_exists": bool(soname) and os.path.exists(os.path.join(libdir, soname)),
          "stub_pth": install_stub_pth(args), "stub_paths": stub_paths(args)})  # fmt: skip
    try:
        if "transfer" in parts:
            part_transfer(args, log_dir)
        if "model" in parts and not over_budget(args, "model"):
            part_model_local(args)
        for i, b in enumerate(sorted(args.batch_sizes)):
            wants_model = "model" in parts and i == 0
            if not (wants_model or "batching" in parts) or over_budget(args, "batching"):
                break
            server = Server(args, "model", b, log_dir)
            try:
                emit({"what": "server_start", "kind": "model", "max_batch_size": b,
                      "seconds": server.start_s})  # fmt: skip
                if wants_model:
                    part_model_remote(args, server)
                if "batching" in parts:
                    part_batching(args, server, b)
            finally:
                server.stop()
    except Exception as exc:
        emit({"what": "error", "error": f"{type(exc).__name__}: {exc}"[-4000:]})
        raise SystemExit(1) from None
    emit({"what": "done", "seconds": round(time.monotonic() - T0, 1)})


if __name__ == "__main__":
    main()
