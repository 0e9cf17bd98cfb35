"""Split the training set over clients: IID, or Dirichlet over labels as Flower Datasets draws it.

The draws reproduce Flower Datasets' IidPartitioner (after a seeded shuffle) and DirichletPartitioner
(min_partition_size=0, self_balancing=False) index for index, so partitions match FlowerTune's and
earlier runs'; tests/test_data.py checks it against flwr_datasets. It is reimplemented rather than
imported because flwr_datasets pulls seaborn and scipy into every process that partitions (~2.5 s
for each Flower ClientApp and CLI run).
"""

from __future__ import annotations

import datasets
import numpy as np

from legend.config import DataConfig
from legend.data.table import column
from legend.errors import LegendError


def partition_indices(train: datasets.Dataset, num_clients: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Row indices of ``train`` held by each client; the same for the same seed.

    Dirichlet: one draw, then clients below min_partition_size are topped up with random rows of the
    largest clients. (Flower's own remedy, redrawing up to 10 times, cannot succeed for small alpha
    over few labels: at alpha 0.1, 2 labels and 20 clients nearly every draw leaves some client
    almost empty.)
    """
    if len(train) < num_clients * cfg.min_partition_size:
        raise LegendError(
            f"data: {len(train)} training rows cannot give {num_clients} clients {cfg.min_partition_size} each; "
            "lower data.min_partition_size or fl.num_clients, or use more data"
        )
    if cfg.partition == "dirichlet" and "label" not in train.column_names:
        raise LegendError(
            "data.partition 'dirichlet' skews the labels over clients, and open instruction data has none: use data.partition='iid'"
        )
    if cfg.partition == "iid":
        parts = iid_shards(len(train), num_clients, seed)
    else:
        parts = dirichlet_over_labels(np.asarray(column(train, "label")), num_clients, cfg.alpha, seed)
    return top_up(parts, cfg.min_partition_size, np.random.default_rng(seed))


def iid_shards(num_rows: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into contiguous shards, the first ``num_rows % num_clients`` one row longer."""
    order = np.random.default_rng(seed).permutation(num_rows)
    size, extra = divmod(num_rows, num_clients)
    starts = [size * i + min(i, extra) for i in range(num_clients + 1)]
    return [order[starts[i] : starts[i + 1]] for i in range(num_clients)]


def dirichlet_over_labels(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Each label's rows split over clients by one Dirichlet(alpha) draw, then each client's rows shuffled."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(np.unique(labels).tolist()):
        rows = np.nonzero(labels == label)[0]
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares) * len(rows)).astype(int)[:-1]
        for part, piece in zip(parts, np.split(rows, cuts)):
            part.extend(piece.tolist())
    for part in parts:
        rng.shuffle(part)
    return [np.asarray(part, dtype=np.int64) for part in parts]


def top_up(parts: list[np.ndarray], minimum: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random rows from the currently largest client to each client below ``minimum``."""
    parts = [p.copy() for p in parts]
    for small in sorted(range(len(parts)), key=lambda i: len(parts[i])):
        while len(parts[small]) < minimum:
            donor = max(range(len(parts)), key=lambda i: len(parts[i]))
            take = min(minimum - len(parts[small]), len(parts[donor]) - minimum)
            chosen = rng.choice(len(parts[donor]), size=take, replace=False)
            parts[small] = np.concatenate([parts[small], parts[donor][chosen]])
            parts[donor] = np.delete(parts[donor], chosen)
    return parts


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_labels: int) -> np.ndarray:
    return np.bincount(labels[indices], minlength=num_labels)
