"""Face detection and landmarks: every face in every frame, then the tracked one per frame.

:func:`track_faces` is the one way to get a clip's face track: a detector over the frames in order,
then the tracking policy of :mod:`lipsync.face.track`; the pipeline, the job service's pre-queue
check and the data tools call it. The detector is chosen by name (:func:`make_detector`,
``--detector``). Backends share one interface, :class:`FaceDetector`:

- :meth:`FaceDetector.detect_all` -- all faces per frame (``list[list[FaceObservation]]``);
- :meth:`FaceDetector.detect` -- per frame the face to edit or None, chosen by the tracking policy
  of :mod:`lipsync.face.track` (largest face first, then the same person; too-small faces are
  passed through). The tracker state persists across calls, so a video can be fed in chunks;
  call :meth:`FaceDetector.reset` before the next video.

Frames are ``(N, H, W, 3)`` uint8 RGB arrays (PyAV ``frame.to_ndarray(format="rgb24")``), in video
order. Landmarks, boxes and :attr:`FaceObservation.points3` are in pixels of those frames
(x to the right, y down; a landmark at normalised ``(u, v)`` is at ``(u * W, v * H)``).

:class:`MediaPipeDetector` (default)
    MediaPipe FaceMesh (legacy ``mediapipe.solutions.face_mesh``, bundled short-range BlazeFace
    detector + 468-point mesh, runs offline). It runs in **video mode**
    (``static_image_mode=False``): the mesh of frame *t* is computed in the region given by the
    mesh of frame *t-1*, and the detector only runs while fewer than ``max_num_faces`` faces are
    tracked. This is what the reference fixtures used: on the first 16 frames of
    ``demo1_video.mp4`` the landmarks equal the fixture to 3e-5 px. Static-image mode (a fresh
    detection every frame) differs from it by ~4 px on average, and so does feeding the frames
    out of order. With ``max_num_faces > 1`` FaceMesh sometimes reports the tracked face twice
    (a fresh detection that does not overlap the tracked region enough to be merged); the
    tracker keeps the continuous one, which is the same face ``max_num_faces=1`` returns.
    The detector runs on full-resolution frames: FaceMesh itself only looks at a 128x128 copy
    (detection) and a 192x192 crop (mesh), so a downscaled input saves nothing but moves the
    landmarks (0.5 px mean / 2.8 px max at 960 px, 1.1 / 4.4 px at 640 px on the demo).
    FaceMesh does not report a per-face confidence; ``score`` is None.

InsightFace (SCRFD + 2d106, what reference LatentSync 1.6 uses) is not a backend here: its model
files cannot be obtained in this project's environment, so that path could never be tested with
its real model, and untested it was removed. The landmark groups of its 106 points stay in
:mod:`lipsync.face.landmarks` for whoever adds it back with a real-model test.

The three alignment points and their landmark indices are documented in
:mod:`lipsync.face.landmarks`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable

import numpy as np

from lipsync.constants import DEFAULT_MIN_FACE_SIZE, DETECTORS, DetectorName
from lipsync.errors import ConfigError, check_choice
from lipsync.face.landmarks import bbox_from_landmarks, points3_mediapipe
from lipsync.face.track import FaceObservation, FaceTrack, FaceTracker, TrackBuilder, TrackReport
from lipsync.media.color import as_rgb_batch
from lipsync.runtime import native_stderr_silenced

__all__ = [
    "FaceDetector",
    "FaceObservation",
    "MediaPipeDetector",
    "as_frames",
    "make_detector",
    "track_faces",
]


def as_frames(frames: np.ndarray) -> np.ndarray:
    """Check and normalise detector input to a C-contiguous (N, H, W, 3) uint8 array."""
    return as_rgb_batch(frames)


class FaceDetector(abc.ABC):
    """Base of the detection backends (see the module docstring)."""

    name: str = "base"

    def __init__(self, *, min_face_size: int = DEFAULT_MIN_FACE_SIZE) -> None:
        self.tracker = FaceTracker(min_face_size=min_face_size)

    @abc.abstractmethod
    def _detect_frame(self, frame: np.ndarray) -> list[FaceObservation]:
        """All faces in one (H, W, 3) uint8 RGB frame."""

    def detect_all(self, frames: np.ndarray) -> list[list[FaceObservation]]:
        """All faces in each frame, in the backend's order; frames in video order."""
        return [self._detect_frame(frame) for frame in as_frames(frames)]

    def detect(self, frames: np.ndarray) -> list[FaceObservation | None]:
        """Per frame the face to edit, or None (no face, another person only, or too small).

        The reasons are counted in :attr:`report`.
        """
        return [self.tracker.update(obs).face for obs in self.detect_all(frames)]

    @property
    def report(self) -> TrackReport:
        """Frame counts of :meth:`detect` calls since the last :meth:`reset`."""
        return self.tracker.report

    def reset(self) -> None:
        """Start a new video: forget the tracked face (and the backend's own tracking state)."""
        self.tracker.reset()

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to free
        """Release the backend's resources."""

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MediaPipeDetector(FaceDetector):
    """MediaPipe FaceMesh, bundled model, CPU, offline (see the module docstring).

    ``max_num_faces`` > 1 lets the tracker see other people; ``static_image_mode=True`` treats
    every frame as an unrelated image (not what the reference does for videos).
    """

    name = "mediapipe"

    def __init__(
        self,
        *,
        max_num_faces: int = 4,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        static_image_mode: bool = False,
        refine_landmarks: bool = False,
        min_face_size: int = DEFAULT_MIN_FACE_SIZE,
    ) -> None:
        super().__init__(min_face_size=min_face_size)
        if max_num_faces < 1:
            raise ConfigError(f"max_num_faces must be >= 1, got {max_num_faces}")
        for label, value in (
            ("min_detection_confidence", min_detection_confidence),
            ("min_tracking_confidence", min_tracking_confidence),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{label} must be in [0, 1], got {value}")
        self._options = dict(
            static_image_mode=static_image_mode,
            max_num_faces=max_num_faces,
            refine_landmarks=refine_landmarks,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        self._mesh = None
        self._face_mesh_cls = _import_face_mesh()

    def _detect_frame(self, frame: np.ndarray) -> list[FaceObservation]:
        height, width = frame.shape[:2]
        if self._mesh is None:
            # a new graph logs 4-5 lines from C++ (TensorFlow Lite's delegate, absl warnings)
            # while it is built and runs its first frame, whatever Python's logging says
            with native_stderr_silenced():
                self._mesh = self._face_mesh_cls(**self._options)
                result = self._mesh.process(frame)
        else:
            result = self._mesh.process(frame)
        faces = result.multi_face_landmarks or []
        scale = np.array([width, height], dtype=np.float64)
        out = []
        for face in faces:
            # float32 normalised coordinates -> float64 pixels -> float32, like the fixture.
            lm = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float64) * scale
            lm = lm.astype(np.float32)
            out.append(
                FaceObservation(
                    landmarks=lm,
                    bbox=bbox_from_landmarks(lm),
                    score=None,
                    points3=points3_mediapipe(lm),
                )
            )
        return out

    def reset(self) -> None:
        super().reset()
        self.close()  # a fresh graph on the next frame: no tracking state from the last video

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None


def _import_face_mesh():
    try:
        from mediapipe.python.solutions.face_mesh import FaceMesh
    except ImportError as exc:  # pragma: no cover - mediapipe is a declared dependency
        raise ConfigError(
            f"the MediaPipe face detector needs mediapipe: pip install mediapipe==0.10.21 ({exc})"
        ) from exc
    return FaceMesh


def make_detector(
    name: DetectorName = "mediapipe", *, min_face_size: int = DEFAULT_MIN_FACE_SIZE, **options
) -> FaceDetector:
    """A detector backend by name (``--detector``); ``options`` go to its constructor."""
    check_choice("face detector", name, DETECTORS)
    return MediaPipeDetector(min_face_size=min_face_size, **options)


def track_faces(
    frames: np.ndarray | Iterable[np.ndarray],
    detector: FaceDetector | DetectorName = "mediapipe",
    *,
    min_face_size: int = DEFAULT_MIN_FACE_SIZE,
    follow: bool = True,
    keep_observations: bool = False,
    on_frames: Callable[[int], None] | None = None,
) -> FaceTrack:
    """Detect every face in every frame and choose, frame by frame, the face to edit.

    ``frames``: one (N, H, W, 3) uint8 RGB array, or an iterable of such batches in video order
    (e.g. :meth:`lipsync.media.frames.VideoFrames.batches`), read once; memory stays bounded by
    a batch. ``detector``: a backend name (made here with ``min_face_size`` and closed at the
    end) or a :class:`FaceDetector` (its own ``min_face_size`` applies; it is reset first and
    left open). ``follow=False`` treats the frames as unrelated images (a sample spread over a
    video): each gets its largest face. ``on_frames(n)`` is called after each batch (progress).

    Returns a :class:`~lipsync.face.track.FaceTrack`: per frame its
    :class:`~lipsync.face.track.FrameStatus`, the alignment points ready for
    :func:`lipsync.face.align.estimate_transforms` (NaN where no usable face), the followed
    face's box, the :class:`~lipsync.face.track.TrackReport`; with ``keep_observations`` also
    every chosen :class:`~lipsync.face.track.FaceObservation` (all landmarks).
    """
    own = not isinstance(detector, FaceDetector)
    det = make_detector(detector, min_face_size=min_face_size) if own else detector
    try:
        det.reset()
        det.tracker.follow = follow
        batches = [frames] if isinstance(frames, np.ndarray) else frames
        builder = TrackBuilder(keep_observations)
        for batch in batches:
            for observations in det.detect_all(batch):
                builder.add(det.tracker.update(observations))
            if on_frames is not None:
                on_frames(len(batch))
        return builder.build(det.report)
    finally:
        if own:
            det.close()
