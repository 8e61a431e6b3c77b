"""--model-dtype: weights loaded in half precision, K steps without float32 copies
(bgotrace.perturb.lowp), and a bfloat16 run end to end against the float32 reference."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

from bgotrace.cli.main import app
from bgotrace.config import PerturbConfig
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.perturb.lowp import LowPrecisionOptimizer, stochastic_round_
from bgotrace.perturb.steps import perturb, perturb_pair
from bgotrace.query import Query, encode_query
from bgotrace.score.context import sweep_model_in
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

ADAM = (0.9, 0.999, 1e-8)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("adam", [ADAM, None])
def test_lowp_optimizer_is_torch_adam_and_sgd_in_float32(maximize: bool, adam) -> None:
    """The same update as torch.optim.Adam/SGD when nothing is rounded (float32 storage);
    tolerance 1e-6 of a 1e-2 movement: float32 reassociation only."""
    torch.manual_seed(0)
    w0 = torch.randn(5000) * 0.05
    ref, mine = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    if adam is None:
        reference: torch.optim.Optimizer = torch.optim.SGD([ref], lr=1e-3, maximize=maximize)
    else:
        reference = torch.optim.Adam([ref], lr=1e-3, maximize=maximize)
    ours = LowPrecisionOptimizer([mine], lr=1e-3, adam=adam, maximize=maximize)
    for _ in range(10):
        g = torch.randn(5000)
        ref.grad, mine.grad = g.clone(), g.clone()
        reference.step()
        ours.step()
    assert (ref - w0).abs().mean() > 1e-3  # they moved
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)


def test_stochastic_rounding_is_unbiased() -> None:
    """A value 1/8 of a bfloat16 step above a representable one: round-to-nearest always
    drops the 1/8; stochastic rounding keeps it on average (within 5 binomial std)."""
    base = torch.tensor(0.0625, dtype=torch.bfloat16).float()  # 2^-4, exactly representable
    step = 2.0**-4 * 2.0**-7  # bfloat16 spacing above 2^-4
    x = torch.full((200_000,), float(base) + step / 8)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {float(base), float(base) + step}
    bias = float(out.float().mean() - x.mean())
    std = step * (1 / 8 * 7 / 8 / x.numel()) ** 0.5
    assert abs(bias) < 5 * std
    assert float(x.to(torch.bfloat16).float().mean() - x.mean()) == pytest.approx(-step / 8)


def test_small_adam_steps_survive_in_bfloat16() -> None:
    """K = 10 Adam steps of η = 1e-4 on weights of magnitude ~0.1 (bfloat16 spacing 4.9e-4):
    torch.optim.Adam on bfloat16 weights rounds every step away; the low-precision path
    moves the weights as float32 Adam does, in expectation."""
    torch.manual_seed(0)
    w0 = ((torch.rand(50_000) + 1) * 0.1 * torch.sign(torch.randn(50_000))).bfloat16().float()
    grads = [torch.randn(50_000) + 1.0 for _ in range(10)]

    def run(weights: torch.Tensor, opt_of) -> torch.Tensor:
        w = weights.clone().requires_grad_(True)
        opt = opt_of(w)
        for g in grads:
            w.grad = g.to(w.dtype)
            opt.step()
        return w.detach().float() - w0

    ref = run(w0, lambda w: torch.optim.Adam([w], lr=1e-4))
    nearest = run(w0.bfloat16(), lambda w: torch.optim.Adam([w], lr=1e-4))
    lowp = run(w0.bfloat16(), lambda w: LowPrecisionOptimizer([w], lr=1e-4, adam=ADAM,
                                                               maximize=False))  # fmt: skip
    assert nearest.abs().mean() < 0.1 * ref.abs().mean()  # why: round-to-nearest loses them
    # Each weight lands on one of its two neighbouring bfloat16 values (so per weight the
    # movement is noisy: a few bfloat16 steps), but unbiased: along the gradients' common
    # direction, which is what a unit's loss change reads, it is float32 Adam's within 5%.
    direction = torch.stack(grads).mean(0)
    assert float(lowp @ direction / (ref @ direction)) == pytest.approx(1.0, abs=0.05)
    assert float(lowp.mean() / ref.mean()) == pytest.approx(1.0, abs=0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = make_tiny_tokenizer()
    tiny_gpt2(tokenizer, width=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_load_in_the_model_dtype_and_the_sweep_reuses_them(model_dir, dtype) -> None:
    model, tokenizer = load_model_and_tokenizer(model_dir, device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert sweep_model_in(model, dtype) is model  # no second copy
    query = encode_query(Query("q", "Paris is the capital of", " France."), tokenizer, 64)
    names = [n for n, _ in model.named_parameters()]
    cfg = PerturbConfig(lr=1e-3, steps=3)
    descent, ascent = perturb_pair(model, query, names, cfg, n_units=10)
    for state in (descent, ascent):
        assert {t.dtype for t in state.params.values()} == {getattr(torch, dtype)}
    assert descent.final_loss < descent.loss_trajectory[0] < ascent.final_loss
    # each direction took its own first step: the same as a single perturb call
    alone = perturb(model, query, names, cfg, "ascent", n_units=10)
    assert alone.loss_trajectory == ascent.loss_trajectory


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, Berlin of Germany.",
    "Water boils at one hundred degrees and ice melts at zero.",
    "def add(a, b): return a + b",
    "Rome is the capital of Italy and Madrid of Spain.",
    "The cat sat on the mat and the dog lay by the door.",
    "Ice is frozen water; steam is water that boiled.",
    "for i in range(10): print(i)",
    "Lisbon is the capital of Portugal.",
    "A fox is quick and a dog is lazy.",
]


def test_bfloat16_end_to_end_agrees_with_float32(model_dir, tmp_path) -> None:
    """The same run with --model-dtype bfloat16 --dtype bfloat16 and in float32: finite
    scores, the dtype recorded in config.yaml, and rankings that agree (Spearman >= 0.8;
    measured on the benchmark model in benchmarks/RESULTS.md)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                              for i, t in enumerate(TEXTS)))  # fmt: skip
    scores = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        args = ["attribute", "--model", model_dir, "--corpus", corpus, "--quiet",
                "--cache-dir", tmp_path / "cache", "--max-length", "16", "--steps", "3",
                "--lr", "1e-3", "--prompt", "Paris is the capital of", "--completion",
                " France.", "--model-dtype", dtype, "--dtype", dtype, "--device", "cpu",
                "--out", out]  # fmt: skip
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert f"dtype: {dtype}" in (out / "config.yaml").read_text()
        frame = pd.read_parquet(out / "scores.parquet").set_index("unit_id")
        assert frame["score"].notna().all()
        scores[dtype] = frame["score"]
    a, b = scores["float32"].align(scores["bfloat16"])
    assert spearmanr(a, b).statistic >= 0.8
