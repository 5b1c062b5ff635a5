import pytest
import torch
from torch import nn

from sumie.diffusion.precond import DiscreteDenoiser, EDMDenoiser, make_denoiser
from sumie.diffusion.schedules import DiscreteSchedule, append_dims


class OracleNet(nn.Module):
    """The ideal raw network for data that is one point x_star: it recovers sigma from c_noise and
    x from c_in * x, then outputs exactly the target its preconditioning expects."""

    def __init__(self, x_star, sigma_of_c_noise):
        super().__init__()
        self.x_star, self.sigma_of = x_star, sigma_of_c_noise
        self.den = None

    def forward(self, x_in, c_noise, cond=None):
        sigma = self.sigma_of(c_noise).float()
        s = self.den.scalings(sigma)
        x = x_in / append_dims(s.c_in, x_in.ndim)
        return (self.x_star - append_dims(s.c_skip, x.ndim) * x) / append_dims(s.c_out, x.ndim)


@pytest.mark.parametrize("param", ["eps", "v", "x0", "edm"])
def test_ideal_denoiser_recovers_single_point_at_every_sigma(param):
    torch.manual_seed(0)
    x_star = torch.randn(1, 3, 4, 4)
    sched = DiscreteSchedule.named("scaled_linear", 1000)
    if param == "edm":
        net = OracleNet(x_star, lambda c: (4 * c).exp())
        den = EDMDenoiser(net, sigma_data=0.5)
        sigmas = [0.002, 0.1, 1.0, 10.0, 80.0]
    else:
        net = OracleNet(x_star, lambda c: sched.t_to_sigma(c.double()))
        den = DiscreteDenoiser(net, sched, param)
        sigmas = [sched.sigma_min, 0.3, 1.0, 5.0, sched.sigma_max]
    net.den = den
    for sigma in sigmas:
        x = x_star + sigma * torch.randn(2, 3, 4, 4)
        out = den(x, torch.full((2,), sigma))
        assert torch.allclose(out, x_star.expand(2, -1, -1, -1), atol=2e-4 * max(1.0, sigma)), (param, sigma)


def test_scalings_closed_forms():
    sched = DiscreteSchedule.named("linear", 1000)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    eps = DiscreteDenoiser(nn.Identity(), sched, "eps").scalings(sigma)
    assert torch.allclose(eps.c_skip, torch.ones(3)) and torch.allclose(eps.c_out, -sigma)
    assert torch.allclose(eps.c_in, 1 / (sigma**2 + 1).sqrt())
    assert torch.allclose(eps.c_noise, sched.sigma_to_t(sigma).float())
    v = DiscreteDenoiser(nn.Identity(), sched, "v").scalings(sigma)
    assert torch.allclose(v.c_skip, 1 / (sigma**2 + 1)) and torch.allclose(v.c_out, -sigma / (sigma**2 + 1).sqrt())
    e = EDMDenoiser(nn.Identity(), sigma_data=0.5).scalings(sigma)
    assert torch.allclose(e.c_skip, 0.25 / (sigma**2 + 0.25))
    assert torch.allclose(e.c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(e.c_noise, sigma.log() / 4)


def test_v_target_is_the_velocity_of_salimans_and_ho():
    """(x0 - c_skip x) / c_out must equal v = alpha eps - s x0 in the VP variables."""
    sched = DiscreteSchedule.named("linear", 1000)
    den = DiscreteDenoiser(nn.Identity(), sched, "v")
    x0, eps = torch.randn(5), torch.randn(5)
    sigma = torch.tensor(0.8)
    x = x0 + sigma * eps
    s = den.scalings(sigma.reshape(1))
    target = (x0 - s.c_skip * x) / s.c_out
    alpha, sv = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    assert torch.allclose(target, alpha * eps - sv * x0, atol=1e-6)


def test_make_denoiser_errors():
    with pytest.raises(ValueError, match="valid: eps, v, x0, edm"):
        make_denoiser(nn.Identity(), "flow")
    with pytest.raises(ValueError, match="discrete schedule"):
        make_denoiser(nn.Identity(), "eps")
