"""The reference scripts' tail-patch form and the hub family of ``bench run``.

Tolerance of the AdamW check: both sides are float32 arithmetic on the same numbers; torch's
AdamW and the closed form of its first step differ only by rounding (one float32 ulp of a
parameter of size ~0.2 is ~1.5e-8), while a wrong sign or a missed clip moves a parameter by
up to 2e-5: atol 1e-7.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgotrace.eval.influence import TailPatchConfig, TailPatcher, unit_gradient
from bgotrace.eval.reference_form import fresh_adamw_step, relative_change_percent
from bgotrace.eval.runner import run_eval
from tests.test_eval import _quick, built, patch_setup, sources  # noqa: F401


def test_fresh_adamw_step_is_the_closed_form_first_step(patch_setup):  # noqa: F811
    model, cache, _ = patch_setup
    names = [n for n, _ in model.named_parameters()]
    grads = unit_gradient(model, cache.unit_tokens(0), names)
    params = dict(model.named_parameters())
    stepped = fresh_adamw_step(params, grads, lr=1e-5, max_norm=1.0)
    total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    clip = min(1.0, 1.0 / (total + 1e-6))
    for n, g in grads.items():
        gc = g * clip  # first Adam step: m̂ = g, v̂ = g², so the update is g/(|g|+ε)
        expected = params[n].detach() * (1 - 1e-5 * 0.01) - 1e-5 * gc / (gc.abs() + 1e-8)
        torch.testing.assert_close(stepped[n], expected, rtol=0, atol=1e-7)


def test_relative_change_percent():
    np.testing.assert_allclose(relative_change_percent([0.0, np.log(2), np.log(0.5)]), [0, 100, 50])


def test_reference_patcher_moves_the_completion(patch_setup):  # noqa: F811
    model, cache, queries = patch_setup
    patcher = TailPatcher(model, cache, queries, TailPatchConfig(optimizer="adamw-fresh"))
    deltas = patcher.deltas(np.array([[0, 1], [2, 3]]))
    assert np.isfinite(deltas).all() and np.abs(deltas).max() > 0


def test_bench_run_reports_hubs_and_reference_tail_patch(built):  # noqa: F811
    result = run_eval(
        built.bench_dir, built.model_dir, ["bm25", "random"], ["tail-patch", "hubs"],
        split="all", options=_quick(),
    )  # fmt: skip
    table = result.table
    hubs = table[table["family"] == "hubs"]
    assert set(hubs["metric"]) == {"hub_share", "hub_units", "corr_length", "corr_base_loss"}
    share = hubs.set_index(["method", "metric"])["mean"]
    assert 0 < share[("random", "hub_share")] <= 1
    ref = table[table["metric"].str.startswith("tail_patch_ref@")]
    assert {"bm25", "random", "random-k"} <= set(ref["method"])
    assert (ref["mean"].dropna() >= 0).all() and (ref["unit"] == "% |Δp|/p").all()


@pytest.mark.parametrize("bad", ["newton"])
def test_unknown_tail_patch_optimizer_lists_the_reference_one(bad):
    with pytest.raises(Exception, match="adamw-fresh"):
        TailPatchConfig(optimizer=bad)
