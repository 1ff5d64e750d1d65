import sys, re, collections, subprocess
data, = sys.argv[1:]
out = subprocess.run(["perf", "script", "-i", data, "-F", "tid,ip,dso"], capture_output=True, text=True).stdout
threads = collections.Counter(); dsos = collections.defaultdict(collections.Counter)
tid = None; first = False
for line in out.split("\n"):
    if line and not line[0].isspace():
        tid = int(line.split()[0]); first = True; continue
    if first and line.strip():
        m = re.search(r"\((.*)\)", line); d = m.group(1).split("/")[-1] if m else "?"
        threads[tid] += 1; dsos[tid][d] += 1; first = False
total = sum(threads.values())
main = min(threads)
print(f"samples {total}; by thread (tid: share of the gateway's samples)")
for t, n in threads.most_common(): print(f"  {t}: {100*n/total:5.1f}%")
print(f"event loop thread {main}: by library (share of its own samples)")
for d, n in dsos[main].most_common(10): print(f"  {100*n/threads[main]:5.1f}%  {d}")
