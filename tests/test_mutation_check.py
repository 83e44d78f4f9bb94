"""scripts/mutation_check.py cannot rot silently: its table parses, every planted bug's original text is in
the tree exactly once, and every test it names exists (the full check, which runs them, is a CI stage)."""

import ast
from pathlib import Path

from tests.tiny_run import ROOT, load_script

check = load_script("mutation_check")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_entry_is_complete_and_its_original_text_is_in_the_tree():
    mutations = check.MUTATIONS
    assert len(mutations) >= 15
    assert len({m.claim for m in mutations}) == len(mutations)  # one row per claim
    for m in mutations:
        assert m.claim and m.file and m.original and m.tests, m
        assert m.replacement != m.original, m.claim
    assert check.originals_problems() == []


def test_every_named_test_exists():
    for m in check.MUTATIONS:
        nodes = [t for t in m.tests if "::" in t]
        assert nodes, f"{m.claim}: no test node named"
        for node in nodes:
            file, _, name = node.partition("::")
            assert (ROOT / file).is_file(), (m.claim, file)
            assert name.split("[")[0] in _test_functions(ROOT / file), (m.claim, node)


def test_a_missing_original_is_reported(tmp_path):
    (tmp_path / "mod.py").write_text("x = 1\nx = 1\n")
    entries = [
        check.Mutation("once", "mod.py", "y = 2", "y = 3", ("t.py::test_a",)),
        check.Mutation("twice", "mod.py", "x = 1", "x = 2", ("t.py::test_a",)),
        check.Mutation("absent file", "nope.py", "x", "y", ("t.py::test_a",)),
    ]
    problems = check.originals_problems(tmp_path, entries)
    assert problems == [
        "once: the original text occurs 0 times in mod.py, not once",
        "twice: the original text occurs 2 times in mod.py, not once",
        "absent file: nope.py does not exist",
    ]


def test_a_mutant_runs_on_a_copy_and_its_verdict_follows_the_tests(tmp_path):
    """One planted bug end to end on a tiny stand-in repository: caught when its test fails, SURVIVED
    when it passes; the original file is never touched."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "lib.py").write_text("def double(x):\n    return 2 * x\n")
    (repo / "test_lib.py").write_text(
        "from lib import double\n\n\ndef test_double():\n    assert double(3) == 6\n"
    )
    cases = {
        "caught": check.Mutation("c", "lib.py", "2 * x", "3 * x", ("test_lib.py::test_double",)),
        "SURVIVED": check.Mutation("s", "lib.py", "2 * x", "x + x", ("test_lib.py::test_double",)),
    }
    for i, (want, m) in enumerate(cases.items()):
        got = check.run_one(i, m, repo, tmp_path / "work", timeout_s=120)
        assert got.verdict == want, got.tail
    assert (repo / "lib.py").read_text() == "def double(x):\n    return 2 * x\n"
