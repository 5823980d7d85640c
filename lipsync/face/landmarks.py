"""Landmark index sets and the three alignment points (two eyebrow centres, nose centre).

The alignment (``lipsync.face.align``) needs three points per frame, in pixels, in this order:

0. the eyebrow on the **image-left** side (the subject's right eyebrow),
1. the eyebrow on the **image-right** side (the subject's left eyebrow),
2. the nose centre.

Each point is the plain mean of a group of landmarks, rounded to whole pixels (``np.round``,
half to even), as the reference does before it estimates the similarity transform.

MediaPipe FaceMesh (468 points, ``refine_landmarks=False``)
    - image-left eyebrow: the 10 points of ``FACEMESH_RIGHT_EYEBROW``
      ``46, 52, 53, 55, 63, 65, 66, 70, 105, 107`` (upper and lower brow contour);
    - image-right eyebrow: the 10 points of ``FACEMESH_LEFT_EYEBROW``
      ``276, 282, 283, 285, 293, 295, 296, 300, 334, 336``;
    - nose: the 24 points of ``FACEMESH_NOSE``
      ``1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326,
      327, 344, 440`` (bridge, tip, alae and nostril rim).

    On the 16 fixture frames of ``demo1_video.mp4`` the two eyebrow centres reproduce the fixture's
    ``points3`` exactly (all 64 coordinates). The nose centre is within 1 px everywhere and exact in
    24 of 32 coordinates: the fixture's nose group is not published, FACEMESH_NOSE is the closest
    of the natural candidates we tried (RMS 0.44 px before rounding; the 68-point "nose" maps used
    by LatentSync 1.5 and others are 0.6 - 0.9 px off), and the 32 rounded coordinates are too
    few to single out one group among the many that fit them.

InsightFace ``2d106det`` (106 points), what reference LatentSync 1.6 uses
    - image-left eyebrow: ``43, 48, 49, 50, 51``;
    - image-right eyebrow: ``101, 102, 103, 104, 105``;
    - nose: ``74, 77, 83, 86``.

    The reference rounds the 106 landmarks to integers *before* taking the means;
    :func:`points3_insightface106` does the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "INSIGHTFACE106_GROUPS",
    "MEDIAPIPE_GROUPS",
    "MEDIAPIPE_LEFT_EYEBROW",
    "MEDIAPIPE_NOSE",
    "MEDIAPIPE_RIGHT_EYEBROW",
    "bbox_from_landmarks",
    "points3_from_groups",
    "points3_insightface106",
    "points3_mediapipe",
]

# -- MediaPipe FaceMesh (indices into the 468-point mesh) -----------------------------------------
# Subject's right eyebrow = image-left side (mediapipe's FACEMESH_RIGHT_EYEBROW).
MEDIAPIPE_RIGHT_EYEBROW: tuple[int, ...] = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
# Subject's left eyebrow = image-right side (mediapipe's FACEMESH_LEFT_EYEBROW).
MEDIAPIPE_LEFT_EYEBROW: tuple[int, ...] = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
# mediapipe's FACEMESH_NOSE.
MEDIAPIPE_NOSE: tuple[int, ...] = (
    1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327,
    344, 440,
)  # fmt: skip
MEDIAPIPE_GROUPS = (MEDIAPIPE_RIGHT_EYEBROW, MEDIAPIPE_LEFT_EYEBROW, MEDIAPIPE_NOSE)

# -- InsightFace 2d106det (reference LatentSync 1.6) ----------------------------------------------
INSIGHTFACE106_GROUPS: tuple[tuple[int, ...], ...] = (
    (43, 48, 49, 50, 51),
    (101, 102, 103, 104, 105),
    (74, 77, 83, 86),
)


def points3_from_groups(
    landmarks: np.ndarray,
    groups: Sequence[Sequence[int]],
    *,
    round_landmarks: bool = False,
) -> np.ndarray:
    """Mean of each landmark group, rounded to whole pixels: ``(..., K, 2) -> (..., 3, 2)``.

    ``round_landmarks`` rounds the landmarks themselves first (the reference does this for the
    InsightFace 106-point landmarks). Works on one face ``(K, 2)`` or a stack ``(N, K, 2)``.
    Means are taken in float64; the result is float32.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim < 2 or lm.shape[-1] != 2:
        raise ValueError(f"landmarks must have shape (..., K, 2), got {lm.shape}")
    need = max(max(g) for g in groups) + 1
    if lm.shape[-2] < need:
        raise ValueError(f"landmarks have {lm.shape[-2]} points, these groups need {need}")
    if round_landmarks:
        lm = np.round(lm)
    centres = [lm[..., list(g), :].mean(axis=-2) for g in groups]
    return np.round(np.stack(centres, axis=-2)).astype(np.float32)


def points3_mediapipe(landmarks: np.ndarray) -> np.ndarray:
    """The 3 alignment points from MediaPipe FaceMesh landmarks ``(..., 468 or 478, 2)``."""
    return points3_from_groups(landmarks, MEDIAPIPE_GROUPS)


def points3_insightface106(landmarks: np.ndarray) -> np.ndarray:
    """The 3 alignment points from InsightFace 2d106 landmarks ``(..., 106, 2)`` (reference 1.6)."""
    return points3_from_groups(landmarks, INSIGHTFACE106_GROUPS, round_landmarks=True)


def bbox_from_landmarks(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box ``(x0, y0, x1, y1)`` around ``(K, 2)`` landmarks (not clipped to the image)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    x0, y0 = lm.min(axis=0)
    x1, y1 = lm.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)
