"""Run the pipeline on exported models: an ONNX Runtime :class:`~lipsync.engine.SyncEngine`.

    >>> from lipsync.export.ort_engine import OrtEngine
    >>> from lipsync.pipeline import LipSyncPipeline
    >>> engine = OrtEngine("onnx-v1.6", provider="auto")      # an `lipsync export onnx` folder
    >>> report = LipSyncPipeline(engine).run("talk.mp4", "speech.wav", "synced.mp4")

The denoising loop is our own :class:`~lipsync.diffusion.ChunkDenoiser` (scheduler, guidance,
mask, paste-back): only the three networks are swapped for ONNX Runtime sessions, through
:class:`OrtUNet` and :class:`OrtVae`, and Whisper through :class:`OrtWhisperEncoder` inside our
:class:`~lipsync.audio.AudioEncoder` (log-mel, 30 s windows, per-frame windows). Randomness is
drawn here with the same generators as the PyTorch engine — the initial noise from the seed, the
VAE posterior from ``(seed, chunk)`` — so a seed gives the same result on both engines up to the
graphs' rounding. Every chunk runs at its own length: a last chunk of 5 frames is a 5-frame
U-Net call, nothing is dropped or padded.

Providers (``provider=``): ``cpu``; ``cuda`` and ``tensorrt`` need the ``onnxruntime-gpu``
package (``tensorrt`` also TensorRT's libraries; engines are built at the first call of each
shape profile and cached); ``auto`` takes CUDA when present, else the CPU. Tensors cross the
host on every call; this engine is a portable path, not the fastest one on a GPU.

Not supported here: DeepCache (``cache_interval > 1``) and FP8; guidance on a share of the
steps, other schedulers and step counts work.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from lipsync.audio import AudioEncoder
from lipsync.config import OnnxOptions, get_preset
from lipsync.constants import PROVIDERS, Provider
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.engine import chunk_generator, chunk_noise
from lipsync.errors import ConfigError
from lipsync.export.manifest import Manifest
from lipsync.export.profiles import as_ort_trt, graph_inputs, shape_profile
from lipsync.models.whisper import WhisperDims

# Provider and PROVIDERS live in lipsync.constants (the CLI names them without onnxruntime)
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def provider_chain(
    provider: Provider, graph: str, path: Path, cache_dir: Path | None = None
) -> list:
    """ONNX Runtime's provider list for one graph (ConfigError if the wanted one is missing)."""
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if provider == "cpu" or (provider == "auto" and CUDA not in available):
        return [CPU]
    if provider == "auto":
        return [CUDA, CPU]
    wanted = CUDA if provider == "cuda" else TRT
    if wanted not in available:
        raise ConfigError(
            f"ONNX Runtime here has no {wanted} (it has {', '.join(available)}); install the "
            "GPU build: pip install onnxruntime-gpu (and TensorRT for the tensorrt provider)"
        )
    if provider == "cuda":
        return [CUDA, CPU]
    profile = shape_profile(graph, graph_inputs(path))
    cache = str(cache_dir or path.parent / "trt-cache")
    trt_options = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": as_ort_trt(profile, 0),
        "trt_profile_opt_shapes": as_ort_trt(profile, 1),
        "trt_profile_max_shapes": as_ort_trt(profile, 2),
    }
    return [(TRT, trt_options), CUDA, CPU]


def open_session(
    path: Path, graph: str, provider: Provider = "auto", threads: int | None = None
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings about unused initialisers etc. are not for users
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=provider_chain(provider, graph, path))


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def sample_latents(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None,
    sample: bool,
    scaling_factor: float,
    shift_factor: float = 0.0,
) -> torch.Tensor:
    """Scaled latents from the VAE posterior, as :meth:`lipsync.models.vae.Vae.encode` makes them:
    ``mean + exp(logvar / 2) · ε`` with ``ε`` drawn from ``generator`` (diffusers'
    ``DiagonalGaussianDistribution.sample``, op for op), or the mean; then shifted and scaled.
    mean, logvar (n, 4, h, w) -> (n, 4, h, w)."""
    z = mean
    if sample:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
    return (z - shift_factor) * scaling_factor


class OrtUNet:
    """The exported U-Net behind the call :class:`ChunkDenoiser` makes of a ``UNet3D``."""

    dtype = torch.float32  # inputs and outputs (an fp16 export computes inside in fp16)
    device = torch.device("cpu")

    def __init__(self, session: ort.InferenceSession):
        self.session = session

    def cache_point(self, branch: int):
        raise ConfigError(
            "the ONNX engine does not support DeepCache (cache_interval > 1); use --mode exact "
            "or set --cache-interval 1"
        )

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        null_audio_clips: int = 0,
        cache=None,
    ) -> torch.Tensor:
        # sample (b, 13, f, h, w); encoder_hidden_states ((b - null)·f, 50, 384): the audio of
        # the clips after the first null_audio_clips -> noise (b, 4, f, h, w)
        if cache is not None:
            self.cache_point(cache.branch)
        b, _, f = sample.shape[:3]
        clips = b - null_audio_clips
        tokens = encoder_hidden_states.reshape(clips, f, *encoder_hidden_states.shape[-2:])
        feeds = {
            "sample": _numpy(sample),
            "timestep": np.array([float(timestep)], dtype=np.float32),
            "audio": _numpy(tokens),
        }
        return torch.from_numpy(self.session.run(["noise"], feeds)[0])


