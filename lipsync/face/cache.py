"""Face-track cache: landmarks of a video computed once, reused by every later run on it.

A common workload is one presenter video lip-synced to many audio tracks; face tracking (pass 1,
FaceMesh on the CPU) is then the same work every time. With ``RunOptions.face_cache`` set to a
folder, the tracked face points of each video are stored there as ``<key>.npz`` and read back.

The key is the SHA-256 of the video file's bytes plus everything the track depends on (frame
count, minimum face size, the detector and the file format version), so an edited video or a
changed setting never reads a stale entry. Entries are written atomically (temp file + rename).
What is stored is resolution-independent: the 3 alignment points per frame, each frame's
status and the tracker's report; matrices are computed from them for the model's resolution.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields
from pathlib import Path

import numpy as np

from lipsync.face.track import FrameStatus, TrackReport

FORMAT_VERSION = 1
DETECTOR = "mediapipe-facemesh-0.10.21"


def track_key(video_path: str | os.PathLike, num_frames: int, min_face_size: int) -> str:
    """Cache key of the face track of the first ``num_frames`` frames of ``video_path``."""
    h = hashlib.sha256()
    with open(video_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"|{num_frames}|{min_face_size}|{DETECTOR}|v{FORMAT_VERSION}".encode())
    return h.hexdigest()


def save_track(
    path: str | os.PathLike,
    points: list[np.ndarray | None],
    status: list[FrameStatus],
    report: TrackReport,
) -> Path:
    """points: per frame a (3, 2) array of alignment points or None (no usable face)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((len(points), 3, 2), np.nan, dtype=np.float64)
    for i, p in enumerate(points):
        if p is not None:
            arr[i] = p
    report_values = np.array([getattr(report, f.name) for f in fields(report)], dtype=np.int64)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                points=arr,
                status=np.array([s.value for s in status]),
                report_fields=np.array([f.name for f in fields(report)]),
                report_values=report_values,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_track(
    path: str | os.PathLike,
) -> tuple[list[np.ndarray | None], list[FrameStatus], TrackReport] | None:
    """What :func:`save_track` stored, or None if the entry is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arr = z["points"]
            status = [FrameStatus(s) for s in z["status"].tolist()]
            values = dict(
                zip(z["report_fields"].tolist(), z["report_values"].tolist(), strict=True)
            )
    except (OSError, KeyError, ValueError):
        return None
    known = {f.name for f in fields(TrackReport)}
    if set(values) != known or len(status) != len(arr):
        return None
    points = [None if np.isnan(p).any() else p for p in arr]
    return points, status, TrackReport(**values)
