"""Samples by thread, and the event loop thread's (the lowest thread id) by library, of a perf profile.

    python3 dso.py perf.data
"""

import collections
import re
import subprocess
import sys


def main() -> None:
    script = subprocess.run(["perf", "script", "-i", sys.argv[1], "-F", "tid,ip,dso"],
                            capture_output=True, text=True).stdout
    threads: collections.Counter = collections.Counter()
    libraries: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    thread, first = None, False
    for line in script.split("\n"):
        if line and not line[0].isspace():
            thread, first = int(line.split()[0]), True
            continue
        if first and line.strip():
            found = re.search(r"\((.*)\)", line)
            library = found.group(1).split("/")[-1] if found else "?"
            threads[thread] += 1
            libraries[thread][library] += 1
            first = False
    total = sum(threads.values())
    main_thread = min(threads)
    print(f"samples {total}; by thread (tid: share of the gateway's samples)")
    for tid, count in threads.most_common():
        print(f"  {tid}: {100 * count / total:5.1f}%")
    print(f"event loop thread {main_thread}: by library (share of its own samples)")
    for library, count in libraries[main_thread].most_common(10):
        print(f"  {100 * count / threads[main_thread]:5.1f}%  {library}")


if __name__ == "__main__":
    main()
