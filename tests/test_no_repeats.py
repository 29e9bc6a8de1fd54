"""No block of six or more identical lines is written twice inside the package.

Lines are compared stripped, with blank lines, comments, lone punctuation, imports and
function signatures left out (a protocol states the signatures its implementations repeat);
a window of six such lines appearing at two places is a helper waiting to be written.
Lines of the same *shape* with other names are not caught here; the project's review tool
lists those.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flowconvert"
WINDOW = 6
_SKIP = re.compile(r"^(#.*|[\)\]\}\(\[\{,:]*|from \S+ import .*|import .*|\"\"\"|r\"\"\")$")


def _lines(path: Path) -> list[tuple[int, str]]:
    out, in_signature = [], False
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = " ".join(raw.split())
        if line.startswith(("def ", "async def ")):
            in_signature = True
        if in_signature:
            in_signature = not line.endswith((":", ": ..."))
            continue
        if line and not _SKIP.match(line):
            out.append((number, line))
    return out


def repeated_blocks(root: Path = PACKAGE, window: int = WINDOW) -> list[tuple[str, str]]:
    """Pairs of ``file:line`` where the same ``window`` significant lines stand."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        lines = _lines(path)
        for i in range(len(lines) - window + 1):
            key = tuple(text for _, text in lines[i : i + window])
            seen[key].append(f"{path.name}:{lines[i][0]}")
    pairs = [(places[0], places[1]) for places in seen.values() if len(places) > 1]
    # one pair per repeated run: drop windows that continue the previous one
    return [p for i, p in enumerate(pairs) if i == 0 or not _continues(pairs[i - 1], p)]


def _continues(before: tuple[str, str], pair: tuple[str, str]) -> bool:
    return all(
        a.split(":")[0] == b.split(":")[0] and int(b.split(":")[1]) > int(a.split(":")[1]) for a, b in zip(before, pair)
    )


def test_the_checker_finds_a_repeated_block(tmp_path):
    block = "\n".join(f"x{i} = f({i})" for i in range(WINDOW))
    (tmp_path / "a.py").write_text(f"def a():\n{block}\n")
    (tmp_path / "b.py").write_text(f"def b():\n    pass\n{block}\n")
    assert repeated_blocks(tmp_path)


def test_no_block_is_written_twice():
    assert repeated_blocks() == []
