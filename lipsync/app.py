"""The web UI: ``lipsync app`` serves a Gradio page to upload a video and an audio track, pick the
main options, follow the progress and watch or download the result.

Models are loaded once per preset and kept; each run writes into a fresh temporary folder.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

from lipsync.config import PRESETS
from lipsync.errors import LipSyncError
from lipsync.pipeline import Progress


class GradioProgress(Progress):
    """Maps pipeline stages onto one Gradio progress bar (faces 10%, denoising 85%, encoding)."""

    WEIGHTS = {"faces": (0.0, 0.1), "denoising": (0.1, 0.95), "encoding": (0.95, 1.0)}

    def __init__(self, progress):
        self.progress = progress
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def start(self, stage: str, total: int) -> None:
        self.totals[stage], self.done[stage] = max(1, total), 0
        self._show(stage)

    def advance(self, stage: str, n: int = 1) -> None:
        self.done[stage] = self.done.get(stage, 0) + n
        self._show(stage)

    def finish(self, stage: str) -> None:
        self.done[stage] = self.totals.get(stage, 1)
        self._show(stage)

    def _show(self, stage: str) -> None:
        lo, hi = self.WEIGHTS.get(stage, (0.0, 1.0))
        frac = min(1.0, self.done[stage] / self.totals[stage])
        done, total = self.done[stage], self.totals[stage]
        self.progress(lo + (hi - lo) * frac, desc=f"{stage} {done}/{total}")


class ModelCache:
    """One loaded :class:`~lipsync.api.LipSync` per preset, created on first use."""

    def __init__(self, device: str | None, dtype: str | None, checkpoint_dir: str | None):
        self.device, self.dtype, self.checkpoint_dir = device, dtype, checkpoint_dir
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, preset: str):
        from lipsync.api import LipSync

        with self._lock:
            if preset not in self._models:
                self._models[preset] = LipSync.from_pretrained(
                    preset, device=self.device, dtype=self.dtype,
                    checkpoint_dir=self.checkpoint_dir,
                )  # fmt: skip
            return self._models[preset]


def build_app(
    default_preset: str = "v1.6",
    device: str | None = None,
    dtype: str | None = None,
    checkpoint_dir: str | None = None,
):
    """The Gradio Blocks page (call ``.launch()`` on it)."""
    import gradio as gr

    cache = ModelCache(device, dtype, checkpoint_dir)
    run_lock = threading.Lock()  # one run at a time on one GPU

    def synthesize(video, audio, preset, steps, guidance, seed, progress=gr.Progress()):
        if not video or not audio:
            raise gr.Error("Upload a video and an audio file first.")
        out = Path(tempfile.mkdtemp(prefix="lipsync-app-")) / "synced.mp4"
        try:
            with run_lock:
                ls = cache.get(preset)
                report = ls.run(
                    video, audio, out, progress=GradioProgress(progress),
                    steps=int(steps), guidance=float(guidance), seed=int(seed),
                )  # fmt: skip
        except LipSyncError as e:
            raise gr.Error(str(e)) from e
        return str(out), json.dumps(report.as_dict(), indent=2)

    with gr.Blocks(title="lipsync") as page:
        gr.Markdown(
            "# lipsync\nUpload a talking-head video and a new audio track; the mouth is "
            "regenerated to match the audio (LatentSync 1.5 / 1.6)."
        )
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload"])
                audio = gr.Audio(label="Audio", type="filepath", sources=["upload"])
                preset = gr.Dropdown(
                    choices=list(PRESETS), value=default_preset, label="Model preset"
                )
                steps = gr.Slider(1, 50, value=20, step=1, label="Denoising steps")
                guidance = gr.Slider(1.0, 3.0, value=1.5, step=0.1, label="Guidance scale")
                seed = gr.Number(value=1247, precision=0, label="Seed")
                button = gr.Button("Lip-sync", variant="primary")
            with gr.Column():
                result = gr.Video(label="Result")
                details = gr.Code(label="Report", language="json")
        button.click(
            synthesize,
            inputs=[video, audio, preset, steps, guidance, seed],
            outputs=[result, details],
            api_name="run",
        )
    return page
