"""Acceleration: regional ``torch.compile`` (:mod:`.compile`), FP8 linear layers (:mod:`.fp8`)."""
