"""Run the pipeline with the model on a Triton server (``lipsync serve triton``).

    >>> from lipsync.serving.triton.client import TritonEngine, make_triton_runner
    >>> runner = make_triton_runner("grpc://gpu-host:8001")        # a LipSync over Triton
    >>> report = runner.run("talk.mp4", "speech.wav", "synced.mp4", steps=20, seed=1)
    >>> runner.close()

:class:`TritonEngine` implements :class:`lipsync.engine.SyncEngine`: media, faces and encoding
stay in this process; the Whisper encoder and the denoising loop run on the server. A chunk gives
the same result as :class:`lipsync.engine.LocalEngine` on the server's device and dtype
(randomness depends on ``(seed, chunk_index)`` only; faces travel as exact 8-bit levels).

Transport (``shared_memory=``):

* ``"system"`` -- the large tensors (faces, audio windows, mask; the synced faces) go through
  POSIX shared memory registered with the server (``tritonclient.utils.shared_memory``); only
  the request headers and scalars travel over the socket. Needs the server on this host with the
  same ``/dev/shm`` (a pod's containers: share an ``emptyDir`` with ``medium: Memory``).
  Regions are created on first use, grown when a chunk needs more, reused across calls (one set
  per call in flight), unregistered and unlinked by :meth:`TritonEngine.close`.
* ``"cuda"`` -- the same with CUDA IPC regions (``tritonclient.utils.cuda_shared_memory``,
  needs ``cuda-python``) for GPU-resident crops. Not tested here (no GPU Triton on the CI or
  development machines); note that PyTriton's Python backend hands the model numpy arrays, so
  the server copies the tensors to the host anyway.
* ``"none"`` -- everything in the gRPC / HTTP messages: works across machines.
* ``"auto"`` (default) -- ``"system"`` when the server can open our region (same host), else
  ``"none"``. Decided once, at connection.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Literal, get_args

import numpy as np
import torch

from lipsync.api import LipSync
from lipsync.audio import (
    ENCODER_WINDOW_FRAMES,
    N_MELS,
    WindowedFeatures,
    as_waveform,
    clip_log_mel_max,
    encoder_windows,
    stft_segment,
)
from lipsync.diffusion import MAX_FRAMES, DenoiseOptions
from lipsync.errors import ConfigError, LipSyncError, one_line
from lipsync.serving.triton.protocol import (
    ACCESS_HEADER,
    ACCESS_TOKEN_ENV,
    AUDIO_MODEL,
    LIPSYNC_MODEL,
    NP_OF_TORCH,
    NP_OF_TRITON,
    TRITON_OF_NP,
    ChunkRequest,
    check_chunk,
    faces_to_levels,
    read_parameters,
    triton_dtype,
)
from lipsync.serving.triton.shm import SharedMemoryPool, aligned

LOG = logging.getLogger("lipsync.triton")

Protocol = Literal["grpc", "http"]
SharedMemoryMode = Literal["auto", "system", "cuda", "none"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
SHARED_MEMORY_MODES: tuple[SharedMemoryMode, ...] = get_args(SharedMemoryMode)
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


class TritonError(LipSyncError):
    """The Triton model server refused or failed a request (the message says which and why).

    Not the user's input at fault: the job service retries it (``retryable``) with backoff
    (:func:`lipsync.serving.queue.decide`), ``retry_reason`` being the metrics label."""

    retryable = True
    retry_reason = "triton"


class TritonUnavailableError(TritonError):
    """The Triton server cannot be reached (down, restarting, wrong URL, network). Worth
    retrying later; a worker waits for the server to come back before its next job."""

    retry_reason = "unavailable"


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """``grpc://host:port``, ``http://host:port`` or ``host[:port]`` -> (host:port, protocol)."""
    if not url or not isinstance(url, str):
        raise ConfigError("no Triton URL given (e.g. grpc://localhost:8001)")
    scheme, sep, rest = url.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme == "https":
            raise ConfigError(f"TLS Triton URLs are not supported: {url}")
        if scheme not in PROTOCOLS:
            raise ConfigError(f"unknown Triton URL scheme {scheme!r} in {url}: use grpc or http")
        if protocol and protocol != scheme:
            raise ConfigError(f"Triton URL {url} does not match protocol={protocol!r}")
        protocol = scheme
    else:
        rest = url
    protocol = (protocol or "grpc").lower()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown Triton protocol {protocol!r}: use grpc or http")
    hostport = rest.rstrip("/")
    if not hostport or "/" in hostport:
        raise ConfigError(f"bad Triton URL {url!r}: expected [grpc|http]://host[:port]")
    if ":" not in hostport.rsplit("]", 1)[-1]:
        hostport = f"{hostport}:{DEFAULT_PORTS[protocol]}"
    return hostport, protocol


