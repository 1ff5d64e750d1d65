"""The table of deep-wait.md from deep-wait.jsonl (measure.sh's output): per run and mean per side."""

import collections
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
FIELDS = ("throughput", "p50_ms", "p99_ms", "gateway_cpu_ms", "backend_cpu_ms", "outside_backend_cpu_ms")
print("| round | side | policy | req/s | p50 ms | p99 ms | CPU ms/req | in backend | outside | mean batch per stage |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
groups = collections.defaultdict(list)
for row in rows:
    stages = " / ".join(str(v[1]) for v in row["stage_samples_mean_batch_cpu_ms_per_sample"].values())
    print(f"| {row['round']} | {row['side']} | {row['policy']} | " + " | ".join(str(row[f]) for f in FIELDS)
          + f" | {stages} |")
    groups[(row["policy"], row["side"])].append(row)
for (policy, side), group in sorted(groups.items()):
    means = [round(sum(r[f] for r in group) / len(group), 3) for f in FIELDS]
    print(f"| **mean** | {side} | {policy} | " + " | ".join(str(m) for m in means) + " | |")
