"""The ``logitcache`` command line: one click group of thin commands over library functions.

Errors that are the user's (a missing cache, a bad flag, a corrupt shard) print one line and exit with status 2;
anything else is a bug and keeps its traceback. Commands that take a while show a progress bar on stderr.

Start-up stays cheap (``--help``, ``--version`` and argument errors answer in well under half a second): the flags
come from the ``*_config`` modules, which import only the standard library and ``logitcache.config``; torch,
numpy and transformers are imported inside the command bodies, after the config has been built and checked.
``tests/core/test_cli_startup.py`` holds this line (``import logitcache.cli`` must not import torch or numpy).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import ConfigError, click_options

#: (module, class) of the library's user-facing exceptions, beside ConfigError
_USER_ERRORS = (
    ("logitcache.model_sources", "ModelSpecError"),
    ("logitcache.pipeline.byte_alignment", "AlignmentError"),
    ("logitcache.storage.errors", "CacheError"),
    ("logitcache.byte_offsets", "TokenizationMismatchError"),
)  # interop's errors are ConfigErrors


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The user-facing exception classes whose modules are loaded: an exception of a class whose module was never
    imported cannot have been raised, so this needs no import (the modules that define them pull in numpy/torch)."""
    types: list[type[BaseException]] = [ConfigError]
    for module, name in _USER_ERRORS:
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's user-facing exceptions into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, _user_error_types()):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="logitcache")
def main() -> None:
    """Distill language models from a reusable cache of teacher top-k log-probabilities.

    \b
    Stages:  generate (teacher -> CACHE)  ->  align (CACHE + student tokenizer)  ->  train (student)
    Baseline: sft (plain fine-tuning from --data).  Eval: eval.  Storage: inspect, verify, show, convert.
    Other tools' logit datasets: import, export.
    Run `logitcache COMMAND --help` for each.
    """


def _generate_config() -> type:
    from logitcache.pipeline.generate_config import GenerateConfig

    return GenerateConfig


