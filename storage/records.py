"""The in-memory records that cross the storage boundary: one teacher sequence and its loss-span rows.

These dataclasses are the contract between stage one (which fills them), the cache writer and reader (which
persist them), and stages two and three (which consume them). They hold plain numpy arrays so the storage
layer depends on nothing heavier than numpy.

Positions (DESIGN.md section 2): a sequence has teacher token ids ``x_0 .. x_{n-1}``; the completion starts at
token ``P = prompt_len``. The loss span is the positions ``p`` with ``P-1 <= p <= n-2`` (each predicts a
completion token), so a sequence has exactly ``n - P`` rows; row ``r`` describes position ``P - 1 + r`` and
predicts token ``x_{P+r}``. An empty completion has zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: finish reasons a sequence may carry: ``stop`` (end-of-text or a stop string), ``length`` (max tokens hit),
#: ``score`` (teacher-forced over a given response).
FINISH_REASONS = ("stop", "length", "score")


@dataclass
class PositionRows:
    """The cached teacher distribution for ``n`` consecutive loss-span positions of one sequence.

    ``topk_ids``/``topk_logprobs`` are ``[n, K]``: the K most likely next tokens at temperature 1 (log-softmax
    over the full vocabulary), sorted by descending logprob. ``target_ids``/``target_logprobs`` are ``[n]``: the
    realized next token and its logprob, even when outside the top-K. ``extra_lse`` maps a temperature tau to
    ``[n]`` values of ``logsumexp(logits / tau)`` (only backends that see full logits can record it).
    ``logit_mean``/``logit_std`` (both or neither, float32 ``[n]``) are the mean and population standard
    deviation of the raw float32 logits over the full vocabulary width (``--logit-moments``; None when not
    recorded). ``tail_ids``/``tail_logprobs`` (both or neither, int32/float32 ``[n, N]``) are ``N`` ids drawn with
    replacement from the teacher's distribution at temperature 1 restricted to outside the row's top-K, with their
    logprobs (normalized over the full vocabulary, like ``topk_logprobs``; ``--tail-samples``; None when not
    recorded).
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_ids: np.ndarray
    target_logprobs: np.ndarray
    extra_lse: dict[float, np.ndarray] = field(default_factory=dict)
    logit_mean: np.ndarray | None = None
    logit_std: np.ndarray | None = None
    tail_ids: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.topk_ids = np.ascontiguousarray(self.topk_ids, dtype=np.int32)
        self.topk_logprobs = np.ascontiguousarray(self.topk_logprobs, dtype=np.float32)
        self.target_ids = np.ascontiguousarray(self.target_ids, dtype=np.int32).reshape(-1)
        self.target_logprobs = np.ascontiguousarray(self.target_logprobs, dtype=np.float32).reshape(-1)
        n = self.target_ids.shape[0]
        if self.topk_ids.ndim != 2 or self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[0] != n:
            raise ValueError(
                f"PositionRows: topk_ids {self.topk_ids.shape} and topk_logprobs {self.topk_logprobs.shape} must "
                f"both be [n, K] with n = len(target_ids) = {n}"
            )
        if self.target_logprobs.shape[0] != n:
            raise ValueError(f"PositionRows: target_logprobs has {self.target_logprobs.shape[0]} rows, expected {n}")
        self.extra_lse = {
            float(t): np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for t, v in self.extra_lse.items()
        }
        for t, v in self.extra_lse.items():
            if v.shape[0] != n:
                raise ValueError(f"PositionRows: extra_lse[{t}] has {v.shape[0]} rows, expected {n}")
        if (self.logit_mean is None) != (self.logit_std is None):
            raise ValueError("PositionRows: logit_mean and logit_std come together (both or neither)")
        if self.logit_mean is not None and self.logit_std is not None:
            self.logit_mean = np.ascontiguousarray(self.logit_mean, dtype=np.float32).reshape(-1)
            self.logit_std = np.ascontiguousarray(self.logit_std, dtype=np.float32).reshape(-1)
            for name, v in (("logit_mean", self.logit_mean), ("logit_std", self.logit_std)):
                if v.shape[0] != n:
                    raise ValueError(f"PositionRows: {name} has {v.shape[0]} rows, expected {n}")
        if (self.tail_ids is None) != (self.tail_logprobs is None):
            raise ValueError("PositionRows: tail_ids and tail_logprobs come together (both or neither)")
        if self.tail_ids is not None and self.tail_logprobs is not None:
            self.tail_ids = np.ascontiguousarray(self.tail_ids, dtype=np.int32)
            self.tail_logprobs = np.ascontiguousarray(self.tail_logprobs, dtype=np.float32)
            shape = self.tail_ids.shape
            if self.tail_ids.ndim != 2 or shape != self.tail_logprobs.shape or shape[0] != n:
                raise ValueError(
                    f"PositionRows: tail_ids {self.tail_ids.shape} and tail_logprobs {self.tail_logprobs.shape} must "
                    f"both be [n, N] with n = {n}"
                )

    @property
    def tail_samples(self) -> int:
        """``N``, the tail draws per row (0 when the rows carry none)."""
        return 0 if self.tail_ids is None else int(self.tail_ids.shape[1])

    def tail_problem(self, vocab: int) -> tuple[int, str] | None:
        """The first row whose tail draws are unsound and what is wrong (None: sound, or no draws): ids outside
        ``[0, vocab)`` or inside the row's top-K, logprobs NaN or positive."""
        if self.tail_ids is None or self.tail_logprobs is None or not self.tail_ids.size:
            return None
        ids, lps = self.tail_ids, self.tail_logprobs
        bad = np.flatnonzero(((ids < 0) | (ids >= vocab)).any(axis=1))
        if bad.size:
            r = int(bad[0])
            return r, f"tail_ids value {ids[r][(ids[r] < 0) | (ids[r] >= vocab)][0]} outside [0, {vocab})"
        bad = np.flatnonzero(~(lps <= 0).all(axis=1))  # NaN compares False
        if bad.size:
            return int(bad[0]), "tail_logprobs NaN or positive (logprobs must be <= 0)"
        for start in range(0, self.n, 4096):  # [rows, N, K] comparisons, in blocks to bound memory
            stop = min(start + 4096, self.n)
            inside = (ids[start:stop, :, None] == self.topk_ids[start:stop, None, :]).any(axis=(1, 2))
            if inside.any():
                return start + int(np.flatnonzero(inside)[0]), "tail_ids holds an id of the row's top-K (draws come "\
                    "from outside it)"
        return None

    @property
    def has_moments(self) -> bool:
        """Whether the rows carry ``logit_mean``/``logit_std``."""
        return self.logit_mean is not None

    @property
    def n(self) -> int:
        return int(self.target_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def tail_mass(self) -> np.ndarray:
        """``1 - sum(exp(topk_logprobs))`` per row, clipped at 0 (float32 ``[n]``)."""
        mass = np.exp(self.topk_logprobs.astype(np.float64)).sum(axis=1)
        return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)

    @staticmethod
    def empty(k: int, temperatures: tuple[float, ...] = (), moments: bool = False, tail: int = 0) -> PositionRows:
        z = np.zeros(0, np.float32) if moments else None
        return PositionRows(
            topk_ids=np.zeros((0, k), np.int32),
            topk_logprobs=np.zeros((0, k), np.float32),
            target_ids=np.zeros(0, np.int32),
            target_logprobs=np.zeros(0, np.float32),
            extra_lse={t: np.zeros(0, np.float32) for t in temperatures},
            logit_mean=z,
            logit_std=z,
            tail_ids=np.zeros((0, tail), np.int32) if tail else None,
            tail_logprobs=np.zeros((0, tail), np.float32) if tail else None,
        )

    @staticmethod
    def concat(parts: list[PositionRows], k: int) -> PositionRows:
        if not parts:
            return PositionRows.empty(k)
        temps = sorted(parts[0].extra_lse)
        moments = parts[0].has_moments
        if any(p.has_moments != moments for p in parts):
            raise ValueError("PositionRows.concat: some parts carry logit moments and others do not")
        tail = parts[0].tail_ids is not None
        if any((p.tail_ids is not None) != tail for p in parts):
            raise ValueError("PositionRows.concat: some parts carry tail draws and others do not")
        return PositionRows(
            topk_ids=np.concatenate([p.topk_ids for p in parts]),
            topk_logprobs=np.concatenate([p.topk_logprobs for p in parts]),
            target_ids=np.concatenate([p.target_ids for p in parts]),
            target_logprobs=np.concatenate([p.target_logprobs for p in parts]),
            extra_lse={t: np.concatenate([p.extra_lse[t] for p in parts]) for t in temps},
            logit_mean=np.concatenate([p.logit_mean for p in parts]) if moments else None,  # type: ignore[misc]
            logit_std=np.concatenate([p.logit_std for p in parts]) if moments else None,  # type: ignore[misc]
            tail_ids=np.concatenate([p.tail_ids for p in parts]) if tail else None,  # type: ignore[misc]
            tail_logprobs=np.concatenate([p.tail_logprobs for p in parts]) if tail else None,  # type: ignore[misc]
        )

    def slice(self, start: int, stop: int) -> PositionRows:
        return PositionRows(
            topk_ids=self.topk_ids[start:stop],
            topk_logprobs=self.topk_logprobs[start:stop],
            target_ids=self.target_ids[start:stop],
            target_logprobs=self.target_logprobs[start:stop],
            extra_lse={t: v[start:stop] for t, v in self.extra_lse.items()},
            logit_mean=None if self.logit_mean is None else self.logit_mean[start:stop],
            logit_std=None if self.logit_std is None else self.logit_std[start:stop],
            tail_ids=None if self.tail_ids is None else self.tail_ids[start:stop],
            tail_logprobs=None if self.tail_logprobs is None else self.tail_logprobs[start:stop],
        )


