"""Linear Centered Kernel Alignment (Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited"), with the unbiased HSIC-1 estimator and its minibatch form
(Nguyen et al. 2021, "Do Wide and Deep Networks Learn the Same Things?"). Computed in float64.
"""
from __future__ import annotations

import numpy as np
import torch


def _as64(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    assert x.ndim == 2, f"expected an (n, d) array, got shape {tuple(x.shape)}"
    return x.detach().to(torch.float64)


def hsic1(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of two (n, n) Gram matrices, n > 3; diagonals zeroed, not subtracted."""
    n = K.shape[0]
    K, L = K.clone(), L.clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    KL = K @ L
    ones = torch.ones(n, dtype=K.dtype, device=K.device)
    term = KL.trace() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * (ones @ KL @ ones) / (n - 2)
    return term / (n * (n - 3))


def linear_cka(X, Y, unbiased: bool = False) -> float:
    """CKA with a linear kernel between (n, d1) and (n, d2) representations of the same n inputs."""
    X, Y = _as64(X), _as64(Y)
    assert X.shape[0] == Y.shape[0], "X and Y must describe the same inputs"
    if unbiased:
        K, L = X @ X.T, Y @ Y.T
        return float(hsic1(K, L) / (hsic1(K, K) * hsic1(L, L)).sqrt())
    X, Y = X - X.mean(0), Y - Y.mean(0)  # centring the features centres the linear Gram matrices
    cross = (Y.T @ X).pow(2).sum()
    return float(cross / ((X.T @ X).pow(2).sum().sqrt() * (Y.T @ Y).pow(2).sum().sqrt()))


def minibatch_cka(X, Y, batch_size: int = 1024) -> float:
    """Unbiased CKA accumulated over minibatches (each HSIC-1 averaged), for n too large for n x n."""
    X, Y = _as64(X), _as64(Y)
    xy = xx = yy = 0.0
    for i in range(0, X.shape[0] - 3, batch_size):
        x, y = X[i:i + batch_size], Y[i:i + batch_size]
        if x.shape[0] <= 3:
            break
        K, L = x @ x.T, y @ y.T
        xy, xx, yy = xy + hsic1(K, L), xx + hsic1(K, K), yy + hsic1(L, L)
    return float(xy / (xx * yy) ** 0.5)


def cka_matrix(features: list, unbiased: bool = False) -> np.ndarray:
    """CKA of every pair in a list of (n, d) representations (e.g. the CLS at every depth)."""
    m = len(features)
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = linear_cka(features[i], features[j], unbiased)
    return out
