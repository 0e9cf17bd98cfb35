"""train.split_by_length: each batch computed as pieces of similar length gives the whole batch's step, with less padding."""

import itertools

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, tiny_instruct_overrides, tiny_overrides

from legend.config import Config, load_config
from legend.engine.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from legend.engine.client import PIECE_OVERHEAD_TOKENS, length_pieces
from legend.engine.simulation import run_experiment
from legend.errors import LegendError

QUICKSTART = ROOT / "configs" / "quickstart.toml"


def cost(lengths, pieces):
    """Padded tokens plus the overhead of each pass: what the cuts minimise."""
    return sum(len(piece) * lengths[piece].max() + PIECE_OVERHEAD_TOKENS for piece in pieces)


def test_pieces_are_the_cheapest_cuts_of_the_sorted_batch():
    """Against every way of cutting the length-sorted rows into consecutive pieces, on random batches."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        lengths = rng.integers(2, 65, size=30)
        rows = rng.choice(30, size=int(rng.integers(1, 9)), replace=False)
        pieces = length_pieces(lengths, rows)
        assert sorted(np.concatenate(pieces).tolist()) == sorted(rows.tolist())
        order = rows[np.argsort(lengths[rows], kind="stable")]
        best = min(
            cost(lengths, np.split(order, cuts)) for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert cost(lengths, pieces) == best


def test_a_batch_is_cut_only_where_the_padding_saved_outweighs_a_pass():
    lengths = np.array([4, 60, 5, 61, 4, 12, 13])
    assert [p.tolist() for p in length_pieces(lengths, np.array([0, 1, 2, 3]))] == [[0, 2], [1, 3]]  # saves 2 x 56 tokens
    same = np.array([6, 5, 4])
    assert length_pieces(lengths, same)[0] is same  # 12 and 13 tokens: no cut pays, the batch stays as drawn


def run(out, overrides):
    summary = run_experiment(load_config(QUICKSTART, overrides), out)
    return summary, torch.load(out / CHECKPOINT, weights_only=True)["global_state"]


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("fedit", {}),
        ("fedit", {"lora.top_blocks": 2, "devices.activation_cache": "true"}),
        ("fedprox", {"fedprox.mu": 10, "train.local_steps": 4}),
        ("fedit", {"train.logit_adjustment": 1}),
    ],
)
def test_pieces_give_the_global_adapter_of_whole_batches_and_cost_less(tmp_path, strategy, extra):
    """Two rounds of random batches of 16, whole or in pieces (FedIT's on its top two blocks from the frozen-prefix cache,
    FedProx's with its extra loss, FedIT's with logit offsets): the global state agrees to float rounding (bounded as in
    test_parallel_clients: AdamW enlarges the rounding of small gradients), while the devices compute fewer padded tokens.
    Strategies that plan from the devices' round times (LEGEND, HetLoRA) may plan otherwise, as the time is less."""
    overrides = tiny_overrides(**{"strategy.name": strategy, "train.batch_size": 16, "train.group_by_length": "false", **extra})
    (whole, first), (split, second) = (
        run(tmp_path / "whole", [*overrides, "train.split_by_length=false"]),
        run(tmp_path / "split", [*overrides, "train.split_by_length=true"]),
    )
    assert largest_difference(first, second) < 1e-4
    assert split["final_accuracy"] == whole["final_accuracy"]
    assert split["bytes_up"] == whole["bytes_up"]
    assert split["virtual_time_s"] < whole["virtual_time_s"]  # the cost model charges the pieces' shapes


def test_a_decoders_pieces_average_over_the_whole_batchs_response_tokens(tmp_path, tiny_decoder):
    """The causal-LM loss is a mean per response token: each piece's sum is divided by the whole batch's count."""
    overrides = tiny_instruct_overrides(tiny_decoder, **{"strategy.name": "fedit", "train.group_by_length": "false"})
    (whole, first), (split, second) = (
        run(tmp_path / "whole", [*overrides, "train.split_by_length=false"]),
        run(tmp_path / "split", [*overrides, "train.split_by_length=true"]),
    )
    assert largest_difference(first, second) < 1e-5
    assert np.isclose(split["final_loss"], whole["final_loss"], rtol=1e-4)


def test_a_run_from_before_pieces_resumes_with_whole_batches(tmp_path):
    """A checkpoint that predates train.split_by_length ran whole batches: it resumes with the key off, not at its default."""
    current = Config().model_dump()
    older = {**current, "train": {k: v for k, v in current["train"].items() if k != "split_by_length"}}
    save_checkpoint(tmp_path, {"config": older, "metrics": []})
    with pytest.raises(LegendError, match=r"different config \(train.split_by_length\)"):
        load_checkpoint(tmp_path, current)
    assert load_checkpoint(tmp_path, Config.model_validate({"train": {"split_by_length": False}}).model_dump())["metrics"] == []
