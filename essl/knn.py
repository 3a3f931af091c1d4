"""Weighted k-nearest-neighbour classification of frozen features.

The classifier of Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(InstDisc, CVPR 2018), Sec. 3.4, which the SSL literature uses as a training-free companion to the linear
probe (Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022, report both):

1. L2-normalise train and test features, so the dot product is the cosine similarity ``s``;
2. take the ``k`` training samples most similar to each test sample;
3. each neighbour votes for its class with weight ``exp(s / T)``;
4. predict the class with the largest summed weight.

Conventions (tested in ``tests/test_knn.py`` against a naive per-sample reference):

- ``k`` larger than the number of training samples is clamped to it (every sample votes).
- Equal class scores resolve to the smallest class index (``torch.argmax`` returns the first maximum).
- Which neighbour wins a tie in *similarity* at the k-th place is up to ``torch.topk``.

Everything runs on the features' device; the test samples are processed in chunks so that the
(chunk, N_train) similarity matrix stays within :data:`SIMILARITY_BUDGET` elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: InstDisc's k and temperature, used by most SSL kNN monitors (k = 200, T = 0.1).
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1

#: Maximum number of elements of one chunk's similarity matrix (2**26 float32 = 256 MiB).
SIMILARITY_BUDGET = 2**26


def _check_inputs(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int,
                  k: int, temperature: float) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (N, D); got train {tuple(train_features.shape)}, "
            f"test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test feature dimensions differ: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if train_labels.numel() and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(f"train_labels must lie in [0, {num_classes}), got "
                         f"[{int(train_labels.min())}, {int(train_labels.max())}]")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int | None = None,
) -> Tensor:
    """Predict test labels with InstDisc's similarity-weighted kNN (Wu et al., CVPR 2018).

    Args:
        train_features: (N, D) features of the labelled "memory bank".
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        test_features: (M, D) features to classify, on the same device as ``train_features``.
        num_classes: number of classes C.
        k: number of neighbours; clamped to N.
        temperature: T in the vote weight ``exp(cos / T)``.
        chunk_size: test samples per chunk; by default as many as fit :data:`SIMILARITY_BUDGET`.

    Returns:
        (M,) int64 predicted labels on the features' device.
    """
    _check_inputs(train_features, train_labels, test_features, num_classes, k, temperature)
    n_train = train_features.shape[0]
    k = min(k, n_train)
    if chunk_size is None:
        chunk_size = max(1, SIMILARITY_BUDGET // n_train)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    train = torch.nn.functional.normalize(train_features.float(), dim=1)  # (N, D)
    test = torch.nn.functional.normalize(test_features.float(), dim=1)  # (M, D)
    labels = train_labels.to(device=train.device, dtype=torch.long)  # (N,)

    predictions = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        # exp(s / T) rescaled per row by exp(-s_max / T): same argmax, no overflow or all-zero underflow.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (m, k), top_sim is sorted descending
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)  # (m, C)
        scores.scatter_add_(1, labels[top_idx], weights)
        predictions.append(scores.argmax(dim=1))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=train.device)
    return torch.cat(predictions)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int | None = None,
) -> float:
    """Fraction of ``test_labels`` that :func:`knn_predict` gets right, in [0, 1]."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(
            f"test_labels must have shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}"
        )
    if test_labels.numel() == 0:
        raise ValueError("kNN accuracy needs at least one test sample")
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k=k,
                       temperature=temperature, chunk_size=chunk_size)
    return (pred == test_labels.to(pred.device)).double().mean().item()


def merge_shards(index: Tensor, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The features and labels of a split put back together from DDP shards, in sample order.

    ``index`` (N,) or (world, n) holds each row's position in the split, ``features`` (..., D) and ``labels`` the
    matching rows (``LightningModule.all_gather`` stacks the ranks first). Lightning's ``DistributedSampler`` pads
    the shards to equal sizes with repeated samples, so rows are de-duplicated by index (the first copy kept) and
    sorted by it: the result is the single-process split, row for row.
    """
    index = index.reshape(-1)
    features = features.reshape(index.shape[0], -1)
    labels = labels.reshape(-1)
    order = torch.sort(index, stable=True).indices  # repeated indices stay in rank order
    index, features, labels = index[order], features[order], labels[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return features[first], labels[first]
