"""The command line as a user meets it: ``lipsync check`` and ``presets``, and one-line errors."""

from __future__ import annotations

import json
import os

from tests.support.cli import lipsync_cli


def test_cli_check_tiny_json():
    proc = lipsync_cli("check", "--preset", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["unet_output"] == [1, 4, 16, 16, 16]
    assert report["audio_windows"] == [16, 50, 384]
    assert report["unet_output_finite"] is True


def test_cli_user_errors_are_one_line(tmp_path):
    env = dict(os.environ, LIPSYNC_HOME=str(tmp_path))
    for args, text in [
        (("check", "--preset", "v9"), "error: unknown preset 'v9'"),
        (("check", "--preset", "v1.5"), "error: v1.5 checkpoints not found"),
        (("check", "--dtype", "int3"), "error: unknown dtype 'int3'"),
    ]:
        proc = lipsync_cli(*args, env=env)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith(text), (args, proc.stderr)


def test_cli_presets_json(tmp_path):
    proc = lipsync_cli("presets", "--json", "--dir", str(tmp_path))
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["v1.6"]["resolution"] == 512
    assert rows["v1.6"]["checkpoints"].startswith("missing: lipsync download --version 1.6")
    assert rows["tiny"]["checkpoints"].startswith("random weights")


def test_cli_usage_errors_are_one_message_not_a_traceback():
    proc = lipsync_cli("run", "--bogus")
    assert proc.returncode == 2 and "No such option: --bogus" in proc.stderr
    assert "Traceback" not in proc.stderr
