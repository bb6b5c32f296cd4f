"""Start-up time of the commands: ``train.py --help`` and a run on a missing data file.

    python3 scripts/benchmark_startup.py [--root CHECKOUT ...] [--repeats 5]

Each command runs ``--repeats`` times in a fresh interpreter; the median wall time and the
median CPU time (user + system, of the child process) are printed per checkout. Several
``--root`` checkouts (e.g. an older commit unpacked with ``git archive``) are timed in turns,
so that a busy machine slows them alike; CPU time is the steadier number there.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "train.py --help": ["train.py", "--help"],
    "train.py (missing data file)": [
        "train.py", "model=one_cmt_oral", "data=csv", "data.path=/nonexistent/missing.csv",
    ],
}


def timed(root: Path, args: list[str], run_dir: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit status) of ``python3 ROOT/args...`` run in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args, f"hydra.run.dir={run_dir}"] if args[-1] != "--help"
        else [sys.executable, *args],
        cwd=root, env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", action="append", type=Path, help="checkout(s) to time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    roots = args.root or [ROOT]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for _ in range(args.repeats):
            for name, command in COMMANDS.items():
                for root in roots:  # alternate: the machine's load hits every checkout alike
                    wall, cpu, status = timed(root, command, run_dir)
                    times.setdefault((name, str(root)), []).append((wall, cpu))
                    times.setdefault((name, str(root) + " status"), []).append((status, 0))
    print(f"{'command':32} {'checkout':40} {'wall s':>8} {'cpu s':>8} status")
    for name in COMMANDS:
        for root in roots:
            runs = times[(name, str(root))]
            status = {int(s) for s, _ in times[(name, str(root) + " status")]}
            print(
                f"{name:32} {str(root):40} {statistics.median(w for w, _ in runs):8.2f} "
                f"{statistics.median(c for _, c in runs):8.2f} {sorted(status)}"
            )


if __name__ == "__main__":
    main()
