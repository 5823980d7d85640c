"""Training: SyncNet and the LatentSync U-Net (single process, or several through torchrun)."""
