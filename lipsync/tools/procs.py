"""Local server processes, for the benchmarks and the tests that start them: free TCP ports,
and stopping a server started in its own session (``start_new_session=True``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_process(proc: subprocess.Popen, timeout: float, group: bool = False) -> None:
    """If ``proc`` still runs: SIGTERM (to the process, or with ``group`` to its whole process
    group), then after ``timeout`` seconds SIGKILL to its process group; returns once it exited."""
    if proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
