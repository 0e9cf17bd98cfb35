"""Tasks (`tasks`), tokenisation with dynamic padding (`batching`) and partitioning over clients (`partition`).
Nothing is imported here: reading a task does not load the partitioner's plotting libraries."""
