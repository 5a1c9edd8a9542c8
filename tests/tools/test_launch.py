"""`ta_opd_verl.cli.train.supervise`: the child (verl, in real use) must not outlive a supervisor that is
stopped with SIGTERM or Ctrl-C, and the per-step progress line reads verl's metrics file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ta_opd_verl.cli.train import supervise

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
