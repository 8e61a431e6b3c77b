"""``--lr auto``: the search reaches its target, is deterministic and never diverges.

Models: a fresh tiny GPT-2 (query loss ≈ log V), the same model after it memorised the
query (loss ≈ 0, where Fisher steps at a fixed η blow up), and the shipped demo model.
Tolerance: the search stops within ``TOLERANCE`` (10%) of the target; the test allows 25%
for the rare query where the search runs out of trials first (reported as not reached).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bgotrace.config import PerturbConfig
from bgotrace.errors import ConfigError
from bgotrace.perturb.calibrate import MAX_TRIALS, calibrate_lr
from bgotrace.perturb.fisher import fisher_denominators
from bgotrace.perturb.lr_trials import Trial, first_order_lr, predict_lr, start_point
from bgotrace.perturb.steps import ASCENT, DESCENT, perturb
from bgotrace.query import Query, encode_query
from tests.conftest import make_tiny_tokenizer
from tests.models import memorise, tiny_gpt2

QUERY = Query("q", "Paris is the capital of", " France, Berlin of Germany.")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def fresh(tokenizer):
    return tiny_gpt2(tokenizer, seed=1)


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A tiny model trained on the query text until its loss is ≈ 0."""
    return memorise(tiny_gpt2(tokenizer, seed=2), encode_query(QUERY, tokenizer, None).input_ids)


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _fisher_like(model, scale: float):
    """A diagonal 'Fisher' with tiny entries, as on memorised data (F̂ → 0)."""
    gen = torch.Generator().manual_seed(0)
    return {n: scale * torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


def _ascent_rise(model, q, cfg, lr, fisher=None):
    state = perturb(
        model, q, _names(model), dataclasses.replace(cfg, lr=lr), ASCENT, n_units=10, fisher=fisher
    )
    return state.final_loss - state.loss_trajectory[0], state


@pytest.mark.parametrize("which", ["fresh", "memorised"])
@pytest.mark.parametrize("criterion,target", [("loss", 1.0), ("loss", 0.3), ("radius", 1e-3)])
def test_search_reaches_the_target(request, tokenizer, which, criterion, target):
    model = request.getfixturevalue(which)
    q = encode_query(QUERY, tokenizer, None)
    cfg = PerturbConfig(lr="auto", lr_target=target, lr_criterion=criterion, steps=5)
    cal = calibrate_lr(model, q, _names(model), cfg, n_units=10)
    assert cal.reached, cal.to_dict()
    assert abs(cal.achieved / target - 1) <= 0.25
    assert cal.chosen().effect == cal.achieved and cal.chosen().overshot_at is None
    if criterion == "loss":  # the recorded effect is what the perturbation reproduces
        rise, _ = _ascent_rise(model, q, cfg, cal.lr)
        assert rise == pytest.approx(cal.achieved, rel=1e-5)
    # θ0's pass is shared by every trial; each trial adds one forward per step it ran
    assert cal.query_steps == 1 + sum(len(t.trajectory) - 1 for t in cal.trials)
    assert cal.query_steps <= 1 + len(cal.trials) * cfg.steps
    # the budget: MAX_TRIALS full trials' passes (+ one full run when every trial overshot)
    assert cal.query_steps <= 1 + (MAX_TRIALS + 1) * cfg.steps


def test_memorised_query_is_what_the_fixture_claims(tokenizer, memorised):
    q = encode_query(QUERY, tokenizer, None)
    cfg = PerturbConfig(steps=1)
    state = perturb(memorised, q, _names(memorised), cfg, DESCENT, n_units=10)
    assert state.loss_trajectory[0] < 0.05


def test_search_is_deterministic(tokenizer, fresh):
    q = encode_query(QUERY, tokenizer, None)
    cfg = PerturbConfig(lr="auto", lr_target=0.5, steps=4)
    runs = [calibrate_lr(fresh, q, _names(fresh), cfg, n_units=10).to_dict() for _ in range(2)]
    for r in runs:
        r.pop("seconds")
    assert runs[0] == runs[1]


def test_fisher_on_memorised_model_diverges_fixed_but_not_auto(tokenizer, memorised):
    """F̂ → 0: the reference η = 1e-4 blows the query loss up; auto keeps the target."""
    q = encode_query(QUERY, tokenizer, None)
    fisher = _fisher_like(memorised, 1e-9)
    cfg = PerturbConfig(optimizer="fisher", lr=1e-4, steps=5)
    try:
        rise, _ = _ascent_rise(memorised, q, cfg, 1e-4, fisher)
    except Exception:  # NonFiniteLossError: diverged outright
        rise = math.inf
    assert rise > 5.0  # far beyond any useful perturbation
    auto = dataclasses.replace(cfg, lr="auto", lr_target=1.0)
    cal = calibrate_lr(memorised, q, _names(memorised), auto, n_units=10, fisher=fisher)
    assert cal.reached and cal.lr < 1e-4
    rise, state = _ascent_rise(memorised, q, cfg, cal.lr, fisher)
    assert math.isfinite(rise) and abs(rise - 1.0) < 0.25
    descent = perturb(
        memorised, q, _names(memorised), dataclasses.replace(cfg, lr=cal.lr), DESCENT,
        n_units=10, fisher=fisher,
    )  # fmt: skip
    assert all(math.isfinite(v) for v in descent.loss_trajectory)


@pytest.mark.slow
def test_demo_model_auto_does_not_diverge():
    from bgotrace.demo import DEMO_PROMPTS, demo_model_path
    from bgotrace.modeling.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(demo_model_path()), device="cpu")
    q = encode_query(Query("d", DEMO_PROMPTS[0], " The patriotic art of lying"), tok, None)
    for optimizer in ("adam", "fisher"):
        fisher = _fisher_like(model, 1e-9) if optimizer == "fisher" else None
        cfg = PerturbConfig(optimizer=optimizer, lr="auto", steps=10)
        cal = calibrate_lr(model, q, _names(model), cfg, n_units=100, fisher=fisher)
        assert cal.reached and math.isfinite(cal.achieved)


