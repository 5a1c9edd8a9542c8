"""`ta_opd_verl.cli.train.supervise`: the child (verl, in real use) must not outlive a supervisor that is
stopped with SIGTERM or Ctrl-C, and the per-step progress line reads verl's metrics file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ta_opd_verl.cli.train import LOG_FILE, StartupPhases, failure_reason, keep_file_logger, supervise
from ta_opd_verl.cli.train import main as train_main
from ta_opd_verl.compare.plan import comparison_plan

# Stands in for verl: writes its pid, then one metrics line, then sleeps until stopped.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    Path("child.pid").write_text(str(os.getpid()))
    with open("metrics.jsonl", "w") as metrics:
        metrics.write(json.dumps({"step": 1, "data": {"val-core/tiny/acc/mean@1": 0.25}}) + "\\n")
    time.sleep(600)
    """
)

SUPERVISOR = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ta_opd_verl.cli.train import supervise
    out = Path(sys.argv[1])
    supervise([sys.executable, "-c", sys.argv[2]], out, dict(os.environ), timeout=None, progress=True)
    """
)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose: it holds no resources but its exit status.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(") ")[-1][0] != "Z"


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f}s"
        time.sleep(0.1)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_stopping_the_supervisor_stops_its_child(tmp_path, stop_signal):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path), CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A background job of a non-interactive shell starts with SIGINT ignored; restore Python's default
        # so this test also sends the Ctrl-C a person at a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )
    wait_for(tmp_path / "child.pid")
    child = int((tmp_path / "child.pid").read_text())
    # The progress loop polls every 2 s: let it print the step line before stopping.
    time.sleep(3)
    supervisor.send_signal(stop_signal)
    output, _ = supervisor.communicate(timeout=60)
    assert supervisor.returncode != 0
    deadline = time.monotonic() + 10
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(child), f"the child outlived its supervisor:\n{output}"
    assert "[ta-opd] step 1" in output and "val acc 0.250" in output, output


def test_a_finished_child_is_reported_with_its_exit_status(tmp_path):
    result = supervise(
        [sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"],
        tmp_path,
        dict(os.environ),
        timeout=None,
        progress=False,
    )
    assert result.returncode == 3
    assert "hello" in result.log_path.read_text()
    assert result.metrics() == []


def test_a_child_past_its_timeout_is_killed(tmp_path):
    with pytest.raises(TimeoutError, match="did not finish within 5s"):
        supervise(
            [sys.executable, "-c", CHILD],
            tmp_path,
            dict(os.environ),
            timeout=5,
            progress=False,
        )
    assert not process_alive(int((tmp_path / "child.pid").read_text()))


@pytest.mark.parametrize(
    ("log", "reason"),
    [
        (
            "Hydra stuff\nta-opd: configuration refused before start-up: distillation.x must be 1, got 2\n",
            "ta-opd: configuration refused before start-up: distillation.x must be 1, got 2",
        ),
        (
            "Traceback (most recent call last):\n  File 'a.py'\nValueError: first\n"
            "(TaskRunner pid=123) Traceback (most recent call last):\n"
            "(TaskRunner pid=123) omegaconf.errors.ConfigAttributeError: Key 'foo' is not in struct\n"
            "(raylet) some shutdown noise\n",
            "omegaconf.errors.ConfigAttributeError: Key 'foo' is not in struct",
        ),
        ("all fine until the process was killed\n", None),
    ],
    ids=["refusal", "worker-traceback", "nothing"],
)
def test_the_failure_reason_is_read_from_verls_log(log, reason):
    assert failure_reason(log) == reason


def test_ta_opd_train_prints_the_refusal_itself(tmp_path):
    """A refused config: the console says which key and why, not only where the log is."""
    command = [sys.executable, "-m", "ta_opd_verl.cli.main", "train", "--out", str(tmp_path / "run")]
    command += ["--", "distillation.distillation_loss.ta_opd.k=64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "[ta-opd] verl failed: ta-opd: configuration refused before start-up:" in result.stdout
    assert "distillation.distillation_loss.ta_opd.k (64) must be <=" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--steps", "-1"], "argument --steps: must be an integer >= 1, got -1"),
        (["trainer.total_training_steps=3"], "Hydra overrides go after `--`: ta-opd train -- key=value"),
    ],
    ids=["zero-steps", "negative-steps", "override-without-separator"],
)
def test_ta_opd_train_refuses_bad_arguments_before_anything_starts(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _as_in_a_terminal() -> None:
    """In the child before it runs: a session of its own, and SIGINT's default action, as a command typed
    at a terminal has. A shell that started pytest in the background (``make test &``) ignores SIGINT in
    its children, and an ignored signal stays ignored across exec: Python would then never raise
    KeyboardInterrupt."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _session_processes(sessions: set[int]) -> dict[int, str]:
    """The live processes whose session is one of ``sessions``: pid -> the start of its command line."""
    processes = {}
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) in sessions and process.status() != psutil.STATUS_ZOMBIE:
                processes[process.pid] = " ".join(process.cmdline()[:3])
    return processes


