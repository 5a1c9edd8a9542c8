"""`TAOPDConfig` / `TAOPDDistillationLossConfig`: defaults, one test per rejection, verl instantiation."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config.distillation import DistillationLossConfig

from ta_opd_verl.config import DEFAULTS, PRESETS, TAOPDConfig, TAOPDDistillationLossConfig

# `ta_opd` is registered by the plugin's loss module; these tests use verl's own `k1` for the base fields.
BASE = {"loss_mode": "k1", "topk": 32, "use_policy_gradient": True}
TARGET = "ta_opd_verl.config.TAOPDDistillationLossConfig"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def test_defaults_follow_the_paper():
    cfg = TAOPDConfig()
    assert (cfg.selector, cfg.ratio, cfg.k, cfg.student_probs, cfg.entropy_mode) == (
        "teachability",
        0.05,
        16,
        "exact",
        "full",
    )
    assert (cfg.compatibility, cfg.min_keep_per_sample, cfg.q_low, cfg.q_high) == (
        "lower_bound",
        0,
        0.05,
        0.95,
    )
    assert (cfg.loss, cfg.aggregation, cfg.seed) == ("pg_k1", "token-mean", 0)


@pytest.mark.parametrize(
    ("kwargs", "key", "accepted"),
    [
        ({"selector": "best"}, "selector", "teachability"),
        ({"ratio": 0.0}, "ratio", "(0, 1]"),
        ({"ratio": 1.5}, "ratio", "(0, 1]"),
        ({"ratio": -0.05}, "ratio", "(0, 1]"),
        ({"ratio": True}, "ratio", "(0, 1]"),
        ({"k": 0}, "k", ">= 1"),
        ({"k": 2.5}, "k", "integer"),
        ({"student_probs": "approx"}, "student_probs", "topk_only"),
        ({"compatibility": "upper_bound"}, "compatibility", "lower_bound"),
        ({"entropy_mode": "half"}, "entropy_mode", "topk"),
        ({"min_keep_per_sample": -1}, "min_keep_per_sample", ">= 0"),
        ({"q_low": -0.1}, "q_low", "[0, 1]"),
        ({"q_high": 1.1}, "q_high", "[0, 1]"),
        ({"q_low": 0.5, "q_high": 0.5}, "q_low", "smaller than"),
        ({"q_low": 0.9, "q_high": 0.1}, "q_low", "smaller than"),
        ({"loss": "k3"}, "loss", "reverse_kl_topk"),
        ({"aggregation": "seq-sum"}, "aggregation", "seq-mean-token-mean"),
        ({"seed": "zero"}, "seed", "integer"),
        ({"selection_dump_dir": 3}, "selection_dump_dir", "folder path or null"),
    ],
)
def test_invalid_ta_opd_values_are_rejected_with_the_full_key(kwargs, key, accepted):
    with pytest.raises(ValueError) as info:
        TAOPDConfig(**kwargs)
    message = str(info.value)
    assert f"distillation.distillation_loss.ta_opd.{key}" in message
    assert accepted in message


def test_k_above_teacher_topk_is_rejected():
    with pytest.raises(
        ValueError, match=r"ta_opd\.k \(33\) must be <= distillation\.distillation_loss\.topk"
    ):
        TAOPDDistillationLossConfig(**BASE, ta_opd=TAOPDConfig(k=33))


def test_missing_teacher_topk_is_rejected():
    with pytest.raises(ValueError, match=r"distillation\.distillation_loss\.topk \(None\)"):
        TAOPDDistillationLossConfig(**{**BASE, "topk": None})


def test_pg_k1_without_policy_gradient_is_rejected():
    with pytest.raises(ValueError, match="use_policy_gradient"):
        TAOPDDistillationLossConfig(**{**BASE, "use_policy_gradient": False})


def test_unknown_nested_key_is_rejected():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['budget'\] under distillation"):
        TAOPDDistillationLossConfig(**BASE, ta_opd={"budget": 0.1})


def test_k_equal_to_topk_and_reverse_kl_without_policy_gradient_are_accepted():
    cfg = TAOPDDistillationLossConfig(
        loss_mode="forward_kl_topk",
        topk=16,
        use_policy_gradient=False,
        ta_opd=TAOPDConfig(k=16, loss="reverse_kl_topk"),
    )
    assert cfg.ta_opd.k == cfg.topk == 16


def test_base_post_init_still_runs():
    cfg = TAOPDDistillationLossConfig(**BASE)
    assert isinstance(cfg, DistillationLossConfig)
    assert cfg.loss_settings is not None and cfg.loss_settings.use_estimator  # set by verl's __post_init__
    with pytest.raises(ValueError, match="Unsupported loss mode: not_a_loss"):
        TAOPDDistillationLossConfig(**{**BASE, "loss_mode": "not_a_loss"})


@pytest.mark.parametrize("nested_target", [False, True])
def test_instantiates_through_verl_omega_conf_to_dataclass(nested_target):
    ta_opd = {"selector": "tip", "ratio": 0.1, "k": 8, "min_keep_per_sample": 1}
    if nested_target:
        ta_opd["_target_"] = "ta_opd_verl.config.TAOPDConfig"
    node = OmegaConf.create({"_target_": TARGET, **BASE, "ta_opd": ta_opd})
    cfg = omega_conf_to_dataclass(node)
    assert type(cfg) is TAOPDDistillationLossConfig
    assert isinstance(cfg.ta_opd, TAOPDConfig)
    assert (cfg.ta_opd.selector, cfg.ta_opd.ratio, cfg.ta_opd.k, cfg.ta_opd.min_keep_per_sample) == (
        "tip",
        0.1,
        8,
        1,
    )
    assert cfg.ta_opd.q_high == 0.95
    assert cfg.loss_mode == "k1" and cfg.topk == 32
    assert cfg.loss_settings is not None


def test_instantiates_through_a_typed_merge():
    node = OmegaConf.create({**BASE, "ta_opd": {"ratio": 0.2}})
    cfg = omega_conf_to_dataclass(node, dataclass_type=TAOPDDistillationLossConfig)
    assert isinstance(cfg.ta_opd, TAOPDConfig) and cfg.ta_opd.ratio == 0.2


def test_validation_runs_when_instantiated_by_verl():
    node = OmegaConf.create({"_target_": TARGET, **BASE, "ta_opd": {"ratio": 2.0}})
    with pytest.raises(Exception, match=r"distillation\.distillation_loss\.ta_opd\.ratio"):
        omega_conf_to_dataclass(node)


# ---- presets ----

PRESET_KEYS = sorted(DEFAULTS)


def test_without_a_preset_every_preset_key_takes_our_default():
    cfg = TAOPDConfig()
    assert cfg.preset is None
    assert {key: getattr(cfg, key) for key in PRESET_KEYS} == DEFAULTS
    # Our defaults are the paper's equations with the authors' 1e-12 floor in D and verl's loss conventions.
    paper = TAOPDConfig(preset="paper")
    differ = {key for key in PRESET_KEYS if getattr(cfg, key) != getattr(paper, key)}
    assert differ == {"student_prob_floor", "advantage_logprob", "dual_clip"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_sets_every_preset_key(preset):
    cfg = TAOPDConfig(preset=preset)
    expected = {key: value for key, value in PRESETS[preset].items() if value is not None}
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert set(PRESETS[preset]) == set(DEFAULTS)


def test_the_authors_code_preset_table():
    cfg = TAOPDConfig(preset="authors_code")
    assert (cfg.student_probs, cfg.student_prob_floor, cfg.teacher_list, cfg.compatibility) == (
        "topk_only",
        1e-12,
        "top_k",
        "lower_bound",
    )
    assert (cfg.entropy_mode, cfg.min_keep_per_sample, cfg.min_keep_score, cfg.aggregation) == (
        "topk",
        1,
        "ta_entropy",
        "seq-mean-token-mean",
    )
    assert (cfg.no_spread, cfg.normalize_over, cfg.ta_entropy_score, cfg.q3_rule, cfg.budget_rounding) == (
        "zero",
        "response",
        "normalized_product",
        "quadrant_only",
        "float",
    )
    assert (cfg.advantage_logprob, cfg.dual_clip) == ("old", False)


@pytest.mark.parametrize(("teacher", "compatibility"), [("server", "lower_bound"), ("fsdp", "exact")])
def test_the_paper_preset_takes_exact_c_where_the_teacher_gives_it(teacher, compatibility):
    path = {"teacher_path": "/models/teacher"} if teacher == "fsdp" else {}
    cfg = TAOPDConfig(preset="paper", teacher=teacher, **path)
    assert cfg.compatibility == compatibility
    assert (cfg.student_probs, cfg.student_prob_floor, cfg.advantage_logprob, cfg.dual_clip) == (
        "exact",
        0.0,
        "old",
        False,
    )


def test_an_explicit_key_overrides_its_preset_and_the_rules_follow():
    cfg = TAOPDConfig(preset="authors_code", min_keep_per_sample=0, aggregation="token-mean")
    assert (cfg.min_keep_per_sample, cfg.aggregation, cfg.entropy_mode) == (0, "token-mean", "topk")
    rules = cfg.selection_rules()
    assert (rules.min_keep_per_sample, rules.no_spread, rules.q3_rule, rules.budget_rounding) == (
        0,
        "zero",
        "quadrant_only",
        "float",
    )
    lines = "\n".join(cfg.resolved_settings())
    assert "preset: authors_code" in lines
    assert "min_keep_per_sample: 0  [set]" in lines
    assert "entropy_mode: 'topk'  [preset authors_code]" in lines
    assert "selector: 'teachability'\n" in lines  # not a preset key: no source


def test_resolved_settings_note_the_verl_keys_a_preset_cannot_set():
    cfg = TAOPDDistillationLossConfig(**BASE, loss_max_clamp=10.0, ta_opd=TAOPDConfig(preset="authors_code"))
    lines = "\n".join(cfg.resolved_settings())
    assert "loss_max_clamp=10.0" in lines and "topk=32" in lines
    quiet = TAOPDDistillationLossConfig(
        **{**BASE, "topk": 16}, loss_max_clamp=None, ta_opd=TAOPDConfig(preset="authors_code")
    )
    assert "note" not in "\n".join(quiet.resolved_settings())
    assert "note" not in "\n".join(TAOPDDistillationLossConfig(**BASE).resolved_settings())


@pytest.mark.parametrize(
    ("kwargs", "key", "accepted"),
    [
        ({"preset": "Paper"}, "preset", "authors_code"),
        ({"student_prob_floor": -1e-12}, "student_prob_floor", "[0, 1)"),
        ({"student_prob_floor": "tiny"}, "student_prob_floor", "[0, 1)"),
        ({"student_probs": "topk_only", "student_prob_floor": 0.0}, "student_prob_floor", "above 0"),
        ({"preset": "authors_code", "student_prob_floor": 0}, "student_prob_floor", "above 0"),
        ({"teacher_list": "top_32"}, "teacher_list", "top_k"),
        ({"min_keep_score": "random"}, "min_keep_score", "ta_entropy"),
        ({"no_spread": "one"}, "no_spread", "zero"),
        ({"normalize_over": "all"}, "normalize_over", "response"),
        ({"ta_entropy_score": "eq17"}, "ta_entropy_score", "normalized_product"),
        ({"q3_rule": "random"}, "q3_rule", "quadrant_only"),
        ({"budget_rounding": "ceil"}, "budget_rounding", "float"),
        ({"advantage_logprob": "new"}, "advantage_logprob", "old"),
        ({"dual_clip": "yes"}, "dual_clip", "true or false"),
    ],
)
def test_invalid_preset_keys_are_rejected_with_the_full_key(kwargs, key, accepted):
    with pytest.raises(ValueError) as info:
        TAOPDConfig(**kwargs)
    message = str(info.value)
    assert f"distillation.distillation_loss.ta_opd.{key}" in message
    assert accepted in message


def test_the_yaml_leaves_preset_keys_null_so_a_preset_reaches_them():
    """conf/ta_opd_common.yaml lists every key; a preset key there must be null, or it would override the
    preset in every run."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = compose(
            config_name="ta_opd_trainer",
            overrides=["distillation.distillation_loss.ta_opd.preset=authors_code"],
        )
    node = config.distillation.distillation_loss
    assert all(node.ta_opd[key] is None for key in PRESET_KEYS)
    cfg = omega_conf_to_dataclass(node)
    assert {key: getattr(cfg.ta_opd, key) for key in PRESET_KEYS} == PRESETS["authors_code"]
