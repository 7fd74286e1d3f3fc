"""The core reads no clock: the import contract (pyproject, lint-imports) bans time/os/random/I/O modules;
datetime is allowed only to format the times that arrive on messages, which this test holds it to."""
from __future__ import annotations

import re
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "libs" / "common" / "noetl_common"
CLOCK = re.compile(r"\b(datetime|date)\.(now|utcnow|today)\s*\(|\btime\.(time|monotonic|perf_counter)\s*\(")


def test_the_core_never_reads_the_clock():
    offenders = [f"{path.relative_to(CORE)}:{n}: {line.strip()}"
                 for path in CORE.rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if CLOCK.search(line)]
    assert offenders == []


def test_the_pattern_catches_a_clock_read():
    assert CLOCK.search("stamp = datetime.now(timezone.utc)") and CLOCK.search("t = time.time()")
