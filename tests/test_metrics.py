import torch

from histodiff_ray.metrics import psnr, ssim


def test_identical_images_score_perfectly_and_noise_scores_lower():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    assert (ssim(a, noisy) < 0.95).all() and (psnr(a, a) > 90).all()


def test_psnr_matches_its_definition():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.1)  # MSE 0.01 → 20 dB
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0]))


def test_ssim_of_a_constant_shift_is_below_one_and_symmetric():
    a = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    b = (a * 0.5 + 0.25)
    assert 0 < ssim(a, b).item() < 1
    torch.testing.assert_close(ssim(a, b), ssim(b, a))
