"""Step 3: scene (shot) detection with PySceneDetect on the 25 fps video of step 2.

PySceneDetect's PyAV backend reads the file (streamed; frames are downscaled for the detector as
PySceneDetect's ``auto_downscale`` chooses), and its :class:`AdaptiveDetector` finds cuts: a frame
whose content change is ``threshold`` times its neighbours' average (robust to camera motion,
which the plain content threshold mistakes for cuts). Scenes shorter than ``min_scene_frames``
are merged into their neighbour by the detector.

Returns half-open frame ranges ``[start, stop)`` covering the whole video in order; a video
without cuts is one scene.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["detect_scenes"]


def detect_scenes(
    video: str | Path, num_frames: int, threshold: float = 3.0, min_scene_frames: int = 15
) -> list[tuple[int, int]]:
    """Scene ranges of ``video`` (25 fps, ``num_frames`` frames), in frames."""
    from scenedetect import AdaptiveDetector, SceneManager
    from scenedetect.backends.pyav import VideoStreamAv

    stream = VideoStreamAv(str(video), threading_mode="AUTO", suppress_output=True)
    manager = SceneManager()
    manager.auto_downscale = True
    manager.add_detector(
        AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_scene_frames)
    )
    manager.detect_scenes(video=stream, show_progress=False)
    starts = [int(start.frame_num) for start, _ in manager.get_scene_list(start_in_scene=True)]
    cuts = sorted({f for f in starts if 0 < f < num_frames})
    bounds = [0, *cuts, num_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
