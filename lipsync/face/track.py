"""Which face to edit in each frame: follow one person through the clip, never jump.

Policy (:class:`FaceTracker`, :func:`select_faces`):

1. **Acquire.** In the first frame that has any face, the largest face (bounding-box area) becomes
   the target.
2. **Follow.** In every later frame the target is the face that continues the previous target:
   among the faces whose box overlaps the last known target box (IoU >= ``iou_threshold``) or
   whose centre moved less than ``max_center_shift`` x the target's size (and whose size changed
   by less than 2x), the one whose landmarks moved least; without landmarks of the same layout,
   the one with the highest IoU. Faces elsewhere in the frame are other people and are never
   picked, however large they grow. The landmark rule also discards MediaPipe's occasional
   duplicate of the tracked face (a fresh detection of the same person, reported as a second face
   with a looser fit).
   With ``follow=False`` there is no continuity: every frame gets its own largest face (the
   frames are unrelated images, e.g. a few samples spread over a video).
3. **Lose and re-acquire.** A frame in which no face continues the target leaves the frame
   unchanged; the last known box is kept, so a face that disappears (turns away, is occluded)
   and comes back at about the same place is picked up again. With ``max_lost_frames=n`` the
   tracker instead starts over (step 1) after ``n`` consecutive frames without the target, e.g.
   to survive scene cuts; the default (None) never re-acquires elsewhere.
4. **Minimum size.** A tracked face whose box is smaller than ``min_face_size`` pixels on its
   short side is too small to edit well: the frame is passed through unchanged and counted.

Per frame the result is the chosen :class:`FaceObservation` (what a detector reports for one
face) or None with a :class:`FrameStatus` saying why; :class:`TrackReport` counts the frames per
status; :class:`FaceTrack` holds a whole clip's result with the alignment points ready for
:func:`lipsync.face.align.estimate_transforms`. :func:`require_faces` raises
:class:`~lipsync.errors.NoFaceError` when no frame has a usable face; call it before any heavy
work. Running a detector over a video and this policy in one pass is
:func:`lipsync.face.detect.track_faces`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from lipsync.constants import DEFAULT_MIN_FACE_SIZE
from lipsync.errors import ConfigError, NoFaceError

__all__ = [
    "DEFAULT_MIN_FACE_SIZE",
    "FaceObservation",
    "FaceTrack",
    "FaceTracker",
    "FrameStatus",
    "TrackReport",
    "TrackStep",
    "box_iou",
    "require_faces",
    "select_faces",
]

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class FaceObservation:
    """One face in one frame, as a detector (:mod:`lipsync.face.detect`) reports it.

    ``landmarks``: (K, 2) float32 pixels (K = 468 for FaceMesh);
    ``bbox``: ``(x0, y0, x1, y1)`` pixels, may extend past the frame edges;
    ``score``: detector confidence in [0, 1], None when the backend has none;
    ``points3``: (3, 2) float32, whole pixels: image-left eyebrow centre, image-right eyebrow
    centre, nose centre (see :mod:`lipsync.face.landmarks`).
    """

    landmarks: np.ndarray
    bbox: Box
    score: float | None
    points3: np.ndarray

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def size(self) -> float:
        """Short side of the box in pixels (what ``min_face_size`` is compared with)."""
        return min(self.width, self.height)


class FrameStatus(StrEnum):
    """Why a frame does or does not get an edited face."""

    OK = "ok"  # the tracked face is there and large enough
    NO_FACE = "no_face"  # no face at all in the frame
    LOST = "lost"  # faces are visible, but none of them is the tracked person
    TOO_SMALL = "too_small"  # the tracked face is smaller than min_face_size: frame passed through


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _area(b: Box) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _centre(b: Box) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _short_side(b: Box) -> float:
    return min(b[2] - b[0], b[3] - b[1])


@dataclass
class TrackReport:
    """Frame counts per :class:`FrameStatus`, plus frames where other people were visible."""

    min_face_size: int = DEFAULT_MIN_FACE_SIZE
    frames: int = 0
    with_face: int = 0
    no_face: int = 0
    lost: int = 0
    too_small: int = 0
    other_faces: int = 0  # frames with faces besides the tracked one (not duplicates of it)

    @property
    def passed_through(self) -> int:
        """Frames left unchanged (no usable face)."""
        return self.frames - self.with_face

    def count(self, status: FrameStatus) -> None:
        self.frames += 1
        if status is FrameStatus.OK:
            self.with_face += 1
        elif status is FrameStatus.NO_FACE:
            self.no_face += 1
        elif status is FrameStatus.LOST:
            self.lost += 1
        else:
            self.too_small += 1

    def summary(self) -> str:
        parts = [f"face in {self.with_face}/{self.frames} frames"]
        if self.no_face:
            parts.append(f"{self.no_face} without a face")
        if self.lost:
            parts.append(f"{self.lost} with only other faces")
        if self.too_small:
            parts.append(f"{self.too_small} with a face under {self.min_face_size} px")
        if self.other_faces:
            parts.append(f"other faces seen in {self.other_faces} (not edited)")
        return ", ".join(parts)


@dataclass(frozen=True)
class TrackStep:
    """One frame's decision: ``face`` is None unless ``status`` is OK; ``tracked`` is the
    followed face even when it is too small."""

    face: FaceObservation | None
    tracked: FaceObservation | None
    status: FrameStatus


@dataclass
class FaceTracker:
    """Streaming form of the policy in the module docstring: feed frames in order to
    :meth:`update`; :meth:`reset` between videos."""

    min_face_size: int = DEFAULT_MIN_FACE_SIZE
    iou_threshold: float = 0.3
    max_center_shift: float = 0.5
    max_lost_frames: int | None = None
    duplicate_iou: float = 0.3
    follow: bool = True  # False: frames are unrelated images, each gets its largest face
    report: TrackReport = field(init=False)
    _box: Box | None = field(init=False, default=None, repr=False)
    _landmarks: np.ndarray | None = field(init=False, default=None, repr=False)
    _missed: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        if self.min_face_size < 0:
            raise ConfigError(f"min_face_size must be >= 0 pixels, got {self.min_face_size}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.max_lost_frames is not None and self.max_lost_frames < 0:
            raise ConfigError(f"max_lost_frames must be >= 0 or None, got {self.max_lost_frames}")
        self.reset()

    def reset(self) -> None:
        """Forget the target and the counts (start of a new video)."""
        self.report = TrackReport(min_face_size=self.min_face_size)
        self._box = None
        self._landmarks = None
        self._missed = 0

    @property
    def target_box(self) -> Box | None:
        """The last known box of the tracked face (None before acquisition)."""
        return self._box

    def _continues(self, obs: FaceObservation, box: Box) -> bool:
        if box_iou(obs.bbox, box) >= self.iou_threshold:
            return True
        size = math.sqrt(_area(box))
        if size <= 0:
            return False
        (cx, cy), (tx, ty) = _centre(obs.bbox), _centre(box)
        ratio = math.sqrt(_area(obs.bbox)) / size
        return math.hypot(cx - tx, cy - ty) <= self.max_center_shift * size and 0.5 <= ratio <= 2

    def _motion(self, obs: FaceObservation, box: Box) -> float:
        prev = self._landmarks
        if prev is not None and obs.landmarks.shape == prev.shape:
            return float(np.linalg.norm(obs.landmarks - prev, axis=-1).mean())
        return -box_iou(obs.bbox, box)  # no comparable landmarks: the best overlap wins

    def update(self, observations: Sequence[FaceObservation]) -> TrackStep:
        """Decide for the next frame, given all faces detected in it."""
        step = self._decide(list(observations))
        self.report.count(step.status)
        if step.tracked is not None:
            others = [
                o
                for o in observations
                if o is not step.tracked and box_iou(o.bbox, step.tracked.bbox) < self.duplicate_iou
            ]
        else:
            others = list(observations)
        if others and step.status is not FrameStatus.NO_FACE:
            self.report.other_faces += 1
        return step

    def _decide(self, observations: list[FaceObservation]) -> TrackStep:
        if not observations:
            if self._box is not None:
                self._missed += 1
            return TrackStep(None, None, FrameStatus.NO_FACE)
        restart = self.max_lost_frames is not None and self._missed > self.max_lost_frames
        box = self._box
        if box is None or restart or not self.follow:
            chosen = max(observations, key=lambda o: _area(o.bbox))  # first of equals wins
        else:
            candidates = [o for o in observations if self._continues(o, box)]
            if not candidates:
                self._missed += 1
                return TrackStep(None, None, FrameStatus.LOST)
            chosen = min(candidates, key=lambda o: self._motion(o, box))
        self._box = chosen.bbox
        self._landmarks = np.asarray(chosen.landmarks, dtype=np.float32)
        self._missed = 0
        if _short_side(chosen.bbox) < self.min_face_size:
            return TrackStep(None, chosen, FrameStatus.TOO_SMALL)
        return TrackStep(chosen, chosen, FrameStatus.OK)


@dataclass
class FaceTrack:
    """A clip's tracking result, frame by frame (:func:`select_faces`,
    :func:`lipsync.face.detect.track_faces`, :func:`lipsync.face.cache.load_track`).

    ``points``: (N, 3, 2) float32 alignment points of the face to edit, whole pixels, NaN where
    the frame has no usable face: what :func:`lipsync.face.align.estimate_transforms` takes.
    ``boxes``: (N, 4) float32 box of the followed face, also when it is too small, NaN where
    there is none. ``faces`` / ``tracked``: the observations themselves (the face to edit, the
    followed one), kept only when asked for (they hold every landmark of every frame).
    """

    status: list[FrameStatus]
    points: np.ndarray
    boxes: np.ndarray
    report: TrackReport
    faces: list[FaceObservation | None] | None = None
    tracked: list[FaceObservation | None] | None = None

    def __len__(self) -> int:
        return len(self.status)

    @property
    def usable(self) -> np.ndarray:
        """(N,) bool: frames with a face to edit."""
        return np.array([s is FrameStatus.OK for s in self.status], dtype=bool)

    def points3(self) -> np.ndarray:
        """(N, 3, 2) float32 alignment points; NaN where the frame has no usable face."""
        return self.points


class TrackBuilder:
    """Collects :class:`TrackStep` s frame by frame into a :class:`FaceTrack`."""

    def __init__(self, keep_observations: bool = False):
        self.keep = keep_observations
        self.status: list[FrameStatus] = []
        self.points: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []
        self.faces: list[FaceObservation | None] = []
        self.tracked: list[FaceObservation | None] = []

    def add(self, step: TrackStep) -> None:
        self.status.append(step.status)
        face, followed = step.face, step.tracked
        self.points.append(_NO_POINTS if face is None else np.asarray(face.points3, np.float32))
        self.boxes.append(_NO_BOX if followed is None else np.asarray(followed.bbox, np.float32))
        if self.keep:
            self.faces.append(face)
            self.tracked.append(followed)

    def build(self, report: TrackReport) -> FaceTrack:
        n = len(self.status)
        return FaceTrack(
            status=self.status,
            points=np.stack(self.points) if n else np.empty((0, 3, 2), np.float32),
            boxes=np.stack(self.boxes) if n else np.empty((0, 4), np.float32),
            report=report,
            faces=self.faces if self.keep else None,
            tracked=self.tracked if self.keep else None,
        )


_NO_POINTS = np.full((3, 2), np.nan, dtype=np.float32)
_NO_BOX = np.full(4, np.nan, dtype=np.float32)


def select_faces(
    observations_per_frame: Sequence[Sequence[FaceObservation]],
    min_face_size: int = DEFAULT_MIN_FACE_SIZE,
    *,
    iou_threshold: float = 0.3,
    max_center_shift: float = 0.5,
    max_lost_frames: int | None = None,
) -> FaceTrack:
    """Apply the tracking policy (module docstring) to all faces detected in each frame."""
    tracker = FaceTracker(
        min_face_size=min_face_size,
        iou_threshold=iou_threshold,
        max_center_shift=max_center_shift,
        max_lost_frames=max_lost_frames,
    )
    builder = TrackBuilder(keep_observations=True)
    for obs in observations_per_frame:
        builder.add(tracker.update(obs))
    track = builder.build(tracker.report)
    warn_passed_through(track.report)
    return track


def warn_passed_through(report: TrackReport) -> None:
    """Log how many frames will be left unchanged, and why."""
    if report.too_small:
        logger.warning(
            "%d frame(s) left unchanged: the face is smaller than %d px", report.too_small,
            report.min_face_size,
        )  # fmt: skip
    if report.no_face + report.lost and report.with_face:
        logger.warning(
            "%d frame(s) left unchanged: no face (or only other people's faces)",
            report.no_face + report.lost,
        )


def require_faces(track: FaceTrack) -> FaceTrack:
    """Return ``track`` if any frame has a usable face, else raise :class:`NoFaceError`."""
    report = track.report
    if report.with_face:
        return track
    if report.frames == 0:
        raise NoFaceError("the video has no frames, so no face was found")
    if report.too_small:
        raise NoFaceError(
            f"no usable face in the video: faces were found in {report.too_small} of "
            f"{report.frames} frames, but all smaller than {report.min_face_size} px "
            "(lower min_face_size or use a closer shot)"
        )
    raise NoFaceError(f"no face found in any of the {report.frames} frames of the video")
