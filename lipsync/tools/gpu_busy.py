"""GPU busy share: the fraction of wall time the GPU was running a kernel, from NVML.

NVML's ``utilization.gpu`` is "percent of time over the past sample period during which one or
more kernels was executing" (sampled by the driver every 1/6 s to 1 s). :class:`GpuBusy` polls it
while a block runs and reports the mean. It reads NVML through ``pynvml`` when installed, else
through ``nvidia-smi --query-gpu=utilization.gpu -lms`` (one long-running child process, no
shell); with neither (a CPU run, a machine without the driver tools) the share is ``None``.

    with GpuBusy(device_index=0) as busy:
        run_the_work()
    busy.share  # 0.0 .. 1.0, or None
"""

from __future__ import annotations

import shutil
import subprocess
import threading


class GpuBusy:
    """Context manager sampling NVML GPU utilisation every ``interval_s`` seconds."""

    def __init__(self, device_index: int | None = 0, interval_s: float = 0.1):
        self.device_index = device_index
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def share(self) -> float | None:
        """Mean utilisation over the block as a fraction (None: nothing could be sampled)."""
        return sum(self.samples) / len(self.samples) / 100.0 if self.samples else None

    def __enter__(self) -> GpuBusy:
        if self.device_index is None:
            return self
        try:
            import pynvml  # noqa: F401 (nvidia-ml-py)

            self._thread = threading.Thread(target=self._poll_nvml, daemon=True)
            self.source = "nvml"
        except ImportError:
            smi = shutil.which("nvidia-smi")
            if smi is None:
                return self
            ms = max(int(self.interval_s * 1000), 20)
            self._proc = subprocess.Popen(
                [smi, f"--id={self.device_index}", "--query-gpu=utilization.gpu",
                 "--format=csv,noheader,nounits", f"-lms={ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
            self.source = "nvidia-smi"
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll_nvml(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            while not self._stop.wait(self.interval_s):
                self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        finally:
            pynvml.nvmlShutdown()

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        first = True
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            line = line.strip()
            if not line.isdigit():
                continue
            if first:  # the first sample covers the period before the block began
                first = False
                continue
            self.samples.append(float(line))
