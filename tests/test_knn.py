"""essl.knn against a naive per-sample reference of InstDisc's weighted kNN (Wu et al., CVPR 2018)."""

import math

import pytest
import torch

from essl.knn import knn_accuracy, knn_predict, merge_shards


def naive_knn(train, train_labels, test, num_classes, k, temperature):
    """One test sample at a time, in plain Python floats: cosine, top-k, exp(s/T) votes, first max."""
    train_rows = [[float(v) for v in row] for row in train]
    labels = [int(y) for y in train_labels]
    preds = []
    for row in test:
        q = [float(v) for v in row]
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for i, t in enumerate(train_rows):
            tn = math.sqrt(sum(v * v for v in t))
            sims.append((sum(a * b for a, b in zip(q, t, strict=True)) / (qn * tn), i))
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * num_classes
        for s, i in sims[:k]:
            scores[labels[i]] += math.exp(s / temperature)
        best = max(scores)
        preds.append(scores.index(best))  # first maximum: ties go to the smallest class index
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 5, 40, 200])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_matches_naive_reference(k, temperature):
    g = torch.Generator().manual_seed(k)
    num_classes = 4
    # class counts 3/5/7/25: k = 5, 40, 200 exceed some or all of them (and 200 > N = 40 clamps)
    train_labels = torch.tensor([0] * 3 + [1] * 5 + [2] * 7 + [3] * 25)
    centres = torch.randn(num_classes, 6, generator=g)
    train = centres[train_labels] + 0.8 * torch.randn(len(train_labels), 6, generator=g)
    test = centres[torch.randint(num_classes, (23,), generator=g)] + 0.8 * torch.randn(23, 6, generator=g)
    expected = naive_knn(train, train_labels, test, num_classes, k, temperature)
    got = knn_predict(train, train_labels, test, num_classes, k=k, temperature=temperature)
    assert got.dtype == torch.long
    assert torch.equal(got, expected)


def test_k_larger_than_train_set_is_clamped():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(10, 3, generator=g), torch.randn(7, 3, generator=g)
    labels = torch.randint(3, (10,), generator=g)
    assert torch.equal(knn_predict(train, labels, test, 3, k=1000), knn_predict(train, labels, test, 3, k=10))


def test_equal_class_scores_go_to_smallest_class():
    train = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # two identical directions, classes 2 and 1
    labels = torch.tensor([2, 1, 0])
    test = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    pred = knn_predict(train, labels, test, num_classes=3, k=2)
    assert pred.tolist() == [1, 0]
    assert torch.equal(pred, naive_knn(train, labels, test, 3, 2, 0.1))


def test_weights_favour_close_neighbours_over_many_far_ones():
    # one neighbour at cos 1 outweighs two at cos 0.6 with T = 0.1 (e^10 > 2 e^6), but not with T = 10
    c = 0.6
    train = torch.tensor([[1.0, 0.0], [c, math.sqrt(1 - c * c)], [c, -math.sqrt(1 - c * c)]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, test, 2, k=3, temperature=0.1).item() == 0
    assert knn_predict(train, labels, test, 2, k=3, temperature=10.0).item() == 1


def test_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(50, 8, generator=g), torch.randn(31, 8, generator=g)
    labels = torch.randint(5, (50,), generator=g)
    full = knn_predict(train, labels, test, 5, k=7)
    for chunk in (1, 4, 30, 31, 1000):
        assert torch.equal(knn_predict(train, labels, test, 5, k=7, chunk_size=chunk), full)


def test_tiny_temperature_does_not_underflow():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(30, 4, generator=g), torch.randn(9, 4, generator=g)
    labels = torch.randint(3, (30,), generator=g)
    # as T -> 0 the weighted vote becomes 1-NN
    assert torch.equal(knn_predict(train, labels, test, 3, k=30, temperature=1e-6),
                       knn_predict(train, labels, test, 3, k=1))


def test_accuracy():
    train = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    test = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.3, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 2, 1]), 3, k=1) == pytest.approx(0.75)
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 2, 0]), 3, k=1) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"num_classes": 2}, "train_labels must lie"),
        ({"test": torch.zeros(2, 5)}, "dimensions differ"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"train": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 2]), "test": torch.randn(2, 3),
            "num_classes": 3}
    args.update(kwargs)
    train, labels, test, num_classes = (args.pop(n) for n in ("train", "labels", "test", "num_classes"))
    with pytest.raises(ValueError, match=match):
        knn_predict(train, labels, test, num_classes, **args)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 2), (3, 4)])
def test_merge_shards_gives_back_the_single_process_split(n, world):
    """Shards as essl's ShardSampler deals them (rank r: r, r + W, ..., padded by wrapping to equal lengths) and
    all_gather stacks them: de-duplicated and in sample order, they are the split itself."""
    from essl.data.module import ShardSampler

    g = torch.Generator().manual_seed(n)
    feats, labels = torch.randn(n, 4, generator=g), torch.randint(3, (n,), generator=g)
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and set().union(*map(set, shards)) == set(range(n))
    index = torch.tensor(shards)  # (world, per rank), as LightningModule.all_gather returns
    got_x, got_y = merge_shards(index, feats[index], labels[index])
    assert torch.equal(got_x, feats) and torch.equal(got_y, labels)
    assert knn_accuracy(got_x, got_y, got_x, got_y, 3, k=2) == knn_accuracy(feats, labels, feats, labels, 3, k=2)


def test_knn_monitor_interval(tmp_path):
    """eval.knn_every_n_epochs: the monitor runs every n-th epoch (Lightning's check_val_every_n_epoch)."""
    import csv
    from pathlib import Path

    from essl.cli import main

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    assert main(["pretrain", str(root / "configs/digits/simclr.yaml"), f"output_dir={run}", "trainer.max_epochs=4",
                 "trainer.limit_train_batches=1", "data.batch_size=16", "progress=false", "backbone.kwargs.width=4",
                 "method.kwargs.hidden_dim=16", "eval.knn_monitor=true", "eval.knn_every_n_epochs=2",
                 "eval.knn_k=5"]) == 0
    with open(run / "metrics.csv") as fh:
        epochs = [int(r["epoch"]) for r in csv.DictReader(fh) if r.get("val/knn_acc")]
    assert epochs == [1, 3]
