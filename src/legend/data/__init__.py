"""Tasks, tokenisation with dynamic padding, and partitioning over clients."""

from legend.data.batching import EncodedSplit, encode, length_buckets
from legend.data.partition import label_histogram, partition_indices
from legend.data.tasks import TASKS, TaskData, load_task, subsample

__all__ = ["TASKS", "EncodedSplit", "TaskData", "encode", "label_histogram", "length_buckets", "load_task", "partition_indices", "subsample"]
