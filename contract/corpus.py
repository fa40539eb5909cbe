"""The project's own byte-level text corpus (framework-free: numpy only).

A deterministic generator of ASCII lines drawn from a small grammar with structure a tiny
language model can learn:

- sentences with number agreement ("the cat sees ..." / "two cats see ..."), a/an before
  vowels, optional prepositional phrases and a "because it is / they are" clause whose
  pronoun agrees with the subject far back in the line;
- counting ("count by 5: 35 40 45 50."), weekday and letter runs;
- arithmetic ("12+7=19.", "9-4=5.", "3*4=12.");
- balanced nested brackets ("brackets: ([{}]<>).");
- copy and reverse of random letter strings ("copy kqzt -> kqzt.", "rev abc -> cba.").

`corpus_tokens(split)` returns the bytes as int64 (0..255). The two splits are independent
generations from different sub-seeds of one fixed internal seed (not slices of one text).
Results are cached; the cached array is read-only.
"""
from __future__ import annotations

from functools import cache

import numpy as np

CORPUS_SEED = 0x0C0_4B05  # fixed internal seed; bump CORPUS_VERSION when the grammar changes
CORPUS_VERSION = 1
SPLITS = {"train": (0, 1_500_000), "heldout": (1, 100_000)}  # split -> (sub-seed, bytes)

_NOUNS = [  # (singular, plural)
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("girl", "girls"),
    ("boy", "boys"), ("king", "kings"), ("queen", "queens"), ("robot", "robots"),
    ("farmer", "farmers"), ("teacher", "teachers"), ("child", "children"), ("owl", "owls"),
    ("eagle", "eagles"),
]
_THINGS = [
    ("ball", "balls"), ("apple", "apples"), ("box", "boxes"), ("book", "books"), ("hat", "hats"),
    ("stone", "stones"), ("tree", "trees"), ("cup", "cups"), ("egg", "eggs"), ("key", "keys"),
]
_VERBS = [  # (3rd person singular, plural)
    ("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find"),
    ("watches", "watch"), ("helps", "help"), ("carries", "carry"), ("follows", "follow"),
]
_ADJS = ["big", "small", "red", "green", "old", "young", "happy", "quiet", "angry", "empty"]
_FEEL = ["happy", "tired", "hungry", "busy", "lost", "brave"]
_PLACES = ["in the park", "near the river", "on the hill", "under the bridge", "at night",
           "in the house", "by the sea"]
