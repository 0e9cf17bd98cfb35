"""legend's Flower apps. The ServerApp runs the engine's round loop with Flower nodes as the devices;
the ClientApp trains each job exactly as the embedded engine does (``local_training``).

Both read the experiment from the run config (``experiment``: the validated config as JSON), so the
server and every node build the same model, data split and strategy from the same seed. Flower starts
a process per message: what only training needs (torch, the model) is imported when a job arrives.

A node keeps its device's own tensors (``DeviceSide.kept``, FedSA-LoRA's B) on the node, in a file
under its ``state-dir`` node config (default: the system's temporary folder), with the round that
trained them; a job of a later round of the same experiment starts from them, any other from the
initial values. Unlike the embedded engine, a node keeps what it trained even when the server drops
or rejects its update (the server cannot take it back from a real device).

With ``devices.activation_cache`` a node also keeps its examples' frozen-prefix states (float16) in a file
beside them, within its device's ``storage_gb`` (or its ``storage-gb`` node config), and trains from them:
its measured round times show what keeping them saves.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp

from legend.config import validate_config
from legend.errors import LegendError
from legend.quiet import quiet_libraries

ERROR_FILE = "error.txt"  # where the ServerApp leaves a user error for `legend deploy` to print


def _secure(content: RecordDict) -> bool:
    """A message of Flower's SecAgg+ protocol (flower.secure_aggregation): it carries the protocol's config record."""
    return RECORD_KEY_CONFIGS in content.config_records


def recode_masked(message: Message, dtype) -> Message:
    """A SecAgg+ reply with its masked vectors in ``dtype`` words (every other message untouched). SecAgg+ masks in int64
    words modulo 2^32 (flower/secure.py's MODULUS): a node sends them as uint32, half the bytes, and the server widens them
    back to int64 before it adds them (their sum would overflow 32 bits)."""
    configs = None if message.has_error() else message.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.MASKED_PARAMETERS in configs:
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b).astype(dtype)) for b in configs[Key.MASKED_PARAMETERS]]
    return message


def secure_when_asked(msg: Message, context: Context, call_next):
    """ClientApp mod: Flower's ``secaggplus_mod`` for the messages of its protocol, its masked vectors sent in 32-bit words;
    every other message passes untouched."""
    if _secure(msg.content):
        return recode_masked(secaggplus_mod(msg, context, call_next), np.uint32)
    return call_next(msg, context)


server_app = ServerApp()
client_app = ClientApp(mods=[secure_when_asked])
_experiments: dict[str, object] = {}  # a node process builds its experiment once
_initial_kept: dict[str, dict] = {}  # and reads the initial values of what its device keeps before it trains


def _experiment(run_config):
    """The experiment of this run (built once per process)."""
    text = str(run_config["experiment"])
    if text not in _experiments:
        quiet_libraries()
        from legend.engine.simulation import build_experiment

        exp = build_experiment(validate_config(json.loads(text)))
        layout = exp.strategy.global_layout()
        kept = exp.kept_keys(layout)
        _initial_kept[text] = {key: value for key, value in exp.model.read(layout).items() if key in kept}
        _experiments[text] = exp
    return _experiments[text]


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from legend.engine.simulation import run_experiment
    from legend.flower.runtime import FlowerRuntime

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    out = Path(str(context.run_config["out"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / ERROR_FILE).unlink(missing_ok=True)
    try:
        exp = _experiment(context.run_config)
        runtime = FlowerRuntime(grid, exp.config.flower, context)
        runtime.connect(exp)
        summary = run_experiment(
            exp.config,
            out,
            resume=bool(context.run_config["resume"]),
            experiment=exp,
            runtime=runtime,
            on_round=lambda row: logging.info("round %d accuracy %s", row["round"], row["accuracy"]),
        )
        logging.info("summary: %s", json.dumps(summary))
    except LegendError as exc:
        (out / ERROR_FILE).write_text(f"{exc}\n")
        raise


@client_app.query()
def advertise(msg: Message, context: Context) -> Message:
    """What this node is: its node config (client-id, device class). Cheap: no model, no torch."""
    return Message(RecordDict({"advert": ConfigRecord(_node(context))}), reply_to=msg)


def _node(context: Context) -> dict:
    """This node's client id and device class: from its --node-config, or, for a virtual node of Flower's
    simulation runtime, its partition id and the device the config's fleet binds that client to."""
    node = dict(context.node_config)
    if "client-id" not in node and "partition-id" in node:
        from legend.devices.fleet import build_fleet

        config = validate_config(json.loads(str(context.run_config["experiment"])))
        client = int(node["partition-id"])
        node.update({"client-id": client, "device": build_fleet(config.devices, config.fl.num_clients, config.seed).device_of(client).kind})
    missing = [key for key in ("client-id", "device") if key not in node]
    if missing:
        raise LegendError(f"this SuperNode's --node-config lacks {missing}: start it with --node-config 'client-id=N device=\"CLASS\"'")
    return node


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the job on this node's own data partition and send the update back."""
    from legend.engine.runtime import local_training
    from legend.flower.messages import decode_job, encode_update
    from legend.flower.secure import read_job, summand

    secure = _secure(msg.content)  # SecAgg+: the job came as FitIns, the update leaves only masked (flower/secure.py)
    job, weight_scale, shapes = read_job(msg.content) if secure else (decode_job(msg.content), 0.0, {})
    node = _node(context)
    client = int(node["client-id"])
    if job.plan.client != client:
        raise LegendError(f"this node is client {client}, the job is for client {job.plan.client}")
    exp = _experiment(context.run_config)
    path = _kept_file(node, str(context.run_config["experiment"]), client)
    _keep_activations(exp, node, path.with_suffix(".prefix"), client)
    update = local_training(exp.local(), job, _own(path, job.round_number, _initial_kept[str(context.run_config["experiment"])]))
    if update.kept:
        _keep(path, job.round_number, update.kept)
    if exp.prefix is not None:
        exp.prefix.save()
    if secure:
        flower = exp.config.flower
        return Message(summand(update, shapes, weight_scale, exp.config.fl.wire_dtype, flower.secure_clip, job.seed), reply_to=msg)
    return Message(encode_update(update), reply_to=msg)


def _keep_activations(exp, node: dict, path: Path, client: int) -> None:
    """devices.activation_cache: the node keeps its frozen-prefix states in ``path`` (bounded by its storage) and trains from
    them (without dropout in the blocks they skip), whatever the engine's reuse rule (``prefix_cache.training_reuse``) says."""
    if not exp.config.devices.activation_cache or exp.prefix is None or exp.prefix.index is not None:
        return
    storage_gb = float(node.get("storage-gb", exp.fleet.device_of(client).profile.storage_gb))
    exp.prefix.keep_on_disk(path, int(storage_gb * 1e9))
    exp.prefix.trains = True  # model.dropout is 0: build_experiment refuses the cache otherwise


def _kept_file(node: dict, experiment: str, client: int) -> Path:
    """Where this node keeps its device's own tensors for this experiment."""
    folder = Path(str(node.get("state-dir", Path(tempfile.gettempdir()) / "legend-node-state")))
    return folder / f"{hashlib.sha256(experiment.encode()).hexdigest()[:16]}-client-{client}.pt"


def _own(path: Path, round_number: int, initial: dict) -> dict:
    """The tensors the device kept from an earlier round of this experiment, else their initial values."""
    import torch

    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["round"] < round_number:
            return saved["kept"]
    return initial


def _keep(path: Path, round_number: int, kept: dict) -> None:
    import torch

    from legend.core import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"round": round_number, "kept": kept}, buffer)
    atomic_write(path, buffer.getbuffer())
