"""The CPU runtime's pieces, each in a fresh interpreter (they patch module globals by design)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, os
import torch
import verl  # loads our `verl.plugins` entry point, which activates the CPU runtime
from ta_opd_verl import plugin_loading
from verl.plugin.platform.platform_manager import PlatformRegistry
from verl.utils.device import get_device_name, get_torch_device
result = {"loaded": plugin_loading.LOADED, "error": plugin_loading.LOAD_ERRORS or None,
          "registered": "cpu" in PlatformRegistry.registered_names()}
if result["registered"]:
    platform = PlatformRegistry.get("cpu")()
    device = get_torch_device()
    import torch.distributed.fsdp as fsdp
    result.update(
        device=get_device_name(), backend=platform.communication_backend_name(),
        ray_resource=platform.ray_resource_name(), ray_options=platform.ray_resource_options(2),
        auto_detected=platform.is_platform_available(use_smi_check=True), ipc=platform.is_ipc_supported(),
        current_device=platform.current_device(), free_memory_positive=device.mem_get_info()[0] > 0,
        pin_memory=fsdp.CPUOffloadPolicy(pin_memory=True).pin_memory,
        rng_round_trip=bool(torch.equal(device.get_rng_state(), torch.get_rng_state())),
    )
from ta_opd_verl.cpu import vllm_plugin
import vllm.model_executor.layers.utils as layer_utils
vllm_plugin.register()
result["vllm_refit_fix"] = bool(getattr(layer_utils, vllm_plugin.PATCH_FLAG, False))
print("RESULT" + json.dumps(result))
"""


def _probe(platform: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "VERL_PLATFORM"}
    if platform:
        env["VERL_PLATFORM"] = platform
    output = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300, check=True
    ).stdout
    return json.loads(output.split("RESULT", 1)[1])


def test_cpu_platform_is_registered_and_patched_when_requested():
    result = _probe("cpu")
    assert result["error"] is None
    assert result["registered"] and result["device"] == "cpu" and result["current_device"] == "cpu"
    assert result["backend"] == "gloo"
    assert result["ray_resource"] == "GPU" and result["ray_options"] == {"num_gpus": 2}
    assert result["auto_detected"] is False and result["ipc"] is False
    assert result["free_memory_positive"] and result["rng_round_trip"]
    assert result["pin_memory"] is False
    assert result["vllm_refit_fix"] is True
    assert any("cpu:gloo" in patch for patch in result["loaded"])


def test_nothing_changes_off_the_cpu_platform():
    result = _probe(None)
    assert result["error"] is None
    assert not result["registered"]
    assert result["vllm_refit_fix"] is False
    assert "distillation loss 'ta_opd'" in result["loaded"]


def test_the_process_group_initialiser_asks_for_plain_gloo():
    probe = (
        "import os; os.environ['VERL_PLATFORM']='cpu'; import verl; "
        "import verl.utils.distributed as d; "
        "calls=[]; import torch.distributed as td; "
        "td.is_initialized=lambda: False; td.init_process_group=lambda **kw: calls.append(kw['backend']); "
        "d.initialize_global_process_group_ray(); print('BACKEND', calls[0])"
    )
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300).stdout
    assert "BACKEND cpu:gloo" in output
