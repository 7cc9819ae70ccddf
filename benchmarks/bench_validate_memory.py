"""Peak memory of `alignkit data validate` on a large preference file: loading streams, so it stays bounded.

    /work/venv/bin/python benchmarks/bench_validate_memory.py                     # 1,000,000 rows (~660 MB)
    /work/venv/bin/python benchmarks/bench_validate_memory.py --rows 100000 200000 1000000

Writes TRL preference rows ``{prompt, chosen, rejected}`` of about 660 bytes each (the size of the
rows in the issue-13 report: 200,000 rows in 132 MB) to /tmp once per size, then runs
``alignkit data validate --stage rm FILE`` in a child process per size and reports that child's
peak RSS (``os.wait4``) and wall time. Bounded memory shows as the same peak for every size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

WORDS = "the a pizza soup was great bad okay service slow quick warm cold menu price staff table".split()


def write_rows(path: str, n: int, seed: int = 0) -> None:
    if os.path.exists(path):
        return
    rng = random.Random(seed)

    def text(n_words):
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    with open(path + ".part", "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"prompt": f"review {i}: " + text(35), "chosen": text(40) + " .", "rejected": text(40) + " !"}
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".part", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--dir", default="/tmp")
    args = p.parse_args()
    results = []
    for n in args.rows:
        path = os.path.join(args.dir, f"alignkit_pref_{n}.jsonl")
        write_rows(path, n)
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "data", "validate", "--stage", "rm", path],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss: KiB on Linux)
        out = proc.stdout.read().decode().strip()
        results.append({"rows": n, "file_mb": round(os.path.getsize(path) / 2 ** 20), "exit_code":
                        os.waitstatus_to_exitcode(status), "seconds": round(time.time() - start, 1),
                        "peak_rss_mb": round(usage.ru_maxrss / 1024), "output": out[:200]})
        print(json.dumps(results[-1]), flush=True)
    print("\n| rows | file MB | exit | seconds | peak RSS MB |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['file_mb']} | {r['exit_code']} | {r['seconds']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