OPTIMIZERS = ("adam", "sgd", "fisher")


def _fisher_for(which: str, model):
    """F̂ → 0 on the memorised model (the case that breaks fixed Fisher steps); else O(1e-3)."""
    return _fisher_like(model, 1e-9 if which == "memorised" else 1e-3)


def _effect(model, q, cfg, lr, fisher):
    """K ascent steps at lr, measured the slow way: loss rise or ‖θK − θ0‖/‖θ0‖."""
    rise, state = _ascent_rise(model, q, cfg, lr, fisher)
    if cfg.lr_criterion == "loss":
        return rise
    base = dict(model.named_parameters())
    moved = sum(float((state.params[n] - base[n].detach()).pow(2).sum()) for n in base)
    return math.sqrt(moved / sum(float(p.detach().pow(2).sum()) for p in base.values()))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("criterion,target", [("loss", 1e-3), ("radius", 1e-6)])
def test_first_order_guess_is_exact_for_one_small_step(
    tokenizer, fresh, optimizer, criterion, target
):
    """K = 1 and a tiny target: one step at the guess reaches the target to within 2% (the
    neglected terms are O(η²); measured ≤ 0.3%)."""
    q = encode_query(QUERY, tokenizer, None)
    fisher = _fisher_for("fresh", fresh)
    cfg = PerturbConfig(
        optimizer=optimizer, lr="auto", lr_target=target, lr_criterion=criterion, steps=1
    )
    start = start_point(fresh, q, _names(fresh))
    guess = first_order_lr(start, _names(fresh), cfg, n_units=10, fisher=fisher)
    assert guess is not None
    assert _effect(fresh, q, cfg, guess, fisher) / target == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("criterion,target,factor", [("loss", 1.0, 5.0), ("radius", 1e-3, 1.25)])
def test_first_order_guess_is_near_the_chosen_lr(
    tokenizer, fresh, optimizer, criterion, target, factor
):
    """K = 5 on the fresh model: the guess is within ``factor`` of the η the search chose
    (loss: measured 0.23-0.32x, the rise saturates along the ascent; radius: 1.0x). On the
    memorised model (loss ≈ 0, gradient ≈ 0) the first order says little: there the
    search's later trials do the work (see the divergence test below)."""
    q = encode_query(QUERY, tokenizer, None)
    cfg = PerturbConfig(
        optimizer=optimizer, lr="auto", lr_target=target, lr_criterion=criterion, steps=5
    )
    cal = calibrate_lr(fresh, q, _names(fresh), cfg, n_units=10, fisher=_fisher_for("fresh", fresh))
    assert cal.reached and cal.first_guess is not None
    assert cal.trials[0].lr == cal.first_guess  # the search starts there
    assert 1 / factor <= cal.first_guess / cal.lr <= factor


