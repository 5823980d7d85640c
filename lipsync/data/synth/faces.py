"""Base footage: face sources, their cached head-and-shoulders frames and landmarks, augmentation.

Sources
    The demo clip (``demo1_video.mp4`` in ``shared/media``, found like the tests find it:
    ``$LIPSYNC_SHARED``, then ``shared/`` beside or inside the checkout) and every video or image
    in ``--faces DIR``. A file directly in ``DIR`` is one identity (named after the file); a
    sub-folder is one identity whose files are all its sources.

Cache (built once per source, in ``OUT/sources/<source>/``, atomically: a temporary folder renamed)
    - ``frames.npy``: ``(N, C, C, 3)`` uint8 RGB, the region around the face at 25 fps, read
      memory-mapped by the workers. ``C = ceil(1.8 R)`` for output size ``R``: the base
      head-and-shoulders crop (side ``S`` = 2 x the face's landmark height, so the face fills
      about half of it; centred 0.12 S below the face centre to include the shoulders) is the
      centred square of side ``C / 1.8`` (about ``R`` pixels); the margin around it leaves room
      for the augmentation's zoom, shift and rotation.
    - ``landmarks.npy``: ``(N, 468, 2)`` float32, MediaPipe FaceMesh
      (:class:`lipsync.face.detect.MediaPipeDetector`, video mode, on the full-resolution source
      frames), in cache pixels.
    - ``meta.json``: the source, the crop, the reference frame and the mouth geometry below.

    A video source keeps its longest run of frames with a face (at least 2 s, at most
    :data:`MAX_SOURCE_SECONDS`); an image source is one frame that the renderer moves gently.

Mouth geometry (:class:`MouthGeometry`)
    The renderer replaces the lower face of every frame by the lower face of one *reference
    frame* of the same source: the frame with the most closed mouth among those with the most
    usual head roll. Each frame's :attr:`Footage.ref_to_frame` affine (least squares on landmarks
    the jaw and lips do not move: eye corners, nose, forehead, face sides at ear level) places it.
    Coordinates of the mouth model: origin at the middle of the reference's mouth corners, ``u``
    along the eye line, ``v`` perpendicular (down), unit = half the mouth width.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from lipsync.errors import ConfigError, MediaError, one_line
from lipsync.face.detect import MediaPipeDetector
from lipsync.media import iter_frames

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_SOURCE_SECONDS",
    "VIDEO_SUFFIXES",
    "Augment",
    "ColourTransform",
    "FaceSource",
    "Footage",
    "MouthGeometry",
    "apply_colour",
    "augment_affine",
    "build_footage",
    "default_base_video",
    "discover_sources",
    "load_footage",
    "sample_augment",
]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_SOURCE_SECONDS = 30.0
MIN_SOURCE_FRAMES = 50
CACHE_MARGIN = 1.8  # cache side / base crop side
CACHE_VERSION = 1
FPS = 25

# FaceMesh indices
LIP_UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIP_LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LIP_UPPER_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIP_LOWER_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
    148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
STABLE_POINTS = (33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1, 98, 327, 10, 151, 9, 127, 356)
MOUTH_CORNERS = (61, 291)
EYE_CORNERS = (33, 263)  # image-left eye outer corner, image-right eye outer corner
SUBNASALE, CHIN = 2, 152


# -- sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceSource:
    """One base footage file: ``identity`` (several sources may share one), a unique ``key``."""

    identity: str
    key: str
    path: Path
    kind: Literal["video", "image"]


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = re.sub(r"-video$", "", slug)
    return slug or "face"


def default_base_video() -> Path | None:
    """``demo1_video.mp4`` from ``$LIPSYNC_SHARED/media`` or a ``shared/`` beside or inside the
    checkout; None when absent."""
    repo = Path(__file__).resolve().parents[3]
    places = []
    if os.environ.get("LIPSYNC_SHARED"):
        places.append(Path(os.environ["LIPSYNC_SHARED"]))
    places += [repo.parent / "shared", repo / "shared"]
    for place in places:
        path = place / "media" / "demo1_video.mp4"
        if path.is_file():
            return path
    return None


def _kind(path: Path) -> Literal["video", "image"] | None:
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    return None


def discover_sources(base: list[Path], faces_dir: Path | None) -> list[FaceSource]:
    """The sources: the ``base`` files (each its own identity) and ``faces_dir``'s contents."""
    found: list[tuple[str, Path]] = []
    for path in base:
        if not path.is_file():
            raise ConfigError(f"base footage not found: {path}")
        found.append((_slug(path.stem), path))
    if faces_dir is not None:
        if not faces_dir.is_dir():
            raise ConfigError(f"--faces must be a folder of face videos or images: {faces_dir}")
        for entry in sorted(faces_dir.iterdir()):
            if entry.is_dir():
                for f in sorted(entry.iterdir()):
                    if f.is_file() and _kind(f):
                        found.append((_slug(entry.name), f))
            elif entry.is_file() and _kind(entry):
                found.append((_slug(entry.stem), entry))
    sources: list[FaceSource] = []
    keys: set[str] = set()
    for identity, path in found:
        kind = _kind(path)
        if kind is None:
            raise ConfigError(f"not a video or image file: {path}")
        key, n = _slug(f"{identity}-{path.stem}") if identity != _slug(path.stem) else identity, 1
        base_key = key
        while key in keys:
            n += 1
            key = f"{base_key}-{n}"
        keys.add(key)
        sources.append(FaceSource(identity=identity, key=key, path=path.resolve(), kind=kind))
    if not sources:
        raise ConfigError(
            "no base footage: the demo clip was not found (set LIPSYNC_SHARED or pass --base) "
            "and --faces gave no videos or images"
        )
    return sources


