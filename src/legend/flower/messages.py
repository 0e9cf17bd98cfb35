"""The job and the update as Flower messages: tensors in an ArrayRecord, the rest as one JSON string."""

from __future__ import annotations

import json
from dataclasses import asdict

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from legend.core import ClientPlan, State, Update
from legend.engine.runtime import Job
from legend.lora.layout import AdapterLayout


def _arrays(state: State) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={key: tensor.detach().contiguous() for key, tensor in state.items()})


def _meta(content: RecordDict) -> dict:
    return json.loads(content["meta"]["json"])


def job_meta(job: Job) -> dict:
    """Everything of a job but its tensors, as JSON-ready data."""
    plan = job.plan
    return {"round": job.round_number, "seed": job.seed, "client": plan.client, "lr": plan.lr, "layout": asdict(plan.layout)}


def job_from_meta(meta: dict, weights: State) -> Job:
    layout = meta["layout"]
    layout = AdapterLayout(
        layout["method"],
        tuple(layout["rank_by_block"]),
        tuple(layout["train_factors"]),
        layout["train_head"],
        tuple(layout["skipped_blocks"]),
    )
    return Job(meta["round"], ClientPlan(meta["client"], layout, weights, meta["lr"]), meta["seed"])


def encode_job(job: Job) -> RecordDict:
    return RecordDict({"weights": _arrays(job.plan.weights), "meta": ConfigRecord({"json": json.dumps(job_meta(job))})})


def decode_job(content: RecordDict) -> Job:
    return job_from_meta(_meta(content), content["weights"].to_torch_state_dict())


def encode_update(update: Update) -> RecordDict:
    meta = {"client": update.client, "num_samples": update.num_samples, "metrics": update.metrics}
    return RecordDict(
        {
            "weights": _arrays(update.weights),
            "kept": _arrays(update.kept),
            "kept_start": _arrays(update.kept_start),
            "meta": ConfigRecord({"json": json.dumps(meta)}),
        }
    )


def decode_update(content: RecordDict) -> Update:
    meta = _meta(content)
    return Update(
        meta["client"],
        content["weights"].to_torch_state_dict(),
        meta["num_samples"],
        meta["metrics"],
        content["kept"].to_torch_state_dict(),
        content["kept_start"].to_torch_state_dict(),
    )
