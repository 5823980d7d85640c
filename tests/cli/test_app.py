"""The Gradio web UI: it starts, serves its page, runs a job through its API (tiny preset) and
leaves no temporary folder behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import av
import pytest

from tests.support.media_factory import make_audio, make_video, speechlike
from tests.support.serving_stack import free_port


@pytest.fixture(scope="module")
def app_tmp(tmp_path_factory):
    """The app's $TMPDIR: its run folders and Gradio's cache live there."""
    return tmp_path_factory.mktemp("app-tmp")


@pytest.fixture(scope="module")
def server(app_tmp):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lipsync.cli", "app", "--preset", "tiny", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TMPDIR=str(app_tmp)),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the app did not start: {proc.stdout.read()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_app_serves_its_page(server):
    with urllib.request.urlopen(server, timeout=10) as r:
        html = r.read().decode()
    assert r.status == 200
    assert "gradio" in html.lower()
    with urllib.request.urlopen(server + "config", timeout=10) as r:
        config = json.loads(r.read())
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Video", "Audio", "Model preset", "Denoising steps", "Result"} <= labels
    # the UI says what tiny is: in the page's text, the preset menu's note and the tiny choice
    (menu,) = [
        c["props"] for c in config["components"] if c["props"].get("label") == "Model preset"
    ]
    assert "meaningless mouths" in menu["info"]
    assert any(v == "tiny" and "meaningless mouths" in label for label, v in menu["choices"])
    texts = [c["props"].get("value") or "" for c in config["components"]]
    assert any("meaningless mouths" in str(t) for t in texts)


@pytest.mark.e2e
def test_app_runs_a_job(server, app_tmp, tmp_path, small_demo_frames):
    from gradio_client import Client, handle_file

    video = make_video(
        tmp_path / "v.mp4", seconds=0.64, size=(320, 320),
        draw=lambda i, t: small_demo_frames[i],
    )  # fmt: skip
    audio = make_audio(tmp_path / "a.wav", seconds=0.64, signal=speechlike(0.64))
    client = Client(server, verbose=False)
    result, details = client.predict(
        handle_file(str(video)), handle_file(str(audio)), "tiny", 2, 1.5, 7,
        api_name="/run",
    )  # fmt: skip
    path = result["video"] if isinstance(result, dict) else result
    with av.open(path) as c:
        n = sum(1 for _ in c.decode(video=0))
    report = json.loads(details)
    assert n == 16 and report["frames"] == 16 and report["seed"] == 7
    # the run's folder is gone once the result is served (Gradio holds its own copy)
    assert report["output"].startswith(str(app_tmp))
    assert not list(app_tmp.glob("lipsync-app-*"))
