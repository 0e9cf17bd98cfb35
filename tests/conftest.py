"""Shared fixtures: the real data in ../shared/data and a tiny, fast experiment config."""

from __future__ import annotations

import copy
import json
import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core and one more. The Flower deployment tests mostly wait (Flower's 3-second polls,
    a process start per message: a deployment takes ~100 s and ~30 s of CPU), on whichever workers get them, side by
    side (each checks only its own processes); the spare worker trains meanwhile."""
    return len(os.sched_getaffinity(0)) + 1


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


class NodesInThisProcess:
    """The part of Flower's Grid the runtime and SecAgg+ use, delivering each message to legend's real ClientApp in this
    process (each node with its own persistent Context, as a SuperNode keeps it), and keeping every reply the server gets."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict):
        from flwr.app import Context, RecordDict

        self.run_config = run_config
        self.contexts = {node: Context(1, node, config, RecordDict(), run_config) for node, config in node_configs.items()}
        self.replies, self.received = {}, []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from legend.flower.apps import client_app

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink does
            delivered = copy.deepcopy(message)  # a node gets its own copy, as over the wire (SecAgg+ sends one content to all)
            self.replies[message.metadata.message_id] = client_app(delivered, self.contexts[message.metadata.dst_node_id])
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        replies = [self.replies.pop(i) for i in ids if i in self.replies]
        self.received += replies
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def start_node(self, node: int, node_config: dict) -> None:
        from flwr.app import Context, RecordDict

        self.contexts[node] = Context(1, node, node_config, RecordDict(), self.run_config)


@pytest.fixture
def server_identity(monkeypatch):
    """The identity Flower gives a ServerApp's process, which creating a message needs."""
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1 if field == "_run_id" else 0)
