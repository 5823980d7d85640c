"""Face detection and landmarks: every face in every frame, then the tracked one per frame.

Backends share one interface, :class:`FaceDetector`:

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

:class:`InsightFaceDetector` (optional)
    SCRFD (``det_10g.onnx``) + ``2d106det.onnx`` through the ``insightface`` package, what
    reference LatentSync 1.6 uses. Needs ``pip install insightface onnxruntime`` and the model
    files on disk (nothing is downloaded). It mirrors the reference's choices: 640x640 detection,
    score >= 0.5, boxes with width/height outside [0.2, 1.5] dropped, RGB frames fed as they are
    (the reference does so, although InsightFace's models were trained on BGR), and
    :attr:`FaceObservation.points3` from the 106 landmarks rounded to integers first.

The three alignment points and their landmark indices are documented in
:mod:`lipsync.face.landmarks`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync.errors import ConfigError
from lipsync.face.landmarks import (
    bbox_from_landmarks,
    points3_insightface106,
    points3_mediapipe,
)
from lipsync.face.track import DEFAULT_MIN_FACE_SIZE, FaceTracker, TrackReport
from lipsync.media.color import as_rgb_batch

__all__ = [
    "FaceDetector",
    "FaceObservation",
    "InsightFaceDetector",
    "MediaPipeDetector",
    "as_frames",
]

Box = tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class FaceObservation:
    """One face in one frame.

    ``landmarks``: (K, 2) float32 pixels (K = 468 for FaceMesh, 106 for InsightFace);
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

    def _graph(self):
        if self._mesh is None:
            self._mesh = self._face_mesh_cls(**self._options)
        return self._mesh

    def _detect_frame(self, frame: np.ndarray) -> list[FaceObservation]:
        height, width = frame.shape[:2]
        result = self._graph().process(frame)
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


# -- InsightFace (optional, reference 1.6) --------------------------------------------------------

INSIGHTFACE_DETECTION_MODEL = "det_10g.onnx"
INSIGHTFACE_LANDMARK_MODEL = "2d106det.onnx"
INSIGHTFACE_DETECT_SIZE = 640


def find_insightface_models(model_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The detection and 106-landmark model files under ``model_dir``.

    ``model_dir`` may hold the two files itself or be an InsightFace root (``models/buffalo_l/``
    below it, as in the reference's ``checkpoints/auxiliary``). Raises :class:`ConfigError`.
    """
    root = Path(model_dir).expanduser()
    places = [root, root / "models" / "buffalo_l", root / "buffalo_l"]
    for place in places:
        det, lmk = place / INSIGHTFACE_DETECTION_MODEL, place / INSIGHTFACE_LANDMARK_MODEL
        if det.is_file() and lmk.is_file():
            return det, lmk
    looked = ", ".join(str(p) for p in places)
    raise ConfigError(
        f"InsightFace model files {INSIGHTFACE_DETECTION_MODEL} and {INSIGHTFACE_LANDMARK_MODEL} "
        f"not found (looked in {looked}); they come with the LatentSync 1.6 checkpoints under "
        "auxiliary/models/buffalo_l/"
    )


class InsightFaceDetector(FaceDetector):
    """SCRFD + 2d106 landmarks through ``insightface`` (optional; see the module docstring).

    ``model_dir``: folder with ``det_10g.onnx`` and ``2d106det.onnx`` (or an InsightFace root
    holding ``models/buffalo_l/``). ``providers``: onnxruntime execution providers, default
    CUDA then CPU. Not covered by tests with real models (none are shipped).
    """

    name = "insightface"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        det_size: int = INSIGHTFACE_DETECT_SIZE,
        det_thresh: float = 0.5,
        providers: Sequence[str] | None = None,
        ctx_id: int = 0,
        min_face_size: int = DEFAULT_MIN_FACE_SIZE,
    ) -> None:
        super().__init__(min_face_size=min_face_size)
        det_path, lmk_path = find_insightface_models(model_dir)
        try:
            from insightface.app.common import Face
            from insightface.model_zoo import get_model
        except ImportError as exc:
            raise ConfigError(
                "the InsightFace face detector needs the insightface package: "
                f"pip install insightface onnxruntime-gpu (or onnxruntime) ({exc})"
            ) from exc
        providers = list(providers or ["CUDAExecutionProvider", "CPUExecutionProvider"])
        self._face_cls = Face
        self._det = get_model(str(det_path), providers=providers)
        self._lmk = get_model(str(lmk_path), providers=providers)
        if self._det is None or getattr(self._det, "taskname", None) != "detection":
            raise ConfigError(f"{det_path} is not an InsightFace detection model")
        if self._lmk is None or getattr(self._lmk, "taskname", None) != "landmark_2d_106":
            raise ConfigError(f"{lmk_path} is not an InsightFace 2d106 landmark model")
        self._det.prepare(ctx_id, input_size=(det_size, det_size), det_thresh=det_thresh)
        self._lmk.prepare(ctx_id)
        self._det_thresh = det_thresh

    def _detect_frame(self, frame: np.ndarray) -> list[FaceObservation]:
        # The reference feeds its RGB frames to InsightFace unchanged; so do we.
        bboxes, kpss = self._det.detect(frame, max_num=0, metric="default")
        out = []
        for i in range(bboxes.shape[0]):
            x0, y0, x1, y1, score = (float(v) for v in bboxes[i, :5])
            w, h = x1 - x0, y1 - y0
            if score < self._det_thresh or h <= 0 or not 0.2 <= w / h <= 1.5:
                continue  # the reference's sanity filters (size is the tracker's business)
            face = self._face_cls(
                bbox=bboxes[i, :4], kps=None if kpss is None else kpss[i], det_score=score
            )
            lmk = np.asarray(self._lmk.get(frame, face), dtype=np.float32)
            out.append(
                FaceObservation(
                    landmarks=lmk,
                    bbox=(x0, y0, x1, y1),
                    score=score,
                    points3=points3_insightface106(lmk),
                )
            )
        return out
