"""``lipsync data process``: turn raw talking-head footage into training segments.

Seven steps, each with its own folder under ``OUT`` (layout and kill-safety rules:
:mod:`.store`):

1. :mod:`.check` -- drop broken inputs (zero bytes, not media, no video / audio stream, codec not
   decodable, too large, too long, truncated, damaged packets in a full decode);
2. :mod:`.resample` -- 25 fps video and 16 kHz mono audio with the resamplers inference uses;
3. :mod:`.scenes` -- shot boundaries (PySceneDetect, PyAV backend);
4. :mod:`.segments` -- 5-10 s segments inside scenes;
5. :mod:`.faces` -- the inference face stage (detection, tracking, alignment template and
   smoothing) -> R x R face crops + their audio;
6. :mod:`.sync` -- SyncNet offset and confidence: shift to offset 0, drop under the threshold
   (skipped, and recorded as such, without a checkpoint);
7. :mod:`.quality` -- hyperIQA with its weights, else a documented weight-free score.

Kept segments end in ``OUT/final/``; every input and segment has a line in
``OUT/manifest.jsonl`` (:mod:`lipsync.data.manifest`). Work runs in a local process pool or on
Ray through the same code path (:mod:`.executor`, :mod:`.runner`).
"""

from lipsync.data.process.options import ProcessOptions
from lipsync.data.process.runner import ProcessReport, Progress, process_corpus
from lipsync.data.process.sync import SyncEstimate, SyncScorer

__all__ = [
    "ProcessOptions",
    "ProcessReport",
    "Progress",
    "SyncEstimate",
    "SyncScorer",
    "process_corpus",
]
