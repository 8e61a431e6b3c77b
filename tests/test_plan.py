"""The memory plan (bgotrace.plan): estimates vs measured peaks, refusal before loading
weights, the CLI's JSON and size parsing, and that full-model BGO fits an 80 GiB GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, MixtralForCausalLM
from typer.testing import CliRunner

from bgotrace.cli.main import app
from bgotrace.config import AttributeConfig
from bgotrace.devices import parse_size
from bgotrace.errors import ConfigError
from bgotrace.plan.estimate import plan_run
from bgotrace.plan.fit import InsufficientMemoryError, check_memory
from bgotrace.plan.shape import model_shape
from tests.rss_probe import PEAK_RSS

GIB = 2**30
LLAMA_3_8B = dict(  # published dimensions of Llama-3-8B
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    tie_word_embeddings=False,
)  # fmt: skip
LLAMA_32_1B = dict(  # published dimensions of Llama-3.2-1B
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def llama_8b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the config.json of an 8B-shaped Llama (no weights)."""
    path = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(**LLAMA_3_8B).save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    return path


def _config(model_dir: Path, **sections: dict) -> AttributeConfig:
    data: dict[str, dict] = {"model": {"path": str(model_dir)}, "corpus": {"path": "absent"},
                             "query": {"prompt": "a", "completion": "b"}}  # fmt: skip
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return AttributeConfig.from_dict(data)


def test_parse_size_units_and_one_line_errors() -> None:
    assert parse_size("80GiB") == 80 * GIB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5 mib") == int(1.5 * 2**20)
    assert parse_size("4096") == 4096
    for bad in ("80XB", "-1GB", "0GiB", "", "lots"):
        with pytest.raises(ConfigError, match="--device-memory .* is not a memory size") as err:
            parse_size(bad)
        assert "\n" not in str(err.value)


def test_plan_counts_every_expert_of_a_mixture() -> None:
    cfg = MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    real = MixtralForCausalLM(cfg)  # the reference: a real model's parameters, counted
    named = dict(real.named_parameters())
    assert model_shape(cfg, "all").n_params == sum(p.numel() for p in named.values())
    experts = model_shape(cfg, "regex:experts")
    assert experts.n_selected == sum(p.numel() for n, p in named.items() if "experts" in n)
    # four experts of 3 × 32 × 64 weights in each of 2 layers: every expert is counted
    assert experts.n_selected == 2 * 4 * 3 * 32 * 64


def test_full_model_bgo_fits_80_gib_by_the_plan(llama_8b_dir: Path, tmp_path: Path) -> None:
    """--params all --model-dtype bfloat16: Llama-3-8B at Q = 1, a 1B Llama at Q = 8, both at
    the default batch of 16 (the batched normaliser keeps its recorded tensors in bfloat16:
    no float32 copies, which at 16 units of 256 tokens took 31.5 GiB and needed batch 8)."""
    LlamaConfig(**LLAMA_32_1B).save_pretrained(tmp_path)
    for path, q, batch in ((llama_8b_dir, 1, 16), (tmp_path, 8, 16)):
        scoring = {"dtype": "bfloat16", "batch_size": batch}
        half = {"model": {"dtype": "bfloat16"}, "scoring": scoring, "execution": {"device": "cuda"}}
        cfg = _config(path, **half)
        plan = plan_run(cfg, n_queries=q, device_memory=80 * GIB)
        assert plan.run.queries_per_sweep == min(q, 8)
        assert plan.fits, (path, plan.peak_device_bytes / GIB)
        fp32 = plan_run(_config(path, execution={"device": "cuda"}), n_queries=q,
                        device_memory=80 * GIB)  # fmt: skip
        assert not fp32.fits  # today's float32 Adam does not


