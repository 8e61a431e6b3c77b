"""Typed, self-validating configuration of an attribution run.

Every option of ``bgotrace attribute`` is a field here, with its help text in the
field's metadata (the CLI reads it from there), so a run's ``config.yaml`` is the
complete recipe that replays it. Sections follow the data flow: model, corpus,
query, perturbation, scoring, output; beside them, where the run executes (execution).

A field's metadata (``_help``) is all the CLI needs to make it a flag of ``bgotrace
attribute`` (``bgotrace.cli.options``): its help text, a fixed set of ``choices`` (checked
here by :func:`check_choices`, shown by ``--help``), a ``flag`` name other than
``--field-name``, or ``cli=False`` for a setting read from ``config.yaml`` only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bgotrace.candidates_spec import check_prefilter, parse_candidates
from bgotrace.config_values import checked_value, checked_values
from bgotrace.corpus.bos import BOS_MODES
from bgotrace.corpus.conversations import UNIT_LOSSES
from bgotrace.devices import ATTENTION_KERNELS, DEVICES, DTYPES, parse_size
from bgotrace.errors import ConfigError
from bgotrace.variants import get_variant, variants_help

T = TypeVar("T")
log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "fisher")
REDUCTIONS = ("mean", "sum")
LR_CRITERIA = ("loss", "radius")
NORMALIZATIONS = ("none", "sensitivity", "damped")
GRANULARITIES = ("unit", "document", "source")
LOSS_ON = ("completion", "all", "assistant")
SHIP_CACHE = ("auto", "always", "never")
TRUNK_DTYPES = ("float16", "bfloat16", "float32")
METHODS = (
    "bgo",
    "untrac-inv",
    "bgo-linear",
    "random",
    "bm25",
    "repsim",
    "graddot",
    "gradcos",
    "fisher-graddot",
    "trackstar",
    "ekfac",
)
"""Names of the attribution methods (the registry in ``bgotrace.baselines`` must match)."""
DEFAULT_MAX_LENGTH = 256
"""Unit length when none is given and the model reads at least this many positions."""
_SPANS_RE = re.compile(r"^(none|sentence|auto|tokens:[1-9]\d*)$")
_PARAMS_RE = re.compile(r"^(all|adapter|last:(\d+|half)|regex:.+)$")


def _help(
    text: str,
    default: Any = dataclasses.MISSING,
    special: tuple[str, ...] = (),
    *,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field whose help text is shown by ``--help``.

    ``special``: strings a config file may give besides the field's type (e.g. ``("auto",)``
    for a number field); see ``bgotrace.config_values``. ``choices``: the only values the
    field takes (checked by :func:`check_choices` in ``__post_init__``). ``flag``: its CLI
    option when ``--field-name`` is taken by another section's field (``--model-dtype``).
    ``cli=False``: set in ``config.yaml`` only, no flag.
    """
    metadata = {"help": text, "special": special, "choices": choices, "flag": flag, "cli": cli}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def help_of(cls: type, name: str) -> str:
    """The help text of a config field, for the CLI."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def flag_of(f: dataclasses.Field) -> str:
    """The CLI option of a config field: ``--kebab-name`` unless its metadata names one."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_choices(section: Any) -> None:
    """Refuse a value outside its field's ``choices`` (the set ``--help`` shows)."""
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        if choices is not None:
            _one_of(getattr(section, f.name), choices, flag_of(f))