@pytest.mark.parametrize("which", ["fresh", "memorised"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_early_abort_changes_only_the_cost(request, tokenizer, which, optimizer):
    """Stopping overshoots early gives the same trials and the same η, bit for bit, as
    running every trial to K steps, for fewer query passes whenever a trial overshot."""
    model = request.getfixturevalue(which)
    q = encode_query(QUERY, tokenizer, None)
    fisher = _fisher_for(which, model)
    cfg = PerturbConfig(optimizer=optimizer, lr="auto", lr_target=1.0, steps=5)
    runs = [
        calibrate_lr(model, q, _names(model), cfg, n_units=10, fisher=fisher, early_abort=abort)
        for abort in (True, False)
    ]
    stopped, full = runs
    assert stopped.lr == full.lr and stopped.achieved == full.achieved
    assert [t.lr for t in stopped.trials] == [t.lr for t in full.trials]
    assert [t.overshot_at for t in stopped.trials] == [t.overshot_at for t in full.trials]
    overshoots = [t for t in full.trials if t.overshot_at is not None]
    assert all(t.steps == t.overshot_at for t in stopped.trials if t.overshot_at is not None)
    assert stopped.query_steps <= full.query_steps - len(overshoots)
    for n, v in full.ascent.params.items():
        torch.testing.assert_close(stopped.ascent.params[n], v, rtol=0, atol=0)
    if which == "memorised":  # the case where the first-order guess overshoots: it must stop
        assert overshoots


@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("which", ["fresh", "memorised"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_no_divergence_with_any_optimizer(request, tokenizer, which, optimizer, steps):
    """Reached, finite both ways, the ascent reused as is. Memorised with K = 10 is the hard
    case: the ascent's loss explodes within its steps, so the effect is very steep in η."""
    model = request.getfixturevalue(which)
    q = encode_query(QUERY, tokenizer, None)
    fisher = _fisher_for(which, model)
    cfg = PerturbConfig(optimizer=optimizer, lr="auto", lr_target=1.0, steps=steps)
    cal = calibrate_lr(model, q, _names(model), cfg, n_units=10, fisher=fisher)
    assert cal.reached and math.isfinite(cal.achieved), cal.to_dict()
    fixed = dataclasses.replace(cfg, lr=cal.lr)
    for direction in (ASCENT, DESCENT):
        state = perturb(model, q, _names(model), fixed, direction, n_units=10, fisher=fisher)
        assert all(math.isfinite(v) for v in state.loss_trajectory)
    assert (
        cal.ascent.loss_trajectory
        == perturb(
            model, q, _names(model), fixed, ASCENT, n_units=10, fisher=fisher
        ).loss_trajectory
    )


def test_lr_depends_on_the_query_alone(tokenizer, fresh):
    """Same query, same η and same ascent, bit for bit, whatever was calibrated before it."""
    q = encode_query(QUERY, tokenizer, None)
    other = encode_query(Query("o", "The sea is", " wide and deep, and cold."), tokenizer, None)
    cfg = PerturbConfig(lr="auto", lr_target=0.5, steps=4)
    first = calibrate_lr(fresh, q, _names(fresh), cfg, n_units=10)
    between = calibrate_lr(fresh, other, _names(fresh), cfg, n_units=10)
    again = calibrate_lr(fresh, q, _names(fresh), cfg, n_units=10)
    assert between.lr != first.lr  # another query really is another search
    a, b = first.to_dict(), again.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    for n, v in first.ascent.params.items():
        torch.testing.assert_close(again.ascent.params[n], v, rtol=0, atol=0)


def _synthetic(effects: list[float], lr: float = 1.0) -> Trial:
    return Trial(lr, effects[-1], effects=effects, steps=len(effects) - 1, finished=True)


@pytest.mark.parametrize(
    "effects,target,expected",
    [
        ([0, 0.25, 0.5, 0.75, 1.0], 0.5, 0.5),  # linear in k, crossing at step 2 of 4
        ([0, 0.25, 0.5, 0.75, 1.0], 0.375, 0.375),  # between steps 1 and 2: interpolated
        ([0, 1 / 16, 1 / 4, 9 / 16, 1.0], 0.25, 0.5),  # quadratic: crossing exactly at step 2
        ([0, 1 / 16, 1 / 4, 9 / 16, 1.0], 1 / 64, 1 / 16),  # below step 1: linear (truth 1/8)
        ([0, 0.1, 0.2, 0.3, 0.4], 0.8, 2.0),  # undershoot, slope 1 from steps 2 to 4
        ([0, 1 / 16, 1 / 4, 9 / 16, 1.0], 4.0, 2.0),  # undershoot, slope 2 extrapolated
        ([0, 0.5**5, 1.0], 8.0, 2.0),  # slope 5 bounded to 3 when extrapolating
    ],
)
def test_trajectory_prediction_on_hand_computed_trials(effects, target, expected):
    """k of K steps at η read as K steps at η·k/K, power law between neighbouring steps."""
    trial = _synthetic(effects)
    assert predict_lr(trial, target, k_steps=len(effects) - 1) == pytest.approx(expected)


def test_damped_fisher_tends_to_the_eps_form():
    """λ·mean(F̂) = ε gives the ε form exactly; as λ → 0 both tend to g/F̂ (rtol 1e-6)."""
    gen = torch.Generator().manual_seed(0)
    fisher = {"a": torch.rand(5, 3, generator=gen) + 0.1, "b": torch.rand(7, generator=gen) + 0.1}
    names = ["a", "b"]
    mean = float(torch.cat([fisher["a"].flatten(), fisher["b"]]).mean())
    eps_form = fisher_denominators(fisher, names, eps=1e-3 * mean, damping=None)
    damped = fisher_denominators(fisher, names, eps=1.0, damping=1e-3)  # ε unused when damped
    for n in names:
        torch.testing.assert_close(damped[n], eps_form[n], rtol=1e-6, atol=0.0)
        tiny = fisher_denominators(fisher, names, eps=1.0, damping=1e-9)[n]
        torch.testing.assert_close(tiny, fisher[n], rtol=1e-6, atol=0.0)


def test_damping_bounds_near_zero_entries():
    fisher = {"w": torch.tensor([1.0, 1.0, 1e-12])}
    den = fisher_denominators(fisher, ["w"], eps=1e-6, damping=0.1)["w"]
    mean = (2.0 + 1e-12) / 3
    assert float(den.min()) >= 0.1 * mean * (1 - 1e-6)
    zero = fisher_denominators({"w": torch.zeros(3)}, ["w"], eps=1e-6, damping=0.1)["w"]
    assert float(zero.min()) == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": "auto", "lr_target": 0.0}, "--lr-target must be > 0"),
        ({"lr": "auto", "lr_target": -1.0}, "--lr-target must be > 0"),
        ({"lr": "fast"}, "--lr='fast' is not a number"),
        ({"lr": -1e-4}, "--lr must be > 0"),
        ({"lr_criterion": "grad"}, "--lr-criterion='grad' is unknown"),
        ({"fisher_damping": -0.1}, "--fisher-damping must be > 0"),
    ],
)
def test_bad_values_are_clean_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        PerturbConfig(**kwargs)


def test_lr_strings_are_parsed():
    assert PerturbConfig(lr="AUTO").lr == "auto"
    assert PerturbConfig(lr="1e-3").lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="unresolved"):
        PerturbConfig(lr="auto").fixed_lr  # noqa: B018


def test_chosen_ascent_is_what_perturb_gives(tokenizer, fresh):
    """The search hands its best ascent to the engine, which then skips recomputing it."""
    q = encode_query(QUERY, tokenizer, None)
    cfg = PerturbConfig(lr="auto", lr_target=1.0, steps=4)
    cal = calibrate_lr(fresh, q, _names(fresh), cfg, n_units=10)
    assert cal.ascent is not None and all(t.state is None for t in cal.trials)
    _, again = _ascent_rise(fresh, q, cfg, cal.lr)
    assert cal.ascent.loss_trajectory == again.loss_trajectory
    for n, v in again.params.items():
        torch.testing.assert_close(cal.ascent.params[n], v, rtol=0, atol=0)  # bit-identical


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_descent_from_the_search_start_is_the_plain_descent(tokenizer, fresh, optimizer):
    """The search hands θ0's loss and gradient on too: the descent at its η starts there,
    bit-identical to a descent that computes them again."""
    q = encode_query(QUERY, tokenizer, None)
    fisher = _fisher_for("fresh", fresh)
    cfg = PerturbConfig(optimizer=optimizer, lr="auto", lr_target=1.0, steps=4)
    cal = calibrate_lr(fresh, q, _names(fresh), cfg, n_units=10, fisher=fisher)
    assert cal.start is not None and cal.start.loss == cal.ascent.loss_trajectory[0]
    fixed = dataclasses.replace(cfg, lr=cal.lr)
    run = [
        perturb(fresh, q, _names(fresh), fixed, DESCENT, n_units=10, fisher=fisher, start=s)
        for s in (cal.start, None)
    ]
    assert run[0].loss_trajectory == run[1].loss_trajectory
    assert run[0].final_loss < run[0].loss_trajectory[0]
    for n, v in run[1].params.items():
        torch.testing.assert_close(run[0].params[n], v, rtol=0, atol=0)  # bit-identical
