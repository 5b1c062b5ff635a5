"""The sampler accuracy benchmark: its exact reference, its metrics and ``sumie bench samplers``."""

import json
import math

import pytest
import torch

from sumie.cli import main
from sumie.metrics import sampler_accuracy as sa


def test_exact_solution_of_a_single_gaussian_matches_the_closed_form():
    mu = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    s = torch.tensor([[0.05, 0.5, 1.5]], dtype=torch.float64)
    gmm = sa.GaussianMixture(torch.ones(1, dtype=torch.float64), mu, s)
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    exact = mu + (x_T - mu) * s / (s**2 + 14.6**2).sqrt()  # PF-ODE of a Gaussian, in closed form
    assert (sa.exact_solution(gmm, x_T, 14.6) - exact).abs().max().item() < 1e-8


def test_mixture_denoiser_is_the_posterior_mean():
    gmm = sa.GaussianMixture.benchmark(dim=2, components=3, seed=1)
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(200_000, g)
    sigma = 0.7
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    d = gmm.denoise(x, torch.tensor(sigma))
    # E[(x0 - D(x)) f(x)] = 0 for any f: check with f = 1 and f = x
    resid = x0 - d
    assert resid.mean(0).abs().max().item() < 5e-3
    assert (resid * x).mean(0).abs().max().item() < 1e-2
    assert ((x0 - x) ** 2).mean() > ((x0 - d) ** 2).mean()


def test_sliced_wasserstein_separates_distributions():
    gmm = sa.GaussianMixture.benchmark()
    a, b = gmm.sample(2000, torch.Generator().manual_seed(1)), gmm.sample(2000, torch.Generator().manual_seed(2))
    assert sa.sliced_wasserstein(a, b) < 0.1 < sa.sliced_wasserstein(a, b * 1.3)


def test_bench_samplers_cli_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("diffusers")
    out = tmp_path / "bench"
    assert main(["bench", "samplers", "--quick", "--nfe", "5,10", "--samples", "16", "--sde-samples", "32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NFE 10" in printed and "Best per NFE budget" in printed and "EulerDiscrete" in printed
    result = json.loads((out / "samplers.json").read_text())
    rows = result["rows"]
    assert {r["lib"] for r in rows} == {"sumie", "diffusers"}
    assert all(r["nfe"] <= r["target"] for r in rows)
    assert all(math.isfinite(r["error"]) for r in rows if r["lib"] == "sumie")
    euler = {(r["schedule"], r["target"]): r["error"] for r in rows if r["sampler"] == "euler"}
    d_euler = {(r["schedule"], r["target"]): r["error"] for r in rows if r["sampler"] == "EulerDiscrete"}
    # the same algorithm on the same Karras sigmas and noise gives the same error in both libraries
    assert euler[("karras", 10)] == pytest.approx(d_euler[("karras", 10)], rel=1e-3)
    assert (out / "samplers.png").stat().st_size > 10_000 and "| library" in (out / "samplers.md").read_text()


@pytest.mark.parametrize("args,msg", [(["--nfe", "0,5"], "NFE budgets must be >= 1"),
                                      (["--samples", "1"], "--samples and --sde-samples must be >= 2")])
def test_bench_samplers_bad_input(tmp_path, capsys, args, msg):
    assert main(["bench", "samplers", "--quick", "--no-diffusers", "--out", str(tmp_path), *args]) == 2
    assert msg in capsys.readouterr().err