# -- mouth geometry ------------------------------------------------------------------------------


@dataclass
class MouthGeometry:
    """The reference frame's mouth, in cache pixels and in mouth coordinates (module docstring).

    ``origin`` (2,), ``axis_u`` / ``axis_v`` (2,) unit vectors, ``unit`` pixels per mouth unit.
    ``seam_u`` / ``seam_v``: the closed lips' seam (mean of the inner lip contours) sampled on
    ``seam_u`` (increasing, -1.2..1.2, constant beyond the inner corners); ``upper_thickness``
    / ``lower_thickness`` the lips' thickness there. ``nose_v`` / ``chin_v``: subnasale and chin.
    ``lip_colour`` / ``skin_colour``: mean RGB of the lips and of the skin around them.
    """

    origin: list[float]
    axis_u: list[float]
    axis_v: list[float]
    unit: float
    seam_u: list[float]
    seam_v: list[float]
    upper_thickness: list[float]
    lower_thickness: list[float]
    nose_v: float
    chin_v: float
    lip_colour: list[float]
    skin_colour: list[float]

    def to_mouth(self, points: np.ndarray) -> np.ndarray:
        """Cache pixels (..., 2) -> mouth coordinates (..., 2)."""
        d = np.asarray(points, np.float64) - np.asarray(self.origin)
        return np.stack([d @ np.asarray(self.axis_u), d @ np.asarray(self.axis_v)], -1) / self.unit

    def to_pixels(self, uv: np.ndarray) -> np.ndarray:
        """Mouth coordinates (..., 2) -> cache pixels (..., 2)."""
        uv = np.asarray(uv, np.float64)
        return (
            np.asarray(self.origin)
            + self.unit * uv[..., :1] * np.asarray(self.axis_u)
            + self.unit * uv[..., 1:] * np.asarray(self.axis_v)
        )


def _curve(uv: np.ndarray, grid: np.ndarray) -> np.ndarray:
    order = np.argsort(uv[:, 0])
    return np.interp(grid, uv[order, 0], uv[order, 1])


