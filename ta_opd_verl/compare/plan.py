"""The comparison's plan: which runs `ta-opd compare` makes, and the verl overrides of each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ta_opd_verl.demo.run import DEMO_LOSS, TA_OPD_KEY, demo_run_overrides

COMPARED_SELECTORS = ("full", "teachability", "random", "entropy", "raw_kl", "tip")
MAIN_RATIO = 0.05
BUDGET_SELECTOR = "teachability"
BUDGET_RATIOS = (0.01, 0.03, 0.10, 0.20)
SEEDS = 3
# Fewer steps than the demo, so that the whole plan fits in a long sitting on a 2-core machine; the run
# times are in docs/benchmarks.md ("Selector comparison through verl's trainer").
COMPARE_STEPS = 16
CONFIG_NAME = "ta_opd_cpu"


@dataclass(frozen=True)
class PlannedRun:
    selector: str
    ratio: float
    seed: int
    # ta_opd.loss; the demo's keeps the names runs had before the loss was a dimension.
    loss: str = DEMO_LOSS

    @property
    def name(self) -> str:
        loss = "" if self.loss == DEMO_LOSS else f"-{self.loss}"
        return f"{self.selector}{loss}-r{self.ratio:g}-s{self.seed}"


def comparison_plan(
    selectors: Sequence[str] = COMPARED_SELECTORS,
    seeds: int = SEEDS,
    budgets: Sequence[float] = BUDGET_RATIOS,
    ratio: float = MAIN_RATIO,
    losses: Sequence[str] = (DEMO_LOSS,),
) -> list[PlannedRun]:
    """Every loss and selector at ``ratio`` with seed 0, then the budgets of `teachability` with each loss
    (seed 0), then the other seeds: seed-major, so an interrupted comparison already has one run of every
    configuration."""
    plan = [PlannedRun(selector, ratio, 0, loss) for loss in losses for selector in selectors]
    plan += [
        PlannedRun(BUDGET_SELECTOR, budget, 0, loss)
        for loss in losses
        for budget in budgets
        if budget != ratio
    ]
    plan += [
        PlannedRun(selector, ratio, seed, loss)
        for seed in range(1, seeds)
        for loss in losses
        for selector in selectors
    ]
    return plan


def run_overrides(run: PlannedRun, steps: int, lr: float, pair, extra: Sequence[str] = ()) -> list[str]:
    """verl overrides of one run: the demo's (the pair's paths, settings, seeds and runtime), the run's
    selector and ratio, its loss when it is not the demo's (with verl's policy gradient for ``pg_k1`` only),
    validation at step 0 and the last step only, a Hugging Face export at the end."""
    loss = []
    if run.loss != DEMO_LOSS:
        loss = [
            f"{TA_OPD_KEY}.loss={run.loss}",
            f"distillation.distillation_loss.use_policy_gradient={run.loss == 'pg_k1'}",
        ]
    overrides = [
        *demo_run_overrides(pair, steps=steps, lr=lr, seed=run.seed, test_freq=steps),
        f"{TA_OPD_KEY}.selector={run.selector}",
        f"{TA_OPD_KEY}.ratio={run.ratio:g}",
        *loss,
        f"trainer.save_freq={steps}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        *extra,
    ]
    return _last_wins(overrides)


def _last_wins(overrides: Sequence[str]) -> list[str]:
    """Hydra applies repeated keys in order, so only the last one counts; keep just that one, in its place
    (the demo's settings hold ratio=0.05, which a run's own ratio replaces)."""
    last = {_override_key(item): index for index, item in enumerate(overrides)}
    return [item for index, item in enumerate(overrides) if last[_override_key(item)] == index]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")
