"""The event loop thread's kernel samples by system call, from `perf script --tid TID` output.

    perf script -i perf.data --tid TID > main.script; python3 aggr.py main.script [TOP]
"""

import collections
import sys


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    counts: collections.Counter = collections.Counter()
    samples = kernel = 0
    for block in open(path).read().split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
        if len(lines) < 2:
            continue
        samples += 1
        frames = [line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else line for line in lines[1:]]
        if "[kernel.kallsyms]" not in frames[0]:
            continue
        kernel += 1
        calls = [frame for frame in frames if "__x64_sys_" in frame or "__do_sys" in frame]
        key = calls[0].split()[0] if calls else "irq/other: " + frames[0].split()[0]
        user = [frame for frame in frames if "kallsyms" not in frame]
        where = f"{user[0].split()[0]} {user[0].split()[-1]}" if user else ""
        counts[(key, where[:80])] += 1
    for key, count in counts.most_common(top):
        print(f"{100 * count / samples:5.1f}% {key}")
    print("samples", samples, "kernel", kernel, f"{100 * kernel / samples:.1f}%")


if __name__ == "__main__":
    main()
