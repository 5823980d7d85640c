"""Evaluation: image-quality metrics (PSNR, SSIM) for comparing outputs of different modes."""