def _child_sessions(pid: int) -> set[int]:
    """The sessions of ``pid``'s descendants (a child started with its own session has a new one)."""
    sessions = set()
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            sessions.add(os.getsid(child.pid))
    return sessions


def _ray_started(out: Path, stderr: str) -> bool:
    """verl has started Ray in a run under ``out`` (compare keeps each run in runs/<name>/)."""
    return any(
        "Started a local Ray instance" in log.read_text(errors="replace") for log in out.rglob(LOG_FILE)
    )


def _training(out: Path, stderr: str) -> bool:
    """verl's training loop has started in the run under ``out``."""
    return any("Training Progress:" in log.read_text(errors="replace") for log in out.rglob(LOG_FILE))


def _diagnostic_sampling(out: Path, stderr: str) -> bool:
    return "[sampling bank]" in stderr


# Each command interrupted in the middle of its work: the three that run verl's trainer once verl has
# started Ray (and `train` once more in its training loop), the diagnostic (no verl) in its first loop.
CTRL_C_RUNS = {
    "train": (["train", "--steps", "1"], _ray_started),
    "train-while-training": (["train", "--steps", "20"], _training),
    "demo": (["demo", "--steps", "1"], _ray_started),
    "compare": (["compare", "--only", comparison_plan()[0].name, "--steps", "1"], _ray_started),
    "diagnose": (["diagnose"], _diagnostic_sampling),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", CTRL_C_RUNS)
def test_ctrl_c_stops_ta_opd_with_one_line_and_nothing_of_the_run_left(tmp_path, name):
    """Ctrl-C (SIGINT to the terminal's process group) in the middle of the work: one line, status 130,
    within 10 s, and no process left in the command's session or in a session its children started (Ray's
    processes included)."""
    arguments, ready = CTRL_C_RUNS[name]
    out, stderr_path = tmp_path / "out", tmp_path / "stderr"
    command = [sys.executable, "-m", "ta_opd_verl.cli.main", *arguments, "--out", str(out)]
    with open(stderr_path, "w") as stderr_file:
        run = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr_file, cwd=tmp_path, preexec_fn=_as_in_a_terminal
        )
    sessions = {run.pid}
    try:
        deadline = time.monotonic() + 300
        while not ready(out, stderr_path.read_text(errors="replace")):
            assert run.poll() is None and time.monotonic() < deadline, stderr_path.read_text()[-2000:]
            time.sleep(0.5)
        sessions |= _child_sessions(run.pid)
        stopped_at = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=60)
        elapsed = time.monotonic() - stopped_at
        deadline = time.monotonic() + 10
        while (left := _session_processes(sessions)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for pid in _session_processes(sessions):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    stderr = stderr_path.read_text(errors="replace")
    assert run.returncode == 130, stderr[-2000:]
    assert elapsed < 10, f"took {elapsed:.1f}s to stop"
    command_name = arguments[0]
    assert stderr.strip().splitlines()[-1] == f"ta-opd {command_name}: interrupted", stderr[-2000:]
    assert stderr.count("interrupted") == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert not left, left


def test_start_up_phases_are_read_from_verls_log_once_each():
    phases = StartupPhases()
    first = phases.feed(
        "2026 INFO worker.py:2029 -- Started a local Ray instance. View the dashboard\n"
        "\x1b[36m(TaskRunnerV1 pid=1)\x1b[0m config ...\n"
        "\x1b[36m(TaskRunnerV1 pid=1)\x1b[0m more\n"
        "(CheckpointEngineWorker pid=4) noise\n"
        "(WorkerDict pid=2) INFO platform\n"
    )
    assert first == [
        "Ray started",
        "verl's task runner started: building the workers",
        "actor workers started (FSDP2)",
    ]
    later = phases.feed(
        "(WorkerDict pid=3) again\n(NewActor pid=9) hi\n(TaskRunnerV1 pid=1) Training Progress:   0%\n"
    )
    assert later == [
        "NewActor started",
        "training loop started (validation first when trainer.val_before_train)",
    ]


def test_choosing_loggers_keeps_the_file_logger_the_progress_reads():
    overrides = ["a=1", "trainer.logger=[console,tensorboard]", "b=2"]
    assert keep_file_logger(overrides) == (
        ["a=1", "trainer.logger=[console,tensorboard,file]", "b=2"],
        ["console", "tensorboard"],
    )
    assert keep_file_logger(["trainer.logger=['file','wandb']"]) == (
        ["trainer.logger=['file','wandb']"],
        ["file", "wandb"],
    )
    assert keep_file_logger(["x=1"]) == (["x=1"], [])
