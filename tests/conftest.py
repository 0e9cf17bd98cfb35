"""Shared fixtures: the real data in ../shared/data and a tiny, fast experiment config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def quiet_libraries():
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def tiny_overrides(**extra) -> list[str]:
    """A real MiniLM run small enough for a unit test: 400 training rows, 64 test rows, 2 rounds."""
    settings = {
        "data.path": f'"{DATA / "sst2"}"',
        "data.train_size": 400,
        "data.test_size": 64,
        "data.min_partition_size": 5,
        "fl.num_clients": 4,
        "fl.clients_per_round": 2,
        "fl.rounds": 2,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "engine.threads": 1,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]
