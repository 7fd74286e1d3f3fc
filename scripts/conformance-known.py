#!/usr/bin/env python3
"""Run a conformance corpus and hold it to a committed list of the cases that still fail.

    python scripts/conformance-known.py --known docs/dialect-v10-failing.txt -- \
        --cmd "noetl run" --cases ../shared/conformance/cases-v10 --pg-dsn "$NOETL_TEST_PG_DSN"

Everything after `--` goes to ../shared/conformance/run.py. The known list has one case per line, `name  reason`
(lines starting with `#` are comments). Exit 1 when a case outside the list fails, or when a listed case now
passes (the list must shrink with the fix, so it cannot rot); 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "run.py"


def known_failures(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        out[name] = reason.strip()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--known", required=True, type=Path)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    known = known_failures(args.known)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, str(RUNNER), *rest, "--report", str(report)], check=False)
        if not report.exists():
            print("conformance-known: the runner wrote no report")
            return 1
        cases = json.loads(report.read_text())
    failed = {c["case"] for c in cases if not c["ok"]}
    ran = {c["case"] for c in cases}
    unexpected = sorted(failed - set(known))
    fixed = sorted(name for name in known if name in ran and name not in failed)
    for name in unexpected:
        print(f"conformance-known: {name} failed and is not in {args.known}")
    for name in fixed:
        print(f"conformance-known: {name} passes now: remove it from {args.known}")
    print(f"conformance-known: {len(ran) - len(failed)} passed, {len(failed)} failed "
          f"({len(failed & set(known))} of them known)")
    return 1 if unexpected or fixed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
