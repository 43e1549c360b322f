"""Speed of the SDE toolkit's NumPy work with glibc's default malloc against
``pgpo.malloc.keep_freed_memory`` (what ``pgpo-sde`` and ``pgpo-check`` set at start-up), on the
quick report's costliest claim, C8 in the ballistic scaling (16 SDE references of 4,000 paths).

Each side runs in a fresh process, one after the other, ``--repeats`` times alternating; the
median times and their ratio are printed, and the claim's numbers must be identical on both
sides (the setting changes where memory comes from, not what is computed).

    python benchmarks/bench_report.py            # about 1.5 minutes

Target: keep_freed_memory / glibc defaults <= 0.7. Measured (quiet 2-core machine, one repeat):
10.8 s against 24.0 s, 0.45.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = """
import json, sys, tempfile, time
from pathlib import Path
from pgpo.malloc import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
from pgpo.multiplier import MultiplierConfig
from proofs_checks.claims import Effort, claim_c8_adamw
start = time.perf_counter()
check = claim_c8_adamw(MultiplierConfig(1.0, 2.0), Effort.of(True), Path(tempfile.mkdtemp()),
                       "ballistic")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "summary": check.summary}))
"""


def run(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WORKER, mode], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"defaults": [], "kept": []}
    summaries = set()
    for _ in range(args.repeats):
        for mode in times:
            result = run(mode)
            times[mode].append(result["seconds"])
            summaries.add(result["summary"])
    base, kept = statistics.median(times["defaults"]), statistics.median(times["kept"])
    print(f"C8 ballistic, quick effort, one core: glibc defaults {base:.1f} s, "
          f"keep_freed_memory {kept:.1f} s")  # fmt: skip
    print(f"ratio keep_freed_memory / defaults: {kept / base:.2f} (target <= 0.7)")
    print(f"identical numbers on both sides: {len(summaries) == 1}")
    return 0 if len(summaries) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
