"""Flower deployment: `legend deploy local` with real SuperLink and SuperNode processes on loopback.

It must give the embedded engine's result (same config, same seed) and survive a node that dies.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import ROOT, NodesInThisProcess, tiny_overrides

from legend.config import DevicesConfig, load_config
from legend.core import ClientPlan, Update
from legend.devices.capacity import CapacityEstimator
from legend.devices.fleet import build_fleet
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.runtime import Job
from legend.engine.simulation import run_experiment
from legend.errors import LegendError
from legend.lora.layout import AdapterLayout

pytest.importorskip("flwr", reason="the Flower extra is not installed: pip install -e '.[flower]'")
from legend.flower.deploy import marked_processes  # noqa: E402
from legend.flower.messages import decode_job, decode_update, encode_job, encode_update  # noqa: E402
from legend.flower.runtime import advertised_figures  # noqa: E402
from legend.records import MEASURED

QUICKSTART = ROOT / "configs" / "quickstart.toml"
LEGEND = Path(sys.executable).parent / "legend"
THREE_NODES = {"strategy.name": "legend", "data.train_size": 300, "fl.num_clients": 3, "fl.clients_per_round": 3}


def deploy(out, *extra_args, how="local", **extra):
    return subprocess.Popen(
        [str(LEGEND), "deploy", how, str(QUICKSTART), *tiny_overrides(**{**THREE_NODES, **extra}), "--out", str(out), *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def deployment_processes(out):
    """Live processes of the deployment writing to ``out``: every one inherits its own FLWR_HOME, so deployments in
    parallel test workers do not see each other's (a zombie is dead: it only waits for an init that may not reap it)."""
    return marked_processes(f"FLWR_HOME={(out / 'flower' / 'home').resolve()}")


def supernode_of(out, client):
    """The process id of the deployment's SuperNode that runs ``client``."""
    for pid in deployment_processes(out):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")  # the interpreter, then the script
        if any(Path(arg).name == "flower-supernode" for arg in argv[:2]) and f"client-id={client} " in " ".join(argv):
            return pid
    return None


