"""`TAOPDConfig` / `TAOPDDistillationLossConfig`: defaults, one test per rejection, verl instantiation."""

import pytest
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config.distillation import DistillationLossConfig

from ta_opd_verl.config import TAOPDConfig, TAOPDDistillationLossConfig

# `ta_opd` is registered by the plugin's loss module; these tests use verl's own `k1` for the base fields.
BASE = {"loss_mode": "k1", "topk": 32, "use_policy_gradient": True}
TARGET = "ta_opd_verl.config.TAOPDDistillationLossConfig"


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