@dataclass
class SequenceRecord:
    """One teacher sequence: rendered prompt + completion, its teacher tokens, and its loss-span rows.

    ``token_byte_offsets[i]`` is the UTF-8 byte offset at which token ``i`` starts within
    ``(prompt_text + completion_text).encode()``; tokens that cover no bytes (BOS, most special tokens) start
    where the next text begins. ``rows.n`` must equal ``len(token_ids) - prompt_len``.
    """

    sample_id: int
    source_id: str
    prompt_text: str
    completion_text: str
    token_ids: np.ndarray
    token_byte_offsets: np.ndarray
    prompt_len: int
    finish_reason: str
    rows: PositionRows
    #: the input's chat messages (a prompt string becomes one user message) before any template, so a student
    #: can render the same conversation with its own chat template; None when unknown
    messages: list[dict[str, str]] | None = None

    def __post_init__(self) -> None:
        self.token_ids = np.ascontiguousarray(self.token_ids, dtype=np.int32).reshape(-1)
        self.token_byte_offsets = np.ascontiguousarray(self.token_byte_offsets, dtype=np.int64).reshape(-1)
        n_tok = self.token_ids.shape[0]
        if self.token_byte_offsets.shape[0] != n_tok:
            raise ValueError(
                f"sample {self.sample_id}: {self.token_byte_offsets.shape[0]} byte offsets for {n_tok} tokens"
            )
        if not 0 <= self.prompt_len <= n_tok:
            raise ValueError(f"sample {self.sample_id}: prompt_len {self.prompt_len} outside [0, {n_tok}]")
        if self.prompt_len == 0 and n_tok > 0:
            raise ValueError(
                f"sample {self.sample_id}: prompt_len must be >= 1 (the first completion token "
                "needs a position that predicts it)"
            )
        if self.rows.n != n_tok - self.prompt_len:
            raise ValueError(
                f"sample {self.sample_id}: {self.rows.n} rows, expected len(token_ids) - prompt_len = "
                f"{n_tok - self.prompt_len}"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"sample {self.sample_id}: finish_reason {self.finish_reason!r} not in {FINISH_REASONS}")

    @property
    def completion_byte_start(self) -> int:
        """Byte offset of the completion within the full sequence text."""
        return len(self.prompt_text.encode("utf-8"))
