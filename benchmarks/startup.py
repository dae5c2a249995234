"""Start-up cost of vlpatch, measured side by side (issue: `VLPATCH=1` runs apply() in every process).

Three commands, each a fresh interpreter of this environment, run in shuffled order in every round:
  bare      python -c pass
  apply     python -c "import vlpatch; vlpatch.apply()"
  VLPATCH=1 python -c pass            (the .pth path: what pip, pytest and every script pay)
Bytecode is compiled first and PYTHONDONTWRITEBYTECODE is dropped, as for an installed wheel. Prints
the median of each, the median of the paired differences against bare, and the modules apply() adds.

    python benchmarks/startup.py [--rounds 40] [--against DIR]
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import vlpatch

CWD = tempfile.gettempdir()  # not a checkout: `python -c` puts the working directory first on sys.path
COMMANDS = {
    "bare": ([sys.executable, "-c", "pass"], {}),
    "apply": ([sys.executable, "-c", "import vlpatch; vlpatch.apply()"], {}),
    "VLPATCH=1": ([sys.executable, "-c", "pass"], {"VLPATCH": "1"}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--against", metavar="DIR", help="also time apply() of another vlpatch checkout (e.g. a git worktree of an older commit)")
    args = parser.parse_args()
    compileall.compile_dir(os.path.dirname(vlpatch.__file__), quiet=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH") and k != "PYTHONDONTWRITEBYTECODE"}
    if args.against:
        compileall.compile_dir(os.path.join(args.against, "vlpatch"), quiet=1)
        probe = [sys.executable, "-c", "import vlpatch; print(vlpatch.__file__)"]
        where = subprocess.run(probe, env={**env, "PYTHONPATH": args.against}, capture_output=True, text=True, check=True, cwd=CWD).stdout.strip()
        assert where.startswith(os.path.abspath(args.against)), f"PYTHONPATH={args.against} imports {where}"
        COMMANDS["apply (against)"] = (COMMANDS["apply"][0], {"PYTHONPATH": args.against})
    times: dict = {name: [] for name in COMMANDS}
    for _ in range(3):  # warm the file cache
        for cmd, extra in COMMANDS.values():
            subprocess.run(cmd, env={**env, **extra}, check=True, cwd=CWD)
    for _ in range(args.rounds):
        names = list(COMMANDS)
        random.shuffle(names)
        for name in names:
            cmd, extra = COMMANDS[name]
            t = time.perf_counter()
            subprocess.run(cmd, env={**env, **extra}, check=True, cwd=CWD)
            times[name].append(1000 * (time.perf_counter() - t))
    bare = times["bare"]
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds, shuffled; milliseconds")
    print(f"{'command':12} {'median':>8} {'added (median of paired differences)':>38}")
    for name, values in times.items():
        added = statistics.median(v - b for v, b in zip(values, bare)) if name != "bare" else 0.0
        print(f"{name:12} {statistics.median(values):8.1f} {added:38.1f}")
    probe = "import sys; b = set(sys.modules); import vlpatch; vlpatch.apply(); print(' '.join(sorted(set(sys.modules) - b)))"
    added = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, cwd=CWD).stdout.split()
    print(f"modules import vlpatch + apply() adds ({len(added)}): {' '.join(added)}")


if __name__ == "__main__":
    main()
