"""The mutation catalogue (`python -m parity.mutate`, issue #15 item 8) stays in step with the
code: every entry applies (its snippet occurs exactly once in its file) and changes the file;
the command itself is not run here (each mutation is a whole gate run)."""
from __future__ import annotations

import pytest

from contract.targets import REPO_ROOT
from parity.mutate import CATALOGUE, apply, problem


def test_catalogue_is_large_and_named_uniquely():
    assert len(CATALOGUE) >= 40
    assert len({m.name for m in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("m", CATALOGUE, ids=[m.name for m in CATALOGUE])
def test_mutation_applies_to_the_tree(m, tmp_path):
    why = problem(m)
    assert why is None, f"mutation {m.name} no longer applies: {why} (update parity/mutate.py)"
    from contract.targets import REPO_ROOT
    dst = tmp_path / m.path
    dst.parent.mkdir(parents=True)
    dst.write_text((REPO_ROOT / m.path).read_text())
    apply(m, tmp_path)
    assert dst.read_text() != (REPO_ROOT / m.path).read_text()


def test_a_snippet_that_moved_is_reported(tmp_path):
    m = CATALOGUE[0]
    (tmp_path / m.path).parent.mkdir(parents=True)
    (tmp_path / m.path).write_text("nothing to see\n")
    assert "occurs 0 times" in (problem(m, tmp_path) or "")
    with pytest.raises(ValueError, match=m.name):
        apply(m, tmp_path)


def test_gate_run_is_every_parity_test_file(tmp_path):
    # the reordered gate is still the whole of `pytest parity/`: every test file, once, the
    # killers first; a new test file is picked up without editing the list
    # but this file, whose catalogue check fails in every mutated tree by construction
    from parity.mutate import GATE_FIRST, gate_targets
    names = sorted(p.name for p in (REPO_ROOT / "parity").glob("test_*.py") if p.name != "test_mutate.py")
    got = gate_targets()
    assert sorted(got) == [f"parity/{n}" for n in names] and len(set(got)) == len(got)
    assert got[: len(GATE_FIRST)] == [f"parity/{n}" for n in GATE_FIRST]
    (tmp_path / "parity").mkdir()
    for n in ("test_zz_new.py", "test_parity.py", "test_mutate.py"):
        (tmp_path / "parity" / n).write_text("")
    assert gate_targets(tmp_path) == ["parity/test_parity.py", "parity/test_zz_new.py"]


def test_first_look_names_catalogue_entries_and_tests_of_the_gate():
    # a FIRST_LOOK entry of a renamed mutation or a moved test would silently send that
    # mutation to the whole gate every time: both sides must exist
    from parity.mutate import BY_NAME, FIRST_LOOK
    assert set(FIRST_LOOK) <= set(BY_NAME), sorted(set(FIRST_LOOK) - set(BY_NAME))
    for name, target in FIRST_LOOK.items():
        path, _, test = target.partition("::")
        assert path.startswith("parity/test_") and (REPO_ROOT / path).is_file(), (name, target)
        if test:
            func = test.split("[")[0]
            assert f"def {func}(" in (REPO_ROOT / path).read_text(), (name, target)
        if "[" in test:
            from parity.cases import CASES
            assert test.split("[")[1].rstrip("]") in CASES, (name, target)


def test_a_first_look_that_does_not_run_is_not_a_kill(tmp_path, monkeypatch, capsys):
    # pytest not finding the FIRST_LOOK test (exit 4/5) or timing out is no verdict: the whole
    # gate runs, and here (a stubbed gate that passes) the mutation survives
    import parity.mutate as mutate
    calls = []

    def fake_run(root, targets, timeout):
        calls.append(targets)
        return (True, "exit 5", 0.1) if len(calls) == 1 else (False, "", 0.1)

    monkeypatch.setattr(mutate, "run_tests", fake_run)
    assert mutate.main(["--only", "lower_tie0", "--keep", str(tmp_path / "w")]) == 1
    out = capsys.readouterr().out
    assert calls[0] == [mutate.FIRST_LOOK["lower_tie0"]] and calls[1] == mutate.gate_targets()
    assert "did not run (exit 5)" in out and "lower_tie0: SURVIVED" in out and "killed 0 of 1" in out
