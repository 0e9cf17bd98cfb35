"""Split the training set over clients with Flower Datasets' partitioners (IID or Dirichlet over labels)."""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from legend.config import DataConfig
from legend.errors import LegendError


def partition_indices(train: datasets.Dataset, num_clients: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Row indices of ``train`` held by each client; the same for the same seed."""
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
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        parts = [np.asarray(list(partitioner.load_partition(i)["row"]), dtype=np.int64) for i in range(num_clients)]
    except ValueError as exc:
        raise LegendError(
            f"data: cannot give {num_clients} clients at least {cfg.min_partition_size} examples each ({exc}); "
            "lower data.min_partition_size or fl.num_clients, or raise data.alpha"
        ) from None
    if min(len(p) for p in parts) == 0:
        raise LegendError(f"data: a client got no examples with {len(train)} rows over {num_clients} clients; use fewer clients or more data")
    return parts


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_labels: int) -> np.ndarray:
    return np.bincount(labels[indices], minlength=num_labels)
