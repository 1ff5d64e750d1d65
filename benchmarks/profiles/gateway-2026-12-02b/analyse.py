"""Before/after table of measure.sh output (JSON lines; a `window` field, or one file per window).

    python3 analyse.py before-after.jsonl [MANIFEST]
"""

import json
import statistics
import sys

DEPTHS = ["15", "25", "35", "45", "56"]


def macs_fraction(stages: dict, cumulative: list[int], full_macs: int) -> float:
    """Mean MACs per image over the full network's, from the samples each stage saw."""
    seen = [stages.get(depth, [0])[0] for depth in DEPTHS]
    left = [seen[k] - (seen[k + 1] if k + 1 < len(seen) else 0) for k in range(len(seen))]
    return sum(n * macs for n, macs in zip(left, cumulative)) / seen[0] / full_macs


def main() -> None:
    paths = [arg for arg in sys.argv[1:] if arg.endswith(".jsonl")]
    manifest_path = next((arg for arg in sys.argv[1:] if arg.endswith(".json")),
                         "/work/main/model_repository/manifest.json")
    manifest = json.load(open(manifest_path))
    cumulative = [entry["macs"] for entry in manifest["exits"]]
    full_macs = manifest["exits"][-1]["standalone_macs"]
    rows = []
    for index, path in enumerate(paths):
        for line in open(path):
            if line.startswith("{"):
                row = json.loads(line)
                row.setdefault("window", index + 1)
                rows.append(row)
    print("| window.round | side | full: CPU/req | in backend | **outside** | req/s | early: CPU/req | in backend "
          "| outside | req/s | MACs | staging |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    values: dict[tuple[str, str], list[float]] = {}
    for window in sorted({row["window"] for row in rows}):
        for round_ in sorted({row["round"] for row in rows if row["window"] == window}):
            for side in ("before", "after"):
                def run(policy: str, side: str = side, round_: int = round_, window: int = window) -> dict:
                    return next(row for row in rows if row["window"] == window and row["round"] == round_
                                and row["side"] == side and row["policy"] == policy)
                full, early = run("full"), run("early")
                fraction = macs_fraction(early["stage_samples_mean_batch_cpu_ms_per_sample"], cumulative, full_macs)
                staging = early["gateway_cpu_ms"] - full["outside_backend_cpu_ms"] - fraction * full["backend_cpu_ms"]
                found = {"full_cpu": full["gateway_cpu_ms"], "full_backend": full["backend_cpu_ms"],
                         "full_outside": full["outside_backend_cpu_ms"], "full_rps": full["throughput"],
                         "early_cpu": early["gateway_cpu_ms"], "early_backend": early["backend_cpu_ms"],
                         "early_outside": early["outside_backend_cpu_ms"], "early_rps": early["throughput"],
                         "macs": fraction, "staging": staging}
                for key, value in found.items():
                    values.setdefault((side, key), []).append(value)
                print(f"| {window}.{round_} | {side} | " + " | ".join(
                    f"{value:.0f}" if key.endswith("rps") else f"{value:.3f}" for key, value in found.items()) + " |")
    for side in ("before", "after"):
        means = {key: statistics.mean(found) for (which, key), found in values.items() if which == side}
        print(f"| **mean** | {side} | " + " | ".join(
            f"{value:.0f}" if key.endswith("rps") else f"{value:.3f}" for key, value in means.items()) + " |")


if __name__ == "__main__":
    main()
