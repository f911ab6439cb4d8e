"""``interop`` imports only ``storage`` and the shared core: never ``pipeline``, ``distill`` or ``cli``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "interop"
FORBIDDEN = ("logitcache.pipeline", "logitcache.distill", "logitcache.cli", "logitcache.testing")


def test_interop_imports_only_storage_and_the_shared_core():
    bad = []
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.name}: {n}" for n in names
                    if n.startswith(FORBIDDEN)]
    assert len(list(ROOT.glob("*.py"))) >= 6 and bad == []
