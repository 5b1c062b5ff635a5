import pytest
import torch
from torch import nn

from sumie.diffusion.losses import DiffusionLoss
from sumie.diffusion.precond import DiscreteDenoiser, EDMDenoiser
from sumie.diffusion.schedules import DiscreteSchedule, LogNormalSigma, UniformTimestepSigma


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, c_noise, cond=None):
        return self.w * x


def test_native_eps_loss_is_plain_epsilon_regression():
    sched = DiscreteSchedule.named("linear", 1000)
    den = DiscreteDenoiser(Linear(), sched, "eps")
    loss_fn = DiffusionLoss(UniformTimestepSigma(sched))
    x0 = torch.randn(8, 3, 4, 4)
    loss = loss_fn(den, x0, generator=torch.Generator().manual_seed(1))
    # replay the same draws by hand: Ho et al. 2020 eq. 14
    g = torch.Generator().manual_seed(1)
    sigma = UniformTimestepSigma(sched)(8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x = x0 + sigma[:, None, None, None] * eps
    eps_hat = 0.3 * x / (sigma**2 + 1).sqrt()[:, None, None, None]
    assert torch.allclose(loss, (eps_hat - eps).pow(2).flatten(1).mean(1), rtol=1e-5)


def test_min_snr_weight_is_clamped_snr_in_x0_space():
    den = EDMDenoiser(Linear())
    fn = DiffusionLoss(LogNormalSigma(), weighting="min_snr", min_snr_gamma=5.0)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(fn.weight(den, sigma), torch.tensor([5.0, 1.0, 0.01]))
    native = DiffusionLoss(LogNormalSigma())
    assert torch.allclose(native.weight(den, sigma), 1 / den.scalings(sigma).c_out ** 2)


def test_edm_loss_matches_edm_eq8():
    den = EDMDenoiser(Linear(), sigma_data=0.5)
    x0 = torch.randn(6, 2, 3, 3)
    loss = DiffusionLoss(LogNormalSigma())(den, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = LogNormalSigma()(6, generator=g)
    n = torch.randn(x0.shape, generator=g)
    D = den(x0 + sigma[:, None, None, None] * n, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss, weight * (D - x0).pow(2).flatten(1).mean(1), rtol=1e-4)


def test_noise_offset_changes_the_noise_and_bad_weighting():
    den = EDMDenoiser(Linear())
    x0 = torch.zeros(4, 3, 8, 8)
    a = DiffusionLoss(LogNormalSigma())(den, x0, generator=torch.Generator().manual_seed(0))
    b = DiffusionLoss(LogNormalSigma(), noise_offset=0.5)(den, x0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="valid: native, min_snr"):
        DiffusionLoss(LogNormalSigma(), weighting="p2")
