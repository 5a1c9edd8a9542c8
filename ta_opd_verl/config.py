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
from typing import Any

from ta_opd_verl.special_tokens import special_token_map_error
from ta_opd_verl.teachability import (
    BUDGET_ROUNDINGS,
    DEFAULT_PROB_FLOOR,
    ENTROPY_MODES,
    MIN_KEEP_SCORES,
    NO_SPREAD_RULES,
    Q3_RULES,
    SELECTORS,
    STUDENT_PROBS,
    TA_ENTROPY_SCORES,
    TEACHER_LISTS,
    SelectionRules,
)
from ta_opd_verl.verl_fence.config import BaseConfig, DistillationLossConfig

__all__ = ["DEFAULTS", "PRESETS", "TAOPDConfig", "TAOPDConfigError", "TAOPDDistillationLossConfig"]

KEY_PREFIX = "distillation.distillation_loss"
TA_OPD_KEY = f"{KEY_PREFIX}.ta_opd"
COMPATIBILITY_MODES = ("exact", "lower_bound")
TEACHERS = ("server", "fsdp")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
TEACHER_PROMPTS = ("student", "teacher_template", "column")
LOSSES = ("pg_k1", "reverse_kl_topk", "reverse_kl_topk_tail", "reverse_kl_full")
# The losses whose per-position value the update's forward computes from the student's full logits (verl's
# logits processor, `ta_opd_verl.loss`); pg_k1 needs only the log-probs.
LOGITS_LOSSES = ("reverse_kl_topk", "reverse_kl_topk_tail", "reverse_kl_full")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
NORMALIZE_OVER = ("valid", "response")
ADVANTAGE_LOGPROBS = ("current", "old")

