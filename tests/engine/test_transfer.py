"""lipsync.transfer: host -> device copies (CPU here: the values, dtypes and the cache)."""

from __future__ import annotations

import numpy as np
import torch

from lipsync import transfer


def test_to_device_converts_on_the_host_and_keeps_values():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::2]  # not contiguous
    t = transfer.to_device(a, "cpu", torch.float32)
    assert t.dtype == torch.float32 and t.tolist() == [[0.0, 2.0], [3.0, 5.0]]
    ro = np.ones(3)
    ro.flags.writeable = False
    t = transfer.to_device(ro, "cpu")
    t += 1  # a copy: the read-only array is untouched
    assert ro.tolist() == [1.0, 1.0, 1.0]


def test_device_constant_is_made_once_per_key_and_device():
    calls = []

    def make():
        calls.append(1)
        return np.array([1.0, 2.0])

    first = transfer.device_constant(("test-table",), "cpu", make)
    again = transfer.device_constant(("test-table",), torch.device("cpu"), make)
    assert again is first and len(calls) == 1
    other = transfer.device_constant(("test-table", 2), "cpu", make)
    assert other is not first and len(calls) == 2
