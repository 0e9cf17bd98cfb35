"""`legend deploy local`: a real Flower deployment on loopback (one SuperLink, a SuperNode per client).

Every process it starts runs in its own session and is stopped (SIGTERM, then SIGKILL) when the run
ends, fails or is interrupted. Logs go to OUT/flower/.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from legend.config import Config
from legend.data.tasks import default_data_path
from legend.devices.fleet import build_fleet
from legend.errors import LegendError
from legend.flower.apps import ERROR_FILE
from legend.records import SUMMARY_FILE

CONNECTION = "legend-local"
BIN = Path(sys.executable).parent


def deploy_local(
    config: Config, nodes: int, out: Path, resume: bool = False, echo: Callable[[str], None] = print, simulation: bool = False
) -> dict:
    """Run the experiment through a SuperLink and ``nodes`` SuperNodes on this machine; returns the summary.

    ``simulation``: the SuperNodes are virtual, run by Flower's simulation runtime (Ray) inside the SuperLink's
    machine, each ClientApp in a Ray actor, instead of ``nodes`` flower-supernode processes."""
    if not (BIN / "flower-superlink").exists():
        raise LegendError("Flower is not installed in this environment: pip install 'legend[flower]'")
    if simulation and importlib.util.find_spec("ray") is None:
        raise LegendError("Flower's simulation runtime needs Ray: pip install 'flwr[simulation]==1.41.0' (or legend[bench])")
    if nodes != config.fl.num_clients:
        raise LegendError(
            f"--nodes {nodes} but fl.num_clients is {config.fl.num_clients}: each client runs on its own SuperNode, so make them equal"
        )
    config = _portable(config)
    out = out.resolve()
    work = out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    link_port, *node_ports = _free_ports(nodes + 1)
    # Flower's processes start helpers (flower-superexec, flwr-clientapp) by name: find them beside ours, even without an activated venv
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(work / "home"), "TOKENIZERS_PARALLELISM": "false"}
    _write_connection(work / "home", link_port)
    app = _write_app(work / "app", config, out, resume)
    fleet = build_fleet(config.devices, config.fl.num_clients, config.seed)
    runtime = ["--simulation", "--isolation", "subprocess"] if simulation else []
    with _processes() as start:
        start(
            [
                "flower-superlink",
                "--insecure",
                "--disable-runtime-dependency-installation",
                *runtime,
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
            work / "superlink.log",
            env,
        )
        _wait_for_port(link_port, work / "superlink.log")
        for client, port in enumerate([] if simulation else node_ports):
            node_config = f'client-id={client} device="{fleet.device_of(client).kind}"'
            start(
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(port),
                    "--node-config",
                    node_config,
                ],
                work / f"supernode-{client}.log",
                env,
            )
        federation = ["--federation-config", f"num-supernodes={nodes}"] if simulation else []
        run = start(["flwr", "run", str(app), CONNECTION, "--stream", *federation], work / "serverapp.log", env)
        _follow(run, work / "serverapp.log", echo)
    if (out / ERROR_FILE).is_file():
        raise LegendError((out / ERROR_FILE).read_text().strip())
    if not (out / SUMMARY_FILE).is_file():
        tail = "\n".join((work / "serverapp.log").read_text(errors="replace").splitlines()[-15:])
        raise LegendError(f"the Flower run ended without a summary; the ServerApp's log ({work / 'serverapp.log'}) ends with:\n{tail}")
    return json.loads((out / SUMMARY_FILE).read_text())


def write_app(config: Config, out: Path, resume: bool = False) -> Path:
    """The Flower App of this experiment, for `flwr run APP CONNECTION` against any SuperLink (``out`` is on the SuperLink's host)."""
    out = out.resolve()
    return _write_app(out / "flower" / "app", _portable(config), out, resume)


def _portable(config: Config) -> Config:
    """The config with its data folder made absolute: the Flower processes do not share our working directory."""
    data = config.data
    if data.hub_id:
        return config
    path = Path(data.path) if data.path else default_data_path(data.task)
    return config.model_copy(update={"data": data.model_copy(update={"path": str(path.resolve())})})


@contextlib.contextmanager
def _processes() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start processes in their own sessions; on leaving (normally, on error or Ctrl-C) stop each whole session, then
    every process that inherited this deployment's marker: Flower starts helpers in sessions of their own, and a
    helper whose SuperNode died is nobody's descendant any more."""
    started: list[subprocess.Popen] = []
    marker = f"LEGEND_DEPLOYMENT={uuid.uuid4().hex}"

    def start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
        handle = open(log, "ab")  # noqa: SIM115 (closed with the process below)
        key, value = marker.split("=")
        process = subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]], stdout=handle, stderr=subprocess.STDOUT, env={**env, key: value}, start_new_session=True
        )
        process.log = handle
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            _signal(process.pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + 10
        for process in reversed(started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            _signal(process.pid, signal.SIGKILL, group=True)
            process.wait()
            process.log.close()
        for _ in range(100):  # at most ~10 s: a helper may still be starting one of its own
            marked = marked_processes(marker)
            if not marked:
                break
            for pid in marked:
                _signal(pid, signal.SIGKILL, group=False)
            time.sleep(0.1)


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig) if group else os.kill(pid, sig)


def marked_processes(marker: str) -> set[int]:
    """Live processes whose environment holds ``marker``, a whole NAME=value entry (from /proc; empty where there is none)."""
    needle, found = marker.encode() + b"\0", set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes() and _alive(int(environ.parent.name)):
                found.add(int(environ.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Not a zombie (a zombie keeps its /proc entry until reaped, and cannot be killed again)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _follow(run: subprocess.Popen, log: Path, echo: Callable[[str], None]) -> None:
    """Wait for `flwr run` to finish, echoing the ServerApp's per-round lines as they are logged."""
    seen = 0
    while True:
        done = run.poll() is not None
        lines = log.read_text(errors="replace").splitlines()
        for line in lines[seen:]:
            if " round " in line or "WARNING" in line:
                echo(line.strip())
        seen = len(lines)
        if done:
            return
        time.sleep(0.5)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_port(port: int, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise LegendError(f"the SuperLink did not open port {port} within {timeout_s:g} s: see {log}")


def _write_connection(home: Path, port: int) -> None:
    """The `flwr` CLI's connection to our SuperLink (FLWR_HOME/config.toml)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def _write_app(app: Path, config: Config, out: Path, resume: bool) -> Path:
    """A Flower App whose components are legend's installed apps; the experiment travels in its run config."""
    app.mkdir(parents=True, exist_ok=True)
    experiment = json.dumps(config.model_dump(mode="json"))
    (app / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "legend-run"
version = "1.0.0"
description = "a legend experiment on Flower"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "legend"

[tool.flwr.app.components]
serverapp = "legend.flower.apps:server_app"
clientapp = "legend.flower.apps:client_app"

[tool.flwr.app.config]
experiment = {json.dumps(experiment)}
out = {json.dumps(str(out))}
resume = {"true" if resume else "false"}
""")
    return app
