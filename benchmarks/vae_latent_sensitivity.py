"""How sensitive is a bundle's VAE decoder to errors in the latent? (Is the demo model's speckled
texture the VAE's or the U-Net's?)

    python benchmarks/vae_latent_sensitivity.py [--bundle lipsync/weights/demo] [--pack .pack]
        [--out vae_latent_sensitivity.png]

Encodes 4 val frames of the pack, adds Gaussian noise of sigma 0 ... 0.4 (in the scaled latent
units the U-Net works in) and decodes: mouth-region PSNR per sigma on stdout, and a picture (rows:
input, then one per sigma). Results: docs/TRAINING.md "Measurements".
"""

import argparse

import cv2
import numpy as np
import torch

from lipsync.own_checkpoints import load_own_vae
from lipsync.train.pack import read_pack

ap = argparse.ArgumentParser()
ap.add_argument("--bundle", default="lipsync/weights/demo")
ap.add_argument("--pack", default=".pack")
ap.add_argument("--out", default="vae_latent_sensitivity.png")
args = ap.parse_args()
torch.manual_seed(0)
vae = load_own_vae(args.bundle, device="cpu")
pack = read_pack(args.pack, ("val",))
fr = pack.frames["val"][[100, 600, 1100, 1600]]  # (4, R, R, 3) uint8 RGB
x = torch.from_numpy(fr).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    z = vae.encode(x)
    print("latent std (scaled):", float(z.std()))
    rows = [x]
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.4):
        y = vae.decode(z + sigma * torch.randn_like(z)).clamp(-1, 1)
        mouth = (slice(None), slice(None), slice(128 + 32, 256 - 16), slice(64, 192))
        mse = float(((y[mouth] - x[mouth]) ** 2).mean()) / 4
        print(f"sigma {sigma}: mouth PSNR {10 * np.log10(1 / mse):.2f} dB")
        rows.append(y)
grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
img = ((grid.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
cv2.imwrite(args.out, cv2.resize(img[:, :, ::-1], (img.shape[1] // 2, img.shape[0] // 2)))
