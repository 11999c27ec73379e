"""A real two-node Ray cluster on this machine, for the multi-node tests (docs/multinode.md).

Two `ray start` processes trees, each with its own `--temp-dir` (its logs, sockets, object store, runtime-env
downloads), its own `--num-cpus` and a custom resource naming it, joined over TCP with a token
(`RAY_AUTH_MODE=token`, a token file made here). The nodes share no data directory: jobs reach their data
through the moto S3 server (tests/conftest.py `s3_server`), whose credentials and endpoint are in each node's
environment as an instance's would be. Everything talks to the cluster through subprocesses (`ray job submit`,
`serve deploy`, `python -c` for the state API) so the pytest process never joins it.

Teardown kills exactly the processes of this cluster (those whose command line names its temp root or its GCS
address, and their descendants), never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HEAD_CPUS = 1
WORKER_CPUS = 3  # neither is the driver machine's os.cpu_count() (2): per-node sizing must read the node's own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodeCluster:
    """A head (HEAD_CPUS, resource `head_node`) and a worker (WORKER_CPUS, resource `worker_node`)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="trc-", dir="/tmp"))  # short: Ray's socket paths are limited
        token = self.root / "token"
        token.write_text(secrets.token_hex(32))
        self.env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_USAGE_STATS_ENABLED="0",
            TOKENIZERS_PARALLELISM="false",
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        )
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.node_ids: dict[str, str] = {}  # "head" / "worker" -> Ray node id
        self.cpus = {"head": HEAD_CPUS, "worker": WORKER_CPUS}

    # ----- nodes -----
    def _agent_ports(self) -> list[str]:
        return [
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--dashboard-agent-grpc-port",
            str(_free_port()),
            "--metrics-export-port",
            str(_free_port()),
            "--runtime-env-agent-port",
            str(_free_port()),
        ]

    def _ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "ray"), *args]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and out.returncode:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
            )
        return out

    def start_head(self) -> None:
        temp = self.root / "head"
        temp.mkdir()
        self._ray(
            "start",
            "--head",
            "--port",
            str(self.port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--ray-client-server-port",
            str(_free_port()),
            "--num-cpus",
            str(HEAD_CPUS),
            "--resources",
            json.dumps({"head_node": 1}),
            "--object-store-memory",
            str(300 * 2**20),
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
            *self._agent_ports(),
        )

    def start_worker(self) -> None:
        temp = self.root / "worker"
        temp.mkdir(exist_ok=True)
        self._ray(
            "start",
            "--address",
            self.gcs,
            "--num-cpus",
            str(WORKER_CPUS),
            "--resources",
            json.dumps({"worker_node": 1}),
            "--object-store-memory",
            str(300 * 2**20),
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
            *self._agent_ports(),
        )

    def wait_nodes(self, alive: int, timeout: float = 90) -> list[dict[str, Any]]:
        """Wait until `alive` nodes are alive; record which node id is the head's and which the worker's."""
        deadline = time.time() + timeout
        while True:
            nodes = self.query("import ray\nprint(json.dumps(ray.nodes()))")
            live = [n for n in nodes if n["Alive"]]
            if len(live) == alive:
                for n in live:
                    role = "head" if "head_node" in n["Resources"] else "worker"
                    self.node_ids[role] = n["NodeID"]
                return nodes
            if time.time() > deadline:
                raise TimeoutError(f"{len(live)} nodes alive, wanted {alive}")
            time.sleep(1)

    def processes(self, marks: list[str]) -> list[psutil.Process]:
        """Processes whose command line holds one of `marks`, with all their descendants."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.pid != os.getpid() and any(m in cmd for m in marks):
                    found[p.pid] = p
                    found.update({c.pid: c for c in p.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def kill_worker_node(self) -> int:
        """SIGKILL every process of the worker node (its raylet, agents, log monitor and workers): the node is
        lost as a machine is, with no graceful drain. Returns how many processes were killed."""
        procs = self.processes([str(self.root / "worker")])
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def restart_worker(self, timeout: float = 120) -> None:
        """After kill_worker_node: wait until the GCS has marked the lost node dead, then start a new worker node
        (a new node id, the same temp dir and resources) and wait until it has joined."""
        self.wait_nodes(1, timeout)
        self.start_worker()
        self.wait_nodes(2, timeout)

    def stop(self) -> list[int]:
        """Kill this cluster's processes (TERM, then KILL); returns the pids still alive afterwards (none)."""
        marks = [str(self.root), self.gcs, f"--address={self.gcs}"]
        procs = self.processes(marks)
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        left = [p.pid for p in self.processes(marks)]
        shutil.rmtree(self.root, ignore_errors=True)
        return left

    # ----- talking to it -----
    def query(self, code: str, timeout: float = 120) -> Any:
        """Run `code` in a Python process joined to the cluster; it prints one JSON value, returned here."""
        prog = f"import json, ray\nray.init(address={self.gcs!r}, log_to_driver=False)\n{code}\n"
        out = subprocess.run(
            [sys.executable, "-c", prog], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if out.returncode:
            raise RuntimeError(f"query failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def submit(self, entrypoint: list[str], submission_id: str, runtime_env: dict[str, Any] | None = None) -> None:
        """`ray job submit --no-wait` of `python <entrypoint>` with this checkout as the job's working dir (and the
        other `runtime_env` fields given)."""
        runtime_env = {
            "working_dir": str(ROOT),
            "excludes": [".git", ".venv", ".mypy_cache", "benchmarks/results"],
            **(runtime_env or {}),
        }
        self._ray(
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--submission-id",
            submission_id,
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--no-wait",
            "--",
            "python",
            *entrypoint,
        )

    def job_status(self, submission_id: str) -> str:
        """SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING, as `ray job status` prints it."""
        out = self._ray("job", "status", "--address", self.dashboard, submission_id)
        text = out.stdout + out.stderr
        if re.search(r"Job '[^']+' succeeded", text):
            return "SUCCEEDED"
        if re.search(r"Job '[^']+' was stopped", text):
            return "STOPPED"
        if re.search(r"Job '[^']+' failed", text):
            return "FAILED"
        found = re.search(r"Status for job '[^']+': (\w+)", text)
        if found:
            return found.group(1)
        raise RuntimeError(f"no status in {text!r}")

    def wait_job(self, submission_id: str, timeout: float = 240, stop: bool = True) -> str:
        """The job's terminal status. Past `timeout` it is stopped (`ray job stop`) and TimeoutError raised,
        or with stop=False its status (RUNNING or PENDING) returned."""
        deadline = time.time() + timeout
        while (status := self.job_status(submission_id)) in ("RUNNING", "PENDING"):
            if time.time() > deadline:
                if not stop:
                    return status
                self.stop_job(submission_id)
                raise TimeoutError(f"job {submission_id} still {status} after {timeout} s")
            time.sleep(3)
        return status

    def stop_job(self, submission_id: str) -> str:
        """`ray job stop` (it waits for the job to end); returns the status after."""
        self._ray("job", "stop", "--address", self.dashboard, submission_id, check=False, timeout=180)
        return self.job_status(submission_id)

    def job_logs(self, submission_id: str) -> str:
        return self._ray("job", "logs", "--address", self.dashboard, submission_id).stdout

    def run_job(
        self,
        entrypoint: list[str],
        submission_id: str,
        timeout: float = 240,
        runtime_env: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Submit, wait, and return the JSON summary the job printed (the jobs run with --json)."""
        self.submit(entrypoint, submission_id, runtime_env)
        status = self.wait_job(submission_id, timeout)
        logs = self.job_logs(submission_id)
        assert status == "SUCCEEDED", f"job {submission_id} {status}:\n{logs[-4000:]}"
        return job_summary(logs)

    # ----- Serve -----
    def serve(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        """The `serve` CLI against this cluster's dashboard (`serve deploy FILE`, `serve shutdown -y`, ...)."""
        cmd = [str(Path(sys.executable).parent / "serve"), *args, "--address", self.dashboard]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and out.returncode:
            raise RuntimeError(f"serve {args[0]} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        return out

    def serve_status(self) -> dict[str, Any]:
        """`serve status`: {app name: {"status": ..., "deployments": {...}}} (empty when Serve is not running)."""
        out = self.serve("status", check=False)
        if out.returncode:
            return {}
        return (yaml.safe_load(out.stdout) or {}).get("applications") or {}

    def wait_serve_app(self, app: str, timeout: float = 300) -> dict[str, Any]:
        """Wait until `app` is RUNNING (every replica started); raises on DEPLOY_FAILED or past `timeout`."""
        deadline = time.time() + timeout
        while True:
            state = self.serve_status().get(app) or {}
            if state.get("status") == "RUNNING":
                return state
            if state.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"Serve app {app} {state.get('status')}: {state}")
            if time.time() > deadline:
                raise TimeoutError(f"Serve app {app} not running after {timeout} s: {state}")
            time.sleep(3)


def job_summary(logs: str) -> dict[str, Any]:
    """The last JSON object a job printed at the start of a line (its --json summary)."""
    lines = logs.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    value, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))
    return value


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """The running two-node cluster (S3 credentials and endpoint in the nodes' environment); torn down after the
    module even when a test fails, and checked to leave no process behind."""
    cluster = TwoNodeCluster(dict(os.environ))
    try:
        cluster.start_head()
        cluster.start_worker()
        cluster.wait_nodes(2)
        yield cluster
    finally:
        left = cluster.stop()
        assert not left, f"cluster processes still running after teardown: {left}"
