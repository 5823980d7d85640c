"""The model on Triton Inference Server (PyTriton): ``lipsync serve triton``.

One process loads one preset (``--preset``, ``--device``, ``--dtype``) and serves two models
(docs/TRITON.md has the full description and the measurements):

``audio_features`` (no batching) -- Whisper features of one 30 s encoder window:

* ``waveform`` FP32 ``(n,)``: the 16 kHz samples the window's STFT frames read, already
  reflect-padded at the clip's ends (:func:`stft_segment`): ``n = 160 (frames - 1) + 400``;
* ``log_mel_max`` FP32 ``(1,)``: the clip's largest log10 mel power (:func:`clip_log_mel_max`);
  Whisper floors the log-mel at ``max - 8`` over the *whole* clip, so a window alone cannot know
  it. NaN: use this segment's own maximum (right when the segment is the whole clip, <= 30 s);
* -> ``features`` FP32 ``(frames // 2, 5, 384)``: exactly what
  :meth:`lipsync.audio.AudioEncoder.features` gives for those positions.

The client (:class:`lipsync.serving.triton_client.RemoteFeatures`) computes the maximum in one
streaming STFT pass, then asks for windows as the pipeline's chunks need them: a lazy,
window-at-a-time feature source for audio of any length, like :class:`lipsync.audio.LazyFeatures`.

``lipsync`` (dynamic batching) -- one chunk of aligned faces -> the same faces, mouth redrawn:

* ``faces`` UINT8 ``(k, 3, r, r)``: the 8-bit levels of the faces; the server maps them to
  ``[-1, 1]`` with the table :func:`lipsync.face.align.crops_to_model_input` uses, so they are
  bit-identical to the local pipeline's (and 4x smaller than FP32, 2x smaller than FP16);
* ``windows`` FP32 ``(k, 50, 384)``; ``mask`` FP32 ``(r, r)`` (1 = keep);
* ``seed``, ``chunk_index`` INT64 ``(1,)``; ``options`` BYTES ``(1,)``: the
  :class:`~lipsync.diffusion.DenoiseOptions` fields that differ from their defaults, as JSON
  (``{"steps": 20}``; every field, so fast modes travel too);
* -> ``faces_out`` ``(k, 3, r, r)`` in ``[-1, 1]``: FP16 when the server computes in fp16 (the
  VAE decodes in fp16, so nothing is lost), else FP32.

Batching. Triton's dynamic batcher hands :meth:`ModelHost.infer_lipsync` every chunk request
queued within ``--queue-delay-us`` (up to ``--max-batch-size``). The requests are grouped by
(frames, denoising options, mask); each group runs as ONE :class:`~lipsync.diffusion.ChunkDenoiser`
call on a (B, f, ...) batch, so every step of the denoising loop runs the U-Net once for the
whole group. Each chunk keeps its own noise and generator (:func:`lipsync.engine.chunk_noise`,
:func:`lipsync.engine.chunk_generator`), so its result does not depend on its batch-mates.

The Python backend's stub (``triton_python_backend_stub``) embeds libpython of the serving
interpreter's minor version, found through the dynamic linker. With a pyenv / custom-built
interpreter the system's libpython of the same minor version (or none) would be found instead;
:func:`python_backend_env` puts this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` for
the Triton server process (PyTriton passes our environment to it), so no re-exec is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import sysconfig
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lipsync.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, _reflect_padded_slice, mel_filters
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.engine import chunk_generator, chunk_noise
from lipsync.errors import ConfigError

LOG = logging.getLogger("lipsync.triton")

LIPSYNC_MODEL = "lipsync"
AUDIO_MODEL = "audio_features"
ACCESS_TOKEN_ENV = "LIPSYNC_TRITON_ACCESS_TOKEN"  # server and clients: shared-memory access
PARAM_PREFIX = "lipsync_"  # model-config parameters the client reads (preset, dtype, ...)
AUDIO_WINDOW_FRAMES = 3000  # mel frames per Whisper encoder window (2 x n_audio_ctx)
N_MELS = 80
AUDIO_TOKENS = 50  # per-frame window: 10 positions x 5 layers
AUDIO_CHANNELS = 384


# --------------------------------------------------------------------------------------------
# the wire format, shared with the client


@torch.no_grad()
def face_levels_table() -> torch.Tensor:
    """(256,) float32: 8-bit level -> model input, exactly as ``crops_to_model_input`` maps it."""
    return (torch.arange(256, dtype=torch.float32) / 255.0 - 0.5) / 0.5


def faces_to_levels(faces: torch.Tensor) -> torch.Tensor | None:
    """(k, 3, r, r) float faces -> uint8 levels, or None when they are not exactly 8-bit levels
    (then they cannot travel as UINT8 without changing the result)."""
    f = faces.detach().float()
    levels = ((f * 0.5 + 0.5) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    table = face_levels_table().to(f.device)
    if not torch.equal(table[levels.long()], f):
        return None
    return levels


def stft_segment(wav: torch.Tensor, f0: int, f1: int) -> torch.Tensor:
    """The samples STFT frames ``f0 .. f1-1`` of the clip read (reflect-padded at the clip's
    ends, as Whisper's centred STFT pads): ``160 (f1 - f0 - 1) + 400`` samples."""
    return _reflect_padded_slice(wav, N_FFT // 2, f0 * HOP_LENGTH, (f1 - 1) * HOP_LENGTH + N_FFT)


def log_mel_power(segment: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """log10 mel power of an :func:`stft_segment`: (n_mels, frames), before Whisper's floor and
    scaling -- the same operations as :func:`lipsync.audio.log_mel_spectrogram` per block."""
    window = torch.hann_window(N_FFT)
    filters = torch.from_numpy(np.array(mel_filters(SAMPLE_RATE, N_FFT, n_mels)))
    spec = torch.stft(segment, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    return torch.clamp(filters @ (spec.abs() ** 2), min=1e-10).log10()


def audio_windows(num_samples: int, window_frames: int = AUDIO_WINDOW_FRAMES) -> list[tuple]:
    """Mel-frame ranges ``(f0, f1)`` of the Whisper encoder windows of a clip."""
    n_frames = num_samples // HOP_LENGTH
    return [(s, min(s + window_frames, n_frames)) for s in range(0, n_frames, window_frames)]


def clip_log_mel_max(
    wav: torch.Tensor, n_mels: int = N_MELS, window_frames: int = AUDIO_WINDOW_FRAMES
) -> float:
    """The clip's largest log10 mel power, one window at a time (bounded memory)."""
    best = -np.inf
    for f0, f1 in audio_windows(wav.shape[0], window_frames):
        best = max(best, float(log_mel_power(stft_segment(wav, f0, f1), n_mels).max()))
    return best


# --------------------------------------------------------------------------------------------
# the models' Python side


@dataclass
class ServerOptions:
    """``lipsync serve triton``'s settings."""

    preset: str = "v1.6"
    device: str | None = None
    dtype: str | None = None
    checkpoint_dir: str | None = None
    address: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1  # model instances of `lipsync` (each runs whole batches)
    max_batch_size: int = 4  # chunks per `lipsync` model call
    queue_delay_us: int = 10_000  # how long a request may wait for batch-mates
    audio_instances: int = 1
    cpu_threads: int | None = None
    compile: str = "none"  # torch.compile the U-Net: none, regional, full (lipsync.accel)
    fp8: bool = False  # FP8 matmuls in the U-Net's big linear layers (CUDA, approximate)
    # the preset's architecture with seeded random weights, no checkpoints: for benchmarks
    # (benchmarks/triton_bench.py) on machines without them; the output is noise
    random_weights: bool = False
    log_verbose: int = 0
    # Token for the endpoints PyTriton restricts (shared-memory registration, repository,
    # statistics...). None: $LIPSYNC_TRITON_ACCESS_TOKEN, else a random one, which keeps
    # clients off shared memory (they fall back to sending tensors in the messages).
    access_token: str | None = None

    def validate(self) -> None:
        if self.instances < 1 or self.audio_instances < 1:
            raise ConfigError("--instances and --audio-instances must be at least 1")
        if not 1 <= self.max_batch_size <= 64:
            raise ConfigError(f"--max-batch-size must be 1..64, got {self.max_batch_size}")
        if self.queue_delay_us < 0:
            raise ConfigError(f"--queue-delay-us must be >= 0, got {self.queue_delay_us}")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ConfigError(f"--{name.replace('_', '-')} must be 1..65535, got {port}")


class ModelHost:
    """Decodes Triton requests, groups chunks, runs the models, encodes the responses."""

    has_audio = True

    def __init__(self, bundle, max_denoisers: int = 4):
        self.bundle = bundle
        self.preset_name = bundle.preset.name
        self.resolution = bundle.preset.resolution
        self.device = bundle.device
        self.dtype = bundle.dtype
        self.fp8 = _has_fp8(bundle.unet)
        self._init_common(max_denoisers)

    def _init_common(self, max_denoisers: int = 4) -> None:
        self.out_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        self._table = face_levels_table().to(self.device)
        self._denoisers: OrderedDict = OrderedDict()
        self._max_denoisers = max_denoisers
        self._lock = threading.Lock()
        # chunks per `lipsync` model call -> number of calls (tests and the log read this)
        self.batch_sizes: Counter[int] = Counter()
        # model calls running at once now / at most so far (several --instances overlap)
        self.active_calls = 0
        self.max_active_calls = 0

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def parameters(self) -> dict[str, str]:
        """What a client reads from the model config (``lipsync_*`` parameters)."""
        return {
            "preset": self.preset_name,
            "dtype": self.dtype_name,
            "device": str(self.device),
            "resolution": str(self.resolution),
            "fp8": str(self.fp8).lower(),
            "audio_window_frames": str(AUDIO_WINDOW_FRAMES),
            "n_mels": str(N_MELS),
        }

    # -- lipsync ------------------------------------------------------------------------------

    def _denoiser(self, mask: torch.Tensor, mask_key: bytes, options: DenoiseOptions):
        key = (options, mask_key)
        with self._lock:
            d = self._denoisers.get(key)
            if d is None:
                m = self.bundle
                d = self._denoisers[key] = ChunkDenoiser(m.unet, m.vae, mask, options)
                while len(self._denoisers) > self._max_denoisers:
                    self._denoisers.popitem(last=False)
            else:
                self._denoisers.move_to_end(key)
            return d

    def denoise_group(self, faces, windows, mask, mask_key, seeds, chunk_indices, options):
        """One batched denoise: faces (B, k, 3, r, r) in [-1, 1], windows (B, k, 50, 384)
        -> (B, k, 3, r, r). Chunk b draws from (seeds[b], chunk_indices[b]) only."""
        k = faces.shape[1]
        latent = self.resolution // 8
        noise = torch.cat([chunk_noise(s, k, latent, self.device, self.dtype) for s in seeds])
        gens = [
            chunk_generator(s, c, self.device) for s, c in zip(seeds, chunk_indices, strict=True)
        ]
        return self._denoiser(mask, mask_key, options)(faces, windows, noise, gens)

    def infer_lipsync(self, requests) -> list[dict[str, np.ndarray]]:
        """PyTriton callable: every request queued for this call (each one or more chunks)."""
        groups: dict[tuple, list[tuple[int, int]]] = {}
        masks: dict[bytes, np.ndarray] = {}
        outputs = []
        for i, req in enumerate(requests):
            faces = req["faces"]  # (n, k, 3, r, r) uint8
            outputs.append(np.empty(faces.shape, dtype=self.out_dtype))
            for j in range(faces.shape[0]):
                options = _row_options(req, j)
                # a copy: the request's arrays live in PyTriton's shared-memory buffers, reused
                # by later requests, and a cached ChunkDenoiser keeps the mask (on CPU its
                # ``.to(device)`` is the same memory) -- an alias here made later chunks NaN
                mask = np.array(req["mask"][j], dtype=np.float32, copy=True, order="C")
                mask_key = hashlib.blake2b(mask.tobytes(), digest_size=16).digest()
                masks.setdefault(mask_key, mask)
                groups.setdefault((faces.shape[1], options, mask_key), []).append((i, j))
        rows = sum(len(m) for m in groups.values())
        with self._lock:
            self.batch_sizes[rows] += 1
            self.active_calls += 1
            self.max_active_calls = max(self.max_active_calls, self.active_calls)
        LOG.debug("lipsync call: %d request(s), %d chunk(s), %d group(s)", len(requests), rows,
                  len(groups))  # fmt: skip
        try:
            self._run_groups(requests, groups, masks, outputs)
        finally:
            with self._lock:
                self.active_calls -= 1
        return [{"faces_out": o} for o in outputs]

    def _run_groups(self, requests, groups, masks, outputs) -> None:
        """Denoise each group of same-shaped chunks in one batch, into ``outputs``."""
        for (_, options, mask_key), members in groups.items():
            levels = np.stack([requests[i]["faces"][j] for i, j in members])
            levels = torch.from_numpy(levels).to(self.device)
            faces = self._table[levels.long()]  # exact [-1, 1] values, on the model's device
            windows = torch.from_numpy(np.stack([requests[i]["windows"][j] for i, j in members]))
            seeds = [int(requests[i]["seed"][j][0]) for i, j in members]
            indices = [int(requests[i]["chunk_index"][j][0]) for i, j in members]
            mask = torch.from_numpy(masks[mask_key])
            out = self.denoise_group(faces, windows, mask, mask_key, seeds, indices, options)
            out = out.to("cpu", torch.float16 if self.out_dtype == np.float16 else torch.float32)
            out = out.numpy()
            for b, (i, j) in enumerate(members):
                outputs[i][j] = out[b]

    # -- audio_features -----------------------------------------------------------------------

    def audio_window(self, segment: torch.Tensor, log_max: float) -> torch.Tensor:
        """Features of one encoder window from its :func:`stft_segment` -> (frames // 2, 5, 384)."""
        audio = self.bundle.audio
        log_spec = log_mel_power(segment.float(), audio.dims.n_mels)
        peak = log_spec.max() if np.isnan(log_max) else torch.tensor(log_max, dtype=torch.float32)
        mel = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        frames = mel.shape[1]
        if frames > 2 * audio.dims.n_audio_ctx:
            raise ConfigError(f"a window holds at most {2 * audio.dims.n_audio_ctx} mel frames")
        return audio._window(mel, 0, frames // 2)

    def infer_audio(self, requests) -> list[dict[str, np.ndarray]]:
        out = []
        for req in requests:
            segment = torch.from_numpy(np.asarray(req["waveform"], dtype=np.float32).reshape(-1))
            if segment.shape[0] < N_FFT:
                raise ConfigError(f"a waveform segment needs at least {N_FFT} samples")
            log_max = float(np.asarray(req["log_mel_max"]).reshape(-1)[0])
            out.append({"features": self.audio_window(segment, log_max).numpy()})
        return out

    # -- binding --------------------------------------------------------------------------------

    def bind(self, triton, options: ServerOptions) -> None:
        """Bind both models to a ``pytriton.triton.Triton`` (before ``run()``/``serve()``)."""
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        r = self.resolution
        inputs = [
            Tensor(name="faces", dtype=np.uint8, shape=(-1, 3, r, r)),
            Tensor(name="windows", dtype=np.float32, shape=(-1, AUDIO_TOKENS, AUDIO_CHANNELS)),
            Tensor(name="mask", dtype=np.float32, shape=(r, r)),
            Tensor(name="seed", dtype=np.int64, shape=(1,)),
            Tensor(name="chunk_index", dtype=np.int64, shape=(1,)),
            Tensor(name="options", dtype=bytes, shape=(1,)),
        ]
        outputs = [Tensor(name="faces_out", dtype=self.out_dtype, shape=(-1, 3, r, r))]
        config = ModelConfig(
            batching=True,
            max_batch_size=options.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us),
        )
        funcs = [self.infer_lipsync for _ in range(options.instances)]
        triton.bind(LIPSYNC_MODEL, funcs, inputs, outputs, config=config)
        params = {
            **self.parameters(),
            "max_batch_size": str(options.max_batch_size),
            "instances": str(options.instances),
        }
        _set_model_parameters(triton, LIPSYNC_MODEL, params)
        if self.has_audio:
            ch = self.bundle.audio.dims.n_audio_state
            layers = self.bundle.audio.dims.n_audio_layer + 1
            triton.bind(
                AUDIO_MODEL,
                [self.infer_audio for _ in range(options.audio_instances)],
                [
                    Tensor(name="waveform", dtype=np.float32, shape=(-1,)),
                    Tensor(name="log_mel_max", dtype=np.float32, shape=(1,)),
                ],
                [Tensor(name="features", dtype=np.float32, shape=(-1, layers, ch))],
                config=ModelConfig(batching=False),
            )
            _set_model_parameters(triton, AUDIO_MODEL, self.parameters())


class EchoModelHost(ModelHost):
    """The ``lipsync`` model's I/O with no model behind it (returns the faces): measures what
    the transport costs (``benchmarks/triton_bench.py``, tests)."""

    has_audio = False

    def __init__(self, resolution: int, dtype: torch.dtype = torch.float32):
        self.bundle = None
        self.preset_name = "echo"
        self.resolution = resolution
        self.device = torch.device("cpu")
        self.dtype = dtype
        self.fp8 = False
        self._init_common()

    def denoise_group(self, faces, windows, mask, mask_key, seeds, chunk_indices, options):
        return faces


def options_to_json(options: DenoiseOptions) -> bytes:
    """The options that differ from the defaults, as JSON: a server that predates a new option
    still serves every request that leaves it at its default."""
    default = DenoiseOptions()
    changed = {
        f.name: getattr(options, f.name)
        for f in fields(DenoiseOptions)
        if getattr(options, f.name) != getattr(default, f.name)
    }
    return json.dumps(changed, sort_keys=True).encode()


def options_from_json(raw) -> DenoiseOptions:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        values = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"bad denoise options {text[:80]!r}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"denoise options must be a JSON object, got {text[:80]!r}")
    unknown = sorted(set(values) - {f.name for f in fields(DenoiseOptions)})
    if unknown:
        raise ConfigError(
            f"this server does not know the denoise option(s) {', '.join(unknown)}; update it"
        )
    options = DenoiseOptions(**values)
    options.validate()
    return options


def _row_options(req, j: int) -> DenoiseOptions:
    return options_from_json(req["options"][j][0])


def _has_fp8(unet) -> bool:
    try:
        from lipsync.accel.fp8 import has_fp8
    except ImportError:  # pragma: no cover - older tree
        return False
    return bool(has_fp8(unet))


def _set_model_parameters(triton, model_name: str, params: dict[str, str]) -> None:
    """Publish ``params`` as the model config's ``parameters`` (``lipsync_<name>``), which
    clients read with ``get_model_config``. PyTriton (pinned to 0.7.0) has no public option for
    it; its generated config carries ``backend_parameters``, which we extend before loading."""
    try:
        model = triton._model_manager._models[(model_name, 1)]
        config = model._get_triton_model_config()
        config.backend_parameters.update({PARAM_PREFIX + k: str(v) for k, v in params.items()})
    except (AttributeError, KeyError, TypeError) as exc:  # another PyTriton version
        LOG.warning("cannot publish model parameters of %s (%s); clients fall back to the "
                    "tensor shapes", model_name, exc)  # fmt: skip


# --------------------------------------------------------------------------------------------
# the server process


def python_backend_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the Triton server must start with so that its Python-backend stub embeds
    *this* interpreter's libpython (``LIBDIR`` first on ``LD_LIBRARY_PATH``), and so that
    ``tritonserver`` finds PyTriton's bundled libraries (``nvidia_pytriton.libs``, last).

    Measured here (pyenv 3.11.7, system libpython 3.11.2 in /lib): without it the stub loads the
    system's 3.11.2 library with pyenv's 3.11.7 standard library and every model fails to load
    (``'_thread.RLock' object has no attribute '_recursion_count'``); on a machine with no
    libpython3.11 at all it cannot start. With it, ``/proc/<stub>/maps`` shows pyenv's library.

    PyTriton takes an install outside site-packages (``pip install --target DIR`` +
    ``PYTHONPATH``) for an editable one and looks for its libraries in the source tree, so
    ``tritonserver`` fails with ``libcudart-….so: cannot open shared object file``; the wheel's
    ``nvidia_pytriton.libs`` beside the package is what it needs then. Such an install has a
    second problem this cannot fix (a warning says so): the stub embeds Python in isolated mode,
    ignoring PYTHONPATH, so it finds neither ``pyzmq`` nor the right ``numpy`` there.
    """
    env = dict(os.environ if environ is None else environ)
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        LOG.warning(
            "this Python (%s) has no shared libpython; Triton's Python backend needs "
            "libpython%d.%d.so of the same version (build Python with --enable-shared)",
            sys.executable, *sys.version_info[:2],
        )  # fmt: skip
    elif soname and not (Path(libdir) / soname).exists():
        LOG.warning("libpython not found at %s", Path(libdir) / soname)
    elif not parts or parts[0] != libdir:
        parts = [libdir] + [p for p in parts if p != libdir]
    libs = _pytriton_libs()
    if libs is not None and str(libs) not in parts:
        parts.append(str(libs))
    if libs is not None and not _in_site_packages(libs.parent):
        LOG.warning(
            "PyTriton is installed outside site-packages (%s): Triton's Python-backend stub "
            "ignores PYTHONPATH and will not find pyzmq or numpy < 2 there; install them into "
            "site-packages, or add a .pth file there with `import sys; sys.path.insert(0, %r)`",
            libs.parent, str(libs.parent),
        )  # fmt: skip
    if parts:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return env


def _in_site_packages(folder: Path) -> bool:
    import site

    sites = [*site.getsitepackages(), site.getusersitepackages()]
    return any(folder == Path(p).resolve() for p in sites if p)


def _pytriton_libs() -> Path | None:
    """The wheel's ``nvidia_pytriton.libs`` folder (beside the ``pytriton`` package), if any."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    libs = Path(spec.origin).resolve().parent.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` = ``env`` while PyTriton starts the server (it copies ``os.environ``)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class TritonService:
    """A running Triton server with our models (in this process's threads)."""

    def __init__(self, triton, host: ModelHost, options: ServerOptions):
        self.triton = triton
        self.host = host
        self.options = options

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"localhost:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.options.metrics_port}/metrics"

    def serve(self) -> None:
        """Block until SIGINT / SIGTERM or until the server dies, then stop it."""
        self.triton.serve()

    def stop(self) -> None:
        self.triton.stop()

    def __enter__(self) -> TritonService:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(options: ServerOptions, host: ModelHost | None = None) -> TritonService:
    """Load the preset (unless ``host`` is given), start Triton, return once models are ready."""
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    options.validate()
    if host is None:
        host = ModelHost(load_bundle(options))
    config = TritonConfig(
        http_address=options.address,
        grpc_address=options.address,
        metrics_address=options.address,
        http_port=options.http_port,
        grpc_port=options.grpc_port,
        metrics_port=options.metrics_port,
        allow_metrics=True,
        allow_cpu_metrics=True,
        allow_gpu_metrics=host.device.type == "cuda",
        log_verbose=options.log_verbose or None,
        exit_timeout_secs=10,
    )
    token = options.access_token or os.environ.get(ACCESS_TOKEN_ENV) or None
    triton = Triton(config=config, security_config=TritonSecurityConfig(access_token=token))
    try:
        host.bind(triton, options)
        with _environment(python_backend_env()):
            triton.run()
    except BaseException:
        triton.stop()
        raise
    LOG.info(
        "Triton serving %s (%s, %s, %d px): grpc :%d, http :%d, metrics :%d; max batch %d, "
        "%d instance(s), queue delay %d us",
        host.preset_name, host.device, host.dtype_name, host.resolution, options.grpc_port,
        options.http_port, options.metrics_port, options.max_batch_size, options.instances,
        options.queue_delay_us,
    )  # fmt: skip
    return TritonService(triton, host, options)


def load_bundle(options: ServerOptions):
    """The preset's models, loaded as ``lipsync run`` loads them (compile / FP8 included)."""
    from lipsync.api import LipSync

    if options.random_weights:
        return _random_bundle(options)
    kwargs = {}
    if options.compile != "none":
        kwargs["compile"] = options.compile
    if options.fp8:
        kwargs["fp8"] = True
    ls = LipSync.from_pretrained(
        options.preset, device=options.device, dtype=options.dtype,
        checkpoint_dir=options.checkpoint_dir, cpu_threads=options.cpu_threads or os.cpu_count(),
        **kwargs,
    )  # fmt: skip
    return ls.models


def _random_bundle(options: ServerOptions):
    """``random_weights``: the preset's architecture, seeded random weights, same defaults
    (device, dtype, threads) and accelerations as :meth:`lipsync.api.LipSync.from_pretrained`."""
    from lipsync.models.bundle import load_models, parse_dtype

    cuda = torch.cuda.is_available()
    device = torch.device(options.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and not cuda:
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    if options.dtype is not None:
        dtype = parse_dtype(options.dtype)
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(options.cpu_threads or os.cpu_count() or 1)
    if options.fp8:
        from lipsync.accel.fp8 import require_fp8_device

        require_fp8_device(device)
    LOG.warning("random weights (--random-weights): for timing only, the output is noise")
    models = load_models(options.preset, device=device, dtype=dtype, random_weights=True)
    if options.fp8:
        from lipsync.accel.fp8 import convert_unet_to_fp8

        convert_unet_to_fp8(models.unet)
    if options.compile != "none":
        from lipsync.accel.compile import compile_unet, compile_vae

        models.unet = compile_unet(models.unet, options.compile)
        compile_vae(models.vae, "regional")
    return models


def serve(options: ServerOptions, host: ModelHost | None = None) -> None:
    """``lipsync serve triton``: start, print the endpoints, serve until interrupted
    (``host``: other models than the preset's, e.g. a benchmark's transport-only host).

    SIGTERM (Kubernetes, ``kill``) stops it as SIGINT does: in-flight requests finish (Triton
    waits up to ``exit_timeout_secs``), then the proxies and the tritonserver process stop and
    the command exits 0. A signal while the models load stops it too (status 130). PyTriton
    itself only catches a KeyboardInterrupt inside its wait loop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        service = start_server(options, host)
        print(
            f"lipsync Triton server: preset {service.host.preset_name} on {service.host.device} "
            f"({service.host.dtype_name}); grpc {options.address}:{options.grpc_port}, "
            f"http {options.address}:{options.http_port}, "
            f"metrics http://{options.address}:{options.metrics_port}/metrics",
            file=sys.stderr,
            flush=True,
        )
        try:
            service.serve()
        except KeyboardInterrupt:
            LOG.info("interrupted: stopping the Triton server")
        finally:
            service.stop()  # idempotent
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
