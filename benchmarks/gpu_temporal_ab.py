"""A/B: temporal attention as plain matmuls (default) vs scaled_dot_product_attention, v1.6
bf16 regional compile, via lipsync.bench.bench_model. Usage: python benchmarks/gpu_temporal_ab.py"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lipsync.bench import bench_model  # noqa: E402
from lipsync.models.transformer import TemporalAttention  # noqa: E402

for use_sdpa in (False, True):
    TemporalAttention.use_sdpa = use_sdpa
    torch._dynamo.reset()
    r = bench_model("v1.6", 16, 20, "exact", "cuda", "bf16", "regional", 3, random_weights=True)
    r["temporal_attention"] = "sdpa" if use_sdpa else "matmul"
    print(json.dumps(r), flush=True)
