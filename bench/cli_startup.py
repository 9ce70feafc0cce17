"""How long `df-agent --help` and an argument error take, and whether they import torch.

    python bench/cli_startup.py [--runs 10]

Each command runs `--runs` times in a fresh interpreter; prints the median and the fastest wall
time, the bare interpreter's start for comparison, the load average (other work on the machine
slows every figure) and the modules the help path imports that it should not (torch,
transformers). Goal (issue 18): under 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass (the interpreter alone)": [sys.executable, "-c", "pass"],
    "df-agent --help": [sys.executable, "-m", "df_agent.cli", "--help"],
    "df-agent ask --help": [sys.executable, "-m", "df_agent.cli", "ask", "--help"],
    "df-agent ask (argument error)": [sys.executable, "-m", "df_agent.cli", "ask", "only-an-image.png"],
}
PROBE = (
    "import sys, contextlib, io\n"
    "from df_agent.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
    "    for argv in (['--help'], ['ask', '--help'], ['ask', 'only-an-image.png']):\n"
    "        try:\n"
    "            main(argv)\n"
    "        except SystemExit:\n"
    "            pass\n"
    "print(' '.join(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules) or 'none')\n"
)


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    for name, command in CASES.items():
        times = [wall(command) for _ in range(args.runs)]
        print(f"{name:40s} median {statistics.median(times):.3f} s  fastest {min(times):.3f} s")
    heavy = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    print(f"heavy modules imported by --help and argument errors: {heavy.strip()}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
