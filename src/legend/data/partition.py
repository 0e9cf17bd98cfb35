"""Split the training set over clients with Flower Datasets' partitioners (IID or Dirichlet over labels)."""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from legend.config import DataConfig
from legend.data.table import column
from legend.errors import LegendError


def partition_indices(train: datasets.Dataset, num_clients: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Row indices of ``train`` held by each client; the same for the same seed.

    Dirichlet: one draw of Flower's DirichletPartitioner, then clients below min_partition_size are
    topped up with random rows of the largest clients. (Flower's own remedy, redrawing up to 10 times,
    cannot succeed for small alpha over few labels: at alpha 0.1, 2 labels and 20 clients nearly every
    draw leaves some client almost empty.)
    """
    if len(train) < num_clients * cfg.min_partition_size:
        raise LegendError(
            f"data: {len(train)} training rows cannot give {num_clients} clients {cfg.min_partition_size} each; "
            "lower data.min_partition_size or fl.num_clients, or use more data"
        )
    if cfg.partition == "dirichlet" and "label" not in train.column_names:
        raise LegendError("data.partition 'dirichlet' skews the labels over clients, and open instruction data has none: use data.partition='iid'")
    table = train.add_column("row", list(range(len(train))))
    if cfg.partition == "iid":
        # IidPartitioner cuts contiguous shards, so shuffle first with our seed.
        partitioner = IidPartitioner(num_partitions=num_clients)
        table = table.shuffle(seed=seed)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=0,
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = table
    parts = [np.asarray(column(partitioner.load_partition(i), "row"), dtype=np.int64) for i in range(num_clients)]
    return top_up(parts, cfg.min_partition_size, np.random.default_rng(seed))


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
