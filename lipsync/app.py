"""The web UI: ``lipsync app`` serves a Gradio page to upload a video and an audio track, pick the
main options, follow the progress and watch or download the result.

Models are loaded once per preset and kept. Each run writes into a fresh temporary folder
(``$TMPDIR/lipsync-app-*``) that is deleted as soon as Gradio has copied the result into its own
cache (the run is a generator: the code after its one ``yield`` runs once the result is served);
Gradio's cache (uploads and results) is swept of files older than :data:`CACHE_MAX_AGE_S`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from lipsync.api import LipSync
from lipsync.config import PRESETS, LoadOptions, get_preset
from lipsync.errors import LipSyncError
from lipsync.progress import StageProgress

CACHE_MAX_AGE_S = 3600  # Gradio's copies of uploads and results: swept every half hour

#: what the preset menu shows (label, value): a preset with random weights says so
TINY_NOTE = "random weights: paints meaningless mouths, for testing only"


def preset_choices() -> list[tuple[str, str]]:
    return [
        (f"{name} ({TINY_NOTE})" if p.random_weights else name, name) for name, p in PRESETS.items()
    ]


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
        folder = Path(tempfile.mkdtemp(prefix="lipsync-app-"))
        out = folder / "synced.mp4"
        try:
            with run_lock:
                ls = cache.get(preset)
                report = ls.run(
                    video, audio, out, progress=GradioProgress(progress),
                    steps=int(steps), guidance=float(guidance), seed=int(seed),
                )  # fmt: skip
            yield str(out), json.dumps(report.as_dict(), indent=2)  # Gradio copies it now
        except LipSyncError as e:
            raise gr.Error(str(e)) from e
        finally:  # after the copy; also on errors and when the client goes away
            shutil.rmtree(folder, ignore_errors=True)

    with gr.Blocks(title="lipsync", delete_cache=(CACHE_MAX_AGE_S // 2, CACHE_MAX_AGE_S)) as page:
        gr.Markdown(
            "# lipsync\nUpload a talking-head video and a new audio track; the mouth is "
            "regenerated to match the audio (LatentSync 1.5 / 1.6). The `tiny` preset has "
            "random weights: it paints meaningless mouths and is only for testing the pipeline."
        )
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload"])
                audio = gr.Audio(label="Audio", type="filepath", sources=["upload"])
                preset = gr.Dropdown(
                    choices=preset_choices(), value=default_preset, label="Model preset",
                    info=f"tiny: {TINY_NOTE}",
                )  # fmt: skip
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
