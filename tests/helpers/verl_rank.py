"""Shared by the rank bodies of the 2-process FSDP2 tests (tests/fsdp_engine_worker.py,
tests/fsdp_teacher_worker.py): one gloo rank's environment, and verl 0.9.1's actor ``TrainingWorker`` built
as ``ActorRolloutRefWorker.init_model`` builds it (``verl/workers/engine_workers.py``): a
``TrainingWorkerConfig`` from the actor's dataclasses, then ``TrainingWorker`` -> ``EngineRegistry.new`` ->
``FSDPEngineWithLMHead`` (FSDP2), and ``reset()`` (model, FSDP2 wrap, optimizer). No Ray: the worker reads
its rank from the environment, as Ray's worker group would set it."""

from __future__ import annotations

import os

import torch
from verl_fixtures import compose_config


def start_cpu_rank(rank: int, world_size: int, port: int) -> None:
    """This process as rank ``rank`` of ``world_size`` on the CPU platform; imports verl with our plugin."""
    torch.set_num_threads(1)
    os.environ.update(
        # ta_opd_verl.cpu: VERL_PLATFORM=cpu selects our CPU platform (gloo, CPU device module) when
        # `import verl` loads our verl.plugins entry point; VERL_ENGINE_DEVICE=cuda picks the FSDP engine.
        VERL_PLATFORM="cpu",
        VERL_ENGINE_DEVICE="cuda",
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import verl  # noqa: F401  (loads ta_opd_verl.verl_plugin, which activates the CPU platform)

    from ta_opd_verl.plugin_loading import require_plugin

    require_plugin()


def actor_training_worker(config_name: str, overrides: list[str], micro_batch_size: int):
    """(composed config, actor dataclass, reset ``TrainingWorker``) with fixed-size micro-batches of padded
    rows (no dynamic batch size, no remove-padding)."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    config = compose_config(config_name, overrides)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    actor.model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
    worker_config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=actor.model_config,
        engine_config=actor.engine,
        optimizer_config=actor.optim,
        checkpoint_config=actor.checkpoint,
    )
    worker_config.engine_config.use_dynamic_bsz = False
    worker_config.engine_config.infer_micro_batch_size_per_gpu = micro_batch_size
    worker_config.engine_config.micro_batch_size_per_gpu = micro_batch_size
    worker_config.engine_config.use_remove_padding = False
    worker = TrainingWorker(config=worker_config)
    worker.reset()
    return config, actor, worker


def run_ranks(target, world_size: int, args: tuple, timeout_s: float) -> None:
    """``target(rank, port, *args)`` in ``world_size`` spawned processes on one free local port; fails
    unless every rank exits 0 within ``timeout_s`` (a hung rank is killed)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, port, *args)) for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout_s)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0] * world_size