@main.command(context_settings={"show_default": False})
@click_options(_generate_config())
@user_errors
def generate(config_file: str | None, **flags: Any) -> None:
    """Stage one: run the teacher over --data and write its top-k logprobs into the cache --out.

    \b
    Resumable: a rerun skips complete shards. Job arrays: --num-shards N --shard-index I per task, then
    `logitcache finalize OUT`. Distributed: --workers N (local dask) or --scheduler ADDRESS.
    """
    from logitcache.config import from_sources
    from logitcache.pipeline.generate_config import GenerateConfig

    cfg = from_sources(GenerateConfig, flags, config_file)
    from logitcache.pipeline.generate_stage import run_generate

    summary = run_generate(cfg)
    rate = summary["tokens"] / summary["seconds"] if summary.get("seconds") else 0.0
    line = (
        f"generate: {summary['sequences']} sequences, {summary['tokens']} cached positions in "
        f"{summary['seconds']:.1f}s ({rate:.1f} pos/s); shards {summary['shards_done_before']} already done, "
        f"{summary['shards_mine']} for this task of {summary['shards_total']}"
    )
    if summary["finalized"]:
        line += f"; finalized {cfg.out} ({summary['positions']} positions"
        line += "".join(f", {k} {v}" for k, v in summary.get("counters", {}).items()) + ")"
    else:
        line += f"; not finalized yet: run `logitcache finalize {cfg.out}` once every task is done"
    skipped = summary.get("skipped_samples") or []
    if skipped:
        shown = "; ".join(f"sample {s['sample_id']}: {s['reason']}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more in the manifest)" if len(skipped) > 5 else ""
        line += f"\nskipped (--on-sample-error skip): {shown}{more}"
    click.echo(line)


def _align_config() -> type:
    from logitcache.pipeline.align_config import AlignConfig

    return AlignConfig


@main.command()
@click_options(_align_config())
@user_errors
def align(config_file: str | None, **flags: Any) -> None:
    """Stage two: align CACHE to a student tokenizer (pairs, chunks, vocabulary map), stored inside CACHE.

    \b
    Writes CACHE/alignments/<student tokenizer fingerprint>/; resumable; shards run in parallel processes.
    """
    from logitcache.config import from_sources
    from logitcache.pipeline.align_config import AlignConfig

    cfg = from_sources(AlignConfig, flags, config_file)
    from logitcache.pipeline.align_stage import describe_store, run_align

    manifest = run_align(cfg)
    d = describe_store(manifest)
    click.echo(
        f"align: {d['sequences']} sequences in {manifest['seconds']:.1f}s -> alignments/{manifest['key']}; "
        f"{d['aligned_teacher_fraction']:.1%} of teacher positions paired, chunks of "
        f"{d['mean_chunk_teacher_tokens']:.2f} teacher / {d['mean_chunk_student_tokens']:.2f} student tokens"
        + (f", vocab map coverage {d['vocab_map_coverage']:.1%}" if d["vocab_map_coverage"] is not None else "")
    )


def _train_config() -> type:
    from logitcache.distill.train_config import TrainConfig

    return TrainConfig


@main.command()
@click_options(_train_config())
@user_errors
def train(config_file: str | None, **flags: Any) -> None:
    """Stage three: train --student from --cache with the --loss terms; no teacher in memory.

    \b
    Multi-GPU / multi-process: torchrun --nproc-per-node N -m logitcache.cli train ...
    Resume: rerun with --resume (the same stream continues from the latest checkpoint).
    """
    from logitcache.config import from_sources
    from logitcache.distill.train_config import TrainConfig

    cfg = from_sources(TrainConfig, flags, config_file)
    from logitcache.distill.train import run_train

    scorer = None
    if cfg.teacher:  # online mode: the one path that scores with a teacher (distill never imports pipeline)
        from logitcache.pipeline.backend_hf import score_rows as scorer
    s = run_train(cfg, teacher_scorer=scorer)
    if s.get("already_finished"):
        click.echo(
            f"train: the run in {cfg.out} already finished ({s['steps']} steps, --max-steps {s['max_steps']}); "
            f"nothing to do, summary.json left as it was; raise --max-steps to train further"
        )
        return
    ev = s["eval"]
    click.echo(
        f"train: {s['steps']} steps, {s['tokens']} student completion tokens in {s['seconds']:.1f}s; last loss "
        f"{s['last'].get('loss', float('nan')):.4f}"
        + (f"; eval ce {ev['eval/ce']:.4f} ppl {ev['eval/ppl']:.2f}" if ev else "")
        + f"; checkpoint {s['checkpoint']}"
    )


def _sft_config() -> type:
    from logitcache.distill.sft_config import SFTConfig

    return SFTConfig


@main.command()
@click_options(_sft_config())
@user_errors
def sft(config_file: str | None, **flags: Any) -> None:
    """Supervised fine-tuning of --model on --data (prompt + response records): no cache, no teacher.

    \b
    The SFT baseline, or a teacher fine-tuned on the task before `generate`. Prompts are rendered as generate
    and eval render them; the loss covers the response and the token that ends the model's turn.
    Resume: rerun with --resume. The fine-tuned model: OUT/final (a save_pretrained folder).
    """
    from logitcache.config import from_sources
    from logitcache.distill.sft_config import SFTConfig

    cfg = from_sources(SFTConfig, flags, config_file)
    from logitcache.distill.sft import run_sft

    s = run_sft(cfg)
    ev = s["eval"]
    click.echo(
        f"sft: {s['steps']} steps on {s['train_records']} records ({s['heldout_records']} held out, "
        f"{s['skipped_overlong']} skipped as longer than --max-length), {s['tokens']} response tokens in "
        f"{s['seconds']:.1f}s; last loss {s['last'].get('loss', float('nan')):.4f}"
        + (f"; eval ce {ev['eval/ce']:.4f} ppl {ev['eval/ppl']:.2f}" if ev else "")
        + f"; model {s['model']}"
    )


def _eval_config() -> type:
    from logitcache.distill.eval_config import EvalConfig

    return EvalConfig


@main.command(name="eval")
@click_options(_eval_config())
@click.option("--json", "as_json", is_flag=True, help="Print the whole report (with per-sample rows) as JSON.")
@user_errors
def eval_cmd(config_file: str | None, as_json: bool, **flags: Any) -> None:
    """Evaluate a (student) model on --data: greedy answers vs references, perplexity, agreement with a teacher.

    \b
    Metrics: ROUGE-L / ROUGE-Lsum (rouge-score), SQuAD token F1 and exact match, perplexity of the references;
    with --cache, ROUGE-L of the model's answers against the teacher's cached completions.
    """
    from logitcache.config import from_sources
    from logitcache.distill.eval_config import EvalConfig

    cfg = from_sources(EvalConfig, flags, config_file)
    from logitcache.distill.evaluate import format_table, run_eval

    report = run_eval(cfg)
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))


