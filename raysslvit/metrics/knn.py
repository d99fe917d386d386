"""Weighted k-NN classification on frozen features (Wu et al. 2018, as DINO and solo-learn monitor
SSL): cosine similarity, the k nearest train features vote for their class with weight exp(s / T)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of the weighted k-NN vote of `train_f` (n, d) for every row of `test_f` (m, d)."""
    bank = F.normalize(train_f.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(bank))
    hits = 0
    for i in range(0, len(test_f), chunk):
        q = F.normalize(test_f[i:i + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(q), classes, device=q.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        hits += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return hits / len(test_f)
