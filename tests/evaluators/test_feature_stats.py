"""Feature statistics against closed forms, numpy and brute-force definitions."""

import itertools
import math

import numpy as np
import pytest
import torch

from sqdf.evaluators import frechet_distance, mean_pairwise_distance, vendi_score


def _gaussian(n: int, mean: list, std: list, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    return torch.tensor(mean, dtype=torch.float64) + torch.tensor(std, dtype=torch.float64) * z


def _correlated(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mixing + torch.randn(dim)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    mean_a, std_a = [0.0, 1.0, -2.0], [1.0, 2.0, 0.5]
    mean_b, std_b = [1.0, -1.0, -2.0], [3.0, 1.0, 0.5]
    # For commuting (here diagonal) covariances the trace term is sum_i (s_a,i - s_b,i)².
    gap = torch.tensor(mean_a) - torch.tensor(mean_b)
    exact = float(gap @ gap + (torch.tensor(std_a) - torch.tensor(std_b)).pow(2).sum())
    a = _gaussian(200_000, mean_a, std_a, seed=0)
    b = _gaussian(200_000, mean_b, std_b, seed=1)
    # Sampling error of the mean term is about 2 |mu_a - mu_b| sqrt(10 / n) ~ 0.04.
    assert frechet_distance(a, b) == pytest.approx(exact, abs=0.2)


def test_frechet_trace_term_for_non_commuting_covariances_matches_numpy():
    a, b = _correlated(400, 5, seed=2), _correlated(300, 5, seed=3) + 0.5
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    # tr((S_a^½ S_b S_a^½)^½) = sum of sqrt of the eigenvalues of S_a S_b (all real, >= 0).
    trace_cross = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    diff = a.numpy().mean(0) - b.numpy().mean(0)
    expected = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_in_one_dimension_is_mean_and_std_gaps():
    a, b = _gaussian(1000, [0.3], [1.5], seed=4), _gaussian(700, [-0.2], [0.4], seed=5)
    expected = (a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-10)


def test_frechet_of_two_halves_of_one_sample_is_near_zero():
    x = _gaussian(200_000, [1.0, -3.0, 0.0], [2.0, 0.5, 1.0], seed=6)
    assert frechet_distance(x[0::2], x[1::2]) < 1e-3


def test_frechet_of_a_set_with_itself_is_zero_even_when_singular():
    # 10 points in 32 dims: a rank-deficient covariance, as for a small batch of features.
    x = _correlated(10, 32, seed=7)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_is_symmetric():
    a, b = _correlated(50, 8, seed=8), _correlated(80, 8, seed=9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="dims differ"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))


def test_mean_pairwise_distance_matches_double_loop():
    x = _correlated(7, 4, seed=10)
    rows = x.tolist()
    pairs = list(itertools.combinations(range(len(rows)), 2))
    expected = sum(math.dist(rows[i], rows[j]) for i, j in pairs) / len(pairs)
    assert mean_pairwise_distance(x) == pytest.approx(expected, rel=1e-12)


def test_mean_pairwise_distance_of_identical_points_is_zero():
    assert mean_pairwise_distance(torch.ones(6, 3)) == 0.0


def test_vendi_of_orthogonal_one_hots_is_n():
    assert vendi_score(torch.eye(12)) == pytest.approx(12.0, rel=1e-9)
    # More points than dimensions takes the D × D route; 3 orthogonal groups count as 3.
    groups = torch.eye(3).repeat_interleave(40, dim=0) * torch.rand(120, 1).add(0.5)
    assert vendi_score(groups) == pytest.approx(3.0, rel=1e-9)


def test_vendi_of_identical_points_is_one():
    assert vendi_score(torch.tensor([[0.2, -1.0, 3.0]]).repeat(9, 1)) == pytest.approx(1.0)
    assert vendi_score(torch.zeros(9, 4)) == pytest.approx(1.0)


@pytest.mark.parametrize("n, dim", [(6, 20), (50, 4)])
def test_vendi_matches_definition_with_the_n_by_n_kernel(n, dim):
    x = _correlated(n, dim, seed=11).numpy()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(unit @ unit.T / n).clip(min=0)
    eig = eig[eig > 0]
    expected = math.exp(-(eig * np.log(eig)).sum())
    assert vendi_score(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-9)


class _Features(torch.nn.Module):
    """torchmetrics' FID over given features: a "feature extractor" that returns its input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(
    "n, m, dim, rel",
    [
        (400, 300, 5, 1e-12),  # full-rank covariances: both are exact up to round-off
        (50, 80, 8, 1e-12),
        # Fewer points than dimensions, as in sqdf eval: torchmetrics takes the square roots of
        # S_a S_b's eigenvalues from a general (non-symmetric) eig, whose zero eigenvalues come
        # out as round-off of about 1e-16 of the largest; their roots add ~1e-8 each, about
        # 2e-7 of the distance at Inception's 2048 dims (ours clamps a symmetric eigh's to 0).
        # 512 dims keep that regime (rank 11 in 512) at a sixty-fourth of 2048's eig cost.
        (6, 6, 64, 1e-6),
        (12, 12, 512, 1e-6),
    ],
)
def test_frechet_equals_torchmetrics_fid_on_the_same_features(n, m, dim, rel):
    from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

    a, b = _correlated(n, dim, seed=2), _correlated(m, dim, seed=3) + 0.5
    # torchmetrics' formula on the means and unbiased covariances ...
    formula = _compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(float(formula), rel=rel)
    # ... and its whole metric, which accumulates the sums itself (float64)
    fid = FrechetInceptionDistance(feature=_Features(dim))
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(fid.compute()), rel=rel)
