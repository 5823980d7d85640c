"""The quality options of stage 2 (issue 16), each off by default: typed config and the losses.

``quality`` section of a U-Net training config (``lipsync train unet``: ``--set
quality.phone_ctc.weight=0.05``; the demo recipe: ``--set unet2.quality.phone_ctc.weight=0.05``):

* ``phone_ctc`` — the phoneme-aware alignment head (:mod:`lipsync.train.phone_ctc`): a CTC loss
  over the window's phones, read by a mouth head from the decoded one-step estimate. Needs the
  phone labels of the windows (the synthetic corpus has them exactly; for real footage see
  :mod:`lipsync.data.phone_align`).
* ``mouth_trepa`` — mouth-weighted TREPA (:mod:`lipsync.train.mouth_trepa`) with a video encoder
  from a file (:mod:`lipsync.train.video_encoder`: ours, ``tiny3d``, or VideoMAE v2).
* ``dynamic_conditioning`` — per-frame (optionally per-position) weights of the audio
  cross-attention against the identity path (:mod:`lipsync.models.dyncond`); it changes the
  U-Net's architecture (new ``cond_gate`` layers, identity at the start), so it is merged into the
  U-Net config and the new keys may be missing from the initial checkpoint.

A weight > 0 without what it needs (a video encoder file, a pretrained head that does not
exist) stops the run at start with one line, as the other pretrained losses do.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from lipsync.errors import ConfigError
from lipsync.train.config import QualitySection
from lipsync.train.mouth_trepa import MouthWeightedTrepa
from lipsync.train.phone_ctc import MouthCtcHead, PhoneCtcLoss, unit_names
from lipsync.train.video_encoder import load_video_encoder

GATE_KEYS = ".cond_gate."  # the dynamic-conditioning layers' key infix (allow_missing pattern)


def apply_to_unet_config(cfg: Any, unet_config: dict[str, Any]) -> None:
    """Merge the quality section's architecture change into a :class:`UNetTrainConfig` in place
    (``unet_config``: its U-Net config, resolved): dynamic conditioning goes into
    ``model.unet_config`` and, unless the U-Net starts from scratch, its new layers may be
    missing from the initial checkpoint (``init.allow_missing``)."""
    if not cfg.quality.dynamic_conditioning.enabled:
        return
    cfg.model.unet_config = with_dynamic_conditioning(unet_config, cfg.quality)
    if cfg.init.source != "scratch" and GATE_KEYS not in cfg.init.allow_missing:
        cfg.init.allow_missing = [*cfg.init.allow_missing, GATE_KEYS]


def with_dynamic_conditioning(unet_config: dict[str, Any], section: QualitySection) -> dict:
    """``unet_config`` with the section's dynamic conditioning (unchanged when disabled)."""
    dc = section.dynamic_conditioning
    if not dc.enabled:
        return dict(unet_config)
    return {**unet_config, "dynamic_conditioning": asdict(dc)}


class QualityLosses(nn.Module):
    """The enabled quality terms for :func:`lipsync.train.losses.total_loss`."""

    def __init__(self, ctc: PhoneCtcLoss | None, ctc_weight: float,
                 trepa: MouthWeightedTrepa | None, trepa_weight: float):  # fmt: skip
        super().__init__()
        self.ctc, self.ctc_weight = ctc, ctc_weight
        self.trepa, self.trepa_weight = trepa, trepa_weight

    def forward(
        self,
        pixels: torch.Tensor,
        gt_pixels: torch.Tensor | None,
        phones: torch.Tensor | None,
        alpha_t: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # pixels, gt_pixels: (b, f, 3, R, R) in [-1, 1] (decoded x̂0, target); phones (b, f)
        # PHONES ids (-1 unknown); alpha_t (b,) -> (weighted sum, parts)
        loss = torch.zeros((), device=pixels.device)
        parts: dict[str, torch.Tensor] = {}
        if self.ctc is not None:
            if phones is None:
                raise ConfigError("quality.phone_ctc needs phone labels in the batches")
            ctc, ctc_parts = self.ctc(pixels, gt_pixels, phones, alpha_t)
            loss = loss + self.ctc_weight * ctc
            parts.update(ctc_parts)
        if self.trepa is not None:
            if gt_pixels is None:
                raise ConfigError("quality.mouth_trepa needs the target frames in the batches")
            parts["mtrepa"] = self.trepa(pixels, gt_pixels.float())
            loss = loss + self.trepa_weight * parts["mtrepa"]
            parts["mtrepa"] = parts["mtrepa"].detach()
        return loss, parts


def build_quality_losses(
    section: QualitySection, resolution: int, device: torch.device | str
) -> QualityLosses | None:
    """The modules of the enabled losses (None when none is); files are read here, at start."""
    section.validate()
    ctc = trepa = None
    if section.phone_ctc.weight:
        s = section.phone_ctc
        if s.head_init:
            head = MouthCtcHead.from_file(s.head_init, units=s.units)
        else:
            head = MouthCtcHead(len(unit_names(s.units)), s.head_width, s.units)
        ctc = PhoneCtcLoss(head.to(device).train(), lr=s.head_lr, weighting=s.timestep_weighting)
    if section.mouth_trepa.weight:
        s = section.mouth_trepa
        encoder = load_video_encoder(s.encoder, s.encoder_path, s.videomae_config).to(device)
        trepa = MouthWeightedTrepa(encoder, resolution, s.mouth_weight, s.delta)
    if ctc is None and trepa is None:
        return None
    return QualityLosses(ctc, section.phone_ctc.weight, trepa, section.mouth_trepa.weight)
