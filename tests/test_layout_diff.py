"""vpd-layout-diff (contract/layout_diff.py): the checkpoint/weight-file diff of
SPEC S71. Non-square shapes everywhere, because a square matrix hides a transpose."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from contract.layout_diff import main

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 5)).astype(np.float32)  # non-square
V = RNG.standard_normal(7)


def st(path: Path, tensors: dict) -> str:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return str(path)


def run(capsys, *argv) -> tuple[int, dict[str, tuple[str, str]], str, str]:
    """-> (exit code, {name: (status, detail)}, summary line, stderr)."""
    code = main(list(argv))
    cap = capsys.readouterr()
    rows = {}
    summary = ""
    for line in cap.out.splitlines():
        for status in ("IDENTICAL", "TRANSPOSED", "VALUES DIFFER", "SHAPE DIFFERS", "MISSING"):
            if line.startswith(status + " "):
                name, _, detail = line[len(status):].strip().partition("  ")
                rows[name.strip()] = (status, detail.strip())
        if " tensors: " in line:
            summary = line
    return code, rows, summary, cap.err


@pytest.fixture
def a(tmp_path):
    return st(tmp_path / "a.safetensors", {"w": W, "v": V})


def test_identical_files_exit_0(capsys, tmp_path, a):
    # guards: equal files -> every row IDENTICAL, summary says so, exit 0
    b = st(tmp_path / "b.safetensors", {"w": W.copy(), "v": V.copy()})
    code, rows, summary, _ = run(capsys, a, b)
    assert code == 0
    assert rows == {"v": ("IDENTICAL", ""), "w": ("IDENTICAL", "")}
    assert "2 tensors" in summary and "all IDENTICAL" in summary


def test_transposed_copy(capsys, tmp_path, a):
    # guards: a [5,3] copy equal to A.T is TRANSPOSED (not SHAPE DIFFERS), exit 1
    b = st(tmp_path / "b.safetensors", {"w": W.T, "v": V})
    code, rows, summary, _ = run(capsys, a, b)
    assert code == 1
    assert rows["w"][0] == "TRANSPOSED" and "[3, 5]" in rows["w"][1] and "[5, 3]" in rows["w"][1]
    assert rows["v"][0] == "IDENTICAL"
    assert "1 TRANSPOSED" in summary and "DIFFERENT" in summary


def test_square_transposed(capsys, tmp_path):
    # guards: a square tensor whose values differ but whose transpose matches is TRANSPOSED
    sq = RNG.standard_normal((4, 4))
    code, rows, _, _ = run(capsys, st(tmp_path / "a.safetensors", {"sq": sq}),
                           st(tmp_path / "b.safetensors", {"sq": sq.T}))
    assert code == 1 and rows["sq"][0] == "TRANSPOSED"


def test_values_differ_reports_max_abs_and_rel(capsys, tmp_path, a):
    # guards: same shape, different values -> VALUES DIFFER with max abs and max rel diff
    w2 = W.copy()
    w2[1, 3] += np.float32(0.25)
    b = st(tmp_path / "b.safetensors", {"w": w2, "v": V})
    code, rows, _, _ = run(capsys, a, b)
    assert code == 1
    status, detail = rows["w"]
    assert status == "VALUES DIFFER"
    d = float(np.float32(w2[1, 3]) - W[1, 3])
    rel = abs(d) / max(abs(float(W[1, 3])), abs(float(w2[1, 3])))
    assert f"max abs diff {d:.6g}" in detail and "at [1, 3]" in detail and "1/15 differ" in detail
    assert f"max rel diff {rel:.6g}" in detail


def test_transposed_shape_but_other_values_is_shape_differs(capsys, tmp_path, a):
    # guards: [5,3] that is NOT A.T must not be called TRANSPOSED
    b = st(tmp_path / "b.safetensors", {"w": W.T + 1, "v": V})
    code, rows, _, _ = run(capsys, a, b)
    assert code == 1 and rows["w"][0] == "SHAPE DIFFERS"


def test_shape_differs_prints_both_shapes(capsys, tmp_path, a):
    # guards: SHAPE DIFFERS names both shapes
    b = st(tmp_path / "b.safetensors", {"w": np.zeros((3, 4), np.float32), "v": V})
    code, rows, _, _ = run(capsys, a, b)
    assert code == 1
    assert rows["w"][0] == "SHAPE DIFFERS" and "A [3, 5]" in rows["w"][1] and "B [3, 4]" in rows["w"][1]


def test_missing_on_each_side(capsys, tmp_path, a):
    # guards: a tensor on one side only is MISSING and the row says which side lacks it
    b = st(tmp_path / "b.safetensors", {"w": W, "extra": np.zeros((2, 3))})
    code, rows, summary, _ = run(capsys, a, b)
    assert code == 1
    assert rows["v"][0] == "MISSING" and "missing in B" in rows["v"][1]
    assert rows["extra"][0] == "MISSING" and "missing in A" in rows["extra"][1]
    assert rows["w"][0] == "IDENTICAL"
    assert "3 tensors" in summary and "2 MISSING" in summary


def test_dtype_difference(capsys, tmp_path):
    # guards: a dtype change is VALUES DIFFER unless the values are equal after casting,
    # in which case the row is IDENTICAL and says the dtypes differ
    x64 = RNG.standard_normal((3, 5))
    a = st(tmp_path / "a.safetensors", {"exact": W, "lossy": x64})
    b = st(tmp_path / "b.safetensors", {"exact": W.astype(np.float64), "lossy": x64.astype(np.float32)})
    code, rows, _, _ = run(capsys, a, b)
    assert code == 1
    assert rows["exact"][0] == "IDENTICAL" and "F32 vs F64" in rows["exact"][1] and "equal after casting" in rows["exact"][1]
    assert rows["lossy"][0] == "VALUES DIFFER" and "F64 vs F32" in rows["lossy"][1]


def test_atol_default_is_bitwise(capsys, tmp_path):
    # guards: default equality is bitwise (-0.0 vs 0.0 differs); --atol relaxes it
    a = st(tmp_path / "a.safetensors", {"z": np.array([0.0, 1.0, 2.0])})
    b = st(tmp_path / "b.safetensors", {"z": np.array([-0.0, 1.0, 2.0 + 1e-9])})
    code, rows, _, _ = run(capsys, a, b)
    assert code == 1 and rows["z"][0] == "VALUES DIFFER"
    code, rows, _, _ = run(capsys, a, b, "--atol", "1e-6")
    assert code == 0 and rows["z"][0] == "IDENTICAL" and "within atol" in rows["z"][1]
    code, rows, _, _ = run(capsys, a, b, "--atol", "1e-12")
    assert code == 1 and rows["z"][0] == "VALUES DIFFER"


def test_nan_at_same_place_is_identical(capsys, tmp_path):
    # guards: the same NaN bits on both sides do not make a tensor differ
    x = np.array([[np.nan, 1.0, 2.0], [3.0, 4.0, 5.0]])
    code, rows, _, _ = run(capsys, st(tmp_path / "a.safetensors", {"x": x}), st(tmp_path / "b.safetensors", {"x": x}))
    assert code == 0 and rows["x"][0] == "IDENTICAL"


def _write_bf16(path: Path, name: str, shape: tuple, bits: np.ndarray) -> str:
    """Hand-written safetensors with a BF16 tensor (numpy has no bfloat16)."""
    data = bits.astype("<u2").tobytes()
    header = json.dumps({name: {"dtype": "BF16", "shape": list(shape), "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return str(path)


def test_bf16_tensors(capsys, tmp_path):
    # guards: bf16 checkpoints are readable (decoded exactly), not a crash
    one, two = 0x3F80, 0x4000  # bf16 bit patterns of 1.0 and 2.0
    a = _write_bf16(tmp_path / "a.safetensors", "h", (2, 3), np.full(6, one))
    b = _write_bf16(tmp_path / "b.safetensors", "h", (2, 3), np.full(6, one))
    c = _write_bf16(tmp_path / "c.safetensors", "h", (2, 3), np.array([one] * 5 + [two]))
    t = _write_bf16(tmp_path / "t.safetensors", "h", (3, 2), np.full(6, one))
    assert run(capsys, a, b)[0] == 0
    code, rows, _, _ = run(capsys, a, c)
    assert code == 1 and rows["h"][0] == "VALUES DIFFER" and "max abs diff 1 " in rows["h"][1]
    assert run(capsys, a, t)[1]["h"][0] == "TRANSPOSED"


def test_directories_compare_union_by_name(capsys, tmp_path):
    # guards: checkpoint directories compare the union of their *.safetensors tensors by
    # name, however the tensors are split across files
    da, db = tmp_path / "ckA", tmp_path / "ckB"
    da.mkdir()
    db.mkdir()
    st(da / "model.safetensors", {"w": W, "v": V})
    st(db / "part-1.safetensors", {"w": W})
    st(db / "part-2.safetensors", {"v": V})
    code, rows, _, _ = run(capsys, str(da), str(db))
    assert code == 0 and set(rows) == {"w", "v"}
    st(db / "part-3.safetensors", {"u": W.T})
    code, rows, _, _ = run(capsys, str(da), str(db))
    assert code == 1 and rows["u"][0] == "MISSING" and "missing in A" in rows["u"][1]


def test_unreadable_inputs_exit_2_naming_the_file(capsys, tmp_path, a):
    # guards: a missing path, a non-safetensors file, an empty directory, or a name held by
    # two files of one directory -> exit 2 and a message naming the file
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    empty = tmp_path / "empty"
    empty.mkdir()
    dup = tmp_path / "dup"
    dup.mkdir()
    st(dup / "x.safetensors", {"w": W})
    st(dup / "y.safetensors", {"w": W})
    for bad, named in ((tmp_path / "nope.safetensors", "nope.safetensors"), (junk, "junk.safetensors"),
                       (empty, "empty"), (dup, "y.safetensors")):
        code, rows, _, err = run(capsys, a, str(bad))
        assert code == 2 and named in err and not rows, (bad, err)
        assert run(capsys, str(bad), a)[0] == 2


def test_bad_arguments_exit_2(capsys, a):
    # guards: usage errors exit 2
    assert main([a]) == 2
    assert main([a, a, "--atol", "-1"]) == 2
    assert main([a, a, "--atol", "x"]) == 2
    capsys.readouterr()


def test_cli_exit_codes_subprocess(tmp_path, a):
    # guards: the real process exit codes of `python -m contract.layout_diff` (0 / 1 / 2)
    # and of the `vpd-layout-diff` console script when installed
    same = st(tmp_path / "same.safetensors", {"w": W, "v": V})
    trans = st(tmp_path / "trans.safetensors", {"w": W.T, "v": V})
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    mod = [sys.executable, "-m", "contract.layout_diff"]
    r = [subprocess.run(mod + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
         for args in ([a, same], [a, trans], [a, str(tmp_path / "missing.safetensors")])]
    assert [x.returncode for x in r] == [0, 1, 2], [(x.returncode, x.stdout, x.stderr) for x in r]
    assert "TRANSPOSED" in r[1].stdout and "missing.safetensors" in r[2].stderr
    script = shutil.which("vpd-layout-diff", path=str(Path(sys.executable).parent))
    if script:  # the installed console script maps main()'s return value to the exit code
        x = subprocess.run([script, a, trans], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert x.returncode == 1 and "TRANSPOSED" in x.stdout, (x.stdout, x.stderr)
