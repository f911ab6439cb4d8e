"""A tiny teacher cache aligned to a tiny student with another tokenizer: the fixture of training tests."""

from __future__ import annotations

from pathlib import Path

from gen_helpers import ascii_teacher, write_prompts

from logitcache.pipeline.align_stage import AlignConfig, run_align
from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
from logitcache.testing.tiny_models import tiny_llama, unigram_tokenizer

STUDENT_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"


def build_setup(root: Path, n: int = 24, shard_size: int = 4) -> dict[str, Path]:
    teacher = ascii_teacher(root / "teacher")
    data = write_prompts(root / "p.jsonl", n)
    run_generate(
        GenerateConfig(
            model=str(teacher), data=str(data), out=str(root / "cache"), mode="score", top_k=8, shard_size=shard_size
        )
    )
    tok = unigram_tokenizer()
    tok.chat_template = STUDENT_TEMPLATE
    student = root / "student"
    tiny_llama(tok, seed=1).save_pretrained(student)
    tok.save_pretrained(student)
    run_align(AlignConfig(cache=str(root / "cache"), student_tokenizer=str(student), workers=1))
    return {"teacher": teacher, "data": data, "cache": root / "cache", "student": student}
