"""CLI start-up benchmark (issue 11): wall time of cheap ``logitcache`` commands, each in a fresh process.

``--help``, ``--version`` and argument errors should answer at once; they used to import torch/transformers
(~1.5-3 s on the shared 2-core VM) because the click group builds its options from the stage config dataclasses,
which lived in the heavy stage modules. Now the configs live in light ``*_config`` modules and the heavy imports
happen inside the command bodies. For comparison the table also times ``import torch`` and
``import logitcache.distill.train`` (what the old start-up paid on top of Python and click), and a bare
``python -c pass``.

Each row is the median (and min) of ``--repeats`` runs of ``python -c ...`` in a subprocess (interpreter start
included), interleaved so that a burst of load on the machine hits every row alike.

    python bench/cli_startup.py               # 7 runs per row
    python bench/cli_startup.py --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

ROWS: list[tuple[str, str]] = [
    ("python -c pass", "pass"),
    ("logitcache --version", "from logitcache.cli import main; main(['--version'])"),
    ("logitcache --help", "from logitcache.cli import main; main(['--help'])"),
    ("logitcache train --help", "from logitcache.cli import main; main(['train', '--help'])"),
    ("logitcache generate --help", "from logitcache.cli import main; main(['generate', '--help'])"),
    ("train --max-steps abc (usage error)", "from logitcache.cli import main; main(['train', '--max-steps', 'abc'])"),
    ("train without --student (config error)", "from logitcache.cli import main; main(['train', '--cache', 'c'])"),
    ("import torch (reference)", "import torch"),
    ("import logitcache.distill.train (old start-up)", "import logitcache.distill.train"),
]


def time_once(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    for _name, code in ROWS:  # warm the OS page cache once per row
        time_once(code)
    for _ in range(args.repeats):
        for name, code in ROWS:
            times[name].append(time_once(code))
    width = max(len(name) for name, _ in ROWS)
    print(f"{'command':<{width}}  {'median s':>9}  {'min s':>7}")
    for name, _ in ROWS:
        print(f"{name:<{width}}  {statistics.median(times[name]):>9.3f}  {min(times[name]):>7.3f}")


if __name__ == "__main__":
    main()
