"""Model weights shipped with lipsync: ``syncnet_synth_small.safetensors``, our small SyncNet
trained on the synthetic corpus (when present; see docs/EVAL.md)."""
