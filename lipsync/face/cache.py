"""Face-track cache: landmarks of a video computed once, reused by every later run on it.

A common workload is one presenter video lip-synced to many audio tracks; face tracking (pass 1,
FaceMesh on the CPU) is then the same work every time. With ``RunOptions.face_cache`` set to a
folder, the tracked face points of each video are stored there as ``<key>.npz`` and read back.

The key is the SHA-256 of the video file's bytes plus everything the track depends on (minimum
face size, the detector and the file format version), so an edited video or a changed setting
never reads a stale entry. An entry holds the first N frames' track; a run that needs more
frames than that tracks again and replaces it (tracking is sequential: frame i depends only on
frames before it, so a prefix of a longer track is the shorter track). Entries are written
atomically (temp file + rename). What is stored is resolution-independent: a
:class:`~lipsync.face.track.FaceTrack` without its observations (the 3 alignment points, the
followed face's box and the status of each frame); matrices are computed from the points for the
model's size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from lipsync.face.track import FaceTrack, FrameStatus, TrackReport

FORMAT_VERSION = 2  # 2: boxes stored too
DETECTOR = "mediapipe-facemesh-0.10.21"


def track_key(video_path: str | os.PathLike, min_face_size: int) -> str:
    """Cache key of the face track of ``video_path``."""
    h = hashlib.sha256()
    with open(video_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"|{min_face_size}|{DETECTOR}|v{FORMAT_VERSION}".encode())
    return h.hexdigest()


def save_track(path: str | os.PathLike, track: FaceTrack, complete: bool = False) -> Path:
    """Store ``track`` (its observations are not kept); ``complete``: the track reaches the
    video's last frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                points=track.points.astype(np.float64),
                boxes=track.boxes,
                status=np.array([s.value for s in track.status]),
                min_face_size=np.int64(track.report.min_face_size),
                other_faces=np.int64(track.report.other_faces),
                complete=np.bool_(complete),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_track(path: str | os.PathLike, num_frames: int) -> FaceTrack | None:
    """The first ``num_frames`` frames of what :func:`save_track` stored, or None when the entry
    is missing, unreadable, or shorter than that without reaching the video's end. The report
    is recounted for those frames (``other_faces`` is the stored track's count)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            points = z["points"]
            boxes = z["boxes"]
            status = [FrameStatus(s) for s in z["status"].tolist()]
            report = TrackReport(min_face_size=int(z["min_face_size"]))
            report.other_faces = int(z["other_faces"])
            complete = bool(z["complete"])
    except (OSError, KeyError, ValueError):
        return None
    if not len(status) == len(points) == len(boxes) or (len(points) < num_frames and not complete):
        return None
    status = status[:num_frames]
    for s in status:
        report.count(s)
    points = points[:num_frames].astype(np.float32)
    return FaceTrack(status, points, boxes[:num_frames].astype(np.float32), report)
