"""Model weights shipped with lipsync: ``syncnet_synth_small.safetensors``, our small SyncNet
trained on the synthetic corpus (when present; see docs/EVAL.md), and ``demo/``, the ``demo``
preset's bundle (``manifest.json`` + shards, format ``lipsync.bundle/1``; when present, see
docs/TRAINING.md)."""
