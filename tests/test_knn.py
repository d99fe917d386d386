import torch

from raysslvit.metrics.knn import knn_accuracy


def test_knn_finds_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 4
    y = torch.arange(5).repeat(200)
    x = centres[y] + torch.randn(1000, 32, generator=g)
    assert knn_accuracy(x[:800], y[:800], x[800:], y[800:], k=20) > 0.95
    noise = torch.randn(1000, 32, generator=g)
    assert knn_accuracy(noise[:800], y[:800], noise[800:], y[800:], k=20) < 0.4  # chance is 0.2


def test_knn_votes_are_weighted_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    # the one very close neighbour of class 0 outvotes two far ones of class 1
    assert knn_accuracy(bank, labels, torch.tensor([[1.0, 0.05]]), torch.tensor([0]), k=3) == 1.0
    assert knn_accuracy(bank, labels, torch.tensor([[1.0, 0.05]]), torch.tensor([0]), k=3, temperature=100.0) == 0.0
