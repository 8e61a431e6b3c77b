"""``bgotrace cache build``: prepare a corpus's token cache (and on request the normaliser and
the trunk cache) ahead of any query, so the first ``attribute`` run starts with the sweep.

Example (CPU)::

    bgotrace cache build --model MODEL_DIR --corpus corpus.jsonl --max-length 128
    bgotrace cache build --model MODEL_DIR --corpus corpus.jsonl --normalizer \\
        --trunk-cache --params last:1

The cache lands where ``attribute`` with the same ``--corpus``, ``--max-length``, ``--stride``,
``--bos``, ``--unit-loss`` and fields looks for it (or in ``--cache-dir``), so that run reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, cast

import typer

from bgotrace.cache import TokenCache, get_token_cache
from bgotrace.cli.errors import user_errors
from bgotrace.config import CorpusSpec, PerturbConfig, ScoreConfig, help_of
from bgotrace.corpus import ChunkingConfig, CorpusFields, CorpusFiles
from bgotrace.corpus.bos import resolve_bos
from bgotrace.runtime.progress import set_progress

cache_app = typer.Typer(
    help="Prepare the token cache of a corpus without a query.", no_args_is_help=True
)


def _opt(section: type, name: str, flag: str | None = None) -> Any:
    flag = flag or "--" + name.replace("_", "-")
    return typer.Option(flag, help=help_of(section, name), show_default=False)


@dataclass(frozen=True)
class Extras:
    """What to prepare besides the token cache (each needs the model's weights)."""

    normalizer: bool = False
    """Compute the per-unit gradient norms of ``--normalize sensitivity``/``damped``."""
    trunk_cache: bool = False
    """Store the hidden states entering the first perturbed block (``--trunk-cache``)."""
    params: str = "all"
    """``--params`` of the later runs: both depend on the perturbed parameters."""
    device: str = "auto"
    """Where the model runs for them."""

    @property
    def need_model(self) -> bool:
        return self.normalizer or self.trunk_cache


def build(
    model: Annotated[str, typer.Option(help="Model directory (its tokenizer cuts the units).")],
    corpus: Annotated[str, _opt(CorpusSpec, "path", "--corpus")],
    max_length: Annotated[int | None, _opt(CorpusSpec, "max_length")] = None,
    stride: Annotated[int, _opt(CorpusSpec, "stride")] = 0,
    bos: Annotated[str, _opt(CorpusSpec, "bos")] = "auto",
    unit_loss: Annotated[str, _opt(CorpusSpec, "unit_loss")] = "assistant",
    text_field: Annotated[str, _opt(CorpusSpec, "text_field")] = "text",
    id_field: Annotated[str, _opt(CorpusSpec, "id_field")] = "id",
    source_field: Annotated[str, _opt(CorpusSpec, "source_field")] = "source",
    cache_dir: Annotated[str | None, _opt(CorpusSpec, "cache_dir")] = None,
    verify_cache: Annotated[str, _opt(CorpusSpec, "verify_cache")] = "quick",
    shard_tokens: Annotated[int, _opt(CorpusSpec, "shard_tokens")] = 64 * 2**20,
    rebuild_cache: Annotated[
        bool, typer.Option(help="Rebuild the token cache even if one matches.")
    ] = False,
    normalizer: Annotated[
        bool, typer.Option(help="Also compute the normaliser (--normalize damped/sensitivity).")
    ] = False,
    trunk_cache: Annotated[bool, _opt(ScoreConfig, "trunk_cache")] = False,
    params: Annotated[str, _opt(PerturbConfig, "params")] = "all",
    device: Annotated[str, typer.Option(help="Device for --normalizer/--trunk-cache.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Trust the model's own code.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Tokenize the corpus into its cache (streamed, sharded); print where it is."""
    set_progress(not quiet)
    spec = CorpusSpec(
        path=corpus, text_field=text_field, id_field=id_field, source_field=source_field,
        max_length=max_length, stride=stride, bos=bos, unit_loss=unit_loss, cache_dir=cache_dir,
        verify_cache=verify_cache, shard_tokens=shard_tokens,
    )  # fmt: skip
    extras = Extras(normalizer, trunk_cache, params, device)
    cache, loaded = build_cache(model, spec, extras, rebuild_cache, trust_remote_code)
    if extras.need_model:
        prepare_extras(loaded, cache, extras)
    shards = len(cache.manifest["shards"])
    typer.echo(f"{cache.root}\t{len(cache)} units, {cache.n_tokens} tokens, {shards} shard(s)")


def build_cache(
    model_path: str, spec: CorpusSpec, extras: Extras, rebuild: bool, trust_remote_code: bool
) -> tuple[TokenCache, Any]:
    """The token cache that ``attribute`` would build for ``spec``; the model when loaded."""
    files = CorpusFiles(spec.path, CorpusFields(spec.text_field, spec.id_field, spec.source_field))
    model: Any = None
    if extras.need_model:
        from bgotrace.modeling.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            model_path, device=extras.device, trust_remote_code=trust_remote_code
        )
        config = model.config
    else:
        from transformers import AutoConfig

        from bgotrace.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    spec.max_length = spec.unit_length(_context(config))
    bos_id = resolve_bos(tokenizer, spec.bos)
    chunking = ChunkingConfig(spec.max_length, spec.stride, bos_id=bos_id, unit_loss=spec.unit_loss)
    cache = get_token_cache(
        files, tokenizer, chunking, spec.cache_dir, rebuild=rebuild,
        verify=spec.verify_cache, shard_tokens=spec.shard_tokens,
    )  # fmt: skip
    return cache, (model, tokenizer)


def _context(config: Any) -> int | None:
    """The model's context from its config alone (no weights read)."""
    from bgotrace.modeling.loading import context_length

    return context_length(cast(Any, SimpleNamespace(config=config)))


def prepare_extras(loaded: tuple[Any, Any], cache: TokenCache, extras: Extras) -> None:
    """Build the normaliser and trunk cache through the sweep's own set-up path, so an
    ``attribute`` run with the same ``--params`` finds and reuses them."""
    from bgotrace.score.context import build_sweep_context

    model, tokenizer = loaded
    score_cfg = ScoreConfig(
        normalize="sensitivity" if extras.normalizer else "none", trunk_cache=extras.trunk_cache
    )
    ctx = build_sweep_context(
        model, cache, perturb_cfg=PerturbConfig(params=extras.params), score_cfg=score_cfg,
        pad_id=int(tokenizer.pad_token_id or 0),
    )  # fmt: skip
    if ctx.normaliser is not None:
        ctx.normaliser.divisors()  # computed on first use: now, for attribute to reuse
    ctx.close()


cache_app.command("build")(user_errors(build))
