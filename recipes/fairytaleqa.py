"""FairytaleQA as logitcache inputs: question + the section(s) it is about as the prompt, ``answer1`` as the response.

    python recipes/fairytaleqa.py OUT [--train 96 --teacher-train 384 --test 64 --max-words 120]

Reads ``../shared/data/fairytaleqa`` (or ``--data``; the split_for_training layout of the FairytaleQA repository:
``<story>-story.csv`` with ``section,text`` and ``<story>-questions.csv`` with ``cor_section, question, answer1``)
and writes JSONL files with ``id``, ``prompt``, ``response`` (the shape ``generate``, ``sft`` and ``eval`` read):

- ``train.jsonl``: the students' training set (distillation arms and the SFT baseline train on exactly these);
- ``teacher_train.jsonl``: the teacher's fine-tuning set, a superset of ``train.jsonl`` drawn from the same split
  (the paper's teachers are fine-tuned on the whole train split; a teacher that saw more data is the point of
  distillation);
- ``test.jsonl``: the evaluation set, from the test split (stories disjoint from train);
- ``prepare.json``: the options and the counts, so a table can say what it was measured on.

Trade-offs, chosen for a 2-core CPU machine: only questions whose sections total at most ``--max-words`` words are
used (short prompts: the median question's sections hold ~170 words, a quarter hold <= 128), which biases the task
towards short contexts; which questions are drawn is a pure function of their ids (a SHA-1 order), so every run and
every machine sees the same sets. The prompt is plain text (``Story: ... Question: ... Answer:``) so a base model
without a chat template (Gemma-3-270M) and a chat student (SmolLM2, rendered with its template) read the same words.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairytaleqa"
PROMPT = "Read the story, then answer the question in a few words.\n\nStory: {story}\n\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    response: str
    words: int  # words in the section text


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"fairytaleqa: cannot read {path}: {e}") from None


def load_split(data: Path, split: str) -> list[Question]:
    """Every question of ``split`` with a non-empty ``answer1`` whose sections exist, sorted by id."""
    folder = data / split
    files = sorted(folder.glob("*-questions.csv"))
    if not files:
        raise SystemExit(f"fairytaleqa: no *-questions.csv under {folder}; pass --data pointing at the dataset folder")
    out = []
    for qf in files:
        story_name = qf.name[: -len("-questions.csv")]
        sections = {r["section"].strip(): r["text"].strip() for r in _rows(folder / f"{story_name}-story.csv")}
        for r in _rows(qf):
            answer = (r.get("answer1") or "").strip()
            wanted = [s.strip() for s in (r.get("cor_section") or "").split(",") if s.strip()]
            if not answer or not wanted or any(s not in sections for s in wanted):
                continue
            story = "\n".join(sections[s] for s in wanted)
            prompt = PROMPT.format(story=story, question=r["question"].strip())
            out.append(Question(f"{split}/{story_name}/{r['question_id']}", prompt, " " + answer, len(story.split())))
    return sorted(out, key=lambda q: q.id)


def draw(questions: list[Question], n: int, max_words: int) -> list[Question]:
    """The first ``n`` questions with at most ``max_words`` section words, in SHA-1 order of their ids."""
    short = [q for q in questions if q.words <= max_words]
    short.sort(key=lambda q: hashlib.sha1(q.id.encode()).hexdigest())
    if len(short) < n:
        raise SystemExit(f"fairytaleqa: only {len(short)} questions with <= {max_words} words; lower the count or "
                         "raise --max-words")
    return short[:n]


def write_jsonl(path: Path, questions: list[Question]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps({"id": q.id, "prompt": q.prompt, "response": q.response}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def prepare(out: Path, *, train: int, teacher_train: int, test: int, max_words: int,
            data: Path = DEFAULT_DATA) -> dict[str, object]:
    """Write ``train.jsonl``, ``teacher_train.jsonl``, ``test.jsonl`` and ``prepare.json`` under ``out``."""
    if teacher_train < train:
        raise SystemExit(f"fairytaleqa: --teacher-train ({teacher_train}) must be >= --train ({train})")
    out.mkdir(parents=True, exist_ok=True)
    teacher_set = draw(load_split(data, "train"), teacher_train, max_words)
    test_set = draw(load_split(data, "test"), test, max_words)
    write_jsonl(out / "teacher_train.jsonl", teacher_set)
    write_jsonl(out / "train.jsonl", teacher_set[:train])
    write_jsonl(out / "test.jsonl", test_set)
    info = {"data": str(data), "train": train, "teacher_train": teacher_train, "test": test, "max_words": max_words,
            "prompt": PROMPT}
    (out / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="The FairytaleQA split_for_training folder.")
    ap.add_argument("--train", type=int, default=96, help="Student training questions.")
    ap.add_argument("--teacher-train", type=int, default=384, help="Teacher fine-tuning questions (>= --train).")
    ap.add_argument("--test", type=int, default=64, help="Test questions.")
    ap.add_argument("--max-words", type=int, default=120, help="Longest section text (words) a question may use.")
    a = ap.parse_args(argv)
    print(json.dumps(prepare(a.out, train=a.train, teacher_train=a.teacher_train, test=a.test,
                             max_words=a.max_words, data=a.data)))


if __name__ == "__main__":
    main()
