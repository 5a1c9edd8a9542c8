"""verl's sync replay buffer with a short poll, for CPU runs.

verl 0.9.1's v1 ``ReplayBuffer`` waits ``poll_interval`` (hard-coded 2.0 s in
``PPOTrainer._build_replay_buffer``) between checks for finished rollouts; with tiny models a step's
real work is well under a second, so the poll dominates. Given to verl through its custom-sampler hook:
``trainer.v1.sampler.custom_sampler.path=pkg://ta_opd_verl.cpu.replay_buffer`` and
``...custom_sampler.name=ShortPollReplayBuffer``.
"""

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from ta_opd_verl.verl_fence import FINGERPRINTS

FINGERPRINTS["verl.trainer.ppo.v1.replay_buffer:ReplayBuffer.__init__"] = "0c37a48629991988"

SHORT_POLL_SECONDS = 0.05


class ShortPollReplayBuffer(ReplayBuffer):
    def __init__(self, **kwargs):
        kwargs["poll_interval"] = SHORT_POLL_SECONDS
        super().__init__(**kwargs)
