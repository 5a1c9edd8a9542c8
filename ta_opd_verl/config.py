"""Configuration of TA-OPD: the `ta_opd` block and verl's distillation-loss config extended with it.

verl (0.9.1) builds `distillation.distillation_loss` with `omega_conf_to_dataclass`, which calls Hydra's
`instantiate(..., _convert_="partial")` on the node's `_target_`. Hydra only instantiates nested nodes
that carry their own `_target_`; any other nested node arrives as a plain dict. So the `ta_opd` node
may carry `_target_: ta_opd_verl.config.TAOPDConfig` or not: `TAOPDDistillationLossConfig` converts a
dict itself. Example YAML::

    distillation:
      distillation_loss:
        _target_: ta_opd_verl.config.TAOPDDistillationLossConfig
        loss_mode: ta_opd
        topk: 32
        ta_opd:
          _target_: ta_opd_verl.config.TAOPDConfig   # optional
          selector: teachability
          ratio: 0.05

Only the `_target_` route works for the whole `distillation` node: verl's `DistillationConfig` types
`distillation_loss` as `DistillationLossConfig`, so a typed merge (`omega_conf_to_dataclass(node,
DistillationConfig)`) rejects the extra `ta_opd` key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ta_opd_verl.teachability import ENTROPY_MODES, SELECTORS, STUDENT_PROBS
from ta_opd_verl.verl_fence.config import BaseConfig, DistillationLossConfig

__all__ = ["TAOPDConfig", "TAOPDConfigError", "TAOPDDistillationLossConfig"]

KEY_PREFIX = "distillation.distillation_loss"
TA_OPD_KEY = f"{KEY_PREFIX}.ta_opd"
COMPATIBILITY_MODES = ("exact", "lower_bound")
TEACHERS = ("server", "fsdp")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
LOSSES = ("pg_k1", "reverse_kl_topk")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


class TAOPDConfigError(ValueError):
    """A TA-OPD run's configuration is invalid; the message names the key and what is accepted."""


