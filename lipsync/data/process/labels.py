"""Synthetic-corpus labels (CONTRACT-data.md section 1) cut to one segment.

A segment shows input video frames ``[video_start, video_start + frames)`` and plays the input's
audio from ``audio_start`` frames on (``audio_start = video_start + sync offset``). Timed labels
(``words``, ``phones``, seconds on the input's audio clock) are kept where they overlap the
segment's audio, re-based to its first sample and clipped to ``[0, duration]``; ``visemes``
rows (one per video frame, describing the rendered mouth) are cut to the segment's video frames.
"""

from __future__ import annotations

from lipsync.data.process.options import FPS

__all__ = ["cut_labels"]

_TIMED = ("words", "phones")


def _cut_timed(items: list, t0: float, duration: float) -> list[dict]:
    out = []
    for item in items:
        start, end = float(item["start"]) - t0, float(item["end"]) - t0
        if end <= 0 or start >= duration:
            continue
        cut = dict(item)
        cut["start"] = round(max(0.0, start), 6)
        cut["end"] = round(min(duration, end), 6)
        out.append(cut)
    return out


def cut_labels(sidecar: dict, video_start: int, audio_start: int, frames: int) -> dict:
    """The sidecar's labels for one segment (see the module docstring)."""
    duration = frames / FPS
    t0 = audio_start / FPS
    out: dict = {
        "phone_set": sidecar.get("phone_set"),
        "text": sidecar.get("text"),
        "sentence_id": sidecar.get("sentence_id"),
        "identity": sidecar.get("identity"),
        "voice": sidecar.get("voice"),
        "synth_id": sidecar.get("id"),
    }
    for key in _TIMED:
        out[key] = _cut_timed(sidecar.get(key) or [], t0, duration)
    visemes = sidecar.get("visemes")
    if isinstance(visemes, dict) and isinstance(visemes.get("per_frame"), list):
        rows = visemes["per_frame"][video_start : video_start + frames]
        out["visemes"] = {"names": visemes.get("names"), "per_frame": rows}
    return out
