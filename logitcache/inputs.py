"""Read stage one's inputs: JSONL, Parquet, CSV, or a Hugging Face ``datasets`` folder saved to disk.

Each record becomes an ``InputRecord`` with a ``prompt`` string or chat ``messages`` (a list of
``{"role", "content"}``), an optional ``response`` (required in score mode) and a ``source_id`` (the
``--id-field`` value, or the record's index). Sample ids are the record's position in the file (after
``--limit``), so they are stable across reruns and shard boundaries are a pure function of the input.

A ``datasets`` folder (``save_to_disk``) is read with pyarrow directly (its ``data-*.arrow`` files are Arrow
streams), so the ``datasets`` package is not needed. Errors name the file, the line or record, and the field.
The input fingerprint hashes the file bytes and the field mapping: a rerun on changed data is detected.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any

from logitcache.config import ConfigError


class InputError(ConfigError):
    """The input data is malformed; the message names file, record and field."""


@dataclass
class InputRecord:
    sample_id: int
    source_id: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    response: str | None


@dataclass(frozen=True)
class InputFields:
    prompt: str = "prompt"
    messages: str = "messages"
    response: str = "response"
    id: str | None = None


def _files_of(path: str) -> tuple[str, list[str]]:
    if not os.path.exists(path):
        raise InputError(f"--data {path}: no such file or folder")
    if os.path.isdir(path):
        arrows = sorted(glob.glob(os.path.join(path, "data-*.arrow"))) or sorted(
            glob.glob(os.path.join(path, "*.arrow"))
        )
        if arrows:
            return "arrow", arrows
        parquets = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if parquets:
            return "parquet", parquets
        raise InputError(f"--data {path}: folder holds no data-*.arrow (datasets save_to_disk) or *.parquet files")
    lower = path.lower()
    for ext, kind in (
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".parquet", "parquet"),
        (".csv", "csv"),
        (".arrow", "arrow"),
    ):
        if lower.endswith(ext):
            return kind, [path]
    raise InputError(f"--data {path}: unknown format; use .jsonl, .parquet, .csv or a datasets folder")


def _rows(kind: str, files: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(location for errors, raw row dict) for every record, in order."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in files:
        if kind == "jsonl":
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise InputError(
                            f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                        ) from e
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                    if not isinstance(obj, dict):
                        raise InputError(f"{path}:{lineno}: expected a JSON object per line")
                    out.append((f"{path}:{lineno}", obj))
        elif kind == "csv":
            with open(path, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                line = data[: e.start].count(b"\n") + 1
                raise InputError(f"{path}:{line}: not valid UTF-8; re-encode the file as UTF-8") from e
            for i, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
                out.append((f"{path}:{i}", dict(row)))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            if kind == "parquet":
                table = pq.read_table(path)
            else:
                with pa.memory_map(path) as src:
                    try:
                        table = pa.ipc.open_stream(src).read_all()
                    except pa.ArrowInvalid:
                        table = pa.ipc.open_file(src).read_all()
            for i, row in enumerate(table.to_pylist()):
                out.append((f"{path}[{i}]", row))
    return out


def read_inputs(path: str, fields: InputFields, mode: str, limit: int | None = None) -> list[InputRecord]:
    """Every input record, validated for ``mode`` (``generate`` or ``score``)."""
    kind, files = _files_of(path)
    rows = _rows(kind, files)
    if limit is not None:
        rows = rows[:limit]
    records = []
    for i, (where, row) in enumerate(rows):
        prompt = row.get(fields.prompt)
        messages = row.get(fields.messages)
        if messages is not None and not isinstance(messages, list):
            if isinstance(messages, str):
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError:
                    messages = None
            if not isinstance(messages, list):
                raise InputError(f"{where}: field {fields.messages!r} must be a list of {{role, content}} messages")
        if prompt is None and messages is None:
            raise InputError(
                f"{where}: missing field {fields.prompt!r} (or {fields.messages!r}); set "
                "--prompt-field/--messages-field to the names your data uses"
            )
        if messages is not None:
            for m in messages:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise InputError(f"{where}: every message in {fields.messages!r} needs 'role' and 'content'")
            if not any(str(m["content"]).strip() for m in messages):
                raise InputError(f"{where}: empty prompt (all messages are empty)")
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
            prompt = None
        elif not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: empty prompt in field {fields.prompt!r}")
        response = row.get(fields.response)
        if mode == "score":
            if response is None:
                raise InputError(
                    f"{where}: missing field {fields.response!r}, required in --mode score; set --response-field"
                )
            if not isinstance(response, str):
                raise InputError(f"{where}: field {fields.response!r} must be a string")
        if fields.id is not None:
            if fields.id not in row or row[fields.id] is None:
                raise InputError(f"{where}: missing id field {fields.id!r} (--id-field)")
            source_id = str(row[fields.id])
        else:
            source_id = str(i)
        records.append(InputRecord(i, source_id, prompt, messages, response if isinstance(response, str) else None))
    if not records:
        raise InputError(f"--data {path}: no records")
    return records


def input_fingerprint(path: str, fields: InputFields, limit: int | None) -> str:
    kind, files = _files_of(path)
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    h.update(json.dumps([kind, fields.__dict__, limit], sort_keys=True).encode())
    return h.hexdigest()[:16]


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Sample-index ranges of the cache shards: a pure function of the input size and ``--shard-size``."""
    return [(s, min(num_samples, s + shard_size)) for s in range(0, num_samples, shard_size)]


def shards_for_task(num_shards: int, num_tasks: int, task_index: int) -> list[int]:
    """The cache shards one job-array task writes: ``s % num_tasks == task_index`` (disjoint, covering)."""
    return [s for s in range(num_shards) if s % num_tasks == task_index]