def test_attribute_refuses_before_loading_weights(llama_8b_dir: Path, tmp_path: Path) -> None:
    """One line, exit 2, with what it needs, what the device has and a computed fix. The
    directory has no weights, so any load attempt would fail with another message."""
    result = CliRunner().invoke(app, [
        "attribute", "--model", str(llama_8b_dir), "--corpus", str(tmp_path / "absent.jsonl"),
        "--prompt", "The capital is", "--completion", " Paris.", "--device", "cpu",
        "--device-memory", "80GiB",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: This run needs about"), lines
    assert "the device has 80.0 GiB" in lines[0] and ": pass --" in lines[0]
    fix = lines[0].split(": pass ")[1].split(" (")[0]
    # the suggested flags do fit, by the same estimate
    flags = dict(zip(fix.split()[::2], fix.split()[1::2], strict=True))
    changed = _config(llama_8b_dir, execution={"device": "cpu", "device_memory": "80GiB"})
    if "--params" in flags:
        changed.perturb.params = flags["--params"]
    if "--queries-per-sweep" in flags:
        changed.scoring.queries_per_sweep = int(flags["--queries-per-sweep"])
    if "--model-dtype" in flags:
        changed.model.dtype = flags["--model-dtype"]
        changed.scoring.dtype = flags["--dtype"]
    check_memory(changed, n_queries=1)  # raises if it does not fit
    with pytest.raises(InsufficientMemoryError):
        check_memory(_config(llama_8b_dir, execution={"device": "cpu", "device_memory": "80GiB"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a host without CUDA")
def test_attribute_on_cuda_without_a_gpu_says_so(llama_8b_dir: Path, tmp_path: Path) -> None:
    """Not the plan's "pass --device-memory" advice: that sizes a plan, a run needs the GPU."""
    result = CliRunner().invoke(app, [
        "attribute", "--model", str(llama_8b_dir), "--corpus", str(tmp_path / "absent.jsonl"),
        "--prompt", "The capital is", "--completion", " Paris.", "--device", "cuda",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == ["error: Device 'cuda' was asked for but CUDA is not available: "
                     "use --device cpu or auto."], lines  # fmt: skip


def test_plan_cli_json_without_a_gpu(llama_8b_dir: Path) -> None:
    args = ["plan", "--model", str(llama_8b_dir), "--device", "cuda", "--device-memory",
            "80GiB", "--model-dtype", "bfloat16", "--dtype", "bfloat16", "--batch-size", "8",
            "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert {"peak_device_bytes", "peak_host_bytes", "stages", "fits"} <= set(plan)
    assert plan["device_memory_bytes"] == 80 * GIB and plan["fits"]
    names = [s["name"] for s in plan["stages"]]
    assert names == ["load", "normaliser", "perturbation", "sweep", "top tokens"]
    assert plan["peak_device_bytes"] == max(s["device_bytes"] for s in plan["stages"])
    assert plan["parameters"] == 8_030_261_248  # Llama-3-8B's published count
    text = CliRunner().invoke(app, args[:-1])
    assert text.exit_code == 0 and "fits in 80.0 GiB (cuda)" in text.output
    # The printed breakdown of the host peak adds up to it (no corpus: no cache pages).
    from bgotrace.plan.fit import human
    from bgotrace.plan.memory import RUNTIME_BYTES

    largest_host = max(s["host_bytes"] for s in plan["stages"])
    assert plan["peak_host_bytes"] == RUNTIME_BYTES + largest_host
    said = f"host peak = runtime {human(RUNTIME_BYTES)} + token cache pages 0.0 KiB + the largest"
    assert said + " stage's host column" in text.output


def test_plan_cli_bad_device_memory_is_one_line(llama_8b_dir: Path) -> None:
    for bad in ("80XB", "-3GB"):
        result = CliRunner().invoke(
            app, ["plan", "--model", str(llama_8b_dir), "--device-memory", bad]
        )
        assert result.exit_code == 2
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "is not a memory size" in lines[0], lines


def test_plan_without_gpu_asks_for_device_memory(llama_8b_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: its memory is read")
    result = CliRunner().invoke(app, ["plan", "--model", str(llama_8b_dir), "--device", "cuda"])
    assert result.exit_code == 2 and "pass --device-memory" in result.output


_MEASURE = (
    textwrap.dedent('''
    """Peak RSS increments of perturb_pair and of a sweep vs the plan's stages less weights."""
    import json, sys
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from bgotrace.config import PerturbConfig
    from bgotrace.perturb.params import select_parameters
    from bgotrace.perturb.sensitivity import unit_gradient_norms
    from bgotrace.perturb.steps import perturb_pair
    from bgotrace.plan.memory import RunShape, stages
    from bgotrace.plan.shape import MetaModel
    from bgotrace.query import EncodedQuery, Query
    from bgotrace.score.sweep import unit_loss_sums
''')
    + PEAK_RSS
    + textwrap.dedent("""

    class Units:  # 64 random units of T tokens: what the sweep reads from a token cache
        toks = np.random.default_rng(0).integers(0, 2000, (32, 64)).astype(np.uint32)
        lengths = np.full(32, 64)
        def __len__(self):
            return 32
        def unit_tokens(self, i):
            return self.toks[i]

    torch.set_num_threads(1)
    T, Q, CPU = 24, 2, torch.device("cpu")
    cfg = GPT2Config(vocab_size=2000, bos_token_id=0, eos_token_id=0, n_positions=64,
                     n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    out = []
    for dtype_name, params in json.loads(sys.argv[1]):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).to(dtype).eval()
        ids = torch.randint(0, 2000, (1, T))
        q = EncodedQuery(Query("q", "a", "b"), ids, ids.clone())
        names = select_parameters(model, params)
        pcfg = PerturbConfig(lr=1e-3, steps=5)
        perturb_pair(model, q, names[-1:], pcfg, n_units=1)  # warm-up: kernels, thread pools
        sweep = lambda states: unit_loss_sums(model, Units(), np.arange(32), states,
                                              batch_size=16, pad_id=0, device=CPU)
        sweep([None])
        norms = lambda indices: unit_gradient_norms(model, Units(), names, CPU, batch_size=16,
                                                    indices=indices)
        norms(np.arange(2))
        measured = {
            "perturbation": peak_since_reset(lambda: perturb_pair(model, q, names, pcfg,
                                                                  n_units=1)),
            "sweep": peak_since_reset(lambda: sweep([
                {n: p.detach() + 1e-3 for n, p in model.named_parameters() if n in names}
                for _ in range(2 * Q)])),
            "normaliser": peak_since_reset(lambda: norms(np.arange(32))),
        }
        for stage_name, unit_length in (("perturbation", T), ("sweep", 64), ("normaliser", 64)):
            run = RunShape(model_bytes=dtype.itemsize, sweep_bytes=dtype.itemsize,
                           optimizer="adam", queries_per_sweep=1 if unit_length == T else Q,
                           states_per_query=2, batch_size=16, unit_length=unit_length,
                           normalize=True, device_type="cpu")
            stage = next(s for s in stages(MetaModel(cfg).shape(params), run)
                         if s.name == stage_name)
            weights = stage.device_parts["weights"]
            out.append({"case": [dtype_name, params, stage_name],
                        "measured": measured[stage_name], "weights": weights,
                        "estimated": stage.device_bytes - weights})
        del model
    print(json.dumps(out))
""")
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_estimate_within_25_percent_of_measured_peak() -> None:
    """Compared, on a 3.7M-parameter GPT-2 in float32 and bfloat16 (the half-precision path
    of bgotrace.perturb.lowp): the peak RSS increment while perturb_pair runs, and while a
    sweep of 32 units under 2 queries' states runs (states made inside it), and while the
    batched normaliser runs over those units (VmHWM reset just before each), against the
    plan's perturbation, sweep and normaliser stages without the weights (already
    resident). Large allocations go through mmap, so freed memory leaves the RSS at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cases = [["float32", "all"], ["bfloat16", "all"]]
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(cases)],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    for row in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert 0.75 <= row["measured"] / row["estimated"] <= 1.25, row


def test_plan_takes_the_attribute_options() -> None:
    """`plan` is built from the same config fields as `attribute`, plus --json."""
    plan_help = CliRunner().invoke(app, ["plan", "--help"], terminal_width=200).output
    attribute_help = CliRunner().invoke(app, ["attribute", "--help"], terminal_width=200).output
    for flag in ("--model-dtype", "--device-memory", "--params", "--queries-per-sweep", "--json"):
        assert flag in plan_help, flag
    for flag in ("--model-dtype", "--device-memory", "--batch-size"):
        assert flag in attribute_help, flag


def test_the_normaliser_is_planned_in_the_sweep_dtype(llama_8b_dir: Path) -> None:
    """The norms are taken of the sweep model (perturb.sensitivity): a float32 model swept in
    bfloat16 plans the normaliser's activations and output gradients in 2 bytes, beside the
    sweep copy."""

    def normaliser(**scoring: object) -> dict[str, int]:
        cfg = _config(llama_8b_dir, scoring=scoring, execution={"device": "cuda"})
        plan = plan_run(cfg, device_memory=80 * GIB)
        return next(s for s in plan.stages if s.name == "normaliser").device_parts

    exact, half = normaliser(), normaliser(dtype="bfloat16")
    assert half["output gradients"] * 2 == exact["output gradients"]
    assert half["activations (batch)"] < exact["activations (batch)"]
    assert "sweep copy" in half and half["float32 chunk"] > 0 == exact["float32 chunk"]
