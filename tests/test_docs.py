"""Every Python example in the README and docs runs, and prints what it says it prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


PYTHON_EXAMPLES = [e for e in find_examples(*[p for p in DOCS if p.exists()]) if e.prefix in ("py", "python")]


def test_the_docs_have_examples():
    assert len(PYTHON_EXAMPLES) >= 4


@pytest.mark.parametrize("example", PYTHON_EXAMPLES, ids=str)
def test_doc_examples(example: CodeExample, eval_example: EvalExample, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example using the default store writes here
    eval_example.set_config(line_length=120)
    eval_example.run_print_check(example)