def rows_without_wall_time(out):
    """Every field but this machine's seconds (the round's, and those spent in forward and backward passes)."""
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED} for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded engine's run of the deployments' config (THREE_NODES), run once for every test that compares with it."""
    out = tmp_path_factory.mktemp("embedded")
    run_experiment(load_config(QUICKSTART, tiny_overrides(**THREE_NODES)), out)
    return out


def test_messages_carry_jobs_and_updates_unchanged():
    layout = AdapterLayout("lora", (0, 0, 2, 4, 8, 16), train_head=True)
    plan = ClientPlan(3, layout, {"a": torch.randn(2, 5), "empty": torch.zeros(0, 5)}, 0.003)
    job = decode_job(encode_job(Job(7, plan, 123456789)))
    assert (job.round_number, job.seed, job.plan.client, job.plan.layout, job.plan.lr) == (7, 123456789, 3, layout, 0.003)
    assert all(torch.equal(job.plan.weights[k], plan.weights[k]) for k in plan.weights)
    update = Update(
        3, {"a": torch.randn(2, 5)}, 41, {"train_loss": 0.5, "steps": 2}, kept={"b": torch.randn(4)}, kept_start={"b": torch.zeros(4)}
    )
    back = decode_update(encode_update(update))
    assert (back.client, back.num_samples, back.metrics) == (3, 41, update.metrics) and torch.equal(back.weights["a"], update.weights["a"])
    assert torch.equal(back.kept["b"], update.kept["b"]) and torch.equal(back.kept_start["b"], update.kept_start["b"])


def test_a_node_keeps_its_devices_own_tensors_for_later_rounds_of_the_same_experiment(tmp_path):
    from legend.flower.apps import _keep, _kept_file, _own

    path = _kept_file({"state-dir": str(tmp_path)}, '{"seed": 0}', 3)
    initial = {"b": torch.zeros(2)}
    assert _own(path, 1, initial) is initial
    _keep(path, 1, {"b": torch.ones(2)})
    assert torch.equal(_own(path, 2, initial)["b"], torch.ones(2))
    assert _own(path, 1, initial) is initial  # a new run of the experiment starts from the initial values
    assert _kept_file({"state-dir": str(tmp_path)}, '{"seed": 1}', 3) != path


def test_a_node_that_states_its_memory_and_bandwidth_replaces_its_class_figures_for_itself():
    fleet = build_fleet(DevicesConfig(), 3, 0)
    others = [fleet.device_of(c).profile for c in (0, 2)]
    figures = advertised_figures({"client-id": 1, "device": "jetson-nano", "memory-gb": "0.5", "uplink-mbps": 2}, 1)
    assert figures == {"memory_gb": 0.5, "uplink_mbps": 2.0}
    fleet.advertise(1, figures)
    prior = CapacityEstimator(fleet, noise=0.0, ema=0.5, seed=0).prior(1)  # what LEGEND, HetLoRA and FlexLoRA plan with
    assert (prior.memory_gb, prior.uplink) == (0.5, 2e6 / 8) and fleet.device_of(1).profile.memory_gb == 0.5
    assert [fleet.device_of(c).profile for c in (0, 2)] == others
    with pytest.raises(LegendError, match="advertises memory-gb='lots': give a positive number"):
        advertised_figures({"memory-gb": "lots"}, 1)


def test_deploy_local_gives_the_embedded_result_and_stops_its_processes(tmp_path, embedded):
    """3 real SuperNodes, 2 rounds of LEGEND: the same metrics and adapter as the embedded engine."""
    run = deploy(tmp_path / "flower")
    output, _ = run.communicate(timeout=540)
    assert run.returncode == 0, output
    assert rows_without_wall_time(tmp_path / "flower") == rows_without_wall_time(embedded)
    flower = torch.load(tmp_path / "flower" / CHECKPOINT, weights_only=True)["global_state"]
    same = torch.load(embedded / CHECKPOINT, weights_only=True)["global_state"]
    assert flower.keys() == same.keys()
    assert max((flower[k] - same[k]).abs().max().item() for k in flower) <= 1e-5
    assert deployment_processes(tmp_path / "flower") == set()


def test_secure_aggregation_gives_the_embedded_summary(tmp_path):
    """flower.secure_aggregation: Flower's SecAgg+ between real processes; the server sums masked, quantised updates.

    LEGEND only: its devices send different depths and ranks, the harder case; FedIT's same-shaped updates go
    through the same messages in test_secure_aggregation.py, in one process (a deployment here costs 1-2 minutes).
    The embedded run applies the coverage guard that secure aggregation applies (fl.min_coverage=2)."""
    run = deploy(tmp_path / "secure", **{"flower.secure_aggregation": "true", "fl.min_clients": 2})  # THREE_NODES: LEGEND
    run_experiment(
        load_config(QUICKSTART, tiny_overrides(**THREE_NODES, **{"fl.min_coverage": 2, "fl.min_clients": 2})), tmp_path / "guarded"
    )
    output, _ = run.communicate(timeout=540)
    assert run.returncode == 0, output
    secure, plain = (json.loads((folder / "summary.json").read_text()) for folder in (tmp_path / "secure", tmp_path / "guarded"))
    assert secure.keys() == plain.keys()
    for key in secure.keys() - set(MEASURED):
        assert secure[key] == (pytest.approx(plain[key], abs=1e-5) if isinstance(plain[key], float) else plain[key]), key
    rows = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["secure_aggregation"]["bytes_up"] > row["bytes_up"] for row in rows[1:])  # masked int64 words, padded, with weights
    assert deployment_processes(tmp_path / "secure") == set()


def test_flowers_simulation_runtime_gives_the_embedded_result(tmp_path, embedded):
    """`legend deploy simulation`: the same apps, their SuperNodes virtual (Ray actors); needs the bench extra."""
    pytest.importorskip("ray", reason="Flower's simulation runtime needs Ray: pip install -e '.[bench]'")
    run = deploy(tmp_path / "simulated", how="simulation")
    output, _ = run.communicate(timeout=540)
    assert run.returncode == 0, output
    assert rows_without_wall_time(tmp_path / "simulated") == rows_without_wall_time(embedded)
    assert deployment_processes(tmp_path / "simulated") == set()


def test_a_supernode_killed_during_a_round_is_lost_and_the_run_finishes(tmp_path):
    """On the measured clock, as on real machines."""
    out = tmp_path / "run"
    run = deploy(
        out, **{"flower.round_timeout_s": 60, "flower.clock": "measured"}
    )  # the live nodes answer well within it, even on a busy machine
    node_log = out / "flower" / "supernode-1.log"
    deadline = time.monotonic() + 300
    while not (node_log.is_file() and "Receiving: train message" in node_log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    node = supernode_of(out, 1)
    assert node, "the SuperNode of client 1 is not running"
    os.killpg(node, signal.SIGKILL)  # the node and its ClientApp, as if its machine went down (each SuperNode leads its own session)
    output, _ = run.communicate(timeout=540)
    assert run.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and summary["lost_updates"] >= 1
    assert [entry["client"] for entry in rows[1]["lost"]] == [1]
    assert 1 not in [t["client"] for t in rows[1]["devices"]] and rows[2]["accuracy"] is not None
    measured = rows[1]["devices"][0]  # the measured clock: the node's own training seconds, and the rest of its round trip
    assert measured["compute_s"] > 0 and measured["download_s"] >= 0 and rows[1]["round_time_s"] >= measured["compute_s"]
    assert deployment_processes(out) == set()


def test_a_node_that_restarts_under_a_new_id_takes_its_client_back(tmp_path, server_identity):
    """The runtime against legend's real ClientApp in this process: client 1's node dies, then comes back as another node."""
    from flwr.app import Context, RecordDict

    from legend.engine.simulation import build_experiment
    from legend.flower.runtime import FlowerRuntime

    config = load_config(QUICKSTART, tiny_overrides(**THREE_NODES))
    exp = build_experiment(config)
    node_config = {c: {"client-id": c, "device": exp.fleet.device_of(c).kind, "state-dir": str(tmp_path)} for c in range(3)}
    grid = NodesInThisProcess({100 + c: node_config[c] for c in range(3)}, {"experiment": json.dumps(config.model_dump(mode="json"))})
    runtime = FlowerRuntime(grid, config.flower, Context(1, 0, {}, RecordDict(), {}))
    runtime.connect(exp)
    assert runtime.node_of == {0: 100, 1: 101, 2: 102}
    del grid.contexts[101]  # the SuperLink no longer lists it
    assert runtime.reachable([0, 1, 2]) == [0, 2]
    grid.start_node(201, node_config[1])
    assert runtime.reachable([0, 1, 2]) == [0, 1, 2] and runtime.node_of[1] == 201


def test_deploy_refuses_a_node_count_other_than_the_clients_in_one_line(tmp_path):
    run = deploy(tmp_path, "--nodes", "2")
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 2
    assert output.strip().splitlines()[-1].startswith("error: --nodes 2 but fl.num_clients is 3")