class OrtVae:
    """The exported VAE encoder and decoder behind :class:`lipsync.models.vae.Vae`'s methods."""

    dtype = torch.float32

    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        scaling_factor: float,
        shift_factor: float = 0.0,
    ):
        self.encoder = encoder
        self.decoder = decoder
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (n, 3, r, r) in [-1, 1] -> mean, logvar (n, 4, r/8, r/8), unscaled."""
        mean, logvar = self.encoder.run(["mean", "logvar"], {"images": _numpy(images)})
        return torch.from_numpy(mean), torch.from_numpy(logvar)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """images (n, 3, r, r) in [-1, 1] -> mean and logvar stacked (n, 8, r/8, r/8), unscaled
        (:meth:`lipsync.models.vae.Vae.moments`: what a looped dub keeps per face)."""
        return torch.cat(self.posterior(images), dim=1)

    def latents(
        self, moments: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """:meth:`moments`' (n, 8, h, w) -> scaled latents (n, 4, h, w): a draw or the mean."""
        mean, logvar = moments.chunk(2, dim=1)
        return sample_latents(
            mean, logvar, generator, sample, self.scaling_factor, self.shift_factor
        )

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """images (n, 3, r, r) in [-1, 1] -> scaled latents (n, 4, r/8, r/8)."""
        return self.latents(self.moments(images), generator, sample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (n, 4, h, w) -> images (n, 3, 8h, 8w)."""
        return torch.from_numpy(self.decoder.run(["images"], {"latents": _numpy(latents)})[0])


class OrtWhisperEncoder(nn.Module):
    """The exported Whisper encoder behind ``WhisperEncoder.forward_layers`` (what
    :class:`~lipsync.audio.AudioEncoder` calls), so the log-mel and window logic stay ours."""

    def __init__(self, session: ort.InferenceSession, dims: WhisperDims):
        super().__init__()
        self.session = session
        self.dims = dims

    def forward_layers(self, mel: torch.Tensor) -> torch.Tensor:
        # mel (n, n_mels, 3000) -> (n, n_layer + 1, 1500, n_state)
        return torch.from_numpy(self.session.run(["layers"], {"mel": _numpy(mel)})[0])


class OrtEngine:
    """A :class:`~lipsync.engine.SyncEngine` on an ``lipsync export onnx`` folder."""

    fp8 = False

    def __init__(
        self, onnx_dir: str | Path, provider: Provider = "auto", threads: int | None = None
    ):
        start = time.perf_counter()
        self.folder = Path(onnx_dir).expanduser()
        self.manifest = manifest = Manifest.read(self.folder)
        self.preset_name = manifest.preset
        self.dtype_name = "float16" if manifest.precision == "fp16" else "float32"
        self.resolution = manifest.resolution
        self.device = torch.device("cpu")  # frames and crops stay on the host

        def session(graph: str) -> ort.InferenceSession:
            return open_session(manifest.path(self.folder, graph), graph, provider, threads)

        self.unet = OrtUNet(session("unet"))
        self.vae = OrtVae(
            session("vae_encoder"),
            session("vae_decoder"),
            manifest.scaling_factor,
            manifest.shift_factor,
        )
        dims = WhisperDims.from_dict(manifest.whisper_dims)
        self.audio = AudioEncoder(OrtWhisperEncoder(session("audio_encoder"), dims))
        self.providers = self.unet.session.get_providers()
        self.load_seconds = time.perf_counter() - start
        self._denoiser: tuple[DenoiseOptions, torch.Tensor, ChunkDenoiser] | None = None

    @classmethod
    def from_options(cls, options: OnnxOptions) -> OrtEngine:
        """The engine ``options`` describe; ConfigError when ``options.preset`` is not the
        export's preset (checked on the manifest, before any graph is opened)."""
        options.validate()
        if options.preset is not None:
            wanted = get_preset(options.preset).name
            exported = Manifest.read(options.onnx_dir).preset
            if wanted != exported:
                raise ConfigError(
                    f"--preset {wanted} does not match the export in {options.onnx_dir}, which "
                    f"holds {exported}; leave --preset out or export {wanted}: "
                    f"lipsync export onnx --preset {wanted} DIR"
                )
        return cls(options.onnx_dir, options.provider, options.threads)

    def lazy_features(self, waveform: np.ndarray):
        return self.audio.lazy_features(waveform)

    def denoiser(self, mask: torch.Tensor, options: DenoiseOptions) -> ChunkDenoiser:
        """A denoiser for this mask and these options (the last one is kept and reused)."""
        cached = self._denoiser
        if cached is None or cached[0] != options or cached[1] is not mask:
            denoiser = ChunkDenoiser(self.unet, self.vae, mask, options)
            cached = self._denoiser = (options, mask, denoiser)
        return cached[2]

    def denoise(self, faces, windows, mask, seed, chunk_index, options, reuse=None):
        """faces (k, 3, r, r) in [-1, 1]; windows (k, 50, 384); mask (r, r) -> (k, 3, r, r).
        ``reuse``: as :meth:`lipsync.engine.LocalEngine.denoise` (looped dubs)."""
        k = faces.shape[0]
        noise = chunk_noise(seed, k, self.manifest.latent_size, self.device, torch.float32)
        gen = chunk_generator(seed, chunk_index, self.device)
        return self.denoiser(mask, options)(faces, windows, noise, gen, reuse=reuse)
