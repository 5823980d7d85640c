"""The web UI: ``lipsync app`` serves a Gradio page to upload a video and an audio track, pick the
main options, follow the progress and watch or download the result.

Models are loaded once per preset and kept; each run writes into a fresh temporary folder.
"""

from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from lipsync.api import LipSync
from lipsync.config import PRESETS, LoadOptions, get_preset
from lipsync.errors import LipSyncError
from lipsync.progress import StageProgress


class GradioProgress(StageProgress):
    """The pipeline's stages on one Gradio progress bar (weighted: :mod:`lipsync.progress`)."""

    def __init__(self, progress):
        super().__init__()
        self.progress = progress

    def changed(self, stage: str) -> None:
        done, total = self.done[stage], self.totals[stage]
        self.progress(self.fraction(), desc=f"{stage} {done}/{total}")


class ModelCache:
    """One loaded :class:`~lipsync.api.LipSync` per preset, created on first use."""

    def __init__(self, options: LoadOptions):
        self.options = options
        self._models: dict[str, LipSync] = {}
        self._lock = threading.Lock()

    def get(self, preset: str) -> LipSync:
        with self._lock:
            if preset not in self._models:
                self._models[preset] = LipSync.from_options(replace(self.options, preset=preset))
            return self._models[preset]


def build_app(options: LoadOptions):
    """The Gradio Blocks page (call ``.launch()`` on it); ``options.preset`` is the default
    preset, the others load with the same options."""
    import gradio as gr

    cache = ModelCache(options)
    default_preset = get_preset(options.preset).name
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