def _reject(key: str, accepted: str, value: object) -> None:
    raise ValueError(f"{TA_OPD_KEY}.{key} must be {accepted}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class TAOPDConfig(BaseConfig):
    """The `distillation.distillation_loss.ta_opd` block: which positions TA-OPD trains on.

    selector (str):
        Score that ranks positions: `teachability` (TA-OPD, D̃·C̃), `raw_kl`, `entropy`, `tip`,
        `ta_entropy`, `c_only`, `d_incompat`, `random`, `q3`, `q3_high_c`, or `full` (every position,
        plain OPD). See `ta_opd_verl.teachability.selector_scores`.
    ratio (float):
        Budget ρ in (0, 1]: keep ceil(ρ · N_valid) positions of the whole rollout batch (Eq. 13).
        The paper's default is 0.05; its main table uses 0.10. Ignored by `full`.
    k (int):
        Support size of the scoring (S, T and U of Eq. 8). Must not exceed `distillation_loss.topk`,
        the number of teacher entries requested from the teacher servers.
    student_probs (str):
        `exact` (paper): true student probabilities on the union; `topk_only` (the authors' training
        code): probability 0 outside the student's top-k, floored at 1e-12 inside D's log.
    compatibility (str):
        `lower_bound` (Eq. 17, default): C from the teacher entries that fall in the student's top-k,
        since verl's teacher servers return only the teacher's own top entries; `exact` (Eq. 10) needs
        the teacher's log-probs at the student's top-k ids: `teacher=fsdp` only.
    teacher (str):
        Who scores the teacher: `server` (verl's teacher servers, `distillation.teacher_models`, multi-
        teacher routing included) or `fsdp` (the teacher model colocated in the actor's worker processes,
        FSDP2-sharded and offloaded between uses, run in the scoring forward; verl's teacher pool is not
        started; see `ta_opd_verl.teachers.colocated`).
    teacher_path (str | None):
        With `teacher=fsdp`: the teacher's local Hugging Face folder (same vocabulary as the student).
        Must be null with `teacher=server` (the servers read `distillation.teacher_models`).
    teacher_dtype (str):
        With `teacher=fsdp`: the dtype the teacher is loaded and run in, `bfloat16` (default), `float16`
        or `float32`; its log-softmax is float32 either way.
    teacher_temperature (float):
        1.0, the only accepted value: like verl's teacher servers (which force 1.0 for prompt
        log-probs), the teacher's logits are scored undivided, whatever the rollout temperature.
    entropy_mode (str):
        `full` (paper): entropy over the whole vocabulary; `topk` (the authors' code): entropy of the
        student's top-k renormalised, divided by log k.
    min_keep_per_sample (int):
        After the global budget, top up every sample to at least min(this, its valid positions)
        selected positions. 0 (paper) or 1 (the authors' code); the keep ratio then exceeds `ratio`.
    q_low (float), q_high (float):
        Quantile levels of the batch-robust normalisation (Eq. 11), 0 <= q_low < q_high <= 1.
    loss (str):
        OPD loss on the selected positions: `pg_k1` (sampled-token advantage in a PPO-clipped policy
        gradient, the paper's runs) or `reverse_kl_topk` (reverse KL on the teacher's top-k).
    aggregation (str):
        verl's loss aggregation over the selected positions: `token-mean` (paper Eq. 7) or
        `seq-mean-token-mean`.
    seed (int):
        Seed of the random selectors (`random`, `q3`); combined with the step so each step differs.
    selection_dump_dir (str | None):
        When set, the driver writes `step_<N>.jsonl` there every step: per sample its stable id, response
        token ids, selected positions and D, C, H per position (to inspect what TA-OPD trains on).
    """

    selector: str = "teachability"
    ratio: float = 0.05
    k: int = 16
    student_probs: str = "exact"
    compatibility: str = "lower_bound"
    teacher: str = "server"
    teacher_path: str | None = None
    teacher_dtype: str = "bfloat16"
    teacher_temperature: float = 1.0
    entropy_mode: str = "full"
    min_keep_per_sample: int = 0
    q_low: float = 0.05
    q_high: float = 0.95
    loss: str = "pg_k1"
    aggregation: str = "token-mean"
    seed: int = 0
    selection_dump_dir: str | None = None

    def __post_init__(self):
        for key, choices in (
            ("selector", SELECTORS),
            ("student_probs", STUDENT_PROBS),
            ("compatibility", COMPATIBILITY_MODES),
            ("teacher", TEACHERS),
            ("teacher_dtype", TEACHER_DTYPES),
            ("entropy_mode", ENTROPY_MODES),
            ("loss", LOSSES),
            ("aggregation", AGGREGATIONS),
        ):
            value = getattr(self, key)
            if value not in choices:
                _reject(key, f"one of {list(choices)}", value)
        if not (_is_number(self.ratio) and 0 < self.ratio <= 1):
            _reject("ratio", "a number in (0, 1]", self.ratio)
        if not (_is_int(self.k) and self.k >= 1):
            _reject("k", "an integer >= 1", self.k)
        if not (_is_int(self.min_keep_per_sample) and self.min_keep_per_sample >= 0):
            _reject("min_keep_per_sample", "an integer >= 0", self.min_keep_per_sample)
        for key in ("q_low", "q_high"):
            value = getattr(self, key)
            if not (_is_number(value) and 0 <= value <= 1):
                _reject(key, "a number in [0, 1]", value)
        if self.q_low >= self.q_high:
            _reject("q_low", f"smaller than {TA_OPD_KEY}.q_high ({self.q_high})", self.q_low)
        if not _is_int(self.seed):
            _reject("seed", "an integer", self.seed)
        if self.selection_dump_dir is not None and not isinstance(self.selection_dump_dir, str):
            _reject("selection_dump_dir", "a folder path or null", self.selection_dump_dir)
        if self.teacher == "fsdp" and not (isinstance(self.teacher_path, str) and self.teacher_path):
            _reject("teacher_path", "the teacher's Hugging Face folder with teacher=fsdp", self.teacher_path)
        if self.teacher == "server" and self.teacher_path is not None:
            _reject(
                "teacher_path",
                "null with teacher=server (the servers load distillation.teacher_models.<name>.model_path)",
                self.teacher_path,
            )
        if self.teacher_temperature != 1.0:
            _reject(
                "teacher_temperature",
                "1.0 (the teacher is scored at temperature 1, like verl's teacher servers)",
                self.teacher_temperature,
            )


@dataclass
class TAOPDDistillationLossConfig(DistillationLossConfig):
    """verl's `DistillationLossConfig` plus the `ta_opd` block (`TAOPDConfig`).

    ta_opd (TAOPDConfig):
        TA-OPD's settings; a plain mapping (Hydra's output for a nested node without `_target_`) is
        converted. Every inherited field keeps verl's meaning; `loss_mode` defaults to `ta_opd`, the
        name under which this plugin registers its loss.

    Beyond `TAOPDConfig`'s own checks, `__post_init__` requires `ta_opd.k <= topk` (verl asks the
    teacher servers for `topk` entries) and `use_policy_gradient=True` for the `pg_k1` loss (its
    gradient would not depend on the teacher otherwise, the reason verl rejects a backpropagated k1),
    then runs verl's own checks (which reject a `loss_mode` missing from verl's loss registry).
    """

    loss_mode: str = "ta_opd"
    ta_opd: TAOPDConfig = field(default_factory=TAOPDConfig)

    def __post_init__(self):
        if not isinstance(self.ta_opd, TAOPDConfig):
            if not isinstance(self.ta_opd, Mapping):
                raise ValueError(f"{TA_OPD_KEY} must be a mapping, got {type(self.ta_opd).__name__}")
            known = {f.name for f in fields(TAOPDConfig)}
            unknown = sorted(set(self.ta_opd) - known)
            if unknown:
                raise ValueError(
                    f"unknown key(s) {unknown} under {TA_OPD_KEY}; accepted: {sorted(known - {'_target_'})}"
                )
            # BaseConfig freezes fields once set; this is the one-time conversion, before anyone reads it.
            object.__setattr__(self, "ta_opd", TAOPDConfig(**dict(self.ta_opd)))
        if self.topk is None or self.ta_opd.k > self.topk:
            raise ValueError(
                f"{TA_OPD_KEY}.k ({self.ta_opd.k}) must be <= {KEY_PREFIX}.topk ({self.topk}), the number of "
                f"teacher entries per position (requested from the teacher servers, or kept by the fsdp "
                f"teacher)"
            )
        if self.ta_opd.loss == "pg_k1" and not self.use_policy_gradient:
            raise ValueError(
                f"{TA_OPD_KEY}.loss=pg_k1 needs {KEY_PREFIX}.use_policy_gradient=True: a backpropagated k1 "
                f"loss has no gradient through the teacher; use {TA_OPD_KEY}.loss=reverse_kl_topk instead"
            )
        super().__post_init__()
