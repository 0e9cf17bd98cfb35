"""Checkpoints written atomically (temp file, fsync, rename), refused when corrupt or mismatched."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from legend.config import Config, renamed_keys
from legend.core import atomic_write
from legend.errors import LegendError

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(out_dir: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **payload}, buffer)
    atomic_write(out_dir / CHECKPOINT, buffer.getbuffer())  # a view: no second copy of the checkpoint in memory


# Keys added with a default other than how the runs before them behaved: a checkpoint that predates one reads this value.
AS_BEFORE_ADDED = {"train.split_by_length": False}


def read_checkpoint(out_dir: Path, purpose: str) -> dict[str, Any]:
    """The saved run state, its config completed with the defaults of keys added since; ``purpose`` starts each error line."""
    path = out_dir / CHECKPOINT
    if not path.is_file():
        raise LegendError(
            f"{purpose}: no {CHECKPOINT} in {out_dir}: "
            + (
                "run without --resume to start fresh"
                if purpose == "--resume"
                else "give the --out folder of `legend run` or `legend deploy`, or OUT/runs/<strategy>-seed<N> of `legend compare`, once "
                "its first round has finished"
            )
        )
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise LegendError(f"{purpose}: {path} is unreadable ({type(exc).__name__}): delete it to start over") from None
    if payload.get("format") != FORMAT_VERSION:
        raise LegendError(f"{purpose}: {path} has format {payload.get('format')}, this legend reads {FORMAT_VERSION}: start a new run")
    defaults = Config().model_dump()
    for dotted, value in AS_BEFORE_ADDED.items():
        section, key = dotted.split(".")
        defaults[section][key] = value
    return {**payload, "config": _with_defaults(renamed_keys(payload["config"]), defaults)}


def load_checkpoint(out_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The saved run state to resume from; refuses a file that is unreadable or was written by another config."""
    payload = read_checkpoint(out_dir, "--resume")
    differing = _differences(payload["config"], config)
    if differing:
        raise LegendError(
            f"--resume: {out_dir} was run with a different config ({', '.join(differing)}): resume with the same config, or use a new --out"
        )
    return payload


def device_state(saved: dict[str, Any]) -> dict[str, Any]:
    """What the runtime stored of the devices' own tensors. Checkpoints from before the runtime owned them (2026-11-30)
    have FedSA-LoRA's B in the strategy's state: its initial B, and per client a file name or (before client_state/) the tensors."""
    if "devices" in saved:
        return saved["devices"]
    strategy = saved["strategy_state"]
    if "local_b" not in strategy:
        return {"initial": {}, "own": {"memory": {}, "files": {}, "written": 0}}
    own = strategy["local_b"] if "files" in strategy["local_b"] else {"memory": strategy["local_b"], "files": {}, "written": 0}
    return {"initial": strategy["initial_b"], "own": own}


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The saved config with keys it predates (added by a later legend) at their defaults: such a run resumes as it ran."""
    out = dict(saved)
    for key, default in defaults.items():
        if key not in saved:
            out[key] = default
        elif isinstance(saved[key], dict) and isinstance(default, dict):
            out[key] = _with_defaults(saved[key], default)
    return out


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; fl.rounds may grow, so a finished run can be extended."""
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, dotted + ".")
        elif a != b and dotted != "fl.rounds":
            out.append(dotted)
    return out
