"""``perturb_pair`` (one shared first step) is bit-identical to two ``perturb`` calls, and
``perturb`` to a plain loop of K optimizer steps.

Tolerance: none. The pair runs the same operations on the same values as the two separate
runs (only the first step's loss and gradient at θ0 are computed once), so every perturbed
parameter and every loss of the trajectories must be equal to the last bit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import bgotrace
from bgotrace.config import PerturbConfig
from bgotrace.corpus import Document
from bgotrace.errors import NonFiniteLossError
from bgotrace.modeling.losses import mean_token_loss
from bgotrace.modeling.split import state_token_losses
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.steps import (
    ASCENT,
    DESCENT,
    Start,
    _make_optimizer,
    _set_grads,
    perturb,
    perturb_pair,
    query_start,
    query_trunk,
)
from bgotrace.query import Query, encode_query
from bgotrace.score import perturbation
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2, tiny_llama

QUERY = Query("q", "Paris is the capital of", " France, Berlin of Germany.")
LR = {"sgd": 1e-2, "adam": 1e-2, "fisher": 1e-4}
N_UNITS = 10


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"gpt2": tiny_gpt2(tokenizer, seed=3), "llama": tiny_llama(tokenizer, seed=3)}


def _fisher(model):
    """A positive diagonal 'Fisher' of every parameter (its values only scale the steps)."""
    gen = torch.Generator().manual_seed(0)
    return {n: 0.5 + torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


def _assert_same(pair_state, single_state, names):
    assert pair_state.direction == single_state.direction
    assert pair_state.loss_trajectory == single_state.loss_trajectory  # exact floats
    for n in names:
        assert torch.equal(pair_state.params[n], single_state.params[n]), n


def _loss(model, names, work, q, shared):
    """The query loss with ``work`` bound by ``functional_call`` on every call (the reference
    for ``perturb``, which swaps its working copies in once per run)."""
    labels = q.labels
    overrides = dict(zip(names, work, strict=True))
    return mean_token_loss(state_token_losses(model, shared, overrides, labels), labels)


def _functional_loop(model, q, names, cfg, direction, fisher):
    """K steps written out: loss, gradient, transform, optimizer step; then the final loss."""
    shared = query_trunk(model, names, q)
    base = dict(model.named_parameters())
    work = [base[n].detach().clone().requires_grad_(True) for n in names]
    optimizer = _make_optimizer(work, cfg, direction == ASCENT, N_UNITS)
    trajectory = []
    with grads_only_for(model, []):
        for _ in range(cfg.steps):
            loss = _loss(model, names, work, q, shared)
            trajectory.append(float(loss.detach()))
            _set_grads(work, torch.autograd.grad(loss, work), names, cfg, fisher)
            optimizer.step()
        with torch.no_grad():
            trajectory.append(float(_loss(model, names, work, q, shared)))
    return trajectory, {n: w.detach() for n, w in zip(names, work, strict=True)}


CASES = [
    pytest.param(arch, opt, params, clip, id=f"{arch}-{opt}-{params}-clip{clip}")
    for arch in ("gpt2", "llama")
    for opt in ("sgd", "adam", "fisher")
    for params in ("all", "last:1")  # full forward; shared trunk
    for clip in (None, 0.05)
]


@pytest.mark.parametrize("arch,optimizer,params,max_grad_norm", CASES)
def test_perturb_equals_a_plain_loop(models, tokenizer, arch, optimizer, params, max_grad_norm):
    model = models[arch]
    q = encode_query(QUERY, tokenizer, None)
    names = select_parameters(model, params)
    cfg = PerturbConfig(optimizer=optimizer, lr=LR[optimizer], steps=3, max_grad_norm=max_grad_norm)
    fisher = _fisher(model) if optimizer == "fisher" else None
    for direction in (DESCENT, ASCENT):
        state = perturb(model, q, names, cfg, direction, n_units=N_UNITS, fisher=fisher)
        trajectory, params_ref = _functional_loop(model, q, names, cfg, direction, fisher)
        assert state.loss_trajectory == trajectory
        for n in names:
            assert torch.equal(state.params[n], params_ref[n]), n
            assert type(state.params[n]) is torch.Tensor  # a plain tensor, not a Parameter


@pytest.mark.parametrize("arch,optimizer,params,max_grad_norm", CASES)
def test_pair_equals_two_perturb_calls(models, tokenizer, arch, optimizer, params, max_grad_norm):
    model = models[arch]
    q = encode_query(QUERY, tokenizer, None)
    names = select_parameters(model, params)
    cfg = PerturbConfig(optimizer=optimizer, lr=LR[optimizer], steps=3, max_grad_norm=max_grad_norm)
    fisher = _fisher(model) if optimizer == "fisher" else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    descent, ascent = perturb_pair(model, q, names, cfg, n_units=N_UNITS, fisher=fisher)
    for state, direction in ((descent, DESCENT), (ascent, ASCENT)):
        single = perturb(model, q, names, cfg, direction, n_units=N_UNITS, fisher=fisher)
        _assert_same(state, single, names)
    # the test can fail: both directions moved, apart, and the model is untouched
    traj_d, traj_a = descent.loss_trajectory, ascent.loss_trajectory
    assert traj_d[0] == traj_a[0] and traj_d[-1] < traj_d[0] < traj_a[-1]
    assert any(not torch.equal(descent.params[n], ascent.params[n]) for n in names)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_pair_with_one_step(models, tokenizer):
    """K = 1: the shared step is the only one; each direction adds its final loss."""
    model = models["gpt2"]
    q = encode_query(QUERY, tokenizer, None)
    names = select_parameters(model, "last:1")
    cfg = PerturbConfig(optimizer="adam", lr=1e-2, steps=1)
    pair = perturb_pair(model, q, names, cfg, n_units=N_UNITS)
    for state, direction in zip(pair, (DESCENT, ASCENT), strict=True):
        _assert_same(state, perturb(model, q, names, cfg, direction, n_units=N_UNITS), names)
        assert len(state.loss_trajectory) == 2


def _attribute(model, tokenizer, tmp_path, lr):
    docs = [Document(f"d{i}", f"Paris is the capital of France {i} times.", "s") for i in range(6)]
    cfg = {
        "corpus": {"max_length": 12, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"lr": lr, "steps": 2, "params": "last:1"},
        "scoring": {"batch_size": 4},
    }
    return bgotrace.attribute(model, tokenizer, docs, queries=[QUERY], config=cfg)


def _count_calls(monkeypatch, pair_as_two: bool = False) -> dict[str, int]:
    calls = {"pair": 0, "single": 0}
    real_pair, real_single = perturbation.perturb_pair, perturbation.perturb

    def pair(model, q, names, cfg, **kw):
        calls["pair"] += 1
        if pair_as_two:  # what the sweep ran before perturb_pair existed
            return tuple(real_single(model, q, names, cfg, d, **kw) for d in (DESCENT, ASCENT))
        return real_pair(model, q, names, cfg, **kw)

    def single(*args, **kw):
        calls["single"] += 1
        return real_single(*args, **kw)

    monkeypatch.setattr(perturbation, "perturb_pair", pair)
    monkeypatch.setattr(perturbation, "perturb", single)
    return calls


def test_sweep_uses_the_pair_and_scores_do_not_change(models, tokenizer, tmp_path, monkeypatch):
    model = models["gpt2"]
    calls = _count_calls(monkeypatch)
    paired = _attribute(model, tokenizer, tmp_path, 1e-2)
    assert calls == {"pair": 1, "single": 0}
    _count_calls(monkeypatch, pair_as_two=True)
    separate = _attribute(model, tokenizer, tmp_path, 1e-2)
    got, want = (r.scores.sort_values("unit_index")["score"].to_numpy() for r in (paired, separate))
    np.testing.assert_array_equal(got, want)
    assert np.abs(got).max() > 0


def test_lr_auto_reuses_the_calibrated_ascent(models, tokenizer, tmp_path, monkeypatch):
    """With ``--lr auto`` the search already ran the ascent: only the descent is left."""
    calls = _count_calls(monkeypatch)
    _attribute(models["gpt2"], tokenizer, tmp_path, "auto")
    assert calls == {"pair": 0, "single": 1}


def test_different_configs_are_not_paired():
    q = encode_query(QUERY, make_tiny_tokenizer(), None)
    cfg = PerturbConfig()
    other = dataclasses.replace(cfg, lr=2e-4)
    assert perturbation._is_pair((q, cfg, DESCENT), (q, cfg, ASCENT))
    assert not perturbation._is_pair((q, cfg, DESCENT), (q, other, ASCENT))
    assert not perturbation._is_pair((q, cfg, ASCENT), (q, cfg, DESCENT))


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])  # None: the start's tensors are .grad
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "fisher"])
def test_perturb_from_a_precomputed_start(models, tokenizer, optimizer, max_grad_norm):
    """``start``: the same runs, bit for bit, and the shared gradient is never written."""
    model = models["llama"]
    q = encode_query(QUERY, tokenizer, None)
    names = select_parameters(model, "last:1")
    cfg = PerturbConfig(optimizer=optimizer, lr=LR[optimizer], steps=3, max_grad_norm=max_grad_norm)
    fisher = _fisher(model) if optimizer == "fisher" else None
    start = query_start(model, q, names)
    grads_before = [g.clone() for g in start.grads]
    for direction in (DESCENT, ASCENT):
        kw = {"n_units": N_UNITS, "fisher": fisher}
        _assert_same(
            perturb(model, q, names, cfg, direction, start=start, **kw),
            perturb(model, q, names, cfg, direction, **kw),
            names,
        )
    assert all(torch.equal(g, b) for g, b in zip(start.grads, grads_before, strict=True))


def test_stop_ends_the_run_where_it_says(models, tokenizer):
    """Stopped after step 2 of 4: the first 2 steps of the full run (= a 2-step run), and
    the predicate saw steps 1 and 2 with the trajectory so far and the current values."""
    model = models["gpt2"]
    q = encode_query(QUERY, tokenizer, None)
    names = select_parameters(model, "last:1")
    cfg = PerturbConfig(optimizer="adam", lr=1e-2, steps=4)
    seen = []

    def stop(step, trajectory, work):
        seen.append((step, list(trajectory), [w.detach().clone() for w in work]))
        return step == 2

    stopped = perturb(model, q, names, cfg, ASCENT, n_units=N_UNITS, stop=stop)
    full = perturb(model, q, names, cfg, ASCENT, n_units=N_UNITS)
    short = perturb(model, q, names, dataclasses.replace(cfg, steps=2), ASCENT, n_units=N_UNITS)
    assert [s[0] for s in seen] == [1, 2]
    assert stopped.loss_trajectory == full.loss_trajectory[:3] == seen[-1][1]
    assert stopped.loss_trajectory == short.loss_trajectory
    for i, n in enumerate(names):
        assert torch.equal(stopped.params[n], short.params[n]), n
        assert torch.equal(seen[-1][2][i], stopped.params[n]), n
    assert any(not torch.equal(stopped.params[n], full.params[n]) for n in names)


def test_a_non_finite_loss_raises_unless_stop_takes_it(models, tokenizer):
    model = models["gpt2"]
    q = encode_query(QUERY, tokenizer, None)
    names = select_parameters(model, "last:1")
    cfg = PerturbConfig(optimizer="sgd", lr=1e30, steps=3)  # the first step overflows
    with pytest.raises(NonFiniteLossError, match="ascent step 1"):
        perturb(model, q, names, cfg, ASCENT, n_units=N_UNITS)
    state = perturb(
        model, q, names, cfg, ASCENT, n_units=N_UNITS, stop=lambda k, t, w: not math.isfinite(t[-1])
    )
    assert len(state.loss_trajectory) == 2 and not math.isfinite(state.final_loss)


def test_lr_auto_descent_starts_from_the_search(models, tokenizer, tmp_path, monkeypatch):
    """The engine's descent starts from the lr search's θ0 loss and gradient: the scores are
    the same, bit for bit, as with a descent that computes them again."""
    real = perturbation.perturb
    starts = []

    def single(*args, start=None, **kw):
        starts.append(start)
        return real(*args, start=start if keep else None, **kw)

    monkeypatch.setattr(perturbation, "perturb", single)
    results = {}
    for keep in (True, False):
        results[keep] = _attribute(models["gpt2"], tokenizer, tmp_path / str(keep), "auto")
    assert len(starts) == 2 and all(isinstance(s, Start) for s in starts)
    got, want = (r.scores.sort_values("unit_index")["score"].to_numpy() for r in results.values())
    np.testing.assert_array_equal(got, want)
    assert np.abs(got).max() > 0