_SING_DET = ["the", "a", "one", "this", "every"]
_PLUR_DET = ["the", "two", "three", "four", "five", "some", "many", "these"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_OPEN, _CLOSE = "([{<", ")]}>"

# line kind -> cumulative weight
_KINDS = [("sentence", 0.36), ("count", 0.50), ("arith", 0.68), ("brackets", 0.78),
          ("copy", 0.88), ("seq", 1.00)]


class _Uniforms:
    """Fast pull of U[0,1) floats from a numpy Generator in blocks."""

    def __init__(self, seed_seq: np.random.SeedSequence, block: int = 1 << 16):
        self._g = np.random.Generator(np.random.PCG64(seed_seq))
        self._block = block
        self._buf: list[float] = []
        self._i = 0

    def u(self) -> float:
        if self._i >= len(self._buf):
            self._buf = self._g.random(self._block).tolist()
            self._i = 0
        v = self._buf[self._i]
        self._i += 1
        return v

    def int(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (inclusive)."""
        return lo + int(self.u() * (hi - lo + 1))

    def pick(self, seq):
        return seq[int(self.u() * len(seq))]


def _noun_phrase(r: _Uniforms, table, plural: bool) -> str:
    det = r.pick(_PLUR_DET if plural else _SING_DET)
    noun = r.pick(table)[1 if plural else 0]
    words = [noun]
    if r.u() < 0.5:
        words.insert(0, r.pick(_ADJS))
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return det + " " + " ".join(words)


def _sentence(r: _Uniforms) -> str:
    plural = r.u() < 0.5
    subj = _noun_phrase(r, _NOUNS, plural)
    verb = r.pick(_VERBS)[1 if plural else 0]
    obj = _noun_phrase(r, _THINGS if r.u() < 0.6 else _NOUNS, r.u() < 0.5)
    s = f"{subj} {verb} {obj}"
    if r.u() < 0.4:
        s += " " + r.pick(_PLACES)
    if r.u() < 0.3:
        s += (" because they are " if plural else " because it is ") + r.pick(_FEEL)
    return s[0].upper() + s[1:] + "."


def _count(r: _Uniforms) -> str:
    step = r.pick([1, 1, 1, 2, 5, 10])
    start = r.int(0, 300) * step
    n = r.int(3, 8)
    nums = " ".join(str(start + k * step) for k in range(n))
    return (f"count: {nums}." if step == 1 else f"count by {step}: {nums}.")


def _arith(r: _Uniforms) -> str:
    op = r.pick("++-*")
    if op == "*":
        a, b = r.int(0, 12), r.int(0, 9)
        return f"{a}*{b}={a * b}."
    a, b = r.int(0, 99), r.int(0, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}={a - b}."
    return f"{a}+{b}={a + b}."


def _brackets(r: _Uniforms) -> str:
    n_pairs = r.int(2, 10)
    out, stack, opened = [], [], 0
    while opened < n_pairs or stack:
        if opened < n_pairs and (not stack or (len(stack) < 6 and r.u() < 0.55)):
            k = r.int(0, 3)
            out.append(_OPEN[k])
            stack.append(k)
            opened += 1
        else:
            out.append(_CLOSE[stack.pop()])
    return "brackets: " + "".join(out) + "."


def _copy(r: _Uniforms) -> str:
    s = "".join(r.pick(_LETTERS) for _ in range(r.int(3, 7)))
    if r.u() < 0.6:
        return f"copy {s} -> {s}."
    return f"rev {s} -> {s[::-1]}."


def _seq(r: _Uniforms) -> str:
    if r.u() < 0.5:
        i0, n = r.int(0, 6), r.int(2, 5)
        return "days: " + " ".join(_DAYS[(i0 + k) % 7] for k in range(n)) + "."
    n = r.int(3, 8)
    i0 = r.int(0, 26 - n)
    return "letters: " + " ".join(_LETTERS[i0 + k] for k in range(n)) + "."


_MAKERS = {"sentence": _sentence, "count": _count, "arith": _arith, "brackets": _brackets,
           "copy": _copy, "seq": _seq}


def _kind_of(u: float) -> str:
    """The line kind whose bin of the cumulative probabilities `_KINDS` holds u in [0, 1)."""
    for name, cum in _KINDS:
        if u < cum:
            return name
    raise ValueError(f"corpus: uniform {u!r} lies past the last bin of _KINDS (cumulative {_KINDS[-1][1]})")


def generate_text(sub_seed: int, n_bytes: int) -> str:
    """Whole lines until at least `n_bytes` characters, then cut to exactly `n_bytes`."""
    r = _Uniforms(np.random.SeedSequence([CORPUS_SEED, CORPUS_VERSION, sub_seed]))
    lines, total = [], 0
    while total < n_bytes:
        line = _MAKERS[_kind_of(r.u())](r) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines)[:n_bytes]


@cache
def corpus_tokens(split: str) -> np.ndarray:
    """Byte values (int64, 0..255) of the corpus split 'train' (~1.5 MB) or 'heldout' (~100 KB)."""
    if split not in SPLITS:
        raise ValueError(f"corpus split must be one of {sorted(SPLITS)}, got {split!r}")
    sub_seed, n_bytes = SPLITS[split]
    raw = generate_text(sub_seed, n_bytes).encode("ascii")
    arr = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    arr.flags.writeable = False
    return arr
