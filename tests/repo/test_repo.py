"""Repository conventions that CI relies on."""

from __future__ import annotations

import re
import subprocess

from tests.support.shared import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Set up section holds exactly one bash block"
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them_verbatim():
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci = (REPO / ".ci/run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"{command!r} is not a line of .ci/run"
    assert "pytest" in commands[1]


def test_no_shell_true_anywhere():
    out = subprocess.run(
        ["git", "grep", "-n", "shell=True", "--", "lipsync"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.stdout == "", out.stdout
