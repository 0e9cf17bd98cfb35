"""Metrics (JSONL) and run summaries."""
