"""Benchmark `vgen preprocess`: images/s and peak memory at 10k and 40k emoji scenes, 64 -> 32 px.

Every configuration runs as a fresh `vgen preprocess` process in the same session, side by side, and
the table ends with the ratios that matter: 2 workers vs 1 (speed-up) and 40k vs 10k (memory growth).
Peak memory is the largest sum of RSS over the process tree (main + workers), sampled every 10 ms.

    python bench/preprocess.py                 # 10k and 40k, 1 and 2 workers
    python bench/preprocess.py --sizes 2000    # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def tree_rss_bytes(root_pid: int) -> int:
    """Sum of VmRSS of `root_pid` and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RSS of its process tree in bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=Path(".bench/preprocess"))
    args = parser.parse_args()
    vgen = [sys.executable, "-m", "vgen"]
    args.work_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for size in args.sizes:
        raw = args.work_dir / f"raw-{size}"
        if not raw.exists():
            wall, _ = run_measured([*vgen, "data", "emoji-scenes", str(raw), "--count", str(size)])
            print(f"emoji-scenes {size}: {wall:.1f} s ({size / wall:,.0f} scenes/s)", flush=True)
        for workers in args.workers:
            out = args.work_dir / f"ds-{size}-{workers}"
            cmd = [*vgen, "preprocess", str(raw), "-o", str(out), "--resolution", str(args.resolution),
                   "--workers", str(workers), "--overwrite"]
            wall, peak = run_measured(cmd)
            rows.append((size, workers, wall, size / wall, peak / 2**20))
            print(f"preprocess {size:>6} images, {workers} worker(s): {wall:6.1f} s  {size / wall:7,.0f} img/s  "
                  f"peak RSS {peak / 2**20:6.0f} MiB", flush=True)
            shutil.rmtree(out)

    print("\n| images | workers | wall s | images/s | peak RSS MiB (tree) |")
    print("|---:|---:|---:|---:|---:|")
    for size, workers, wall, rate, peak in rows:
        print(f"| {size} | {workers} | {wall:.1f} | {rate:,.0f} | {peak:.0f} |")
    by = {(s, w): (rate, peak) for s, w, _, rate, peak in rows}
    print()
    for size in args.sizes:
        if (size, 1) in by and (size, 2) in by:
            print(f"speed-up 2 workers / 1 worker at {size}: {by[size, 2][0] / by[size, 1][0]:.2f}x")
    lo, hi = min(args.sizes), max(args.sizes)
    if lo != hi:
        for workers in args.workers:
            print(f"peak RSS {hi} / {lo} images, {workers} worker(s): {by[hi, workers][1] / by[lo, workers][1]:.2f}x")


if __name__ == "__main__":
    main()
