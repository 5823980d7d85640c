"""Throughput of the non-model stages on the 1080p demo clip (issue #3's 60 frames/s bar).

  python benchmarks/media_face_stages.py media VIDEO   # decode, GPU align/restore, encode, pass 2
  python benchmarks/media_face_stages.py faces VIDEO   # FaceMesh landmarks (pass 1)

Prints one JSON line per measurement (frames/s over the whole clip, wall clock). Results:
docs/PERFORMANCE.md ("Media and face stages").
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import common  # noqa: F401 - the repository on sys.path
import numpy as np
import torch

# eyebrow centres + nose centre of the demo's first frame (shared/reference/affine points3[0])
POINTS3 = np.array([[557.0, 654.0], [656.0, 667.0], [598.0, 715.0]], dtype=np.float32)


def emit(name: str, frames: int, seconds: float, **extra) -> None:
    row = {
        "stage": name,
        "frames": frames,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 1),
        **extra,
    }
    print(json.dumps(row), flush=True)


def media(video: str) -> None:
    from lipsync.face.align import crops_to_model_input, estimate_transforms, restore, warp_faces
    from lipsync.media import VideoWriter, iter_frames, probe, read_frames
    from lipsync.media.frames import FileFrames

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = probe(video)
    t = time.perf_counter()
    n = sum(len(b.frames) for b in iter_frames(video, batch=16))
    emit("decode (PyAV, threaded, RGB)", n, time.perf_counter() - t, codec=info.video_codec)

    frames = read_frames(video)
    mats = estimate_transforms(np.repeat(POINTS3[None], len(frames), 0), 512)
    for _ in range(2):  # warm-up (CUDA context, kernels)
        src = torch.from_numpy(frames[:16]).to(dev)
        restore(
            src,
            crops_to_model_input(warp_faces(src, mats[:16], 512), 512),
            mats[:16],
            resolution=512,
        )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(0, len(frames), 16):
        src = torch.from_numpy(frames[s : s + 16]).to(dev, non_blocking=True)
        faces = crops_to_model_input(warp_faces(src, mats[s : s + 16], 512), 512)
        out = restore(src, faces, mats[s : s + 16], resolution=512)
        out.cpu()
    emit(f"align+restore 512 on {dev.type} (incl. copies)", len(frames), time.perf_counter() - t)

    tmp = tempfile.mkdtemp()
    for preset in ("medium", "veryfast", "ultrafast"):
        t = time.perf_counter()
        with VideoWriter(os.path.join(tmp, f"{preset}.mp4"), preset=preset, overwrite=True) as w:
            for s in range(0, len(frames), 16):
                w.write(frames[s : s + 16])
        emit(
            f"encode libx264 {preset} crf 18",
            len(frames),
            time.perf_counter() - t,
            bytes=os.path.getsize(os.path.join(tmp, f"{preset}.mp4")),
        )

    for preset in ("medium", "veryfast"):
        t = time.perf_counter()
        ff = FileFrames(video, info, len(frames))
        with VideoWriter(os.path.join(tmp, f"p2{preset}.mp4"), preset=preset, overwrite=True) as w:
            for s in range(0, len(frames), 16):
                idx = np.arange(s, min(s + 16, len(frames)))
                chunk = ff.get(idx)
                src = torch.from_numpy(chunk).to(dev)
                faces = crops_to_model_input(warp_faces(src, mats[idx], 512), 512)
                w.write(restore(src, faces, mats[idx], resolution=512).cpu().numpy())
        ff.close()
        emit(
            f"pass 2 without the model (decode→GPU align/restore→encode {preset})",
            len(frames),
            time.perf_counter() - t,
        )

    from lipsync.media.color import rgb_to_yuv420

    for preset in ("medium", "veryfast", "faster"):
        t = time.perf_counter()
        with VideoWriter(os.path.join(tmp, f"y{preset}.mp4"), preset=preset, overwrite=True) as w:
            for s in range(0, len(frames), 16):
                w.write(rgb_to_yuv420(torch.from_numpy(frames[s : s + 16]).to(dev)))
        emit(
            f"encode libx264 {preset}, RGB->YUV on {dev.type}", len(frames), time.perf_counter() - t
        )
        t = time.perf_counter()
        ff = FileFrames(video, info, len(frames))
        with VideoWriter(os.path.join(tmp, f"q{preset}.mp4"), preset=preset, overwrite=True) as w:
            for s in range(0, len(frames), 16):
                idx = np.arange(s, min(s + 16, len(frames)))
                src = torch.from_numpy(ff.get(idx)).to(dev)
                faces = crops_to_model_input(warp_faces(src, mats[idx], 512), 512)
                w.write(rgb_to_yuv420(restore(src, faces, mats[idx], resolution=512)))
        ff.close()
        emit(
            f"pass 2 without the model, YUV on {dev.type}, encode {preset}",
            len(frames),
            time.perf_counter() - t,
        )


def faces(video: str) -> None:
    import cv2

    from lipsync.face.detect import MediaPipeDetector

    cap = cv2.VideoCapture(video)
    frames = []
    t = time.perf_counter()
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    emit("decode (OpenCV, for this test only)", len(frames), time.perf_counter() - t)
    frames = np.stack(frames)
    for max_faces in (4, 1):
        with MediaPipeDetector(max_num_faces=max_faces) as det:
            t = time.perf_counter()
            found = 0
            for s in range(0, len(frames), 16):
                found += sum(f is not None for f in det.detect(frames[s : s + 16]))
            emit(
                f"FaceMesh landmarks, max_num_faces={max_faces}",
                len(frames),
                time.perf_counter() - t,
                with_face=found,
            )


if __name__ == "__main__":
    {"media": media, "faces": faces}[sys.argv[1]](sys.argv[2])
