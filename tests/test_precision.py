"""engine.precision = "bfloat16": the matrix multiplies run in bfloat16, parameters and loss stay float32, and a
round of training ends near the float32 adapter (tolerance below). engine.device: the CPU is today's run, exactly."""

import numpy as np
import torch

from legend.config import load_config
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.client import forward_passes
from legend.engine.simulation import build_experiment, run_experiment
from tests.conftest import ROOT, tiny_overrides

QUICKSTART = ROOT / "configs" / "quickstart.toml"
ONE_ROUND = {"strategy.name": "legend", "fl.rounds": 1, "train.local_steps": 10}


def forward(exp, rows):
    """The classifier's output (logits and loss) on these training rows, as local training computes it."""
    with forward_passes(exp.model, rows):
        return exp.model.module(**exp.train.batch(rows))


def test_bfloat16_runs_the_matrix_multiplies_in_bfloat16_and_keeps_the_loss_and_parameters_float32():
    exp = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"engine.precision": "bfloat16"})))
    out = forward(exp, np.arange(4))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in exp.model.params.values())
    plain = build_experiment(load_config(QUICKSTART, tiny_overrides()))
    assert forward(plain, np.arange(4)).logits.dtype == torch.float32


def test_a_bfloat16_round_ends_near_the_float32_adapter(tmp_path):
    """bfloat16 keeps 8 bits of mantissa, so activations differ by ~0.4%; after 10 AdamW steps the adapter differs by
    a relative L2 norm of 5e-2 at most (measured 1.4e-2), and the evaluation loss by 2e-3 (measured 3.5e-4)."""
    adapters, losses = {}, {}
    for precision in ("float32", "bfloat16"):
        config = load_config(QUICKSTART, tiny_overrides(**ONE_ROUND, **{"engine.precision": precision}))
        losses[precision] = run_experiment(config, tmp_path / precision)["final_loss"]
        adapters[precision] = torch.load(tmp_path / precision / CHECKPOINT, weights_only=True)["global_state"]
    reference, half = adapters["float32"], adapters["bfloat16"]
    difference = (sum(((half[k] - reference[k]) ** 2).sum() for k in reference) / sum((reference[k] ** 2).sum() for k in reference)).sqrt()
    assert 0 < difference <= 5e-2
    assert abs(losses["bfloat16"] - losses["float32"]) <= 2e-3


def test_engine_device_cpu_gives_the_golden_summary_exactly(tmp_path):
    """Placement on an explicit CPU changes nothing: the tiny LEGEND run's summary as legend has always written it."""
    from tests.test_strategies import GOLDEN, assert_matches_golden

    summary = run_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "legend", "engine.device": "cpu"})), tmp_path)
    assert_matches_golden(summary, GOLDEN["legend"])


def test_auto_precision_is_bfloat16_exactly_where_the_cpu_multiplies_it_natively():
    from legend.models.placement import cpu_has_native_bfloat16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32)
    assert (resolve_precision("float32", cpu), resolve_precision("bfloat16", cpu)) == (torch.float32, torch.bfloat16)