def mouth_geometry(landmarks: np.ndarray, frame: np.ndarray) -> MouthGeometry:
    """The mouth model of a closed-mouth frame from its FaceMesh landmarks (468, 2)."""
    lm = np.asarray(landmarks, np.float64)
    left, right = lm[MOUTH_CORNERS[0]], lm[MOUTH_CORNERS[1]]
    eye = lm[EYE_CORNERS[1]] - lm[EYE_CORNERS[0]]
    axis_u = eye / np.linalg.norm(eye)
    axis_v = np.array([-axis_u[1], axis_u[0]])
    origin = (left + right) / 2
    unit = float(np.linalg.norm(right - left) / 2)
    geo = MouthGeometry(
        origin=origin.tolist(),
        axis_u=axis_u.tolist(),
        axis_v=axis_v.tolist(),
        unit=unit,
        seam_u=[],
        seam_v=[],
        upper_thickness=[],
        lower_thickness=[],
        nose_v=0.0,
        chin_v=0.0,
        lip_colour=[],
        skin_colour=[],
    )
    uv = geo.to_mouth(lm)
    grid = np.linspace(-1.2, 1.2, 49)
    upper_in = _curve(uv[list(LIP_UPPER_INNER)], grid)
    lower_in = _curve(uv[list(LIP_LOWER_INNER)], grid)
    seam = (upper_in + lower_in) / 2
    upper_out = _curve(uv[list(LIP_UPPER_OUTER)], grid)
    lower_out = _curve(uv[list(LIP_LOWER_OUTER)], grid)
    geo.seam_u = grid.tolist()
    geo.seam_v = seam.tolist()
    geo.upper_thickness = np.clip(seam - upper_out, 0.0, None).tolist()
    geo.lower_thickness = np.clip(lower_out - seam, 0.0, None).tolist()
    geo.nose_v = float(uv[SUBNASALE, 1])
    geo.chin_v = float(uv[CHIN, 1])
    # colours: lips = between outer and inner contours; skin = a band below the lower lip
    h, w = frame.shape[:2]
    lips = np.zeros((h, w), np.uint8)
    outer = np.concatenate([lm[list(LIP_UPPER_OUTER)], lm[list(LIP_LOWER_OUTER)][::-1]])
    cv2.fillPoly(lips, [np.round(outer).astype(np.int32)], 1)
    inner = np.concatenate([lm[list(LIP_UPPER_INNER)], lm[list(LIP_LOWER_INNER)][::-1]])
    cv2.fillPoly(lips, [np.round(inner).astype(np.int32)], 0)
    skin = np.zeros((h, w), np.uint8)
    band = geo.to_pixels(np.array([[-1.0, 0.9], [1.0, 0.9], [0.8, 1.5], [-0.8, 1.5]]))
    cv2.fillPoly(skin, [np.round(band).astype(np.int32)], 1)
    geo.lip_colour = frame[lips > 0].reshape(-1, 3).mean(0).tolist()
    geo.skin_colour = frame[skin > 0].reshape(-1, 3).mean(0).tolist()
    return geo


def _affine_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) affine minimising ||A src - dst|| over the point pairs."""
    x = np.concatenate([src, np.ones((len(src), 1))], 1)
    sol, *_ = np.linalg.lstsq(x, dst, rcond=None)
    return sol.T


def _region_mask(geo: MouthGeometry, landmarks: np.ndarray, size: int, drop: float) -> np.ndarray:
    """Feathered float32 mask (size, size) of the replaced lower face in reference cache pixels.

    The region runs from just under the nose down past the chin and sideways to 85 % of the
    face's half-width at each height; below the mouth it is the union of that outline and the
    same outline ``drop`` mouth units lower (the lowest chin of the footage plus a margin), so
    every frame's own chin and jaw are covered.
    """
    uv = geo.to_mouth(np.asarray(landmarks, np.float64))
    oval = uv[list(FACE_OVAL)]
    top = geo.nose_v + 0.25
    left_side = oval[oval[:, 0] < 0]
    right_side = oval[oval[:, 0] >= 0]
    bottom = geo.chin_v + drop
    heights = np.linspace(top, bottom, 24)

    def half_width(side: np.ndarray, v: np.ndarray) -> np.ndarray:
        order = np.argsort(side[:, 1])
        return np.abs(np.interp(v, side[order, 1], side[order, 0]))

    lw = half_width(left_side, heights)
    rw = half_width(right_side, heights)
    below = heights - drop >= top
    lw[below] = np.maximum(lw[below], half_width(left_side, heights[below] - drop))
    rw[below] = np.maximum(rw[below], half_width(right_side, heights[below] - drop))
    lw, rw = lw * 0.85, rw * 0.85
    outline = np.concatenate([np.stack([-lw, heights], 1), np.stack([rw, heights], 1)[::-1]], 0)
    pix = geo.to_pixels(outline)
    mask = np.zeros((size, size), np.float32)
    cv2.fillPoly(mask, [np.round(pix * 4).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=2)
    sigma = 0.22 * geo.unit
    return cv2.GaussianBlur(mask, (0, 0), sigma)


# -- footage cache -------------------------------------------------------------------------------


@dataclass
class Footage:
    """A cached source (see the module docstring)."""

    source: FaceSource
    root: Path
    frames: np.ndarray  # (N, C, C, 3) uint8, memory-mapped
    landmarks: np.ndarray  # (N, 468, 2) float32, cache pixels
    ref_index: int
    ref_to_frame: np.ndarray  # (N, 2, 3) float64
    geometry: MouthGeometry
    region: np.ndarray  # (C, C) float32 feathered mask in reference cache pixels
    crop_side: float  # base crop side in cache pixels
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.frames.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def static(self) -> bool:
        return self.source.kind == "image"


def _cache_name(source: FaceSource) -> str:
    return source.key


def _read_image(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _detect(
    source: FaceSource, max_seconds: float = MAX_SOURCE_SECONDS
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Landmarks of the longest run of frames with a face: ``(landmarks (N, 468, 2), source frame
    numbers (N,), (width, height))``. Raises :class:`MediaError` when there is no usable face."""
    if source.kind == "image":
        image = _read_image(source.path)
        with MediaPipeDetector(max_num_faces=1, static_image_mode=True) as det:
            face = det.detect(image[None])[0]
        if face is None:
            raise MediaError(f"no face found in {source.path}")
        return face.landmarks[None], np.zeros(1, np.int64), (image.shape[1], image.shape[0])
    max_frames = int(round(max_seconds * FPS))
    lms: list[np.ndarray | None] = []
    size = (0, 0)
    with MediaPipeDetector() as det, iter_frames(source.path, fps=FPS, stop=max_frames) as reader:
        size = (reader.width, reader.height)
        for batch in reader:
            lms += [None if f is None else f.landmarks for f in det.detect(batch.frames)]
    best, run_start, best_start = 0, 0, 0
    for i, lm in enumerate([*lms, None]):
        if lm is None:
            if i - run_start > best:
                best, best_start = i - run_start, run_start
            run_start = i + 1
    if best < min(MIN_SOURCE_FRAMES, max_frames):
        raise MediaError(
            f"{source.path}: no run of {MIN_SOURCE_FRAMES} frames with a face (longest: {best})"
        )
    idx = np.arange(best_start, best_start + best)
    return np.stack([lms[i] for i in idx]).astype(np.float32), idx, size