def _import_config() -> type:
    from logitcache.interop.interop_config import ImportConfig

    return ImportConfig


@main.command(name="import")
@click_options(_import_config())
@user_errors
def import_cmd(config_file: str | None, **flags: Any) -> None:
    """Import someone else's logit dataset SRC (DistillKit, top-k Parquet, OpenAI logprobs JSONL) as a cache.

    \b
    Texts and byte offsets are rebuilt with --teacher-tokenizer; streamed and resumable (rerun the same command).
    Then `logitcache align` and `train` as with any cache (docs/interop.md).
    """
    from logitcache.config import from_sources
    from logitcache.interop.interop_config import ImportConfig

    cfg = from_sources(ImportConfig, flags, config_file)
    from logitcache.interop.import_stage import run_import

    s = run_import(cfg)
    rate = s["positions_written"] / s["seconds"] if s["seconds"] else 0.0
    click.echo(
        f"import: {s['shards_written']} shards written ({s['shards_done_before']} already done), "
        f"{s['positions_written']} positions in {s['seconds']:.1f}s ({rate:,.0f} pos/s); {cfg.out}: "
        f"{s['sequences']} sequences, {s['positions']} positions, {s['import']['exactness']}"
        + "".join(f", {k} {v}" for k, v in s["counters"].items())
        + f"; missing statistics: {', '.join(s['import']['missing_statistics'])}"
    )


def _export_config() -> type:
    from logitcache.interop.interop_config import ExportConfig

    return ExportConfig


@main.command(name="export")
@click_options(_export_config())
@user_errors
def export_cmd(config_file: str | None, **flags: Any) -> None:
    """Export CACHE as files other trainers read (top-k Parquet, DistillKit, OpenAI logprobs JSONL) into --out.

    \b
    One file per cache shard plus export_config.json; resumable (existing files are kept unless --overwrite).
    """
    from logitcache.config import from_sources
    from logitcache.interop.interop_config import ExportConfig

    cfg = from_sources(ExportConfig, flags, config_file)
    from logitcache.interop.export_stage import run_export

    s = run_export(cfg)
    rate = s["positions"] / s["seconds"] if s["seconds"] else 0.0
    click.echo(
        f"export: {s['files_written']} files written ({s['files_skipped']} already there), {s['positions']} "
        f"positions in {s['seconds']:.1f}s ({rate:,.0f} pos/s) -> {cfg.out}"
    )


@main.command()
@click.argument("cache")
@user_errors
def finalize(cache: str) -> None:
    """Write CACHE's manifest once every shard is complete (for job arrays; safe to repeat)."""
    from logitcache.pipeline.generate_stage import finalize_cache

    m = finalize_cache(cache)
    click.echo(f"{cache}: finalized, {m['num_shards']} shards, {m['stats']['positions']} positions")


@main.command()
@click.argument("cache")
@click.argument("out")
@click.option("--id-codec", default=None, help="Id codec of the output: int32, or rank (format v2, smaller; "
              "see docs/format.md). Default: the source's.")
