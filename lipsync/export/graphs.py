"""The four exported graphs: what each computes, its inputs and outputs, which axes are dynamic.

Each graph is a thin ``nn.Module`` around our PyTorch model that computes exactly what the
local engine computes, so an exported model gives the same numbers as the PyTorch call:

* ``unet``: one call of :class:`~lipsync.models.unet.UNet3D` as :class:`~lipsync.diffusion.
  ChunkDenoiser` makes it. The batch is ``[unconditional clips, conditional clips]``; ``audio``
  holds the conditional clips' windows only, and the leading ``batch - clips`` rows of
  ``sample`` are the unconditional half: their cross-attention output is its bias alone (what
  all-zero audio gives, exactly). ``clips == batch`` is a call without guidance. Batch and frame
  count are dynamic (1..24 frames), so no chunk is dropped or padded with made-up frames.
* ``vae_encoder``: images → posterior ``mean`` and ``logvar`` (clamped to [-30, 20] as
  diffusers does); the draw ``mean + exp(logvar / 2) · ε`` and the latent scaling happen
  outside the graph with the run's seeded generator (:func:`lipsync.export.ort_engine.
  sample_latents`), so seeds give the same latents as the PyTorch path.
* ``vae_decoder``: the whole :meth:`lipsync.models.vae.Vae.decode`, scaled latents in:
  ``1 / 0.18215`` scaling, ``post_quant_conv`` (the learned 4→4 mixing of latent channels that
  a bare ``vae.decoder`` export skips), then the decoder.
* ``audio_encoder``: Whisper's input embedding and its block outputs for one 30 s window of
  normalised log-mel (:meth:`lipsync.models.whisper.WhisperEncoder.forward_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lipsync.models.unet import UNet3D
from lipsync.models.vae import Vae
from lipsync.models.whisper import WhisperEncoder

GRAPH_NAMES = ("audio_encoder", "vae_encoder", "vae_decoder", "unet")


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one exported graph (also what TensorRT profiles are built on)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


class UNetGraph(nn.Module):
    """sample (batch, 13, f, h, w), timestep (1,) float, audio (clips, f, 50, 384)
    -> noise (batch, 4, f, h, w); the first ``batch - clips`` clips get no audio."""

    spec = GraphSpec(
        "unet",
        ("sample", "timestep", "audio"),
        ("noise",),
        {
            "sample": {0: "batch", 2: "frames"},
            "audio": {0: "clips", 1: "frames"},
            "noise": {0: "batch", 2: "frames"},
        },
    )

    def __init__(self, unet: UNet3D):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor
    ) -> torch.Tensor:
        # sample (batch, 13, f, h, w); timestep (1,); audio (clips, f, 50, 384)
        # -> noise (batch, 4, f, h, w)
        null_clips = sample.shape[0] - audio.shape[0]  # traced: a shape expression in the graph
        return self.unet(sample, timestep, audio, null_audio_clips=null_clips)


class VaeEncoderGraph(nn.Module):
    """images (n, 3, r, r) in [-1, 1] -> mean, logvar (n, 4, r/8, r/8), unscaled."""

    spec = GraphSpec(
        "vae_encoder",
        ("images",),
        ("mean", "logvar"),
        {"images": {0: "n"}, "mean": {0: "n"}, "logvar": {0: "n"}},
    )

    def __init__(self, vae: Vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # images (n, 3, r, r) -> mean, logvar (n, 4, r/8, r/8)
        dist = self.vae.autoencoder.encode(images).latent_dist
        return dist.mean, dist.logvar


class VaeDecoderGraph(nn.Module):
    """latents (n, 4, h, w), scaled by 0.18215 -> images (n, 3, 8h, 8w), roughly [-1, 1]."""

    spec = GraphSpec(
        "vae_decoder",
        ("latents",),
        ("images",),
        {"latents": {0: "n"}, "images": {0: "n"}},
    )

    def __init__(self, vae: Vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # latents (n, 4, h, w) -> images (n, 3, 8h, 8w)
        return self.vae.decode(latents)


class AudioEncoderGraph(nn.Module):
    """mel (n, 80, 3000) normalised log-mel -> layers (n, 5, 1500, 384)."""

    spec = GraphSpec(
        "audio_encoder",
        ("mel",),
        ("layers",),
        {"mel": {0: "n"}, "layers": {0: "n"}},
    )

    def __init__(self, encoder: WhisperEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # mel (n, n_mels, 3000) -> (n, n_layer + 1, 1500, n_state)
        return self.encoder.forward_layers(mel)


SPECS: dict[str, GraphSpec] = {
    g.spec.name: g.spec for g in (AudioEncoderGraph, VaeEncoderGraph, VaeDecoderGraph, UNetGraph)
}