def _choose_reference(lm: np.ndarray) -> int:
    """Closed mouth, usual head roll: among the 10 % most closed mouths (at least 1), the frame
    whose eye-line angle is nearest the median."""
    face_h = lm[:, CHIN, 1] - lm[:, 10, 1]
    opening = np.linalg.norm(lm[:, 13] - lm[:, 14], axis=1) / np.maximum(face_h, 1e-6)
    eye = lm[:, EYE_CORNERS[1]] - lm[:, EYE_CORNERS[0]]
    angle = np.arctan2(eye[:, 1], eye[:, 0])
    k = max(1, int(math.ceil(0.1 * len(lm))))
    candidates = np.argsort(opening, kind="stable")[:k]
    dev = np.abs(angle[candidates] - np.median(angle))
    return int(candidates[np.argmin(dev)])


def _place(image: np.ndarray, to_cache: np.ndarray, size: int) -> np.ndarray:
    """Warp a source frame into the cache square (area-averaged first when shrinking)."""
    m = to_cache
    scale = float(to_cache[0, 0])
    if scale < 1:
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        fx = small.shape[1] / image.shape[1]
        fy = small.shape[0] / image.shape[0]
        # small pixel q <-> source pixel (q + 0.5) / f - 0.5
        m = to_cache.copy()
        m[0, 2] += to_cache[0, 0] * (0.5 / fx - 0.5)
        m[1, 2] += to_cache[1, 1] * (0.5 / fy - 0.5)
        m[0, 0] /= fx
        m[1, 1] /= fy
        image = small
    return cv2.warpAffine(
        image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def build_footage(
    source: FaceSource,
    cache_root: Path,
    resolution: int,
    max_seconds: float = MAX_SOURCE_SECONDS,
) -> Path:
    """Build (or find) the cache of ``source`` under ``cache_root`` (a video's first
    ``max_seconds`` at most); returns its folder."""
    final = cache_root / _cache_name(source)
    if (final / "meta.json").is_file():
        return final
    lm_src, frame_numbers, (width, height) = _detect(source, max_seconds)
    # the base crop: side 2 x face height, centred 0.12 side below the face centre
    face_h = float(np.median(lm_src[:, :, 1].max(1) - lm_src[:, :, 1].min(1)))
    centre = np.median((lm_src.max(1) + lm_src.min(1)) / 2, axis=0)
    side = 2.0 * face_h
    centre = centre + np.array([0.0, 0.12 * side])
    size = int(math.ceil(CACHE_MARGIN * resolution))
    scale = size / (CACHE_MARGIN * side)
    # source pixels (pixel centres at integer coordinates, as OpenCV) -> cache pixels
    to_cache = np.array(
        [
            [scale, 0.0, (size - 1) / 2 - scale * centre[0]],
            [0.0, scale, (size - 1) / 2 - scale * centre[1]],
        ]
    )
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        frames = np.lib.format.open_memmap(
            tmp / "frames.npy", mode="w+", dtype=np.uint8, shape=(len(frame_numbers), size, size, 3)
        )

        if source.kind == "image":
            frames[0] = _place(_read_image(source.path), to_cache, size)
        else:
            first, count = int(frame_numbers[0]), len(frame_numbers)
            with iter_frames(source.path, fps=FPS, start=first, stop=first + count) as reader:
                for batch in reader:
                    for k, image in zip(batch.indices, batch.frames, strict=True):
                        frames[int(k) - first] = _place(image, to_cache, size)
        frames.flush()
        # MediaPipe's pixel coordinates put pixel centres at +0.5; OpenCV's at integers
        lm = ((lm_src.astype(np.float64) - 0.5) @ to_cache[:, :2].T + to_cache[:, 2]).astype(
            np.float32
        )
        ref = _choose_reference(lm)
        geo = mouth_geometry(lm[ref], np.asarray(frames[ref]))
        stable = list(STABLE_POINTS)
        ref_to_frame = np.stack(
            [_affine_lstsq(lm[ref, stable], lm[i, stable]) for i in range(len(lm))]
        )
        # how far below the reference chin each frame's own chin reaches (mouth units)
        chins = []
        for i in range(len(lm)):
            inv = cv2.invertAffineTransform(ref_to_frame[i])
            chins.append(geo.to_mouth(inv[:, :2] @ lm[i, CHIN] + inv[:, 2])[1] - geo.chin_v)
        drop = float(max(0.0, max(chins))) + 0.5
        region = _region_mask(geo, lm[ref], size, drop)
        np.save(tmp / "landmarks.npy", lm)
        np.save(tmp / "ref_to_frame.npy", ref_to_frame)
        np.save(tmp / "region.npy", region)
        meta = {
            "version": CACHE_VERSION,
            "identity": source.identity,
            "key": source.key,
            "path": str(source.path),
            "kind": source.kind,
            "source_size": [width, height],
            "first_frame": int(frame_numbers[0]),
            "frames": int(len(frame_numbers)),
            "fps": FPS,
            "resolution": resolution,
            "cache_size": size,
            "crop_centre": centre.tolist(),
            "crop_side": side,
            "source_to_cache": to_cache.tolist(),
            "reference_frame": ref,
            "chin_drop": drop,
            "geometry": asdict(geo),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        frames = None  # close the memory map before the rename
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_footage(root: Path, source: FaceSource) -> Footage:
    """Open a cache folder built by :func:`build_footage` (frames memory-mapped)."""
    try:
        meta = json.loads((root / "meta.json").read_text())
        frames = np.load(root / "frames.npy", mmap_mode="r")
        landmarks = np.load(root / "landmarks.npy")
        ref_to_frame = np.load(root / "ref_to_frame.npy")
        region = np.load(root / "region.npy")
    except (OSError, ValueError) as exc:
        raise MediaError(f"damaged footage cache {root}: {one_line(exc)}; delete it") from None
    geo = MouthGeometry(**meta["geometry"])
    return Footage(
        source=source,
        root=root,
        frames=frames,
        landmarks=landmarks,
        ref_index=int(meta["reference_frame"]),
        ref_to_frame=ref_to_frame,
        geometry=geo,
        region=region,
        crop_side=meta["cache_size"] / CACHE_MARGIN,
        meta=meta,
    )


# -- augmentation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Per-clip augmentation, recorded in the sidecar.

    Geometry: ``zoom`` (crop side x zoom: > 1 shows more around the face), ``rotation``
    (degrees), ``shift`` (fractions of the crop side), ``flip`` (mirror left-right). Colour:
    ``brightness`` (added, fraction of 255), ``contrast`` and ``saturation`` (factors), ``hue``
    (degrees, rotation around the grey axis), ``gamma``, ``white_balance`` (RGB gains),
    ``blur`` (Gaussian sigma in output pixels). Image sources also get ``motion``: amplitudes of
    a smooth random head movement (shift fraction, degrees, zoom fraction) and its phases.
    """

    zoom: float = 1.0
    rotation: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    flip: bool = False
    brightness: float = 0.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    gamma: float = 1.0
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur: float = 0.0
    motion: dict[str, Any] | None = None


def sample_augment(rng: np.random.Generator, static: bool = False) -> Augment:
    """A random augmentation (ranges in the docs: ``docs/DATA.md``)."""

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    motion = None
    if static:
        motion = {
            "shift": u(0.01, 0.025),
            "rotation": u(1.0, 3.0),
            "zoom": u(0.01, 0.03),
            "freq": [u(0.12, 0.45) for _ in range(4)],
            "phase": [u(0, 2 * math.pi) for _ in range(4)],
        }
    return Augment(
        zoom=u(0.88, 1.12),
        rotation=u(-6.0, 6.0),
        shift=(u(-0.05, 0.05), u(-0.04, 0.04)),
        flip=bool(rng.random() < 0.5),
        brightness=u(-0.08, 0.08),
        contrast=u(0.85, 1.15),
        saturation=u(0.8, 1.2),
        hue=u(-5.0, 5.0),
        gamma=u(0.85, 1.15),
        white_balance=(u(0.94, 1.06), 1.0, u(0.94, 1.06)),
        blur=u(0.0, 0.6) if rng.random() < 0.4 else 0.0,
        motion=motion,
    )


def augment_affine(
    aug: Augment, footage_size: int, crop_side: float, out_size: int, t: float = 0.0
) -> np.ndarray:
    """(2, 3) affine from cache pixels to output pixels at time ``t`` (seconds; image sources
    move with ``aug.motion``)."""
    zoom, rot = aug.zoom, aug.rotation
    sx, sy = aug.shift
    if aug.motion is not None:
        f, ph = aug.motion["freq"], aug.motion["phase"]
        w = [math.sin(2 * math.pi * f[i] * t + ph[i]) for i in range(4)]
        sx += aug.motion["shift"] * w[0]
        sy += aug.motion["shift"] * w[1]
        rot += aug.motion["rotation"] * w[2]
        zoom *= 1.0 + aug.motion["zoom"] * w[3]
    centre = (
        np.array([(footage_size - 1) / 2, (footage_size - 1) / 2]) + np.array([sx, sy]) * crop_side
    )
    scale = out_size / (crop_side * zoom)
    a = math.radians(rot)
    lin = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * scale
    offset = np.full(2, (out_size - 1) / 2) - lin @ centre
    m = np.concatenate([lin, offset[:, None]], 1)
    if aug.flip:
        m = np.array([[-1.0, 0.0, out_size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0, 0, 1]])
    return m


def _colour_matrix(aug: Augment) -> np.ndarray:
    """3x3 RGB matrix: white balance, then saturation and hue around the grey axis."""
    luma = np.array([0.299, 0.587, 0.114])
    sat = aug.saturation * np.eye(3) + (1 - aug.saturation) * np.tile(luma, (3, 1))
    a = math.radians(aug.hue)
    # rotation about the (1, 1, 1) axis (Rodrigues)
    k = np.ones(3) / math.sqrt(3)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    hue = np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * (kx @ kx)
    return hue @ sat @ np.diag(aug.white_balance)


class ColourTransform:
    """The colour part of an :class:`Augment` as a 3x3 matrix and a tone LUT (fast per frame)."""

    def __init__(self, aug: Augment) -> None:
        self.matrix = _colour_matrix(aug).astype(np.float32)
        x = np.arange(256, dtype=np.float64) / 255.0
        y = np.clip((x - 0.5) * aug.contrast + 0.5 + aug.brightness, 0, 1) ** aug.gamma
        self.lut = np.clip(np.round(y * 255), 0, 255).astype(np.uint8)
        self.blur = aug.blur

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        out = cv2.transform(frame, self.matrix)  # saturates to uint8
        out = cv2.LUT(out, self.lut)
        if self.blur > 0.05:
            out = cv2.GaussianBlur(out, (0, 0), self.blur)
        return out


def apply_colour(frame: np.ndarray, aug: Augment) -> np.ndarray:
    """Apply the colour augmentation to one (H, W, 3) uint8 frame."""
    return ColourTransform(aug)(frame)
