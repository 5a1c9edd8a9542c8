"""Multi-node TA-OPD on one CPU machine: a two-node Ray cluster started with `ray start` (one head, one
node joined with `--address`, each with its own ports, temp folder and logical CPUs/GPUs), the tiny
TA-OPD job submitted with `ray job submit` and the shipped recipes/multinode/runtime_env.yaml, verl's
student pool on one node and its teacher pool on the other (each node declares one logical GPU).

The cluster is always stopped by what this test started (the process sessions of its `ray start`
commands and its own temp folder), never by a machine-wide `ray stop` that would end other Ray users'
sessions. One verl start-up plus three steps: minutes, and about as much memory as a CPU e2e run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from ta_opd_verl.cli.train import (
    _MemoryWatch,
    cpu_environment,
    main_ppo_command,
    tiny_pair_overrides,
)
from ta_opd_verl.cpu import CPU_ENVIRONMENT

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "recipes" / "multinode" / "runtime_env.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
JOB_TIMEOUT = 1500
STEPS, RATIO = 3, 0.05
# The two pools of the CPU config: trainer (actor + student rollout) and teacher, one logical GPU each.
NODE_CPUS, NODE_GPUS = 16, 1
OBJECT_STORE_BYTES = 1536 * 2**20


# Each node's workers get a block of ports below the kernel's ephemeral range (32768-60999 on Linux), so that
# no port handed out by `bind(0)` (our single ports, Ray's own outgoing connections) can fall inside one.
WORKER_PORT_BLOCK = 201
WORKER_PORT_FLOOR, WORKER_PORT_CEILING = 20_000, 32_000


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class PortPlan:
    """Every port of the test cluster, each handed out once: single ports from the ephemeral range, worker
    port blocks from below it. Ray refuses to start a node whose worker range holds one of its other ports
    (it did once in CI when the block started at a random ephemeral port)."""

    def __init__(self) -> None:
        self.taken: set[int] = set()
        self.next_block_start = WORKER_PORT_FLOOR

    def port(self) -> int:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in self.taken:
                self.taken.add(port)
                return port

    def worker_block(self) -> tuple[int, int]:
        start = self.next_block_start
        while start + WORKER_PORT_BLOCK <= WORKER_PORT_CEILING:
            block = range(start, start + WORKER_PORT_BLOCK)
            busy = [port for port in block if port in self.taken or not port_is_free(port)]
            if not busy:
                self.taken.update(block)
                self.next_block_start = block.stop
                return block.start, block.stop - 1
            start = busy[-1] + 1
        raise RuntimeError(
            f"no {WORKER_PORT_BLOCK} consecutive free ports "
            f"between {WORKER_PORT_FLOOR} and {WORKER_PORT_CEILING}"
        )


class LocalRayCluster:
    """Ray nodes started with `ray start --block` on this machine, each in a process session of its own,
    so that `stop` can end exactly their processes (Ray renames its workers, so names cannot be used)."""

    def __init__(self, env: dict[str, str]):
        # Short: Ray's unix sockets live under the temp folder and their paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="taopd-ray-", dir="/tmp"))
        # Ray 2.60 turns token authentication on for a `ray start` head when ~/.ray/auth_token exists, but
        # not for a node joining it: one explicit token for every process of this cluster.
        token = secrets.token_hex(32)
        self.auth_headers = {"Authorization": f"Bearer {token}"}
        self.env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        self.nodes: list[subprocess.Popen] = []
        self.logs: list = []
        self.ports = PortPlan()
        self.gcs_port = self.ports.port()
        self.dashboard_port = self.ports.port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, role_arguments: list[str], num_cpus: int, num_gpus: int) -> None:
        min_worker_port, max_worker_port = self.ports.worker_block()
        command = [
            RAY,
            "start",
            *role_arguments,
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.root / name}",
            "--disable-usage-stats",
            # Two nodes on one host: every port a node opens must differ from the other node's.
            f"--node-manager-port={self.ports.port()}",
            f"--object-manager-port={self.ports.port()}",
            f"--dashboard-agent-listen-port={self.ports.port()}",
            f"--dashboard-agent-grpc-port={self.ports.port()}",
            f"--metrics-export-port={self.ports.port()}",
            f"--runtime-env-agent-port={self.ports.port()}",
            f"--min-worker-port={min_worker_port}",
            f"--max-worker-port={max_worker_port}",
        ]
        log = open(self.root / f"{name}.log", "w")
        self.logs.append(log)
        self.nodes.append(
            subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        )

    def start_head(self, num_cpus: int, num_gpus: int) -> None:
        head = [
            "--head",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.ports.port()}",
        ]
        self._start("head", head, num_cpus, num_gpus)

    def add_node(self, num_cpus: int, num_gpus: int) -> None:
        self._start(f"node{len(self.nodes)}", [f"--address={self.address}"], num_cpus, num_gpus)

    def state(self, resource: str) -> list:
        """Ray's state API (``nodes``, ``actors``, ...) of this cluster, finished entries included."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.dashboard_url, headers=self.auth_headers)
        options = ListApiOptions(detail=True, limit=10_000)
        return client.list(StateResource(resource), options=options, raise_on_missing_output=False)

    def alive_nodes(self) -> list:
        return [node for node in self.state("nodes") if node.state == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.nodes:
                if process.poll() is not None:
                    raise RuntimeError(f"a `ray start` exited with {process.returncode}:\n{self.log_tails()}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except Exception:  # the dashboard is not up yet
                pass
            time.sleep(2)
        raise TimeoutError(f"{count} Ray nodes did not come up within {timeout:.0f}s:\n{self.log_tails()}")

    def log_tails(self) -> str:
        return "\n".join(
            f"{path.name}: {path.read_text()[-1500:]}" for path in sorted(self.root.glob("*.log"))
        )

    def own_processes(self) -> list:
        """Every live process of the sessions our `ray start` commands lead (and their descendants)."""
        import psutil

        sessions = {process.pid for process in self.nodes}
        found = {}
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) in sessions:
                    found[process.pid] = process
            except (ProcessLookupError, psutil.Error):
                continue
        for leader in self.nodes:
            try:
                for child in psutil.Process(leader.pid).children(recursive=True):
                    found[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def stop(self) -> None:
        """SIGTERM to our processes (the `ray start --block` leaders stop their nodes), then SIGKILL."""
        import psutil

        for leader in reversed(self.nodes):
            if leader.poll() is None:
                leader.send_signal(signal.SIGTERM)
        for _ in range(3):
            processes = self.own_processes()
            if not processes:
                break
            for process in processes:
                try:
                    process.terminate()
                except psutil.NoSuchProcess:
                    continue
            _, alive = psutil.wait_procs(processes, timeout=15)
            for process in alive:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    continue
        for leader in self.nodes:
            leader.wait(timeout=30)
        leftover = self.own_processes()
        for log in self.logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        assert not leftover, f"processes of the test cluster still alive: {[p.pid for p in leftover]}"


@pytest.fixture
def two_node_cluster():
    cluster = LocalRayCluster(cpu_environment())
    try:
        cluster.start_head(NODE_CPUS, NODE_GPUS)
        cluster.add_node(NODE_CPUS, NODE_GPUS)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


def job_runtime_env(tmp_path: Path, metrics_path: Path) -> Path:
    """The shipped runtime_env plus what a CPU run needs in every process, and the metrics file."""
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    runtime_env["env_vars"].update(CPU_ENVIRONMENT, VERL_FILE_LOGGER_PATH=str(metrics_path))
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(runtime_env))
    return path


def test_ta_opd_job_runs_on_a_two_node_cluster(two_node_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ta_opd_verl.tiny.build import build_tiny_pair

    cluster = two_node_cluster
    metrics_path = tmp_path / "metrics.jsonl"
    entrypoint = main_ppo_command(
        "ta_opd_cpu",
        [
            *tiny_pair_overrides(build_tiny_pair()),
            # The job joins a running cluster: its resources were declared by `ray start`.
            "ray_kwargs.ray_init.num_cpus=null",
            "ray_kwargs.ray_init.num_gpus=null",
            f"trainer.total_training_steps={STEPS}",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            f"trainer.default_local_dir={tmp_path / 'checkpoints'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            f"distillation.distillation_loss.ta_opd.ratio={RATIO}",
        ],
    )
    submission_id = f"ta-opd-multinode-{os.getpid()}"
    subprocess.run(
        [
            RAY,
            "job",
            "submit",
            f"--address={cluster.dashboard_url}",
            f"--runtime-env={job_runtime_env(tmp_path, metrics_path)}",
            f"--submission-id={submission_id}",
            "--no-wait",
            "--",
            *entrypoint,
        ],
        check=True,
        env=cluster.env,
        timeout=120,
    )
    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers)
    memory = _MemoryWatch()
    started = time.monotonic()
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(submission_id)) not in terminal:
        memory.sample()
        if time.monotonic() - started > JOB_TIMEOUT:
            client.stop_job(submission_id)
            pytest.fail(f"the job did not finish within {JOB_TIMEOUT}s")
        time.sleep(2)
    logs = client.get_job_logs(submission_id)
    print(
        f"two-node TA-OPD job: {status}, {time.monotonic() - started:.0f}s, "
        f"peak memory +{memory.peak_gib:.1f} GiB (the whole machine above its level at submission)"
    )
    assert status == JobStatus.SUCCEEDED, logs[-6000:]

    steps = {entry["step"]: entry["data"] for entry in map(json.loads, metrics_path.read_text().splitlines())}
    assert sorted(steps) == list(range(1, STEPS + 1))
    for step, metrics in steps.items():
        assert metrics["actor/ta_opd/kept_positions"] == math.ceil(
            RATIO * metrics["actor/ta_opd/valid_positions"]
        )
        assert math.isfinite(metrics["actor/distillation/loss"]), step
        assert metrics["training/rollout_actor_probs_pearson_corr"] > 0.99, step

    # The job's actors (trainer workers, teacher server, TransferQueue, ...) ran on both nodes.
    nodes_used = {actor.node_id for actor in cluster.state("actors") if actor.node_id}
    assert len(nodes_used) == 2, f"actors ran on {len(nodes_used)} node(s)"
