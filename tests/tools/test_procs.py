"""lipsync.tools.procs: free ports, and stopping a server process (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from lipsync.tools.procs import free_ports, stop_process

CHILD = (
    "import signal, sys, time\n"
    "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def child(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout.readline() == b"ready\n"  # handlers set
    return proc


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_stop_process_terminates_then_kills_the_group():
    polite = child("obey")
    stop_process(polite, timeout=10)
    assert polite.returncode == -signal.SIGTERM
    stubborn = child("ignore")
    stop_process(stubborn, timeout=0.5)
    assert stubborn.returncode == -signal.SIGKILL
    group = child("obey")
    stop_process(group, timeout=10, group=True)
    assert group.returncode == -signal.SIGTERM
    stop_process(group, timeout=10)  # already gone: nothing to do
    assert group.returncode == -signal.SIGTERM