# --------------------------------------------------------------------------------------------
# the engine


class TritonEngine:
    """:class:`lipsync.engine.SyncEngine` whose models run on a Triton server.

    ``url``: ``grpc://host:8001``, ``http://host:8000`` or ``host[:port]`` (with ``protocol``).
    ``device``: where the pipeline keeps frames and crops here (default: ``cuda`` with
    ``shared_memory="cuda"``, else ``cpu``). ``timeout_s``: per request (None: no limit; a
    chunk can take minutes on a CPU server). Thread-safe: one client and one set of
    shared-memory regions per thread / call in flight. Close it (or use ``with``) to free the
    shared-memory regions; the server is left running.
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: Protocol | None = None,
        shared_memory: SharedMemoryMode = "auto",
        device: str | torch.device | None = None,
        timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        access_token: str | None = None,
    ):
        self.url, self.protocol = parse_url(url, protocol)
        self.access_token = access_token or os.environ.get(ACCESS_TOKEN_ENV) or None
        shared_memory = (shared_memory or "auto").lower()
        if shared_memory not in SHARED_MEMORY_MODES:
            raise ConfigError(
                f"unknown shared_memory {shared_memory!r}; use {', '.join(SHARED_MEMORY_MODES)}"
            )
        if device is None:
            device = "cuda" if shared_memory == "cuda" else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("TritonEngine(device='cuda') but no CUDA GPU is available here")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._clients: list = []
        self._clients_lock = threading.Lock()
        self._shm: SharedMemoryPool | None = None
        self._closed = False
        self._read_server()
        self.shared_memory = self._setup_shared_memory(shared_memory)
        LOG.info(
            "Triton %s at %s: preset %s, %s on %s, %d px; shared memory: %s",
            self.protocol, self.url, self.preset_name, self.dtype_name, self.server_device,
            self.resolution, self.shared_memory,
        )  # fmt: skip

    # -- connection -------------------------------------------------------------------------

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self._closed:
                raise TritonError(f"the TritonEngine for {self.url} is closed")
            if self.protocol == "grpc":
                import tritonclient.grpc as tc

                client = tc.InferenceServerClient(self.url)
            else:
                import tritonclient.http as tc

                timeout = self.timeout_s if self.timeout_s is not None else 24 * 3600.0
                client = tc.InferenceServerClient(
                    self.url, connection_timeout=self.connect_timeout_s, network_timeout=timeout
                )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _restricted_headers(self) -> dict[str, str] | None:
        """Headers for the endpoints PyTriton restricts (shared-memory registration)."""
        if not self.access_token:
            return None
        name = ACCESS_HEADER if self.protocol == "http" else "triton-grpc-protocol-" + ACCESS_HEADER
        return {name: self.access_token}

    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        return tc

    def _error(self, exc: BaseException, what: str) -> TritonError:
        """Our typed error for a failed call (the URL in every message)."""
        from tritonclient.utils import InferenceServerException

        where = f"Triton server at {self.protocol}://{self.url}"
        if isinstance(exc, InferenceServerException):
            status = str(exc.status() or "")
            message = exc.message() or str(exc)
            if "UNAVAILABLE" in status or "failed to connect" in message.lower():
                return TritonUnavailableError(
                    f"{where} is unreachable ({what}): {one_line(Exception(message))}; is "
                    f"`lipsync serve triton` running there?"
                )
            if "unknown model" in message.lower() or "is not ready" in message.lower():
                # up, but the model is not loaded (yet): a (re)starting server loads it last
                return TritonUnavailableError(
                    f"{where} is not ready ({what}): {one_line(Exception(message))}"
                )
            if "DEADLINE_EXCEEDED" in status:
                return TritonError(f"{where}: {what} timed out after {self.timeout_s} s")
            return TritonError(f"{where}: {what} failed: {one_line(Exception(message))}")
        if isinstance(exc, (OSError, ConnectionError)) or type(exc).__module__.startswith(
            ("gevent", "geventhttpclient")
        ):
            return TritonUnavailableError(
                f"{where} is unreachable ({what}): {type(exc).__name__}: {one_line(exc)}; is "
                f"`lipsync serve triton` running there?"
            )
        return TritonError(f"{where}: {what} failed: {type(exc).__name__}: {one_line(exc)}")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LipSyncError:
            raise
        except Exception as exc:
            error = self._error(exc, what)
            if not isinstance(error, TritonUnavailableError) and not self._live():
                # a server that dies mid-request can end the call with another status
                # (e.g. "Stream removed"): unreachable now is what matters for a retry
                error = TritonUnavailableError(
                    f"Triton server at {self.protocol}://{self.url} is unreachable ({what}); "
                    f"the call ended with: {one_line(error)}"
                )
            if isinstance(error, TritonUnavailableError):
                self._reconnect()
            raise error from exc

    def _live(self) -> bool:
        """Whether the server answers a liveness check now (never raises)."""
        try:
            client = self._client()
            kwargs = {"client_timeout": self.connect_timeout_s} if self.protocol == "grpc" else {}
            return bool(client.is_server_live(**kwargs))
        except Exception:
            return False

    def _reconnect(self) -> None:
        """After the server was unreachable: a new connection for this thread's next call (a
        gRPC channel that failed backs off reconnecting for up to minutes), and fresh
        shared-memory registrations (a restarted server knows none of ours)."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._clients_lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception:  # pragma: no cover - best effort
                pass
        if self._shm is not None:
            self._shm.invalidate()

    def is_ready(self) -> bool:
        """Whether the server is up with our models loaded (``lipsync``, and ``audio_features``
        when it had it: a restarting server loads that one last); never raises."""
        models = [LIPSYNC_MODEL] + ([AUDIO_MODEL] if self.has_audio else [])
        try:
            client = self._client()
            kwargs = {"client_timeout": self.connect_timeout_s} if self.protocol == "grpc" else {}
            return bool(
                self._call("checking the server", client.is_server_ready, **kwargs)
            ) and all(
                self._call("checking the models", client.is_model_ready, model, **kwargs)
                for model in models
            )
        except TritonError:
            return False
        except Exception as exc:  # anything else the client raises: not ready either
            LOG.debug("readiness check of %s: %s", self.url, one_line(exc))
            self._reconnect()
            return False

    def wait_until_ready(self, timeout_s: float, stop=None, interval_s: float = 0.5) -> bool:
        """Poll :meth:`is_ready` until the server is back (True), ``timeout_s`` passed or
        ``stop()`` says to give up (False). A job-service worker calls it after a
        :class:`TritonUnavailableError`, so that it takes no more jobs while the server is down."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.is_ready():
                return True
            if time.monotonic() >= deadline or (stop is not None and stop()):
                return False
            time.sleep(interval_s)

    def _model_config(self, name: str) -> dict | None:
        from tritonclient.utils import InferenceServerException

        client = self._client()
        try:
            if self.protocol == "grpc":
                cfg = client.get_model_config(
                    name, as_json=True, client_timeout=self.connect_timeout_s
                )
                cfg = cfg.get("config", cfg)
            else:
                cfg = client.get_model_config(name)
        except InferenceServerException as exc:
            text = (exc.message() or str(exc)).lower()
            if "unavailable" in str(exc.status() or "").lower() or "failed to connect" in text:
                raise self._error(exc, "reading the model config") from exc
            return None  # no such model
        return cfg

    def _read_server(self) -> None:
        client = self._client()
        kwargs = {"client_timeout": self.connect_timeout_s} if self.protocol == "grpc" else {}
        live = self._call("checking the server", client.is_server_live, **kwargs)
        if not live:
            raise TritonUnavailableError(
                f"Triton server at {self.protocol}://{self.url} is not live"
            )
        cfg = self._model_config(LIPSYNC_MODEL)
        if cfg is None:  # PyTriton starts tritonserver first, then loads the models into it
            raise TritonUnavailableError(
                f"Triton server at {self.protocol}://{self.url} has no {LIPSYNC_MODEL!r} model "
                f"(still loading? it must be started with `lipsync serve triton`)"
            )
        ready = self._call("checking the model", client.is_model_ready, LIPSYNC_MODEL, **kwargs)
        if not ready:
            raise TritonUnavailableError(
                f"model {LIPSYNC_MODEL!r} on Triton server at {self.protocol}://{self.url} is "
                f"not ready"
            )
        params = read_parameters(cfg)
        faces_dims = next(i["dims"] for i in cfg["input"] if i["name"] == "faces")
        output = next(o for o in cfg["output"] if o["name"] == "faces_out")
        self.resolution = int(params.get("resolution") or faces_dims[-1])
        self.preset_name = params.get("preset") or "remote"
        self.dtype_name = params.get("dtype") or (
            "float16" if output["data_type"] == "TYPE_FP16" else "float32"
        )
        self.server_device = params.get("device") or "unknown"
        self.fp8 = params.get("fp8") == "true"  # the pipeline's report reads engine.fp8
        self.max_batch_size = int(cfg.get("max_batch_size") or 0)
        self.output_dtype = NP_OF_TRITON[output["data_type"]]  # of faces_out
        self._read_audio_model()

    def _read_audio_model(self) -> None:
        """``has_audio`` and the audio model's shapes. PyTriton loads ``audio_features`` after
        ``lipsync``, so an engine made in between reads it again when first asked for audio."""
        audio = self._model_config(AUDIO_MODEL)
        self.has_audio = audio is not None
        if audio is not None:
            a_params = read_parameters(audio)
            dims = audio["output"][0]["dims"]
            self.audio_layers, self.audio_channels = int(dims[-2]), int(dims[-1])
            self.audio_window_frames = int(
                a_params.get("audio_window_frames") or ENCODER_WINDOW_FRAMES
            )
            self.n_mels = int(a_params.get("n_mels") or N_MELS)

    def _setup_shared_memory(self, mode: str) -> str:
        if mode == "none":
            return "none"
        kind = "cuda" if mode == "cuda" else "system"
        try:
            device_id = (self.device.index or 0) if self.device.type == "cuda" else 0
            shm = SharedMemoryPool(self._client, kind, self._restricted_headers(), device_id)
            shm.probe()
        except Exception as exc:
            if mode == "auto":
                LOG.info("system shared memory not usable with %s (%s): sending tensors in "
                         "the messages", self.url, one_line(exc))  # fmt: skip
                return "none"
            if "restricted" in str(exc) or ACCESS_HEADER in str(exc):
                raise TritonError(
                    f"the Triton server at {self.protocol}://{self.url} restricts shared-memory "
                    f"registration: set {ACCESS_TOKEN_ENV} (or access_token=) to the server's "
                    f"token, or use shared_memory='none'"
                ) from exc
            if isinstance(exc, TritonError):
                raise
            raise TritonError(
                f"{kind} shared memory is not usable with the Triton server at "
                f"{self.protocol}://{self.url} (is it on this host, sharing /dev/shm?): "
                f"{one_line(exc)}"
            ) from exc
        self._shm = shm
        return kind

    @property
    def shared_memory_regions(self) -> list[str]:
        """Names of the regions this engine holds registered now."""
        return self._shm.region_names if self._shm is not None else []

    def close(self) -> None:
        """Unregister and free the shared-memory regions; close the connections."""
        if self._closed:
            return
        if self._shm is not None:
            self._shm.close()
        self._closed = True
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # pragma: no cover - best effort
                pass
        self._local = threading.local()

    def __enter__(self) -> TritonEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # regions in /dev/shm outlive the process unless unlinked
        try:
            if not self._closed and self._shm is not None:
                self._shm.close()
        except Exception:
            pass

    # -- SyncEngine ---------------------------------------------------------------------------

    def lazy_features(self, waveform: np.ndarray) -> RemoteFeatures:
        if not self.has_audio:
            self._read_audio_model()
        if not self.has_audio:
            raise TritonUnavailableError(
                f"Triton server at {self.protocol}://{self.url} has no {AUDIO_MODEL!r} model "
                f"(still loading?)"
            )
        return RemoteFeatures(self, waveform)

    def denoise(self, faces, windows, mask, seed, chunk_index, options: DenoiseOptions, reuse=None):
        """faces (k, 3, r, r) in [-1, 1] (8-bit levels, as the pipeline makes them); windows
        (k, 50, 384); mask (r, r), 1 = keep -> (k, 3, r, r) float32 on ``self.device``.
        ``reuse`` is ignored: the server encodes every chunk's faces (it sees no source frames)."""
        options.validate()
        check_chunk(faces, windows, mask, self.resolution, MAX_FRAMES)
        levels = faces_to_levels(faces)
        if levels is None:
            raise ValueError(
                "TritonEngine sends faces as their 8-bit levels (lossless for the faces "
                "lipsync.face.align.crops_to_model_input makes); these faces are not 8-bit levels"
            )
        mask32 = torch.as_tensor(mask).detach().to(torch.float32)
        out = self.infer(ChunkRequest(levels, windows, mask32, seed, chunk_index, options))[0]
        out = out.to(self.device, torch.float32)
        keep = mask32.to(self.device) == 1
        # kept pixels are the input faces; taking ours makes them exact even with FP16 outputs
        return torch.where(keep, faces.to(self.device, torch.float32), out)

    # -- transport ------------------------------------------------------------------------------

    def infer(self, request: ChunkRequest) -> torch.Tensor:
        """One ``lipsync`` call: the synced faces (1, k, 3, r, r) as the server sent them
        (``output_dtype``). Registers fresh shared-memory regions once if the server lost ours."""
        tensors, params, out_shape = request.tensors(), request.scalars(), request.output_shape()
        try:
            return self._infer_lipsync_once(tensors, params, out_shape)
        except TritonError as exc:
            if self._shm is None or not _lost_region(exc):
                raise
            # the server restarted since our regions were registered: register new ones, once
            LOG.info("Triton server at %s lost our shared-memory regions (restarted?): "
                     "registering new ones", self.url)  # fmt: skip
            self._shm.invalidate()
            return self._infer_lipsync_once(tensors, params, out_shape)

    def _infer_lipsync_once(self, tensors: dict, params: dict, out_shape) -> torch.Tensor:
        tc = self._module()
        client = self._client()
        out_bytes = math.prod(out_shape) * np.dtype(self.output_dtype).itemsize
        slot = None
        try:
            inputs = []
            output = tc.InferRequestedOutput("faces_out")
            if self._shm is not None:
                in_bytes = sum(aligned(t.numel() * t.element_size()) for t in tensors.values())
                slot = self._shm.acquire(in_bytes, out_bytes)
                src = [
                    t if self.shared_memory == "cuda" else t.to("cpu", non_blocking=False)
                    for t in tensors.values()
                ]
                offsets = self._shm.write(slot.inputs, [t.contiguous() for t in src])
                for (name, t), off in zip(tensors.items(), offsets, strict=True):
                    inp = tc.InferInput(name, list(t.shape), TRITON_OF_NP[NP_OF_TORCH[t.dtype]])
                    inp.set_shared_memory(slot.inputs.name, t.numel() * t.element_size(), off)
                    inputs.append(inp)
                output.set_shared_memory(slot.outputs.name, out_bytes)
            else:
                for name, t in tensors.items():
                    arr = t.detach().cpu().contiguous().numpy()
                    inp = tc.InferInput(name, list(arr.shape), TRITON_OF_NP[arr.dtype.type])
                    inp.set_data_from_numpy(arr)
                    inputs.append(inp)
            for name, arr in params.items():
                inp = tc.InferInput(name, list(arr.shape), triton_dtype(arr.dtype))
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
            kwargs = {}
            if self.protocol == "grpc" and self.timeout_s is not None:
                kwargs["client_timeout"] = self.timeout_s
            result = self._call(
                "denoising a chunk", client.infer, LIPSYNC_MODEL, inputs, outputs=[output], **kwargs
            )
            if slot is not None:
                return self._shm.read(slot.outputs, self.output_dtype, out_shape)
            return torch.from_numpy(np.array(result.as_numpy("faces_out"), copy=True))
        finally:
            if slot is not None:
                self._shm.release(slot)

    def audio_window(self, segment: torch.Tensor, log_max: float) -> torch.Tensor:
        """One encoder window's features from its :func:`~lipsync.audio.stft_segment`
        (``audio_features`` model)."""
        tc = self._module()
        client = self._client()
        seg = np.ascontiguousarray(segment.numpy(), dtype=np.float32)
        a = tc.InferInput("waveform", [seg.shape[0]], "FP32")
        a.set_data_from_numpy(seg)
        b = tc.InferInput("log_mel_max", [1], "FP32")
        b.set_data_from_numpy(np.array([log_max], dtype=np.float32))
        kwargs = {}
        if self.protocol == "grpc" and self.timeout_s is not None:
            kwargs["client_timeout"] = self.timeout_s
        result = self._call(
            "computing audio features", client.infer, AUDIO_MODEL, [a, b],
            outputs=[tc.InferRequestedOutput("features")], **kwargs,
        )  # fmt: skip
        return torch.from_numpy(np.array(result.as_numpy("features"), copy=True))


