"""Run every benchmark, then bench/report.py (bench/RESULTS.md and plots).

    python -m bench.run_all [--quick] [--data npz:PATH]

--quick finishes in minutes (smoke-test sizes); without it, the full runs take many hours on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

from bench.common import DEFAULT_DATA, RESULTS


def run(script: str, *args: str, stdout: Path | None = None) -> None:
    start = time.time()
    command = [sys.executable, "-m", f"bench.{script.removesuffix('.py')}", *args]
    print("$", " ".join(command), flush=True)
    if stdout is None:
        subprocess.run(command, check=True, cwd=BENCH.parent)
    else:
        stdout.write_text(subprocess.run(command, check=True, capture_output=True, text=True, cwd=BENCH.parent).stdout)
    print(f"  {script}: {time.time() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    RESULTS.mkdir(exist_ok=True)
    start = time.time()
    run("cost_model.py", *quick, stdout=RESULTS / "cost_model.md")
    run("latency.py", *quick)
    for script in ("search_throughput.py", "quality.py", "fidelity.py", "latency_search.py"):
        run(script, *quick, "--data", args.data)
    if not args.quick:  # after quality.py: it retrains that run's uniform profile with two recipes
        run("retrain_noise.py", "--data", args.data)
    run("report.py")
    print(f"all benchmarks: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
