"""Every compatibility rule in one place: which settings go together, and what each strategy supports.

A strategy declares what it supports (``Strategy.supports``: a quantized base, robust aggregators, secure sums,
client-level DP, parallel groups); the rules here read those declarations, never lists of names, and each refuses in
one line that names the problem and the fix. They run as early as their facts are known: the strategy's class before anything loads
(``check``), its layout once it exists (``check_layout``), the model's adapters once injected (``check_adapters``),
and the runtime at the start of a run (``check_embedded``). Rules on the config's own values (a range, r_min <= r_max)
stay in ``config.validate_config``, which runs at load without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from legend.errors import LegendError
from legend.strategies.base import DP, PARALLEL_GROUPS, QUANTIZED_BASE, ROBUST_AGGREGATION, SECURE_SUMS

if TYPE_CHECKING:
    from legend.config import Config
    from legend.models.shared import SharedModel
    from legend.strategies.base import Strategy


def supporting(capability: str) -> str:
    """The registered strategies that declare ``capability``, for an error's fix."""
    from legend.strategies import STRATEGIES

    return ", ".join(sorted(name for name, cls in STRATEGIES.items() if capability in cls.supports))


def check(config: Config, strategy_cls: type[Strategy]) -> None:
    """What the config asks of the strategy's declarations and of itself, before anything is loaded."""
    name = config.strategy.name
    if config.privacy.clip_norm > 0 and DP not in strategy_cls.supports:
        raise LegendError(f"privacy: {name} does not aggregate by averaging, which client-level DP needs: use one of {supporting(DP)}")
    if config.fl.aggregator != "mean" and ROBUST_AGGREGATION not in strategy_cls.supports:
        raise LegendError(
            f"fl.aggregator '{config.fl.aggregator}' combines coordinates, and {name} does not aggregate by "
            f"coordinate means: use one of {supporting(ROBUST_AGGREGATION)}, or fl.aggregator='mean'"
        )
    if config.data.format == "instruct" and config.faults.malicious > 0 and config.faults.attack == "label_flip":
        raise LegendError(
            "faults.attack 'label_flip' flips class ids, and data.format='instruct' trains on answer text: "
            "use faults.attack='sign_flip' or 'scale'"
        )
    if config.fl.aggregator != "mean" and config.privacy.clip_norm > 0:
        raise LegendError(
            "privacy: client-level DP calibrates its noise to the weighted mean: use fl.aggregator='mean' with privacy.clip_norm"
        )
    if config.flower.secure_aggregation:
        _check_secure_sums(config, SECURE_SUMS in strategy_cls.supports)
    if config.fl.min_coverage > 1 and SECURE_SUMS not in strategy_cls.supports:  # the coverage guard (strategies/coverage.py)
        raise LegendError(
            f"fl.min_coverage keeps a coordinate that fewer devices would train at its old value, which only a strategy that "
            f"averages coordinates does, and {name} does not: use one of {supporting(SECURE_SUMS)}, or fl.min_coverage=0"
        )
    if config.devices.activation_cache and config.model.dropout != 0.0:
        raise LegendError(
            "devices.activation_cache: with dropout in the model the frozen blocks' output differs on every pass, so a device "
            "cannot keep it: set model.dropout=0 or devices.activation_cache=false"
        )


def _check_secure_sums(config: Config, sums_suffice: bool) -> None:
    """Secure aggregation hands the server a sum: only what a sum determines can be computed from it."""
    if not sums_suffice:
        raise LegendError(
            f"flower.secure_aggregation gives the server only a sum of updates, and {config.strategy.name} does not aggregate by "
            f"coordinate means: use one of {supporting(SECURE_SUMS)}, or flower.secure_aggregation=false"
        )
    for key, value, why in (
        ("fl.aggregator", config.fl.aggregator != "mean", "a median or trimmed mean needs each update's values"),
        ("fl.max_update_norm", config.fl.max_update_norm > 0, "the server cannot measure one update's norm"),
        ("privacy.clip_norm", config.privacy.clip_norm > 0, "server-side clipping needs each update"),
    ):
        if value:
            raise LegendError(
                f"flower.secure_aggregation hides each update from the server, and {key} needs it ({why}): "
                f"set {key} to its default or flower.secure_aggregation=false"
            )


def check_layout(config: Config, strategy: Strategy, num_blocks: int) -> None:
    """What the config asks of the strategy's global layout, before it is injected into a model of ``num_blocks`` blocks."""
    method = strategy.global_layout().method
    if config.model.quantize != "none" and (QUANTIZED_BASE not in strategy.supports or strategy.lora_init != "default"):
        # QLoRA trains LoRA over frozen quantized weights: nothing may train, initialise from or merge into them
        what = (
            f"trains {method}"
            if method != "lora"
            else "initialises LoRA from the weights' SVD"
            if strategy.lora_init != "default"
            else "merges LoRA into the base weights"
        )
        raise LegendError(
            f"model.quantize '{config.model.quantize}' keeps the base weights frozen in bitsandbytes' form, and {strategy.name} {what}: "
            f"use {supporting(QUANTIZED_BASE)} (lora.init='default'), or model.quantize='none'"
        )
    top = config.lora.top_blocks
    if top > num_blocks:
        raise LegendError(f"lora.top_blocks ({top}) exceeds the model's {num_blocks} blocks: use at most {num_blocks} (0 = every block)")
    if top and method != "lora":
        raise LegendError(f"lora.top_blocks restricts LoRA layouts and {strategy.name} trains {method}: leave lora.top_blocks at 0")
    if strategy.lora_init == "federa" and method != "lora":
        raise LegendError(
            f"lora.init 'federa' initialises LoRA adapters, and this strategy trains '{method}': use a LoRA strategy or lora.init='default'"
        )
    if config.engine.parallel_clients > 1 and PARALLEL_GROUPS not in strategy.supports:
        raise LegendError(
            f"engine.parallel_clients = {config.engine.parallel_clients} trains clients' LoRA adapters side by side, and {strategy.name} "
            f"trains {method}: set engine.parallel_clients = 1"
        )


def check_adapters(strategy: Strategy, model: SharedModel) -> None:
    """The strategy's global layout, injected, must train something of this model."""
    if not model.keys(strategy.global_layout()):
        raise LegendError(
            f"{strategy.name} trains no tensor of this {model.info.model_type} model (bitfit: it has no biases): use a LoRA strategy"
        )


def check_embedded(config: Config) -> None:
    """What only a Flower deployment can do, refused for a run of the embedded engine."""
    if config.flower.secure_aggregation:
        raise LegendError(
            "flower.secure_aggregation runs on a Flower deployment (legend deploy local|app): "
            "set flower.secure_aggregation=false for an embedded run"
        )