@click.option("--logprob-codec", default=None, help="Logprob codec of the output: fp16, fp16r (v2), fp32, u8c. "
              "Default: the source's (re-coding is only as exact as the source).")
@click.option("--top-k", type=int, default=None, help="Keep the first K of each row (the top-K; at most the "
              "source's K). Default: the source's K.")
@click.option("--positions-backend", type=click.Choice(["zarr", "arrow"]), default=None,
              help="Position-array storage of the output. Default: the source's.")
@click.option("--drop-tail", is_flag=True, default=False, help="Leave out the sampled tail draws "
              "(--tail-samples); a smaller --top-k always does (the draws came from outside the source's top-K).")
@click.option("--overwrite/--no-overwrite", default=False, show_default=True,
              help="Replace an existing cache of a different config at OUT.")
@user_errors
def convert(
    cache: str, out: str, id_codec: str | None, logprob_codec: str | None, top_k: int | None,
    positions_backend: str | None, drop_tail: bool, overwrite: bool,
) -> None:
    """Rewrite CACHE into OUT with other codecs or a smaller K (format v2).

    Atomic and resumable like every writer: a rerun skips the shards already converted. The conversion settings
    and the source are recorded in OUT's cache.json (metadata.convert). Alignment stores are not copied: run
    `logitcache align` on OUT.
    """
    from logitcache.storage.codecs import ID_CODECS, LOGPROB_CODECS
    from logitcache.storage.convert import convert_cache

    for flag, value, known in (("--id-codec", id_codec, ID_CODECS), ("--logprob-codec", logprob_codec,
                                                                      LOGPROB_CODECS)):
        if value is not None and value not in known:
            raise ConfigError(f"{flag} {value!r}: unknown codec; choose one of {', '.join(sorted(known))}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be >= 1")

    def report(index: int, what: str) -> None:
        click.echo(f"shard {index}: {what}", err=True)

    try:
        m = convert_cache(
            cache, out,
            id_codec={"name": id_codec} if id_codec else None,
            logprob_codec={"name": logprob_codec} if logprob_codec else None,
            top_k=top_k,
            positions={"name": positions_backend} if positions_backend else None,
            overwrite=overwrite, drop_tail=drop_tail, on_shard=report,
        )
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise ConfigError(str(e)) from e
    total = sum(sh["bytes"] for sh in m["shards"])
    positions = m["stats"]["positions"]
    per = f", {total / positions:.1f} B/position" if positions else ""
    click.echo(f"{out}: converted {m['num_shards']} shards, {positions} positions, {_fmt_bytes(total)}{per}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON instead of a table.")
