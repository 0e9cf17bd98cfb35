"""engine.parallel_clients: several clients trained in one pass give the updates of training them one by one."""

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, tiny_instruct_overrides, tiny_overrides

from legend.config import load_config
from legend.engine import runtime
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.simulation import run_experiment

QUICKSTART = ROOT / "configs" / "quickstart.toml"


def run(out, parallel_clients, overrides):
    summary = run_experiment(load_config(QUICKSTART, overrides + [f"engine.parallel_clients={parallel_clients}"]), out)
    return summary, torch.load(out / CHECKPOINT, weights_only=True)["global_state"]


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.mark.parametrize("strategy, extra", [("fedit", {}), ("legend", {}), ("hetlora", {}), ("fedit", {"train.logit_adjustment": 1})])
def test_four_clients_at_once_give_the_global_adapter_of_one_by_one(tmp_path, strategy, extra):
    """Four clients per round (LEGEND's at their own depths and ranks, HetLoRA's at their ranks with its
    regulariser, FedIT's with each client's own logit offsets), two rounds: every tensor of the global state within
    1e-4, the same bytes and accuracy.

    The bound is float rounding after AdamW, which divides by each gradient's running scale and so enlarges
    rounding differences of small gradients: up to 1e-5 on an AMD EPYC, 2.6e-5 on an Intel Xeon with AMX. The
    same bound as the fault test below, where one client on the wrong labels moves the state by 1e-3."""
    overrides = tiny_overrides(**{"strategy.name": strategy, "fl.clients_per_round": 4, **extra})
    (alone, first), (together, second) = run(tmp_path / "one", 1, overrides), run(tmp_path / "four", 4, overrides)
    assert largest_difference(first, second) < 1e-4
    for key in ("bytes_up", "bytes_down", "virtual_time_s", "final_accuracy", "rounds"):
        assert together[key] == alone[key], key


def test_a_group_of_one_is_exactly_one_by_one(tmp_path, monkeypatch):
    """The stacked pass with a single client computes what sequential training does, bit for bit: what differs
    with four is only float rounding (other matrix shapes, padding to the group's longest row)."""
    together = runtime.local_training_together
    monkeypatch.setattr(
        runtime,
        "local_training_together",
        lambda exp, jobs, owns: [u for j, o in zip(jobs, owns, strict=True) for u in together(exp, [j], [o])],
    )
    overrides = tiny_overrides(
        **{"strategy.name": "legend", "fl.clients_per_round": 4, "devices.activation_cache": "true", "train.split_by_length": "false"}
    )  # whole batches one by one: a group computes each step whole
    assert largest_difference(run(tmp_path / "one", 1, overrides)[1], run(tmp_path / "four", 4, overrides)[1]) == 0.0


def test_clients_that_crash_or_flip_labels_train_alone_and_the_run_is_unchanged(tmp_path):
    overrides = tiny_overrides(
        **{
            "strategy.name": "fedit",
            "fl.num_clients": 6,
            "fl.clients_per_round": 6,
            "faults.crash": 0.2,
            "faults.malicious": 0.5,
            "faults.attack": '"label_flip"',
        }
    )
    (alone, first), (together, second) = run(tmp_path / "one", 1, overrides), run(tmp_path / "four", 4, overrides)
    assert alone["lost_updates"] > 0 and alone["malicious_updates"] > 0  # the draws do hit some devices
    assert (together["lost_updates"], together["malicious_updates"]) == (alone["lost_updates"], alone["malicious_updates"])
    assert largest_difference(first, second) < 1e-4  # rounding of other group sizes; one client on the wrong labels moves it 1e-3


def test_instruction_tuning_of_a_decoder_in_groups(tmp_path, tiny_decoder):
    """The causal-LM objective's per-row losses: response tokens of each client's rows only."""
    overrides = tiny_instruct_overrides(tiny_decoder, **{"strategy.name": "legend", "fl.clients_per_round": 4})
    (alone, first), (together, second) = run(tmp_path / "one", 1, overrides), run(tmp_path / "four", 4, overrides)
    assert largest_difference(first, second) < 1e-5
    assert np.isclose(together["final_loss"], alone["final_loss"], rtol=1e-4)
