import numpy as np
import pytest
import torch

from raysslvit.metrics.cka import cka_matrix, linear_cka, minibatch_cka


@pytest.fixture
def X():
    return torch.randn(200, 30, generator=torch.Generator().manual_seed(0))


def direct_cka(X, Y):
    """The definition: HSIC(K, L) = tr(K H L H) / (n - 1)^2 on linear Gram matrices, O(n^2)."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    n = len(X)
    H = np.eye(n) - np.ones((n, n)) / n
    hsic = lambda K, L: np.trace(K @ H @ L @ H) / (n - 1) ** 2
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def test_cka_of_itself_is_one(X):
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, X, unbiased=True) == pytest.approx(1.0)


def test_invariant_to_isotropic_scaling_and_orthogonal_transforms(X):
    Y = X @ torch.randn(30, 20, generator=torch.Generator().manual_seed(1)) + 0.5 * torch.randn(200, 20)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(2)))
    for unbiased in (False, True):
        base = linear_cka(X, Y, unbiased)
        assert linear_cka(X, 7.5 * Y, unbiased) == pytest.approx(base)
        assert linear_cka(X, Y @ Q, unbiased) == pytest.approx(base)


def test_equals_the_direct_hsic_computation(X):
    Y = torch.tanh(X[:, :10] * 2) + 0.1 * torch.randn(200, 10)
    assert linear_cka(X, Y) == pytest.approx(direct_cka(X, Y), rel=1e-9)
    assert linear_cka(X.numpy(), Y.numpy()) == pytest.approx(direct_cka(X, Y), rel=1e-9)


def test_unbiased_is_near_zero_for_independent_data():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(500, 100, generator=g), torch.randn(500, 100, generator=g)
    assert abs(linear_cka(A, B, unbiased=True)) < 0.02
    assert linear_cka(A, B) > 0.1  # the biased estimator is inflated in high dimension


def test_minibatch_form_tracks_the_full_unbiased_value(X):
    Y = X[:, :15] + 0.3 * torch.randn(200, 15, generator=torch.Generator().manual_seed(4))
    assert minibatch_cka(X, Y, batch_size=200) == pytest.approx(linear_cka(X, Y, unbiased=True))
    assert minibatch_cka(X, Y, batch_size=50) == pytest.approx(linear_cka(X, Y, unbiased=True), abs=0.05)


def test_cka_matrix_is_symmetric_with_unit_diagonal(X):
    m = cka_matrix([X, X[:, :10], torch.randn(200, 5)])
    assert m.shape == (3, 3) and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
