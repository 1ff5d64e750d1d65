"""Top frames of a `py-spy record -f raw` profile, by own time, per thread kind.

    .venv/bin/python benchmarks/profiles/summarize.py PROFILE.txt [--top 20]

Each line of a raw profile is a stack (frames joined by ';', outermost first) and a
sample count. Stacks that start in the worker threads' `Thread._bootstrap` are
"worker"; the rest are the event loop ("main"). Own time is the innermost
Python frame (Cython and C code, such as grpc.aio's, count towards the Python
frame that called them).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def summarize(path: str, top: int) -> str:
    own: dict[str, Counter] = {"main": Counter(), "worker": Counter()}
    total: dict[str, Counter] = {"main": Counter(), "worker": Counter()}
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        frames = [re.sub(r" \(.*?([^/]+/[^/]+:\d+)\)$", r" (\1)", frame) for frame in stack.split(";")]
        kind = "worker" if frames[0].startswith("Thread._bootstrap") else "main"
        own[kind][frames[-1]] += int(count)
        for frame in set(frame.split(" (")[0] for frame in frames):
            total[kind][frame] += int(count)
    lines = []
    for kind in ("main", "worker"):
        samples = sum(own[kind].values())
        lines.append(f"{kind} thread(s): {samples} samples")
        lines.append("  own time:")
        lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in own[kind].most_common(top)]
        if kind == "main":
            lines.append("  inclusive (functions of serving/ and the libraries they call):")
            lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in total[kind].most_common(top + 12)[8:]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(summarize(args.profile, args.top))


if __name__ == "__main__":
    main()
