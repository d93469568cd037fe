"""RELIABILITY.md names the test that proves each promise: every test it cites exists."""

import ast
import re

from tests.helpers import PROJECT_DIR

TESTS = PROJECT_DIR / "tests"


def functions_in(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def cited_tests(text: str) -> list[str]:
    """``tests/x.py``, ``tests/x.py::name`` and bare ``test_name`` in backquotes."""
    return re.findall(r"`((?:tests/[\w/]+\.py(?:::\w+)?)|test_\w+)`", text)


def missing_citations(text: str) -> list[str]:
    every_test = set().union(*(functions_in(path) for path in TESTS.rglob("test_*.py")))
    missing = []
    for cited in cited_tests(text):
        path, _, name = cited.partition("::")
        if not path.startswith("tests/"):
            found = cited in every_test
        else:
            file = PROJECT_DIR / path
            found = file.is_file() and (not name or name in functions_in(file))
        if not found:
            missing.append(cited)
    return missing


def test_every_test_reliability_md_cites_exists():
    text = (PROJECT_DIR / "RELIABILITY.md").read_text()
    assert len(cited_tests(text)) >= 15
    assert missing_citations(text) == []


def test_a_stale_citation_is_found():
    text = "| a promise | `tests/test_security.py::test_gone` | `test_gone_too` | `tests/gone.py` |"
    assert missing_citations(text) == [
        "tests/test_security.py::test_gone",
        "test_gone_too",
        "tests/gone.py",
    ]
