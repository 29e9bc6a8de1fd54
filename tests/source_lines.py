"""Find a test file's own lines by a trailing ``# marker`` comment (for checking reported locations)."""


def line_of(path: str, marker: str) -> int:
    """Line number, in ``path``, of the one line ending in ``# marker``."""
    with open(path) as f:
        hits = [i for i, line in enumerate(f, 1) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]