@user_errors
def inspect(cache: str, as_json: bool) -> None:
    """Describe CACHE: teacher, capture config, shards, sizes, tail-mass distribution."""
    from logitcache.storage import LogitCache, describe_cache

    info = describe_cache(LogitCache.open(cache))
    # the lse temperatures besides 1 each loss reads with its default config (distill.losses.loss_temperatures;
    # a test pins the two together): kept here so `inspect` needs no torch
    needs = {"ce": (), "kl": (), "rkl": (), "uld": (), "mlot": (2.0,), "alm": ()}
    held = set(info["extra_temperatures"])
    info["exact_losses"] = [n for n, t in needs.items() if not t or {*t, 1.0} <= held]
    lacking = {n: t for n, t in needs.items() if n not in info["exact_losses"]}
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    teacher = info["teacher"]
    capture = info["capture"]
    if capture.get("mode") == "score":  # sampling settings mean nothing for a teacher-forced cache
        drop = ("temperature", "top_p", "max_new_tokens") + (() if capture.get("tail_samples") else ("seed",))
        capture = {k: v for k, v in capture.items() if k not in drop}  # the seed makes the tail draws
    s = info["summary"]
    counters = dict(info["counters"])
    cut = {k: counters.pop(k) for k in list(counters) if k.startswith(("truncated", "cut_")) and counters[k]}
    finish = "  ".join(f"{k} {v}" for k, v in s["finish_reasons"].items()) + (
        "  (truncated: " + ", ".join(f"{k} {v}" for k, v in cut.items()) + ")" if cut else ""
    )
    quantiles = [f"{k} <= {v:.2e}" for k, v in s["tail_mass_quantiles"].items() if not math.isnan(v)]
    lines = [
        f"cache        {info['path']}  (schema v{info['schema_version']}, finalized {info['finalized_at']})",
        f"teacher      {teacher.get('model', '?')}  vocab {info['vocab_size']}  "
        f"tokenizer {str(teacher.get('tokenizer_fingerprint', '?'))[:12]}",
        f"capture      mode {capture.get('mode', '?')}  top_k {info['top_k']}  "
        + "  ".join(f"{k} {v}" for k, v in capture.items() if k not in ("mode", "top_k")),
        f"codecs       ids {info['codecs']['ids'].get('name')}  logprobs {info['codecs']['logprobs'].get('name')}  "
        f"positions {info['positions_backend'].get('name')}",
        f"contents     {info['shards']} shards  {info['sequences']} sequences  {info['positions']} positions  "
        f"{_fmt_bytes(info['bytes'])}  "
        + (f"{info['bytes_per_position']:.1f} B/position" if info["bytes_per_position"] else ""),
        f"statistics   {' '.join(info['row_statistics']) or 'none'}  exact losses (default configs): "
        + " ".join(info["exact_losses"])
        + "".join(
            f"  ({n} needs lse@{' lse@'.join(f'{x:g}' for x in sorted({*t, 1.0}))}: re-capture with "
            f"--extra-temperatures {' --extra-temperatures '.join(f'{x:g}' for x in t)})"
            for n, t in lacking.items()
        ),
        f"tokens       prompt {s['prompt_tokens']}  completion {s['completion_tokens']}",
        f"finish       {finish}",
        f"targets      in top-k {s['target_in_topk_rate']:.2%}  mean logprob {s['mean_target_logprob']:.3f}",
        "tail mass    " + "  ".join(quantiles) + ("  (histogram bin upper bounds)" if quantiles else ""),
        "",
        f"{'shard':<14}{'sequences':>10}{'positions':>12}{'bytes':>12}{'B/pos':>9}",
    ]
    if counters:
        lines.insert(-2, "counters     " + "  ".join(f"{k} {v}" for k, v in counters.items()))
    for row in info["per_shard"]:
        bpp = f"{row['bytes_per_position']:.1f}" if row["bytes_per_position"] else "-"
        lines.append(
            f"{row['name']:<14}{row['sequences']:>10}{row['positions']:>12}{_fmt_bytes(row['bytes']):>12}{bpp:>9}"
        )
    for a in info["alignments"]:
        lines.append("")
        if not a["finalized"]:
            lines.append(f"alignments/{a['key']}: not finalized (rerun `logitcache align`)")
            continue
        cov = a["vocab_map_coverage"]
        lines.append(f"alignments/{a['key']}  student {a['student']}  {a['sequences']} sequences")
        lines.append(
            f"  teacher positions paired {a['aligned_teacher_fraction']:.1%}  mean chunk "
            f"{a['mean_chunk_teacher_tokens']:.2f} teacher / {a['mean_chunk_student_tokens']:.2f} student tokens"
            + (f"  vocab map coverage {cov:.1%}" if cov is not None else "")
        )
        worst = ", ".join(f"sample {w['sample_id']} ({w['aligned_fraction']:.0%})" for w in a["worst"])
        lines.append(f"  least aligned: {worst}")
    click.echo("\n".join(lines))


