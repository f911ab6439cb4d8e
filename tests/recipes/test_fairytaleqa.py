"""recipes/fairytaleqa.py: the benchmark's data preparation (selection is a pure function of ids; clear errors)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fairytaleqa_recipe", ROOT / "recipes" / "fairytaleqa.py")
assert _spec is not None and _spec.loader is not None
fqa = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fqa  # dataclasses look their module up
_spec.loader.exec_module(fqa)


def _story(folder: Path, name: str, sections: dict[str, str], questions: list[dict[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}-story.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "text"])
        w.writerows(sections.items())
    with (folder / f"{name}-questions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question_id", "cor_section", "question", "answer1"])
        w.writeheader()
        w.writerows(questions)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    data = tmp_path / "fqa"
    for split, n in (("train", 12), ("test", 6)):
        qs = [{"question_id": str(i), "cor_section": "1,2" if i % 2 else "1", "question": f"Q{i}?", "answer1": f"a{i}"}
              for i in range(n)]
        qs.append({"question_id": "99", "cor_section": "7", "question": "missing section", "answer1": "x"})
        qs.append({"question_id": "98", "cor_section": "1", "question": "no answer", "answer1": ""})
        _story(data / split, f"s-{split}", {"1": "Once upon a time.", "2": "The end " * 50}, qs)
    return data


def test_prepare_writes_prompt_response_and_drops_unusable_questions(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fqa.prepare(out, train=3, teacher_train=5, test=2, max_words=20, data=dataset)
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    teacher = [json.loads(x) for x in (out / "teacher_train.jsonl").read_text().splitlines()]
    assert len(train) == 3 and len(teacher) == 5
    assert train == teacher[:3]  # the students' set is inside the teacher's
    for r in teacher:
        assert r["response"].startswith(" a") and "Story: Once upon a time." in r["prompt"]
        assert r["prompt"].endswith("Answer:")
        assert "The end" not in r["prompt"]  # two-section questions exceed --max-words 20
    assert json.loads((out / "prepare.json").read_text())["train"] == 3


def test_selection_is_a_pure_function_of_ids(dataset: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fqa.prepare(a, train=2, teacher_train=4, test=2, max_words=1000, data=dataset)
    fqa.prepare(b, train=2, teacher_train=4, test=2, max_words=1000, data=dataset)
    for name in ("train.jsonl", "teacher_train.jsonl", "test.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ids = [json.loads(x)["id"] for x in (a / "teacher_train.jsonl").read_text().splitlines()]
    assert ids != sorted(ids) or len(set(ids)) == len(ids)  # drawn, not the first rows; never twice
    assert len(set(ids)) == len(ids)


def test_clear_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="only 6 questions"):
        fqa.prepare(tmp_path / "o", train=1, teacher_train=1, test=7, max_words=1000, data=dataset)
    with pytest.raises(SystemExit, match="--teacher-train"):
        fqa.prepare(tmp_path / "o", train=3, teacher_train=2, test=1, max_words=1000, data=dataset)
    with pytest.raises(SystemExit, match="no \\*-questions.csv"):
        fqa.prepare(tmp_path / "o", train=1, teacher_train=1, test=1, max_words=1000, data=tmp_path / "nowhere")
