"""`python -m ta_opd_verl.bench cpu-share`: process groups and their CPU shares over a window."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from ta_opd_verl.bench.__main__ import main as bench_main
from ta_opd_verl.bench.cpu_share import cpu_shares, measure, process_label


def test_ray_actors_are_grouped_without_their_running_method():
    assert process_label(["ray::AgentLoopWorkerTQ"], []) == "ray::AgentLoopWorkerTQ"
    assert process_label(["ray::vLLMHttpServer.generate"], []) == "ray::vLLMHttpServer"


def test_vllm_processes_are_labelled_with_the_ray_actor_above_them():
    student = [["VLLM::EngineCore"], ["ray::vLLMHttpServer.generate"], ["raylet"]]
    teacher = [["VLLM::EngineCore"], ["ray::TeacherServerKeepingSampledToken"]]
    assert process_label(["VLLM::Worker"], student) == "VLLM::Worker < ray::vLLMHttpServer"
    assert process_label(["VLLM::Worker"], teacher) == "VLLM::Worker < ray::TeacherServerKeepingSampledToken"
    assert process_label(["VLLM::EngineCore"], []) == "VLLM::EngineCore"


def test_other_processes_keep_their_shortened_command_line():
    assert process_label(["python", "-m", "verl.trainer.main_ppo", "x" * 100], [])[:30] == (
        "python -m verl.trainer.main_pp"
    )
    assert len(process_label(["python", "y" * 200], [])) == 60


def test_shares_count_new_processes_from_zero_and_reused_pids_afresh():
    before = {1: ("ray::A", 10.0), 2: ("ray::B", 5.0), 3: ("gone", 1.0), 4: ("old", 50.0)}
    after = {1: ("ray::A", 14.0), 2: ("ray::B", 6.0), 5: ("ray::A", 2.0), 4: ("new", 3.0)}
    shares = cpu_shares(before, after, wall=10.0)
    assert shares == [
        ("ray::A", pytest.approx(0.6)),
        ("new", pytest.approx(0.3)),
        ("ray::B", pytest.approx(0.1)),
    ]
    with pytest.raises(ValueError, match="window must be positive"):
        cpu_shares(before, after, wall=0.0)


def _started(code: str) -> tuple[subprocess.Popen, str]:
    """A ``python -c code`` process and its label, once it runs ``code`` (right after the fork its command
    line is still its parent's)."""
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while psutil.Process(process.pid).cmdline()[-1:] != [code]:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.01)
    return process, process_label(psutil.Process(process.pid).cmdline(), [])


def test_a_busy_process_gets_a_share_and_a_sleeping_one_none():
    """Relative, so that it holds on a shared machine: a spinning process's share stands well above a
    sleeping one's, which stays near zero."""
    spinner, busy = _started("while True: pass")
    sleeper, idle = _started("import time; time.sleep(60)")
    try:
        shares, wall = measure(2.0)
    finally:
        for process in (spinner, sleeper):
            process.kill()
            process.wait()
    assert wall >= 2.0
    shares = dict(shares)
    assert shares[busy] > 0.05 and shares.get(idle, 0.0) < 0.01, shares


def test_the_command_writes_json_and_a_plot(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "data": {}}\n{"step": 1, "data": {}}\n')
    out = tmp_path / "out"
    assert (
        bench_main(
            [
                "cpu-share",
                "--seconds",
                "0.5",
                "--metrics",
                str(metrics),
                "--after-steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "cpu_share.json").read_text())
    assert result["metrics_lines"] == [2, 2]
    assert result["window_seconds"] >= 0.5
    assert result["shares_of_one_core"] and all(share >= 0 for share in result["shares_of_one_core"].values())
    assert (out / "cpu_share.png").stat().st_size > 5_000
