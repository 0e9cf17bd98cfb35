"""engine.precision = "bfloat16" (or "float16", with loss scaling): the matrix multiplies run in half precision,
parameters and loss stay float32, and a round of training ends near the float32 adapter (tolerance below).
engine.device: the CPU is today's run, exactly."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.client import LocalOptimizer, forward_passes
from legend.engine.simulation import build_experiment, run_experiment

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


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_half_precision_round_ends_near_the_float32_adapter(tmp_path, precision):
    """bfloat16 keeps 8 bits of mantissa, so activations differ by ~0.4%; after 10 AdamW steps the adapter differs by
    a relative L2 norm of 5e-2 at most (measured 1.4e-2), and the evaluation loss by 2e-3 (measured 3.5e-4). float16
    (10 bits, with loss scaling) stays closer."""
    adapters, losses = {}, {}
    for name in ("float32", precision):
        config = load_config(QUICKSTART, tiny_overrides(**ONE_ROUND, **{"engine.precision": name}))
        losses[name] = run_experiment(config, tmp_path / name)["final_loss"]
        adapters[name] = torch.load(tmp_path / name / CHECKPOINT, weights_only=True)["global_state"]
    reference, half = adapters["float32"], adapters[precision]
    difference = (sum(((half[k] - reference[k]) ** 2).sum() for k in reference) / sum((reference[k] ** 2).sum() for k in reference)).sqrt()
    assert 0 < difference <= 5e-2
    assert abs(losses[precision] - losses["float32"]) <= 2e-3


@pytest.mark.parametrize("scaled", [False, True])
def test_float16_loss_scaling_keeps_gradients_float16_would_flush_to_zero(scaled):
    """A float32 loss whose gradient (1e-8) lies below float16's smallest number: the float16 backward of the matrix
    multiply flushes it to zero, unless the loss is scaled first (then unscaled before the step)."""
    weight, x = torch.ones(8, 8, requires_grad=True), torch.ones(4, 8)
    half = SimpleNamespace(device=torch.device("cpu"), compute_dtype=torch.float16, is_head=lambda key: False)
    optimizer = LocalOptimizer({"weight": weight}, 1e-3, SimpleNamespace(max_grad_norm=1.0, weight_decay=0.0, head_lr_ratio=1.0), half)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ((x @ weight).float() * 1e-8).sum()
    (optimizer.scaled(loss) if scaled else loss).backward()
    if scaled:
        optimizer.scaler.unscale_(optimizer.optimizer)
    assert weight.grad.abs().max() == (pytest.approx(4e-8, rel=1e-2) if scaled else 0.0)


def test_engine_device_cpu_gives_the_golden_summary_exactly(tmp_path):
    """Placement on an explicit CPU changes nothing: the tiny LEGEND run's summary as legend has always written it."""
    from tests.test_strategies import GOLDEN, GOLDEN_SETTINGS, assert_matches_golden

    overrides = tiny_overrides(**{"strategy.name": "legend", "engine.device": "cpu", **GOLDEN_SETTINGS})
    summary = run_experiment(load_config(QUICKSTART, overrides), tmp_path)
    assert_matches_golden(summary, GOLDEN["legend"])


def test_auto_precision_is_bfloat16_exactly_where_the_cpu_multiplies_it_natively():
    from legend.models.placement import cpu_has_native_bfloat16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32)
    assert (resolve_precision("float32", cpu), resolve_precision("bfloat16", cpu)) == (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("has_bfloat16", [True, False])
def test_auto_precision_on_a_gpu_is_bfloat16_where_it_has_it_and_float32_where_not(monkeypatch, has_bfloat16):
    """The default never picks float16: it needs loss scaling, and no run measured it as a default. The GPU's answer is
    the only thing replaced (this machine has none)."""
    from legend.models.placement import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: has_bfloat16)
    assert resolve_precision("auto", torch.device("cuda")) == (torch.bfloat16 if has_bfloat16 else torch.float32)


def test_the_default_precision_is_auto_and_a_run_says_what_it_chose(tmp_path):
    from typer.testing import CliRunner

    from legend.cli import app
    from legend.config import Config
    from legend.models.placement import cpu_has_native_bfloat16

    assert Config().engine.precision == "auto"
    overrides = [o for o in tiny_overrides(**{"fl.rounds": 1}) if not o.startswith("engine.precision=")]
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), *overrides, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    chosen = "bfloat16" if cpu_has_native_bfloat16() else "float32"
    assert f"{chosen} matrix multiplies on the cpu" in " ".join(result.output.split())
