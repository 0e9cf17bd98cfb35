"""The Flower runtime: jobs go to the SuperNode of each client as per-node messages, updates come back.

Aggregation, validation, evaluation and checkpoints stay in the engine: Flower only moves messages.
At start every node is asked what it is (its client id and device class, from its node config), and
the server checks that against the config's fleet.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from legend.config import FlowerConfig
from legend.core import SecureSum, Update
from legend.engine.client import LocalTraining
from legend.engine.runtime import ROUND_TRIP_S, Job
from legend.errors import LegendError
from legend.flower.messages import decode_update, encode_job
from legend.flower.secure import secure_round

log = logging.getLogger(__name__)

POLL_S = 0.2
REJOIN_TIMEOUT_S = 30.0  # how long a round waits for a node that joined mid-run to say what it is
# Node-config keys a SuperNode may set to state its own figures (device profile fields), instead of its class's.
ADVERTISED = {"memory-gb": "memory_gb", "uplink-mbps": "uplink_mbps", "downlink-mbps": "downlink_mbps", "storage-gb": "storage_gb"}


class FlowerRuntime:
    def __init__(self, grid: Grid, cfg: FlowerConfig, context: Context):
        self.grid, self.cfg, self.context = grid, cfg, context
        self.clock = cfg.clock  # round times from the profiles ('virtual') or the nodes' own ('measured')
        self.node_of: dict[int, int] = {}  # client -> Flower node id
        self.asked: set[int] = set()  # every node asked what it is (a silent one is not asked again)
        self.global_shapes: dict[str, tuple[int, ...]] = {}  # what secure aggregation pads every update to
        self._summed: SecureSum | None = None

    def connect(self, exp) -> None:
        """Wait for a SuperNode of every client (at most flower.connect_timeout_s), ask each what it is, check it."""
        num_clients = exp.config.fl.num_clients
        self.global_shapes = exp.model.device_shapes(exp.strategy.global_layout())
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        while len(list(self.grid.get_node_ids())) < num_clients and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.exp = exp
        self._admit(list(self.grid.get_node_ids()), self.cfg.connect_timeout_s, restarted=False)
        if not self.node_of:
            raise LegendError(
                f"no SuperNode answered within flower.connect_timeout_s={self.cfg.connect_timeout_s:g} s: start the SuperNodes, "
                "each with --node-config 'client-id=N device=\"CLASS\"'"
            )
        missing = sorted(set(range(num_clients)) - set(self.node_of))
        if missing:
            log.warning("no SuperNode for clients %s: the run goes on without them", missing)

    def _admit(self, nodes: list[int], timeout_s: float, restarted: bool) -> None:
        """Ask each of ``nodes`` what it is, check it against the fleet, and send its client's jobs to it from now on.
        ``restarted``: a node may take over a client whose earlier node is gone (it restarted under a new node id)."""
        exp, num_clients = self.exp, self.exp.config.fl.num_clients
        self.asked.update(nodes)
        messages = [Message(RecordDict({"ask": ConfigRecord({"what": "advert"})}), node, "query") for node in nodes]
        for reply, _ in self._exchange(messages, timeout_s) if messages else []:
            if isinstance(reply, str):
                log.warning("a SuperNode did not say what it is: %s", reply)
                continue
            advert = dict(reply.content["advert"])
            client, kind = int(advert["client-id"]), str(advert["device"])
            if not 0 <= client < num_clients:
                raise LegendError(
                    f"a SuperNode advertises client-id={client}, outside 0..{num_clients - 1}: fix its --node-config or fl.num_clients"
                )
            if client in self.node_of and not restarted:
                raise LegendError(f"two SuperNodes advertise client-id={client}: give each node its own client-id in --node-config")
            expected = exp.fleet.device_of(client).kind
            if kind != expected:
                raise LegendError(
                    f"the SuperNode of client {client} advertises device '{kind}', the config's fleet binds it to '{expected}': "
                    f'set its --node-config device="{expected}" or change devices.fleet'
                )
            if figures := advertised_figures(advert, client):
                exp.fleet.advertise(client, figures)
            if restarted:
                log.info("client %d is back on node %d", client, reply.metadata.src_node_id)
            self.node_of[client] = reply.metadata.src_node_id

    def start(self, folder, initial, saved) -> None:
        """Nothing to restore: each node keeps its device's own tensors (``flower/apps.py``)."""

    def keep(self, updates: list[Update]) -> None:
        """Nothing to store: a node keeps what its device trained."""

    def state_dict(self) -> dict:
        return {}

    def checkpointed(self) -> None:
        pass

    def reachable(self, clients: list[int]) -> list[int]:
        """The clients whose node is connected now; a node that joined since (a restarted one) is asked what it is first."""
        connected = set(self.grid.get_node_ids())
        if joined := sorted(connected - self.asked):
            self._admit(joined, min(self.cfg.connect_timeout_s, REJOIN_TIMEOUT_S), restarted=True)
        return [c for c in clients if self.node_of.get(c) in connected]

    def summed(self) -> SecureSum | None:
        return self._summed

    def train(self, local: LocalTraining, jobs: list[Job]) -> dict[int, Update | str]:
        """Send each job to its client's node; an update that does not come back within the timeout is lost.
        Under secure aggregation the nodes' updates come back only as their sum (``summed``)."""
        if self.cfg.secure_aggregation:
            scale = float(sum(len(local.partitions[job.plan.client]) for job in jobs))
            outcome, self._summed = (
                secure_round(self.grid, self.context, self.cfg, jobs, self.node_of, scale, self.global_shapes) if jobs else ({}, None)
            )
            return outcome
        messages = [Message(encode_job(job), self.node_of[job.plan.client], "train", group_id=str(job.round_number)) for job in jobs]
        replies = self._exchange(messages, self.cfg.round_timeout_s)
        return {job.plan.client: _update(job.plan.client, *reply) for job, reply in zip(jobs, replies, strict=True)}

    def _exchange(self, messages: list[Message], timeout_s: float) -> list[tuple[Message | str, float]]:
        """Push the messages and collect replies as they arrive: per message, its reply (or why there is none) and its round trip."""
        started = time.monotonic()
        ids = list(self.grid.push_messages(messages))
        pending = set(ids)
        replies: dict[str, tuple[Message | str, float]] = {}
        while pending and time.monotonic() - started < timeout_s:
            for reply in self.grid.pull_messages(list(pending)):
                message_id = reply.metadata.reply_to_message_id
                pending.discard(message_id)
                replies[message_id] = (f"node error: {reply.error.reason}" if reply.has_error() else reply, time.monotonic() - started)
            if pending:
                time.sleep(POLL_S)
        return [replies.get(i, (f"no reply within {timeout_s:g} s (node lost or too slow)", timeout_s)) for i in ids]


def advertised_figures(advert: dict, client: int) -> dict[str, float]:
    """The device figures a node's config states, by profile field (``ADVERTISED``); each must be a positive number."""
    figures = {}
    for key, field in ADVERTISED.items():
        if key in advert:
            try:
                value = float(advert[key])
            except (TypeError, ValueError):
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise LegendError(
                    f"the SuperNode of client {client} advertises {key}={advert[key]!r}: give a positive number in its "
                    f"--node-config, e.g. {key}=4"
                )
            figures[field] = value
    return figures


def _update(client: int, reply: Message | str, round_trip_s: float) -> Update | str:
    """The update in a reply, with the round trip the server saw; or why the reply is unusable."""
    if isinstance(reply, str):
        return reply
    try:
        update = decode_update(reply.content)
    except Exception as exc:  # whatever a node sends, the server survives it
        return f"undecodable reply ({type(exc).__name__}: {exc})"
    if update.client != client:
        return f"the reply is for client {update.client}"
    return replace(update, metrics={**update.metrics, ROUND_TRIP_S: round_trip_s})