@main.command()
@click.argument("cache")
@click.option(
    "--level",
    type=click.Choice(["checksums", "full"]),
    default="full",
    show_default=True,
    help="checksums: files, markers and checksums only (what train runs before a job); full: also decode and check "
    "every table, row and alignment record.",
)
@user_errors
def verify(cache: str, level: str) -> None:
    """Check CACHE end to end: schema, checksums, shapes, ids < vocab, sorted logprobs <= 0, alignment stores.

    Exits 0 when sound; otherwise prints one line per problem and exits 1. What could not be checked (a
    checksum an older writer did not record) is printed as a note and does not change the exit status.
    """
    from logitcache.storage import verify_cache

    notes: list[str] = []
    problems = verify_cache(cache, level=level, notes=notes)
    for n in notes:
        click.echo(f"note: {n}")
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        click.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"{cache}: OK")


@main.command()
@click.argument("cache")
@click.option("--sample", "sample_id", type=int, default=None, help="Sample id to show (default: the first sample).")
@click.option("--positions", type=int, default=20, show_default=True, help="How many loss positions to list.")
@click.option("--alternatives", type=int, default=5, show_default=True, help="Top-k alternatives per position.")
@user_errors
def show(cache: str, sample_id: int | None, positions: int, alternatives: int) -> None:
    """Show one cached sequence: its text and, per position, the realized token and the teacher's top alternatives."""
    from logitcache.storage import LogitCache

    c = LogitCache.open(cache)
    if sample_id is None:
        if not c.shards or not c.shards[0].sequences:
            raise ConfigError(f"{cache}: the cache holds no sequences to show")
        sample_id = int(c.sequence_table(c.shards[0].index).column("sample_id")[0].as_py())
    ids = c.sample_ids()
    if sample_id not in set(ids.tolist()):
        known = f"ids {ids.min()}..{ids.max()} ({len(ids)} samples)" if len(ids) else "no samples"
        raise ConfigError(f"--sample: no sample with id {sample_id} in {cache}; it holds {known}")
    rec = c.get(sample_id)
    tok = c.load_tokenizer() if c.has_tokenizer() else None
    pieces = None
    if tok is not None:
        try:
            from logitcache.tokenization import token_bytes_info

            pieces = token_bytes_info(tok).pieces
        except Exception:  # a tokenizer without a fast backend: decode() only
            pieces = None

    def name(i: int) -> str:
        if tok is None:
            return f"#{int(i)}"
        text = tok.decode([int(i)])
        if "\ufffd" in text and pieces is not None and int(i) < len(pieces) and pieces[int(i)]:
            # part of a multi-byte character: show its bytes (<0xC8>), not a replacement character
            raw = pieces[int(i)].decode("utf-8", errors="surrogateescape")
            text = "".join(f"<0x{ord(ch) - 0xDC00:02X}>" if 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in raw)
        return repr(text)

    def prob(lp: float) -> str:
        p = math.exp(lp)
        return f"{p:.3f}" if p >= 1e-3 or p == 0 else f"{p:.1e}"

    click.echo(
        f"sample {rec.sample_id}  (source {rec.source_id!r}, finish {rec.finish_reason}, "
        f"{len(rec.token_ids)} tokens, prompt {rec.prompt_len})"
    )
    click.echo("--- prompt ---")
    click.echo(rec.prompt_text)
    click.echo("--- completion ---")
    click.echo(rec.completion_text)
    click.echo(f"--- first {min(positions, rec.rows.n)} of {rec.rows.n} positions ---")
    r = rec.rows
    for p in range(min(positions, r.n)):
        target = int(r.target_ids[p])
        hits = (r.topk_ids[p] == target).nonzero()[0]
        rank = f"rank {hits[0] + 1}" if hits.size else f"outside top-{r.k}"
        alts = "  ".join(
            f"{name(i)} {prob(float(lp))}"
            for i, lp in zip(r.topk_ids[p, :alternatives], r.topk_logprobs[p, :alternatives])
        )
        lp = float(r.target_logprobs[p])
        click.echo(f"{p:>4}  {name(target):<16} p={prob(lp)} logp={lp:.3f} ({rank})  | {alts}")
    if tok is None:
        click.echo("(no tokenizer copy in the cache: ids shown instead of text)")


if __name__ == "__main__":
    main()
