"""Shared fixtures: the real data in ../shared/data and a tiny, fast experiment config."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """SmolLM2-135M cut to its first 3 blocks (real pre-trained weights, its tokenizer and chat template): a decoder
    small enough for unit tests of the causal-LM path."""
    from legend.models.resolve import resolve_model

    source = Path(resolve_model("smollm2-135m"))
    folder = tmp_path_factory.mktemp("tiny-decoder")
    for file in source.iterdir():
        if file.name != "config.json":
            (folder / file.name).symlink_to(file)
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    return folder


def tiny_instruct_overrides(decoder: Path, **extra) -> list[str]:
    """The tiny run as instructions on the tiny decoder (SST-2 answered "negative" / "positive")."""
    return tiny_overrides(**{"model.name": f'"{decoder}"', "data.format": '"instruct"', "data.train_size": 200, "data.test_size": 32, **extra})


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
