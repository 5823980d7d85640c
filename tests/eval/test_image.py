"""PSNR and SSIM (lipsync.eval.image) against analytic values and an independent SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipsync.eval.image import gaussian_window, psnr, ssim, ssim_map


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    # (frames, C, H, W) in [0.2, 0.8]; float64 so the analytic values hold to rounding
    return 0.2 + 0.6 * torch.rand(2, 3, 48, 40, generator=g, dtype=torch.float64)


def test_identical_images(image):
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_noise_level(image):
    # ±d everywhere: MSE = d² exactly, PSNR = 20 log10(1 / d)
    for d in (0.01, 0.05, 0.1):
        sign = torch.randint(0, 2, image.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
        noisy = image + d * sign
        assert psnr(noisy, image) == pytest.approx(20 * math.log10(1 / d), abs=1e-6)
        assert psnr(noisy * 255, image * 255, data_range=255) == pytest.approx(
            20 * math.log10(1 / d), abs=1e-6
        )
    # Gaussian noise of σ: PSNR = -10 log10(mean noise²) ≈ -20 log10(σ)
    noise = 0.02 * torch.randn(
        image.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    value = psnr(image + noise, image)
    assert value == pytest.approx(-10 * math.log10(float((noise**2).mean())), abs=1e-9)
    assert value == pytest.approx(-20 * math.log10(0.02), abs=0.25)


def test_region_restricts_both_metrics(image):
    region = torch.zeros(48, 40, dtype=torch.bool)
    region[10:30, 8:30] = True
    noisy = image.clone()
    noisy[..., ~region] += 0.3  # change only outside the region, farther than the window
    inner = torch.zeros_like(region)
    inner[15:25, 13:25] = True
    assert psnr(noisy, image, region) == math.inf
    assert ssim(noisy, image, inner) == pytest.approx(1.0, abs=1e-12)
    assert ssim(noisy, image) < 0.9
    with pytest.raises(ValueError):
        psnr(image, image, torch.zeros(48, 40, dtype=torch.bool))


def test_ssim_of_constant_images_is_the_luminance_term():
    # constant a vs constant b: variances and covariance vanish, SSIM = (2ab + C1)/(a² + b² + C1)
    c1 = (0.01 * 1.0) ** 2
    for a, b in ((0.5, 0.5), (0.5, 0.4), (0.9, 0.1)):
        x = torch.full((1, 1, 20, 20), a, dtype=torch.float64)
        y = torch.full((1, 1, 20, 20), b, dtype=torch.float64)
        assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)


def test_ssim_matches_an_independent_implementation(image):
    # scipy's Gaussian filter (σ 1.5, truncated at 3.5 σ: an 11-tap window), as scikit-image's
    # structural_similarity(gaussian_weights=True, use_sample_covariance=False) computes it
    from scipy.ndimage import gaussian_filter

    noisy = image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    x, y = image[0, 1].double().numpy(), noisy[0, 1].double().numpy()

    def blur(t):
        return gaussian_filter(t, 1.5, truncate=3.5)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    ours = ssim_map(image, noisy)[0, 1].numpy()
    np.testing.assert_allclose(ours, expected[5:-5, 5:-5], atol=1e-10)
    assert gaussian_window().shape == (11, 11)
    assert float(gaussian_window().sum()) == pytest.approx(1.0)


def test_ssim_falls_with_noise(image):
    values = [
        ssim(
            image + s * torch.randn(image.shape, generator=torch.Generator().manual_seed(4)), image
        )
        for s in (0.01, 0.05, 0.2)
    ]
    assert 1 > values[0] > values[1] > values[2] > 0
