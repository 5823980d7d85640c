"""Runners that inject failures into ``lipsync serve worker``
(``--runner tests.support.serving_runners:…``, with the repository on PYTHONPATH): the real
tiny-preset engine behind a switch."""

from __future__ import annotations

import torch

from lipsync.errors import NoFaceError

ALWAYS_FAIL_SEED = 666  # every attempt raises RuntimeError
USER_ERROR_SEED = 667  # the first attempt raises a typed user error


class ChaosRunner:
    """CUDA out of memory while ``chunk_frames`` > 8, as a too-big batch would on a GPU; jobs
    with the seeds above fail on purpose; everything else runs the real engine."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[dict] = []

    def run(self, video, audio, out, progress=None, **options):
        seed = options.get("seed")
        if seed == ALWAYS_FAIL_SEED:
            raise RuntimeError("injected failure")
        if seed == USER_ERROR_SEED:
            raise NoFaceError(f"no face found in any of the frames of {video} (injected)")
        if options.get("chunk_frames", 16) > 8:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
            )
        return self.engine.run(video, audio, out, progress=progress, **options)


def chaos_runner(settings):
    from lipsync.serving.worker import make_runner

    return ChaosRunner(make_runner(settings.model_copy(update={"runner": "engine"})))