# The keys a preset sets; null in a run's config means "the preset's value" (without a preset: DEFAULTS).
# DEFAULTS are this project's choices, which predate the presets: the paper's equations with a 1e-12
# floor in D and verl's conventions for the loss (advantage from the current log-prob, dual clip).
DEFAULTS = {
    "student_probs": "exact",
    "student_prob_floor": DEFAULT_PROB_FLOOR,
    "teacher_list": "all",
    "compatibility": "lower_bound",
    "entropy_mode": "full",
    "min_keep_per_sample": 0,
    "aggregation": "token-mean",
    "no_spread": "half",
    "normalize_over": "valid",
    "ta_entropy_score": "eq16",
    "q3_rule": "fill",
    "min_keep_score": "selector",
    "budget_rounding": "decimal",
    "advantage_logprob": "current",
    "dual_clip": True,
}
# `paper`: Eqs. 7-17 as written (docs/algorithm.md, "Presets"); the normalisation's no-spread case, which
# the paper leaves open, keeps our rule. `compatibility` follows the teacher: exact C (Eq. 10) with the
# colocated teacher, the lower bound (Eq. 17) with teacher servers, which cannot give more.
# `authors_code`: every behaviour of the authors' code (github:ckjsuperhh/taopd-baseline), as the golden
# vectors of tests/core/test_authors_code_vectors.py pin it; its random selector's stream excepted.
PRESETS = {
    "paper": {
        **DEFAULTS,
        "student_prob_floor": 0.0,
        "compatibility": None,
        "advantage_logprob": "old",
        "dual_clip": False,
    },
    "authors_code": {
        "student_probs": "topk_only",
        "student_prob_floor": DEFAULT_PROB_FLOOR,
        "teacher_list": "top_k",
        "compatibility": "lower_bound",
        "entropy_mode": "topk",
        "min_keep_per_sample": 1,
        "aggregation": "seq-mean-token-mean",
        "no_spread": "zero",
        "normalize_over": "response",
        "ta_entropy_score": "normalized_product",
        "q3_rule": "quadrant_only",
        "min_keep_score": "ta_entropy",
        "budget_rounding": "float",
        "advantage_logprob": "old",
        "dual_clip": False,
    },
}


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
    preset (str | None):
        `paper` (Eqs. 7-17 as written, no floor in D) or `authors_code` (the authors' code, as their golden
        vectors pin it) sets every key below that is left null; a key given explicitly overrides its
        preset. Without a preset a null key takes `DEFAULTS` (this project's choices). The table of each
        preset: `PRESETS`, and `docs/algorithm.md`, "Presets".
    student_probs (str):
        `exact` (paper): true student probabilities on the union; `topk_only` (the authors' training
        code): probability 0 outside the student's top-k (needs `student_prob_floor` > 0).
    student_prob_floor (float):
        Floor of both renormalised probabilities inside D's logs, over all of U (the authors' 1e-12, the
        default); 0: none, D in log space from the true log-probabilities (Eq. 9 as written).
    teacher_list (str):
        `all`: every teacher entry returned (`distillation_loss.topk` of them) counts in C and in D's
        teacher side where it falls in S; `top_k`: only the teacher's `k` best (the authors' lists hold k).
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
    min_keep_score (str):
        What the top-up ranks by: `selector` (the selector's own score) or `ta_entropy` (the
        `ta_entropy` score whatever the selector, random included: the authors' code).
    q_low (float), q_high (float):
        Quantile levels of the batch-robust normalisation (Eq. 11), 0 <= q_low < q_high <= 1.
    no_spread (str):
        A statistic with no quantile spread: `half` (ours: every position 0.5 at a spread <= 1e-6, else
        ε = 1e-12 in the denominator) or `zero` (the authors': 0 below a spread of 1e-12, no ε).
    normalize_over (str):
        The positions the quantiles and the Q3 medians are taken over: `valid` (the loss-mask positions,
        the paper's I_B) or `response` (every response position, loss-masked ones included: the authors').
    ta_entropy_score (str):
        `eq16`: H̃ + s - H̃s with s = D̃·C̃ (the paper's Eq. 16); `normalized_product`: Norm(D·C), the raw
        product normalised, in place of s (the authors' code).
    q3_rule (str):
        `fill` (ours): `q3` random inside Q3, `q3_high_c` by C̃ inside Q3, both filled up to the budget
        from outside Q3; `quadrant_only` (the authors'): `q3` by (1 - H̃)·Norm(D·C), `q3_high_c` by C̃,
        inside Q3 only, at most |Q3| kept.
    budget_rounding (str):
        `decimal`: n = ceil(ρ·N) with ρ the decimal as written; `float`: max(1, ceil(N·ρ)) in float64 (the
        authors' code; it differs only where N·ρ rounds across an integer).
    loss (str):
        OPD loss on the selected positions: `pg_k1` (sampled-token advantage in a PPO-clipped policy
        gradient, the paper's runs), `reverse_kl_topk` (reverse KL with both distributions renormalised
        on the teacher's top-k), `reverse_kl_topk_tail` (reverse KL on the teacher's top-k plus one tail
        bucket holding each distribution's remaining mass: a lower bound of the full KL), or
        `reverse_kl_full` (the exact reverse KL over the whole vocabulary: `teacher=fsdp` only). See
        `ta_opd_verl.opd_loss`.
    aggregation (str):
        verl's loss aggregation over the selected positions: `token-mean` (paper Eq. 7) or
        `seq-mean-token-mean`.
    advantage_logprob (str):
        `pg_k1`'s advantage -(log p(y) - log p_T(y)) from the `current` log-prob (verl's convention) or the
        `old` one of the scoring forward (the paper's θ_old and the authors' code). Identical on-policy;
        they differ from the second PPO mini-batch of a step on.
    dual_clip (bool):
        `pg_k1` through verl's policy loss, whose dual clip bounds the loss of a negative advantage by 3·|A|
        (true), or the plain PPO clip max(-r·A, -clip(r, 1 - low, 1 + high)·A) of the paper and the
        authors' code (false).
    seed (int):
        Seed of the random selectors (`random`, `q3`); combined with the step so each step differs.
    selection_dump_dir (str | None):
        When set, the driver writes `step_<N>.jsonl` there every step: per sample its stable id, response
        token ids, selected positions and D, C, H per position (to inspect what TA-OPD trains on).
    special_token_map (str | dict):
        How the student's added tokens (end of turn, end of text) pair with a teacher whose added tokens
        differ (DeepSeek-R1-Distill-Qwen teaching Qwen2.5): `auto` (default: by role, then by exact string),
        `none`, or an explicit mapping `{student_id: teacher_id}`. Pairs whose tokens agree (the Qwen3
        pairs) need none. The pre-flight check refuses a pair whose differing response tokens the map
        leaves out; both teachers apply a map with entries. See `ta_opd_verl.special_tokens`.
    teacher_prompt (str):
        The prompt the teacher scores the student's response after: `student` (default: the student's own
        prompt ids), `teacher_template` (the same conversation, the dataset's chat messages, rendered with
        the TEACHER's tokenizer and chat template) or `column` (per sample, the chat messages of the
        dataset column `teacher_prompt_column`, rendered with the teacher's template: a system prompt, a
        hint or the reference solution only the teacher sees). The response is the student's, position
        for position; every per-position quantity stays aligned to the student's response. See
        `ta_opd_verl.teacher_prompts`.
    teacher_prompt_column (str):
        With `teacher_prompt=column`: the training parquet's column holding each sample's teacher-side
        chat messages (`ta-opd prepare-data --teacher-prompt ...` writes it). Default `teacher_prompt`.
    """

    selector: str = "teachability"
    ratio: float = 0.05
    k: int = 16
    preset: str | None = None
    student_probs: str | None = None
    student_prob_floor: float | None = None
    teacher_list: str | None = None
    compatibility: str | None = None
    teacher: str = "server"
    teacher_path: str | None = None
    teacher_dtype: str = "bfloat16"
    teacher_temperature: float = 1.0
    entropy_mode: str | None = None
    min_keep_per_sample: int | None = None
    min_keep_score: str | None = None
    q_low: float = 0.05
    q_high: float = 0.95
    no_spread: str | None = None
    normalize_over: str | None = None
    ta_entropy_score: str | None = None
    q3_rule: str | None = None
    budget_rounding: str | None = None
    loss: str = "pg_k1"
    aggregation: str | None = None
    advantage_logprob: str | None = None
    dual_clip: bool | None = None
    seed: int = 0
    selection_dump_dir: str | None = None
    # `auto`, `none` or a mapping; OmegaConf's typed merge accepts no union of a string and a container.
    special_token_map: Any = "auto"
    teacher_prompt: str = "student"
    teacher_prompt_column: str = "teacher_prompt"

    def __post_init__(self):
        self._resolve_preset()
        for key, choices in (
            ("selector", SELECTORS),
            ("student_probs", STUDENT_PROBS),
            ("teacher_list", TEACHER_LISTS),
            ("compatibility", COMPATIBILITY_MODES),
            ("teacher", TEACHERS),
            ("teacher_dtype", TEACHER_DTYPES),
            ("teacher_prompt", TEACHER_PROMPTS),
            ("entropy_mode", ENTROPY_MODES),
            ("min_keep_score", MIN_KEEP_SCORES),
            ("no_spread", NO_SPREAD_RULES),
            ("normalize_over", NORMALIZE_OVER),
            ("ta_entropy_score", TA_ENTROPY_SCORES),
            ("q3_rule", Q3_RULES),
            ("budget_rounding", BUDGET_ROUNDINGS),
            ("loss", LOSSES),
            ("aggregation", AGGREGATIONS),
            ("advantage_logprob", ADVANTAGE_LOGPROBS),
        ):
            value = getattr(self, key)
            if value not in choices:
                _reject(key, f"one of {list(choices)}", value)
        if not (_is_number(self.student_prob_floor) and 0 <= self.student_prob_floor < 1):
            _reject("student_prob_floor", "a number in [0, 1)", self.student_prob_floor)
        if self.student_probs == "topk_only" and self.student_prob_floor == 0:
            _reject(
                "student_prob_floor",
                "above 0 with student_probs=topk_only (the student has probability 0 outside its top-k)",
                self.student_prob_floor,
            )
        if not isinstance(self.dual_clip, bool):
            _reject("dual_clip", "true or false", self.dual_clip)
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
        special_token_map_problem = special_token_map_error(self.special_token_map)
        if special_token_map_problem is not None:
            _reject("special_token_map", special_token_map_problem, self.special_token_map)
        if not (isinstance(self.teacher_prompt_column, str) and self.teacher_prompt_column):
            _reject("teacher_prompt_column", "a parquet column name", self.teacher_prompt_column)
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

    def _resolve_preset(self) -> None:
        """Fill every null preset key from the preset (or `DEFAULTS`); remember where each value came from."""
        if self.preset is not None and self.preset not in PRESETS:
            _reject("preset", f"null or one of {list(PRESETS)}", self.preset)
        values = PRESETS[self.preset] if self.preset else DEFAULTS
        sources = {}
        for key in DEFAULTS:
            if getattr(self, key) is not None:
                sources[key] = "set"
                continue
            value = values[key]
            if key == "compatibility" and value is None:
                value = "exact" if self.teacher == "fsdp" else "lower_bound"
            sources[key] = f"preset {self.preset}" if self.preset else "default"
            # BaseConfig freezes fields once set; this is the one-time resolution, before anyone reads it.
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_sources", sources)

    def scoring_options(self) -> dict:
        """`ta_opd_verl.teachability.token_statistics`' settings for this block."""
        return {
            "k": self.k,
            "student_probs": self.student_probs,
            "student_prob_floor": self.student_prob_floor,
            "teacher_list": self.teacher_list,
            "entropy_mode": self.entropy_mode,
        }

    def selection_rules(self) -> SelectionRules:
        """The rules `ta_opd_verl.teachability.select_positions` applies for this block."""
        return SelectionRules(**{item.name: getattr(self, item.name) for item in fields(SelectionRules)})

    def resolved_settings(self) -> list[str]:
        """One line per key with its value, and for a preset key where the value came from."""
        lines = [f"{TA_OPD_KEY} (preset: {self.preset or 'none'}):"]
        for item in fields(self):
            if item.name == "_target_":
                continue
            source = self._sources.get(item.name)
            suffix = f"  [{source}]" if source else ""
            lines.append(f"  {item.name}: {getattr(self, item.name)!r}{suffix}")
        return lines


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

    def resolved_settings(self) -> list[str]:
        """The `ta_opd` block as resolved (`TAOPDConfig.resolved_settings`), then the verl keys of this
        node where they differ from what the preset reproduces: a preset sets `ta_opd` keys only."""
        lines = self.ta_opd.resolved_settings()
        if self.ta_opd.preset in PRESETS and self.loss_max_clamp is not None and self.ta_opd.loss == "pg_k1":
            lines.append(
                f"  note: {KEY_PREFIX}.loss_max_clamp={self.loss_max_clamp} clamps the k1 advantage; the "
                f"{self.ta_opd.preset} preset's loss has no clamp (set it to null)"
            )
        if self.ta_opd.preset == "authors_code" and self.topk != self.ta_opd.k:
            lines.append(
                f"  note: {KEY_PREFIX}.topk={self.topk} teacher entries requested; the authors request k="
                f"{self.ta_opd.k} (teacher_list={self.ta_opd.teacher_list!r} decides what scoring uses)"
            )
        return lines
