"""A soak of the Flower deployment: many SuperNodes on this machine, a third killed and some restarted during the run.

It starts `legend deploy local` with one SuperNode per client and, round by round, kills (SIGKILL to the whole process
group: the node and its ClientApp, as if its machine went down) a few nodes at a random moment of the round, until a
third are gone, and restarts every other one a round later with their own command line: they rejoin under a new
node id and take their client back. When the run ends it checks that the run finished, that the lost updates are
counted, that no Flower process is left, and that the summary equals the embedded engine's run in which, round by
round, exactly the clients the deployment could not reach and those whose update it lost are missing. Prints one JSON
line; exit code 1 if a check fails.

    python benchmarks/flower_soak.py configs/quickstart.toml --nodes 40 --out runs/soak40      # docs/reliability.md
    python benchmarks/flower_soak.py configs/quickstart.toml --nodes 6 --rounds 4 --out /tmp/soak   # a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from legend.config import load_config
from legend.engine.runtime import InProcess
from legend.engine.simulation import run_experiment
from legend.records import read_metrics

LEGEND = Path(sys.executable).parent / "legend"


class AsDeployed(InProcess):
    """The embedded engine's devices, missing where the deployment's were: per round, the clients it could not reach
    (no live node) and those whose update it lost."""

    def __init__(self, faults, rows: list[dict]):
        super().__init__(faults)
        self.rows = {row["round"]: row for row in rows}
        self.round = 0

    def reachable(self, clients: list[int]) -> list[int]:
        self.round += 1  # the engine asks once per round, before it samples
        gone = set(self.rows[self.round]["unreachable"])
        return [c for c in clients if c not in gone]

    def train(self, local, jobs):
        lost = {entry["client"]: entry["reason"] for entry in self.rows[self.round]["lost"]}
        trained = super().train(local, [job for job in jobs if job.plan.client not in lost])
        return {job.plan.client: trained.get(job.plan.client, f"lost on Flower: {lost.get(job.plan.client)}") for job in jobs}


def flower_processes() -> list[str]:
    """Live Flower processes (zombies are dead)."""
    table = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=False).stdout.splitlines()
    return [line for line in table if re.search("flower-super|flwr-", line) and line.split()[1][0] != "Z"]


def node_pid(client: int) -> int | None:
    found = subprocess.run(
        ["pgrep", "-f", f"flower-supernode .*client-id={client} device"], capture_output=True, text=True, check=False
    ).stdout.split()
    return int(found[0]) if found else None


def launch_line(pid: int) -> tuple[list[str], dict[str, str]]:
    """A running process's command line and environment, to start it again."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    return [a.decode() for a in args], {k.decode(): v.decode() for k, v in env.items()}


def rounds_done(out: Path) -> int:
    """Rounds finished so far; -1 before the evaluation of round 0 is written (the nodes may not be up yet)."""
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else -1


def soak(config_path: str, overrides: list[str], nodes: int, out: Path, seed: int, timeout_s: float) -> dict:
    rng = np.random.default_rng(seed)
    config = load_config(config_path, overrides)
    rounds = config.fl.rounds
    to_kill = nodes // 3
    kill_rounds = list(range(1, max(rounds - 1, 2)))  # leave the last round for the restarted nodes
    victims = dict(zip(kill_rounds, np.array_split(rng.permutation(nodes)[:to_kill], len(kill_rounds)), strict=True))
    deploy = subprocess.Popen(
        [str(LEGEND), "deploy", "local", config_path, *overrides, "--nodes", str(nodes), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    restarted: list[subprocess.Popen] = []
    killed, back, pending = (
        [],
        {},
        {},
    )  # back: client -> the round it was restarted in; pending: client -> (round, command line, environment)
    started = time.monotonic()
    try:
        for round_number in range(1, rounds):
            while rounds_done(out) < round_number - 1 and deploy.poll() is None and time.monotonic() - started < timeout_s:
                time.sleep(0.5)
            for client, (due, args, env) in list(pending.items()):
                if due <= round_number:
                    del pending[client]
                    log = open(out / "flower" / f"supernode-{client}-restarted.log", "w")  # noqa: SIM115 (closed with the process)
                    restarted.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                    back[client] = round_number
            time.sleep(float(rng.uniform(1.0, 8.0)))  # somewhere in the round: before, during or after the nodes' training
            for client in victims.get(round_number, np.array([], dtype=int)).tolist():
                pid = node_pid(client)
                if pid is None:
                    continue
                args, env = launch_line(pid)
                os.killpg(pid, signal.SIGKILL)
                killed.append(client)
                if len(killed) % 2:  # every other one comes back a round later
                    pending[client] = (round_number + 1, args, env)
        output, _ = deploy.communicate(timeout=max(timeout_s - (time.monotonic() - started), 1))
    finally:
        if deploy.poll() is None:
            deploy.kill()
        for process in restarted:  # ours to stop: the deployment stops only the processes it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        time.sleep(2)
        for process in restarted:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    left = flower_processes()
    rows = read_metrics(out) if (out / "metrics.jsonl").is_file() else []
    result = {
        "nodes": nodes,
        "killed": sorted(killed),
        "restarted": sorted(back),
        "exit_code": deploy.returncode,
        "rounds": rounds_done(out),
        "processes_left": len(left),
        "deploy_s": round(time.monotonic() - started, 1),
    }
    if deploy.returncode != 0 or not rows:
        return {**result, "ok": False, "deploy_output": output[-2000:]}
    summary = json.loads((out / "summary.json").read_text())
    embedded = run_experiment(config, out / "embedded", runtime=AsDeployed(config.faults, rows))
    differ = {key: (summary[key], embedded[key]) for key in summary if key != "wall_s" and not _close(summary[key], embedded[key])}
    trained_again = sorted(
        c for c, since in back.items() if any(c in [t["client"] for t in row["devices"]] for row in rows if row["round"] >= since)
    )
    result.update(
        lost_updates=summary["lost_updates"],
        unreachable_client_rounds=sum(len(r["unreachable"]) for r in rows[1:]),
        restarted_clients_trained_again=trained_again,
        final_accuracy=summary["final_accuracy"],
        summary_differs_from_embedded=differ,
    )
    result["ok"] = not differ and not left and summary["rounds"] == rounds and summary["lost_updates"] > 0
    return result


def _close(a, b) -> bool:
    return abs(a - b) <= 1e-5 if isinstance(a, float) and isinstance(b, float) else a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="draws which nodes die and when")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    per_round = max(args.nodes // 5, 2)
    overrides = [
        f"fl.num_clients={args.nodes}",
        f"fl.clients_per_round={per_round}",
        f"fl.rounds={args.rounds}",
        "eval.every=1",
        "flower.round_timeout_s=120",
        "engine.threads=1",
        *args.overrides,
    ]
    result = soak(args.config, overrides, args.nodes, args.out.resolve(), args.seed, args.timeout_s)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
