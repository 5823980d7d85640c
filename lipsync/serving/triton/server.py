"""The model on Triton Inference Server (PyTriton): ``lipsync serve triton``.

One process loads one preset (:class:`~lipsync.config.LoadOptions`, through
:func:`lipsync.loading.load_models` like every other caller) and serves the two models of
:mod:`lipsync.serving.triton.protocol` (docs/TRITON.md has the full description and the
measurements).

Batching. Triton's dynamic batcher hands :meth:`ChunkHost.infer_lipsync` every chunk request
queued within ``--queue-delay-us`` (up to ``--max-batch-size``). The requests are grouped by
(frames, denoising options, mask); each group runs as ONE :class:`~lipsync.diffusion.ChunkDenoiser`
call on a (B, f, ...) batch, so every step of the denoising loop runs the U-Net once for the
whole group. Each chunk keeps its own noise and generator (:func:`lipsync.engine.chunk_noise`,
:func:`lipsync.engine.chunk_generator`), so its result does not depend on its batch-mates.

The server process's environment (``LD_LIBRARY_PATH`` for the Python backend):
:mod:`lipsync.serving.triton.backend_env`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lipsync.audio import ENCODER_WINDOW_FRAMES, N_FFT, N_MELS, log_mel_power, whisper_log_mel
from lipsync.config import LoadOptions
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.engine import chunk_generator, chunk_noise
from lipsync.errors import ConfigError
from lipsync.face.align import levels_to_unit_table
from lipsync.loading import ModelBundle, load_models
from lipsync.serving.triton.backend_env import environment, python_backend_env
from lipsync.serving.triton.protocol import (
    ACCESS_TOKEN_ENV,
    AUDIO_CHANNELS,
    AUDIO_MODEL,
    AUDIO_TOKENS,
    LIPSYNC_MODEL,
    PARAM_PREFIX,
    options_from_json,
)

LOG = logging.getLogger("lipsync.triton")

# --------------------------------------------------------------------------------------------
# the models' Python side


@dataclass
class ServerOptions:
    """``lipsync serve triton``'s settings: what to load (``load``; its ``random_weights``:
    the architecture without checkpoints, for benchmarks; the output is noise) and how to
    serve it."""

    load: LoadOptions = field(default_factory=LoadOptions)
    address: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1  # model instances of `lipsync` (each runs whole batches)
    max_batch_size: int = 4  # chunks per `lipsync` model call
    queue_delay_us: int = 10_000  # how long a request may wait for batch-mates
    audio_instances: int = 1
    log_verbose: int = 0
    # Token for the endpoints PyTriton restricts (shared-memory registration, repository,
    # statistics...). None: $LIPSYNC_TRITON_ACCESS_TOKEN, else a random one, which keeps
    # clients off shared memory (they fall back to sending tensors in the messages).
    access_token: str | None = None

    def validate(self) -> None:
        self.load.validate()
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


class ChunkHost:
    """The ``lipsync`` model's Python side without a model: decodes requests, groups chunks,
    encodes the responses; :meth:`denoise_group` is the model's work (:class:`ModelHost`).
    A subclass with another :meth:`denoise_group` measures what the transport costs."""

    has_audio = False

    def __init__(
        self,
        resolution: int,
        device: torch.device,
        dtype: torch.dtype,
        preset_name: str,
        fp8: bool = False,
    ):
        self.preset_name = preset_name
        self.resolution = resolution
        self.device = torch.device(device)
        self.dtype = dtype
        self.fp8 = fp8
        self.out_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        self._table = levels_to_unit_table().to(self.device)
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
            "audio_window_frames": str(ENCODER_WINDOW_FRAMES),
            "n_mels": str(N_MELS),
        }

    # -- lipsync ------------------------------------------------------------------------------

    def denoise_group(self, faces, windows, mask, mask_key, seeds, chunk_indices, options):
        """One batched denoise: faces (B, k, 3, r, r) in [-1, 1], windows (B, k, 50, 384)
        -> (B, k, 3, r, r). Chunk b draws from (seeds[b], chunk_indices[b]) only.
        Without a model: the faces as they came."""
        return faces

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
            self.bind_audio(triton, options)


class ModelHost(ChunkHost):
    """:class:`ChunkHost` with a preset's models: the ``lipsync`` and ``audio_features``
    models' Python side (``bundle``: :func:`lipsync.loading.load_models`)."""

    has_audio = True

    def __init__(self, bundle: ModelBundle, max_denoisers: int = 4):
        super().__init__(
            bundle.preset.resolution, bundle.device, bundle.dtype, bundle.preset.name, bundle.fp8
        )
        self.bundle = bundle
        self._denoisers: OrderedDict = OrderedDict()
        self._max_denoisers = max_denoisers

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
        k = faces.shape[1]
        latent = self.resolution // 8
        noise = torch.cat([chunk_noise(s, k, latent, self.device, self.dtype) for s in seeds])
        gens = [
            chunk_generator(s, c, self.device) for s, c in zip(seeds, chunk_indices, strict=True)
        ]
        return self._denoiser(mask, mask_key, options)(faces, windows, noise, gens)

    # -- audio_features -----------------------------------------------------------------------

    def audio_window(self, segment: torch.Tensor, log_max: float) -> torch.Tensor:
        """Features of one encoder window from its :func:`lipsync.audio.stft_segment`
        -> (frames // 2, 5, 384); ``log_max``: the clip's (NaN: this segment's own)."""
        audio = self.bundle.audio
        log_spec = log_mel_power(segment.float(), audio.dims.n_mels)
        mel = whisper_log_mel(log_spec, log_spec.max() if np.isnan(log_max) else log_max)
        frames = mel.shape[1]
        if frames > audio.window_frames:
            raise ConfigError(f"a window holds at most {audio.window_frames} mel frames")
        return audio.window_features(mel, 0, frames // 2)

    def infer_audio(self, requests) -> list[dict[str, np.ndarray]]:
        out = []
        for req in requests:
            segment = torch.from_numpy(np.asarray(req["waveform"], dtype=np.float32).reshape(-1))
            if segment.shape[0] < N_FFT:
                raise ConfigError(f"a waveform segment needs at least {N_FFT} samples")
            log_max = float(np.asarray(req["log_mel_max"]).reshape(-1)[0])
            out.append({"features": self.audio_window(segment, log_max).numpy()})
        return out

    def bind_audio(self, triton, options: ServerOptions) -> None:
        from pytriton.model_config import ModelConfig, Tensor

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


def _row_options(req, j: int) -> DenoiseOptions:
    return options_from_json(req["options"][j][0])


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


class TritonService:
    """A running Triton server with our models (in this process's threads)."""

    def __init__(self, triton, host: ChunkHost, options: ServerOptions):
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


def start_server(options: ServerOptions, host: ChunkHost | None = None) -> TritonService:
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
        with environment(python_backend_env()):
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


def load_bundle(options: ServerOptions) -> ModelBundle:
    """The preset's models, loaded as every caller loads them (:func:`lipsync.loading.
    load_models`); on the CPU all cores by default (this process runs no media threads)."""
    load = options.load
    if load.random_weights:
        LOG.warning("random weights (--random-weights): for timing only, the output is noise")
    return load_models(replace(load, cpu_threads=load.cpu_threads or os.cpu_count()))


def serve(options: ServerOptions, host: ChunkHost | None = None) -> None:
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
