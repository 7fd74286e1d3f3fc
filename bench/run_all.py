"""Run every benchmark and print its numbers. `--quick` uses fewer repetitions (CI)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    repeat = ["--repeat", "2"] if "--quick" in sys.argv else []
    status = 0
    for script in ("fold_bench.py", "embedded_bench.py"):
        print(f"== {script}", flush=True)
        status |= subprocess.call([sys.executable, str(HERE / script), *repeat], cwd=HERE)
    return status


if __name__ == "__main__":
    sys.exit(main())
