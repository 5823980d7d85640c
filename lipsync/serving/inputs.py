"""A submission's inputs, checked before anything is queued.

The API's form reader (:mod:`lipsync.serving.api.form`) and :func:`stage_url` copy an upload or
an ``s3://`` object into a scratch folder (refusing wrong content types, over-size bodies and
buckets not on the allow-list);
:func:`check_inputs` probes both files with :func:`lipsync.media.validate_inputs`, applies the
service's duration limit and looks for a face in a few frames spread over the video. Each problem
raises :class:`InputRejected` with the HTTP status and one clear line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync.constants import FPS
from lipsync.errors import LipSyncError, MediaError, NoFaceError, one_line

_UNTYPED = ("application/octet-stream", "binary/octet-stream")  # curl's and S3's defaults
VIDEO_TYPES = ("video/", "application/mp4", *_UNTYPED)
AUDIO_TYPES = ("audio/", "video/", "application/ogg", *_UNTYPED)
_SAFE_SUFFIX = re.compile(r"^\.[a-z0-9]{1,5}$")


class InputRejected(Exception):
    """An input the API refuses: ``status`` (413, 415, 422, …), ``code`` and a one-line message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Staged:
    path: Path
    suffix: str  # ".mp4", or "" when unknown
    size: int


def safe_suffix(filename: str | None) -> str:
    suffix = Path(filename or "").suffix.lower()
    return suffix if _SAFE_SUFFIX.match(suffix) else ""


def check_content_type(role: str, content_type: str | None) -> None:
    allowed = VIDEO_TYPES if role == "video" else AUDIO_TYPES
    ctype = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if not ctype.startswith(allowed):
        kinds = "a video" if role == "video" else "an audio file (or a video with sound)"
        raise InputRejected(
            415, "unsupported_media_type",
            f"{role} must be {kinds}, got content type {ctype!r}",
        )  # fmt: skip


def too_large(limit: int | None = None) -> InputRejected:
    text = f" (limit {limit / 1024**2:.0f} MiB for video + audio)" if limit else ""
    return InputRejected(413, "too_large", f"the upload is too large{text}")


def stage_url(role: str, url: str, settings, dest_dir: Path, budget: int) -> Staged:
    """Fetch ``s3://bucket/key`` (bucket on ``settings.input_url_buckets``) to ``dest_dir``."""
    from botocore.exceptions import BotoCoreError, ClientError

    from lipsync.serving.storage import parse_s3_url, s3_client

    if not url.startswith("s3://"):
        raise InputRejected(422, "bad_url", f"{role}_url must be an s3://bucket/key URL")
    bucket, key = parse_s3_url(url)
    if not key:
        raise InputRejected(422, "bad_url", f"{role}_url names no object: {url}")
    if bucket not in settings.input_url_buckets:
        raise InputRejected(
            403, "bucket_not_allowed",
            f"{role}_url: bucket {bucket!r} is not one this service reads inputs from",
        )  # fmt: skip
    client = s3_client(settings.s3_endpoint_url, settings.s3_region)
    suffix = safe_suffix(key)
    dest = dest_dir / f"{role}{suffix}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
        if size > budget:
            raise too_large()
        check_content_type(role, head.get("ContentType"))
        client.download_file(bucket, key, str(dest))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise InputRejected(422, "not_found", f"{role}_url: no such object {url}") from None
        raise InputRejected(422, "bad_url", f"{role}_url: cannot read {url}: {code}") from None
    except BotoCoreError as exc:
        raise InputRejected(502, "storage_error", f"{role}_url: {one_line(exc)}") from None
    return Staged(dest, suffix, size)


def check_inputs(
    video: Path, audio: Path, scratch: Path, *, max_duration_s: float, face_check_frames: int,
    min_face_size: int,
):  # fmt: skip
    """Probe both inputs (:func:`validate_inputs`), enforce the duration limit (413) and look for
    a face (422). Returns the :class:`~lipsync.media.ValidatedInputs`."""
    from lipsync.media import validate_inputs

    try:
        inputs = validate_inputs(
            video, audio, scratch / "probe-output.mp4", max_duration_s=float("inf")
        )
    except LipSyncError as exc:
        raise InputRejected(422, _code(exc), _hide_paths(one_line(exc), video, audio)) from None
    vdur = inputs.video.video_duration or inputs.video.duration or 0.0
    for what, seconds in (("video", vdur), ("audio", inputs.audio_duration)):
        if seconds > max_duration_s:
            raise InputRejected(
                413, "too_long",
                f"the {what} is {seconds:.1f} s long, over this service's "
                f"{max_duration_s:.0f} s limit",
            )  # fmt: skip
    if face_check_frames > 0:
        try:
            check_face(inputs, face_check_frames, min_face_size)
        except LipSyncError as exc:
            raise InputRejected(422, _code(exc), one_line(exc)) from None
    return inputs


def _hide_paths(message: str, video: Path, audio: Path) -> str:
    """Our scratch paths mean nothing to the caller: name the role instead."""
    names = [(video, "the video file"), (audio, "the audio file" if audio != video else "")]
    for path, role in names:
        if role:
            for form in {str(path), str(Path(path).resolve())}:
                message = message.replace(form, role)
    return message


def _code(exc: LipSyncError) -> str:
    if isinstance(exc, NoFaceError):
        return "no_face"
    if isinstance(exc, MediaError):
        return "bad_media"
    return "bad_request"


def sample_frames(path: Path, total: int, k: int) -> np.ndarray:
    """Up to ``k`` frames spread evenly over the first ``total`` (the 25 fps timeline)."""
    from lipsync.media import read_frames

    if total <= 0:
        return read_frames(path, stop=1)
    picks = sorted({int(round(x)) for x in np.linspace(0, max(0, total - 1), num=k)})
    frames = []
    for i in picks:
        got = read_frames(path, start=i, stop=i + 1)
        if len(got):
            frames.append(got[0])
    if not frames:
        return read_frames(path, stop=1)
    return np.stack(frames)


def check_face(inputs, k: int, min_face_size: int) -> None:
    """Raise :class:`NoFaceError` when none of ``k`` frames spread over the part of the video
    that will be used holds a usable face: the run's own face policy
    (:func:`lipsync.face.detect.track_faces`, :func:`lipsync.face.track.require_faces`), each
    sampled frame taken as an image of its own."""
    from lipsync.face.detect import make_detector, track_faces
    from lipsync.face.track import require_faces

    total = inputs.video.output_frames(FPS) or 0
    needed = int(np.ceil(inputs.audio_duration * FPS))
    if needed:
        total = min(total, needed) if total else needed
    frames = sample_frames(inputs.video_path, total, k)
    detector = make_detector(
        min_face_size=min_face_size, static_image_mode=True, max_num_faces=1
    )  # fmt: skip
    with detector:
        require_faces(track_faces(frames, detector, follow=False))