def _one_of(value: str, allowed: tuple[str, ...], option: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{option}={value!r} is unknown: use one of {', '.join(allowed)}.")


def _at_least(value: int, minimum: int, option: str) -> None:
    if value < minimum:
        raise ConfigError(
            f"{option} must be >= {minimum}, got {value}: pass a value of {minimum} or more."
        )


FLOAT32_MAX = 3.4028234663852886e38
"""Numbers of the perturbation meet float32 weights: larger ones overflow inside torch."""


def _positive(value: float, option: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{option} must be > 0, got {value}: pass a positive value.")
    if value > FLOAT32_MAX:
        raise ConfigError(
            f"{option}={value:g} is beyond float32's range ({FLOAT32_MAX:.1e}): "
            "pass a smaller value."
        )


@dataclass
class ModelSpec:
    """Which model to attribute."""

    path: str = _help(
        "Hugging Face causal LM directory (safetensors weights + tokenizer).", flag="--model"
    )
    adapter: str | None = _help(
        "PEFT adapter directory, merged into the model (kept unmerged with --params adapter).",
        None,
    )
    dtype: str = _help(
        "Dtype the weights are loaded in (flag --model-dtype): float32 | bfloat16 | float16. "
        "Half precision halves the weights, states and optimizer moments "
        "(bgotrace.perturb.lowp); losses stay float32.",
        "float32",
        choices=tuple(DTYPES),
        flag="--model-dtype",  # --dtype is the sweep's (scoring.dtype)
    )
    trust_remote_code: bool = _help("Run code shipped with the checkpoint (off by default).", False)
    attn_implementation: str = _help(
        "Attention kernel: auto (sdpa where the architecture has it, else eager) | sdpa | "
        "eager | flash_attention_2 (CUDA, half precision, the flash-attn package).",
        "auto",
        choices=ATTENTION_KERNELS,
    )

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class CorpusSpec:
    """Which training data to rank and how to cut it into units."""

    path: str = _help(
        "Corpus: JSONL, Parquet, a folder of .txt files, or a saved `datasets` dir.",
        flag="--corpus",
    )
    text_field: str = _help("Field holding the document text.", "text")
    id_field: str = _help("Field holding the document id (a content hash when absent).", "id")
    source_field: str = _help("Field holding the document's source.", "source")
    max_length: int | None = _help(
        f"Tokens per training unit (default: the model's context, at most {DEFAULT_MAX_LENGTH}).",
        None,
    )
    stride: int = _help("Tokens of overlap between consecutive units of a document.", 0)
    bos: str = _help(
        "BOS in front of every query and unit: auto (where the tokenizer adds one, e.g. "
        "Llama) | always | never.",
        "auto",
        choices=BOS_MODES,
    )
    unit_loss: str = _help(
        "What an SFT conversation unit's loss covers: assistant (its assistant turns, as SFT "
        "trained them) | all. Plain-text units always take every token.",
        "assistant",
        choices=UNIT_LOSSES,
    )
    cache_dir: str | None = _help(
        "Token cache directory (default: .bgotrace-cache/<corpus name>-<key of corpus content, "
        "tokenizer and chunking>).",
        None,
    )
    verify_cache: str = _help(
        "How a reused token cache is checked against a corpus on disk: quick (sizes and sampled "
        "bytes; a file whose mtime moved is re-hashed) | full (re-hash every file).",
        "quick",
        choices=("quick", "full"),
    )
    shard_tokens: int = _help(
        "Tokens per token-cache shard file at most (default 64Mi tokens = 256 MiB).", 64 * 2**20
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.shard_tokens < 1:
            raise ConfigError(
                f"--shard-tokens must be >= 1, got {self.shard_tokens}: pass a larger value."
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(
                f"--max-length must be >= 2, got {self.max_length}: pass a larger --max-length."
            )
        if self.stride < 0 or (self.max_length is not None and self.stride >= self.max_length):
            raise ConfigError(
                f"--stride must be in [0, max_length), got {self.stride}: "
                "stride is the overlap between consecutive units; pass a smaller --stride."
            )

    def unit_length(self, context: int | None) -> int:
        """``max_length``, or the default that fits a model reading ``context`` positions.

        A unit longer than the context would index past the position embeddings, so an
        explicit ``max_length`` beyond it is refused here, before anything is tokenized.
        """
        if self.max_length is None:
            return min(DEFAULT_MAX_LENGTH, context) if context else DEFAULT_MAX_LENGTH
        if context is not None and self.max_length > context:
            raise ConfigError(
                f"--max-length={self.max_length} is longer than the model's context of "
                f"{context} tokens: pass --max-length {context} or less (or omit it)."
            )
        return self.max_length


@dataclass
class QuerySpec:
    """The text(s) to attribute: one prompt + completion, or a JSONL file of them."""

    prompt: str | None = _help("Prompt the model saw.", None)
    completion: str | None = _help("Completion the model produced (the text to attribute).", None)
    queries: str | None = _help(
        "JSONL file of queries with fields id, prompt, completion (or messages: a conversation "
        "ending in the assistant answer).",
        None,
    )
    chat: str | None = _help(
        "User message of a one-turn conversation whose assistant answer is --completion "
        "(rendered with the tokenizer's chat template).",
        None,
    )
    messages: str | None = _help(
        "JSON/JSONL file of one conversation ({role, content} messages) ending in the "
        "assistant answer to attribute.",
        None,
    )
    loss_on: str = _help(
        "completion (prompt masked) | all (whole text, for style) | assistant (every "
        "assistant turn of a conversation).",
        "completion",
        choices=LOSS_ON,
    )
    spans: str = _help(
        "Also attribute parts of the completion, each in the same sweep: none | sentence | "
        "tokens:N | auto (sentences, or about 4 token spans for one sentence).",
        "none",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not _SPANS_RE.match(self.spans):
            raise ConfigError(
                f"--spans={self.spans!r} is unknown: use none, sentence, auto or tokens:N (N >= 1)."
            )
        single = self.prompt is not None or self.completion is not None
        if single and self.queries is not None:
            raise ConfigError(
                "Both --prompt/--completion and --queries were given: use one or the other."
            )
        self._check_chat(single)
        if not single and self.queries is None and self.messages is None:
            raise ConfigError("No query: pass --prompt and --completion, or --queries Q.jsonl.")
        if single and self.completion is None:
            raise ConfigError("--completion is missing: give the text the model produced.")

    def _check_chat(self, single: bool) -> None:
        """--chat pairs with --completion; --messages holds its answer and stands alone."""
        if self.chat is not None and (self.prompt is not None or self.completion is None):
            raise ConfigError(
                "--chat takes the user message and --completion the answer (no --prompt): "
                "pass --chat TEXT --completion ANSWER."
            )
        if self.messages is not None and (single or self.queries is not None):
            raise ConfigError(
                "--messages holds the whole conversation with its answer: drop "
                "--prompt/--completion/--queries, or drop --messages."
            )


@dataclass
class PerturbConfig:
    """How θ+ (descent) and θ− (ascent) are made from the base model."""

    # Adam, not the reference scripts' Fisher steps: see "BGO sensitivity" in
    # benchmarks/RESULTS.md (Fisher won on one validation split but diverges on a model
    # that has memorised its data, where F̂ -> 0 inflates every step).
    optimizer: str = _help(
        "sgd | adam | fisher (diagonal-Fisher preconditioned steps).", "adam", choices=OPTIMIZERS
    )
    lr: float | str = _help(
        "Step size η of both directions, or auto: searched per query so the ascent reaches "
        "--lr-target (bgotrace.perturb.calibrate).",
        1e-4,
    )
    lr_target: float = _help(
        "Target of --lr auto: rise of the query's mean loss after K ascent steps in nats "
        "(--lr-criterion loss), or ||θK−θ0||/||θ0|| (radius).",
        1.0,
    )
    lr_criterion: str = _help(
        "What --lr auto calibrates: loss | radius.", "loss", choices=LR_CRITERIA
    )
    steps: int = _help("Number K of optimizer steps in each direction.", 10)
    params: str = _help(
        "Parameters to perturb: all | adapter (the --adapter's LoRA weights only, unmerged; "
        "base frozen) | last:N (last N blocks) | last:half (last ceil(L/2) of L blocks) | "
        "regex:PATTERN.",
        "all",
    )
    max_grad_norm: float | None = _help(
        "Clip the query gradient to this norm (off if unset).", None
    )
    fisher_samples: int = _help("Corpus units sampled to estimate the diagonal Fisher.", 256)
    fisher_eps: float = _help("ε added to the Fisher diagonal before dividing.", 1e-6, cli=False)
    fisher_damping: float | None = _help(
        "Damped Fisher: divide by F̂ + λ·mean(F̂) (mean over all perturbed parameters) "
        "instead of F̂ + ε (unset: the reference scripts' ε form).",
        None,
    )
    # Optimizer internals few users change: config.yaml only, no flag.
    adam_beta1: float = _help("Adam β1.", 0.9, cli=False)
    adam_beta2: float = _help("Adam β2.", 0.999, cli=False)
    adam_eps: float = _help("Adam ε.", 1e-8, cli=False)

    def __post_init__(self) -> None:
        check_choices(self)
        self.lr = _step_size(self.lr)
        _positive(self.lr_target, "--lr-target")
        if self.fisher_damping is not None:
            _positive(self.fisher_damping, "--fisher-damping")
        _at_least(self.steps, 1, "--steps")
        if not _PARAMS_RE.match(self.params):
            raise ConfigError(
                f"--params={self.params!r} is unknown: use all, adapter, last:N, last:half or "
                "regex:PATTERN."
            )
        _check_regex(self.params)
        if self.max_grad_norm is not None:
            _positive(self.max_grad_norm, "--max-grad-norm")
        _at_least(self.fisher_samples, 1, "--fisher-samples")

    @property
    def fixed_lr(self) -> float:
        """η as a number; ``lr: auto`` must have been resolved by the calibration first."""
        if isinstance(self.lr, str):
            raise ConfigError(
                "lr 'auto' reached a perturbation unresolved: calibrate it with "
                "bgotrace.perturb.calibrate.calibrate_lr first."
            )
        return self.lr


def _check_regex(params: str) -> None:
    """A ``regex:PATTERN`` must compile; say so now rather than after the model is loaded."""
    if not params.startswith("regex:"):
        return
    try:
        re.compile(params.split(":", 1)[1])
    except re.error as err:
        raise ConfigError(
            f"--params={params!r} is not a valid regular expression ({err}): fix the pattern, "
            r"e.g. regex:mlp or regex:\.h\.1\."
        ) from None


def _step_size(value: float | str) -> float | str:
    """``auto`` or a positive number (YAML and the CLI may give numbers as strings)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                f"--lr={value!r} is not a number: give a positive step size or auto."
            ) from None
    _positive(value, "--lr")
    return float(value)


@dataclass
class ScoreConfig:
    """How the corpus sweep turns loss changes into scores."""

    # No fixed choices: the registry (bgotrace.variants) decides, so a registered variant
    # is a valid --score.
    score: str = _help(variants_help() + ".", "bidirectional")
    # sum: best robust setting of the validation sweep (benchmarks/RESULTS.md).
    reduce: str = _help(
        "mean | sum of the per-token loss changes of a unit.", "sum", choices=REDUCTIONS
    )
    # damped (λ = 0.3): issue 15's protocol's choice, the setting that never fails badly.
    # sensitivity (the default before) makes hubs on memorised data; λ = 0.3 stays within its
    # CIs everywhere but one split (default benchmark, validation: source P@10 −0.018)
    # (benchmarks/RESULTS.md, "Issue 15: the default normalisation").
    normalize: str = _help(
        "sensitivity | damped | none: divide each unit's score by the norm of its loss "
        "gradient (like gradient cosine; query-independent, computed once and cached beside "
        "the token cache; curbs hub units). damped: by that norm + --normalize-damping × its "
        "median. none: raw loss changes in nats.",
        "damped",
        choices=NORMALIZATIONS,
    )
    normalize_damping: float = _help(
        "λ of --normalize damped: divide by ‖∇L(z)‖ + λ·median‖∇L‖, so units the model has "
        "learned best (tiny gradients) are not inflated into hubs.",
        0.3,  # chosen by issue 15's protocol (benchmarks/RESULTS.md, issue 15)
    )
    batch_size: int = _help("Units per forward pass.", 16)
    batch_tokens: int = _help(
        "Padded tokens per forward pass (units × the longest): short units go in large "
        "batches, long ones in small; replaces --batch-size's unit count. 0: off.",
        0,
    )
    # auto: a half-precision model (--model-dtype) is swept as loaded, never copied to float32.
    dtype: str = _help(
        "Sweep dtype: auto (the model's own, --model-dtype) | float32 | bfloat16 | float16 "
        "(losses stay float32).",
        "auto",
        choices=("auto", *DTYPES),
    )
    autocast: bool = _help(
        "Run the sweep's forward passes of a float32 model under torch.autocast in bfloat16: "
        "matmuls in bfloat16 from the float32 weights, with no weight copy (--dtype bfloat16 "
        "copies them instead); norms, softmax and losses stay float32.",
        False,
    )
    block_units: int = _help("Units per resumable block of the sweep.", 1024)
    queries_per_sweep: int = _help("Queries whose perturbed models share one corpus sweep.", 8)
    trunk_cache: bool = _help(
        "Store the hidden states entering the first perturbed block for every unit beside the "
        "token cache, so later runs with the same model and split skip the trunk (needs a "
        "perturbation restricted to blocks, e.g. --params last:N).",
        False,
    )
    trunk_cache_dtype: str = _help(
        "Stored dtype of the trunk cache: float16 | bfloat16 | float32.",
        "float16",
        choices=TRUNK_DTYPES,
    )
    candidates: int | float | str | None = _help(
        "Rerank: sweep only each query group's top-M units proposed by --prefilter; M is a "
        "count (200), a percentage (5%) or a fraction (0.05) of the corpus. The other units "
        "are left unscored (NaN, candidate=False). Unset: sweep every unit.",
        None,
    )
    prefilter: str = _help(
        "Method proposing the --candidates: bm25 | repsim | fisher-graddot | trackstar | "
        "any baseline of --method.",
        "bm25",
    )
    linearity_sample: int = _help(
        "Units sampled per query for the linearity diagnostic: Spearman and top-10 overlap "
        "(within the sample) of the scores and their first-order control (bgo-linear); "
        "at most --linearity-share of the swept units (at least 32); 0: off.",
        256,
    )
    linearity_share: float = _help(
        "Largest fraction of the swept units the linearity diagnostic samples (at least 32 "
        "units): a forward-mode pass costs ~3 forwards, so on a small corpus 256 units would "
        "cost a third of the query; 1: always --linearity-sample units.",
        0.02,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        get_variant(self.score)
        _positive(self.normalize_damping, "--normalize-damping")
        for name in ("batch_size", "block_units", "queries_per_sweep"):
            _at_least(getattr(self, name), 1, f"--{name.replace('_', '-')}")
        _at_least(self.linearity_sample, 0, "--linearity-sample")
        if not 0.0 < self.linearity_share <= 1.0:
            raise ConfigError(
                f"--linearity-share {self.linearity_share} is not a fraction in (0, 1]: pass "
                "e.g. 0.02 (1: always --linearity-sample units)."
            )
        _at_least(self.batch_tokens, 0, "--batch-tokens")
        if self.candidates is not None:
            parse_candidates(self.candidates)
            check_prefilter(self.prefilter, METHODS)
        elif self.prefilter != "bm25":  # the default is harmless; an explicit one was meant
            raise ConfigError(
                f"--prefilter {self.prefilter} has no effect without --candidates: add "
                "--candidates M (e.g. 5%) to rerank its top units, or drop --prefilter."
            )


@dataclass
class ExecutionConfig:
    """Where the run executes (device, Ray workers), never what it computes."""

    device: str = _help("auto | cpu | cuda[:N].", "auto")
    workers: int = _help("Ray workers sharing the sweep's blocks (0: this process only).", 0)
    ray_address: str | None = _help(
        "Join a running Ray cluster: auto (this node is in it) or HEAD:PORT. Unset: start a "
        "private Ray instance on this machine for --workers and stop it afterwards.",
        None,
    )
    cpus_per_worker: float = _help("CPUs Ray reserves for each worker.", 1.0)
    gpus_per_worker: float | None = _help(
        "GPUs Ray reserves for each worker (0.5: two workers share a GPU). Unset: 1 when the "
        "model is on a GPU, else 0.",
        None,
    )
    ship_cache: str = _help(
        "How workers read the token cache: auto (by path where the node can read it, else "
        "blocks shipped through Ray's object store) | never (path only: shared file system) "
        "| always (ship every block).",
        "auto",
        choices=SHIP_CACHE,
    )
    block_attempts: int = _help(
        "Tries per block when Ray workers die (also each worker's restarts) before the run "
        "stops with an error.",
        3,
    )
    ray_timeout: float = _help(
        "Seconds to wait for the cluster to start the workers (or restart a dead one).", 120.0
    )
    tf32: bool = _help(
        "TF32 for float32 matmuls on CUDA (products at a 10-bit mantissa, float32 sums; several "
        "times float32's throughput on Ampere and later); --no-tf32 for full float32.",
        True,
    )
    device_memory: str | None = _help(
        "Memory the run must fit in, e.g. 80GiB or 24GB (checked by the memory plan before the "
        "model loads; bgotrace.plan). Unset: the GPU's total, or the host's available memory "
        "on CPU.",
        None,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ConfigError(f"--device={self.device!r} is unknown: use auto, cpu or cuda[:N].")
        _at_least(self.workers, 0, "--workers")
        if not 0 <= self.cpus_per_worker < float("inf"):
            raise ConfigError(
                f"--cpus-per-worker must be >= 0, got {self.cpus_per_worker}: pass 0 or more."
            )
        gpus = self.gpus_per_worker
        if gpus is not None and not 0 <= gpus < float("inf"):
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {gpus}: pass 0 or more.")
        _at_least(self.block_attempts, 1, "--block-attempts")
        _positive(self.ray_timeout, "--ray-timeout")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("--ray-address is empty: pass auto or HEAD:PORT, or omit it.")
        if self.device_memory is not None:
            parse_size(self.device_memory)  # a malformed size is refused here, in one line


@dataclass
class OutputSpec:
    """Where results go and what is shown."""

    out: str | None = _help("Run directory to write (omit to keep results in memory only).", None)
    top_k: int = _help("Rows shown in the printed table.", 10)
    granularity: str = _help("Rank shown: unit | document | source.", "unit", choices=GRANULARITIES)
    top_tokens: int = _help("Top units per query whose per-token loss changes are kept.", 20)
    formats: str = _help(
        "Extra output files, comma-separated: top_units (top_units.csv, each query's top-k "
        "units) or any writer registered in bgotrace.ranking.writers; checked before the sweep.",
        "",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self.top_k, 1, "--top-k")
        _at_least(self.top_tokens, 0, "--top-tokens")


@dataclass
class AttributeConfig:
    """Everything that defines an attribution run; ``config.yaml`` holds one."""

    model: ModelSpec
    corpus: CorpusSpec
    query: QuerySpec
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    scoring: ScoreConfig = field(default_factory=ScoreConfig)
    output: OutputSpec = field(default_factory=OutputSpec)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    seed: int = 0
    method: str = "bgo"
    """``bgo`` (perturbation + sweep) or a baseline name (``bgotrace.baselines``)."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed={self.seed} is out of range: pass a seed in [0, 2**32).")
        if self.method not in METHODS:
            raise ConfigError(
                f"Unknown attribution method {self.method!r}: use one of {', '.join(METHODS)}."
            )
        if self.scoring.autocast:
            self._check_autocast()
        if self.method == "bgo-linear" and self.model.attn_implementation == "flash_attention_2":
            raise ConfigError(
                "--method bgo-linear differentiates in forward mode, which flash_attention_2 "
                "has no formulas for: pass --attn-implementation sdpa (or auto, or eager)."
            )

    def _check_autocast(self) -> None:
        """--autocast lowers a float32 model's compute in place of --dtype's weight copy."""
        if self.model.dtype != "float32":
            raise ConfigError(
                f"--autocast runs a float32 model's sweep in bfloat16, and this model is "
                f"loaded in {self.model.dtype} (already swept as loaded): drop --autocast."
            )
        if self.scoring.dtype not in ("auto", "float32"):
            raise ConfigError(
                f"--autocast and --dtype {self.scoring.dtype} both lower the sweep's "
                "precision (autocast without a weight copy): pass only one of them."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttributeConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        data = moved_to_execution(data)
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(
                f"Unknown config section(s) {sorted(unknown)}: use {', '.join(sections)}."
            )
        kwargs: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            if name in data:
                kwargs[name] = build_section(section_cls, data[name] or {}, name)
        if "seed" in data:
            kwargs["seed"] = checked_value(data["seed"], (int,), key="seed", example="0")
        if "method" in data:
            kwargs["method"] = checked_value(data["method"], (str,), key="method", example="bgo")
        for required in ("model", "corpus", "query"):
            if required not in kwargs:
                raise ConfigError(f"Config has no {required!r} section: add it.")
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> AttributeConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist: pass a run's config.yaml.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"Config file {path} is not UTF-8 text: convert it to UTF-8."
            ) from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(
                f"Config file {path} is not valid YAML{line} ({getattr(err, 'problem', err)}): "
                "fix that line, or start from a run's config.yaml."
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} is not a YAML mapping: pass a config.yaml.")
        return cls.from_dict(data)


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "corpus": CorpusSpec,
    "query": QuerySpec,
    "perturb": PerturbConfig,
    "scoring": ScoreConfig,
    "output": OutputSpec,
    "execution": ExecutionConfig,
}
"""config.yaml section name → its dataclass (the CLI derives its flags from it)."""

MOVED_TO_EXECUTION = {
    "model": ("device",),
    "scoring": (
        "workers",
        "ray_address",
        "cpus_per_worker",
        "gpus_per_worker",
        "ship_cache",
        "block_attempts",
        "ray_timeout",
    ),
}
"""Keys older config.yaml files hold in another section; read into ``execution``."""


def moved_to_execution(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each key of :data:`MOVED_TO_EXECUTION` moved into ``execution``.

    One deprecation line per moved key; the same key also under ``execution`` with another
    value is refused (which one was meant is unknowable). Sections that are not mappings
    are left for :func:`build_section` to refuse.
    """
    data = dict(data)
    execution = data.get("execution") or {}
    if not isinstance(execution, dict):
        return data
    execution = dict(execution)
    for section, keys in MOVED_TO_EXECUTION.items():
        values = data.get(section)
        if not isinstance(values, dict) or not set(keys) & set(values):
            continue
        values = data[section] = dict(values)
        for key in [k for k in keys if k in values]:
            _move(values, execution, section, key)
    if execution:
        data["execution"] = execution
    return data


def _move(values: dict[str, Any], execution: dict[str, Any], section: str, key: str) -> None:
    value = values.pop(key)
    if key in execution and execution[key] != value:
        raise ConfigError(
            f"Config keys {section}.{key}={value!r} and execution.{key}={execution[key]!r} "
            f"disagree: keep execution.{key} only ({section}.{key} is its old place)."
        )
    execution[key] = value
    log.warning(
        "config key %s.%s is deprecated: it is read as execution.%s (write it there).",
        section,
        key,
        key,
    )


def build_section(section_cls: type[T], values: dict[str, Any], name: str) -> T:
    """Build one config section, refusing keys it does not have and values of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"Config section {name!r} is a {type(values).__name__}, not a mapping: "
            f"write it as `{name}:` followed by indented `key: value` lines."
        )
    names = {f.name for f in dataclasses.fields(section_cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {sorted(unknown)} in config section {name!r}: "
            f"use one of {', '.join(sorted(names))}."
        )
    values = checked_values(section_cls, values, name)
    try:
        return section_cls(**values)
    except TypeError as err:
        raise ConfigError(f"Config section {name!r} is incomplete: {err}.") from err