def _lost_region(exc: BaseException) -> bool:
    """The server does not know a shared-memory region we named (it restarted)."""
    text = str(exc).lower()
    return "shared memory region" in text and ("unable to find" in text or "not found" in text)


class RemoteFeatures(WindowedFeatures):
    """(T, 5, 384) Whisper features of a clip, computed on the server one 30 s encoder window at
    a time, when first indexed (the two most recent kept): what :class:`lipsync.audio.LazyFeatures`
    is for local models, with the same values and the same interface (``shape``, ``ndim``,
    ``device``, indexing by a position tensor).

    Whisper floors the log-mel at the clip's maximum - 8, so for a clip longer than one window
    the maximum is found here first, in one streaming STFT pass (no model, bounded memory).
    """

    def __init__(self, engine: TritonEngine, waveform):
        self.engine = engine
        self.wav = as_waveform(waveform)
        self.windows = encoder_windows(self.wav.shape[0], engine.audio_window_frames)
        kept = [(f1 - f0) // 2 for f0, f1 in self.windows]
        super().__init__(kept, engine.audio_layers, engine.audio_channels)
        if len(self.windows) == 1:
            self.log_max = float("nan")  # the server's segment is the whole clip
        else:
            self.log_max = clip_log_mel_max(self.wav, engine.n_mels, engine.audio_window_frames)

    def compute_window(self, k: int) -> torch.Tensor:
        f0, f1 = self.windows[k]
        feats = self.engine.audio_window(stft_segment(self.wav, f0, f1), self.log_max)
        if feats.shape[0] != self.kept[k]:
            raise TritonError(
                f"audio_features returned {feats.shape[0]} positions for window {k}, "
                f"expected {self.kept[k]}"
            )
        return feats


# --------------------------------------------------------------------------------------------
# the runner the job service's workers use


class TritonLipSync(LipSync):
    """:class:`lipsync.api.LipSync` with the model on Triton; ``close()`` frees the engine's
    shared-memory regions (the server keeps running)."""

    def close(self) -> None:
        self.pipeline.engine.close()

    def wait_until_ready(self, timeout_s: float, stop=None) -> bool:
        """See :meth:`TritonEngine.wait_until_ready` (the job-service worker calls it)."""
        return self.pipeline.engine.wait_until_ready(timeout_s, stop)

    def __enter__(self) -> TritonLipSync:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_triton_runner(
    settings_or_url,
    *,
    protocol: str | None = None,
    shared_memory: str | None = None,
    timeout_s: float | None = None,
    defaults=None,
):
    """A ``LipSync``-like runner (``.run(video, audio, out, progress=None, **options)``,
    ``.run_arrays``, ``.close()``) whose model is the Triton server at ``settings_or_url``:
    a URL, or settings with ``triton_url`` (and optionally ``triton_protocol``,
    ``triton_shared_memory``, ``triton_timeout_s``; ``preset`` is checked against the server's).
    """
    from lipsync.pipeline import LipSyncPipeline

    expected_preset = None
    if isinstance(settings_or_url, str):
        url = settings_or_url
    else:
        s = settings_or_url
        url = getattr(s, "triton_url", None)
        protocol = protocol or getattr(s, "triton_protocol", None)
        shared_memory = shared_memory or getattr(s, "triton_shared_memory", None)
        timeout_s = timeout_s if timeout_s is not None else getattr(s, "triton_timeout_s", None)
        expected_preset = getattr(s, "preset", None)
    if not url:
        raise ConfigError("no Triton URL configured (LIPSYNC_TRITON_URL / --triton-url)")
    engine = TritonEngine(url, protocol=protocol, shared_memory=shared_memory or "auto",
                          timeout_s=timeout_s)  # fmt: skip
    if expected_preset:
        from lipsync.config import get_preset

        try:
            wanted = get_preset(expected_preset).name
        except ConfigError:
            wanted = expected_preset
        if wanted != engine.preset_name:
            LOG.warning(
                "settings ask for preset %s but the Triton server at %s serves %s: jobs run "
                "with %s", wanted, engine.url, engine.preset_name, engine.preset_name,
            )  # fmt: skip
    return TritonLipSync(LipSyncPipeline(engine), defaults)


make_runner = make_triton_runner  # the name lipsync.serving.worker.make_runner calls
