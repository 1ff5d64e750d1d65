"""Plots and REPORT.md from a benchmark results directory (regenerable on its own).

    python -m benchmarks.report benchmarks/results/<run>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# What we aim for (issues 6 and 19): (summary key, comparison, target, description); {c} is the
# headline concurrency of the run. A callable target is computed from the summary.
AIMS = [
    ("acc_drop_pt", "<=", 0.5, "accuracy drop against the final exit (points)"),
    ("mean_macs_fraction", "<=", 0.45, "mean MACs / full network (moonshot 0.40)"),
    ("final_exit_test_acc", ">=", 0.904, "final exit's test accuracy"),
    ("saving_over_oracle", ">=", 0.8, "MACs saved / MACs an oracle saves"),
    ("throughput_ratio_c{c}", ">=", 1.6, "throughput, early exit / full network (embedded, c={c}; moonshot 2.0)"),
    ("p99_ratio_c{c}", "<=", 1.0, "p99 latency, early exit / full network (embedded, c={c})"),
    ("batched_throughput_ratio_c{c}", ">=", lambda summary: 0.85 / summary["mean_macs_fraction"],
     "throughput, early exit / full network, 8 images a request (embedded, c={c}; aim 0.85 / mean MACs)"),
    ("gateway_overhead_cpu_ms", "<=", 0.40, "gateway CPU ms per request outside backend calls (full network, c={c})"),
    ("staging_overhead_cpu_ms", "<=", 0.10,
     "early exit's gateway CPU ms per request beyond overhead + mean MACs x the full network's backend CPU"),
    ("triton_throughput_ratio", ">=", 1.6, "throughput, early exit via Triton ({source}) / full network on Triton"),
    ("gateway_overhead_ratio", ">=", 0.85, "throughput, full network through gateway on Triton / Triton direct"),
    ("gateway_forward_cpu_ms", "<=", 0.50, "gateway CPU ms per request forwarded to the cascade model (c={c})"),
    ("gateway_added_p50_ms", "<=", 1.0, "p50 through gateway (triton-cascade) minus p50 direct, c=1 (ms)"),
    ("cascade_gateway_overhead_ratio", ">=", 0.85, "throughput, cascade through gateway / cascade direct (c={c})"),
    ("budget_attainment", ">=", 0.99, "share of budget requests answered within budget"),
]

ROLES = ("gateway", "gateway_backend", "gateway_outside_backend", "tritonserver", "triton_stubs", "loadgen")


def _load(directory: Path):
    summary = json.loads((directory / "summary.json").read_text())
    sweep = json.loads((directory / "sweep.json").read_text())
    scenarios = {path.stem.removeprefix("scenario_"): json.loads(path.read_text())
                 for path in sorted(directory.glob("scenario_*.json"))}
    return summary, sweep, scenarios


def plot_accuracy_vs_macs(sweep: list[dict], path: Path, baseline: tuple[str, list[dict]] | None = None) -> None:
    """Accuracy against mean MACs on the test split; `baseline`: (label, sweep) of an earlier run, in grey."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if baseline is not None:
        label, rows = baseline
        for kind, style in (("accuracy_drop", "o-"), ("compute_budget", "s--")):
            curve = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["macs_fraction"])
            ax.plot([r["macs_fraction"] * 100 for r in curve], [r["test_acc"] * 100 for r in curve], style,
                    color="0.7", label=f"{label}, {kind.replace('_', ' ')}", zorder=1)
    for kind, style, label in (("accuracy_drop", "o-", "early exit, accuracy-drop targets"),
                               ("compute_budget", "s--", "early exit, compute budgets")):
        rows = sorted((r for r in sweep if r["kind"] == kind), key=lambda r: r["macs_fraction"])
        ax.plot([r["macs_fraction"] * 100 for r in rows], [r["test_acc"] * 100 for r in rows], style, label=label)
    fixed = [r for r in sweep if r["kind"] == "fixed_exit"]
    ax.plot([r["macs_fraction"] * 100 for r in fixed], [r["test_acc"] * 100 for r in fixed], "k^", label="fixed exits")
    for r in fixed:
        ax.annotate(str(r["target"]), (r["macs_fraction"] * 100, r["test_acc"] * 100), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    oracle = next(r for r in sweep if r["kind"] == "oracle")
    ax.plot([oracle["macs_fraction"] * 100], [oracle["test_acc"] * 100], "r*", markersize=12, label="oracle")
    ax.set_xlabel("mean MACs (% of the full network)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs compute (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MAIN = ("full_gateway_onnxruntime", "early_gateway_onnxruntime", "full_triton_direct", "full_gateway_triton",
        "early_gateway_triton", "full_gateway_onnxruntime_http", "early_gateway_onnxruntime_http",
        "early_triton_cascade_direct", "early_gateway_triton_cascade")


def plot_online(scenarios: dict, throughput_path: Path, latency_path: Path) -> None:
    fig1, ax1 = plt.subplots(figsize=(6, 4.5))
    fig2, ax2 = plt.subplots(figsize=(6, 4.5))
    for name in MAIN:
        rows = [r for r in scenarios.get(name, []) if r["mode"] == "closed" and r["completed"]]
        if not rows:
            continue
        ax1.plot([r["level"] for r in rows], [r["throughput"] for r in rows], "o-", label=name)
        ax2.plot([r["throughput"] for r in rows], [r["latency_ms"]["p99"] for r in rows], "o-", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrency (closed loop)")
    ax1.set_ylabel("throughput (requests/s)")
    ax1.set_title("Throughput vs concurrency")
    ax2.set_xlabel("throughput (requests/s)")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_yscale("log")
    ax2.set_title("p99 latency vs throughput")
    for fig, ax, path in ((fig1, ax1, throughput_path), (fig2, ax2, latency_path)):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _fmt(value, pct=False) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:.2f}%" if pct else f"{value:.3g}" if isinstance(value, float) else str(value)


def _verdict(value, op: str, target: float) -> str:
    """Met or missed, and by how much (the difference from the aim)."""
    if value is None:
        return "n/a"
    met = value <= target if op == "<=" else value >= target
    return f"yes, by {abs(value - target):.3g}" if met else f"**no, missed by {abs(value - target):.3g}**"


def aims_table(summary: dict) -> list[str]:
    lines = ["| measure | value | aim | met |", "|---|---:|---:|:---|"]
    concurrency = summary.get("headline_concurrency", 16)
    source = summary.get("triton_throughput_ratio_source") or "n/a"
    for key, op, target, description in AIMS:
        key, description = key.format(c=concurrency), description.format(c=concurrency, source=source)
        value = summary.get(key)
        if callable(target):
            target = target(summary)
        lines.append(f"| {description} (`{key}`) | {_fmt(value)} | {op} {target:.3g} | "
                     f"{_verdict(value, op, target)} |")
    return lines


def cpu_table(scenarios: dict) -> list[str]:
    """CPU milliseconds per request of each process, per scenario and level (blank: not in that scenario)."""
    lines = ["| scenario | mode | level | images/request | requests | " + " | ".join(ROLES) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(ROLES)]
    for name, rows in scenarios.items():
        for r in rows:
            cpu = (r.get("cpu") or {}).get("ms_per_request")
            if not cpu:
                continue
            cells = " | ".join("" if cpu.get(role) is None else f"{cpu[role]:.3f}" for role in ROLES)
            lines.append(f"| {name} | {r['mode']} | {r['level']:g} | {r.get('images_per_request', 1)} | "
                         f"{r['cpu']['requests']} | {cells} |")
    return lines


def render(summary: dict, sweep: list[dict], scenarios: dict) -> str:
    lines = [f"# Early-exit benchmark: {summary['model']}", "",
             f"Run `{summary['command']}` at commit `{summary['commit']}` on {summary['machine']}, "
             f"{summary['date']}. Checkpoint: `{summary.get('checkpoint')}`.", "",
             "## Headline (summary.json)", "", *aims_table(summary)]
    lines += ["", f"Final exit test accuracy {_fmt(summary['final_exit_test_acc'], True)}; early exit (0.5 pt "
              f"target calibrated on held-out) {_fmt(summary['early_exit_test_acc'], True)}; oracle mean MACs "
              f"{_fmt(summary['oracle_macs_fraction'], True)} of the full network.", "",
              "## Offline sweep (test split; thresholds calibrated on held-out)", "",
              "| kind | target | test acc | mean MACs | exit shares | predicted ms/img (b1 / b64) |",
              "|---|---:|---:|---:|---|---:|"]
    for row in sweep:
        shares = " / ".join(f"{v * 100:.0f}" for k, v in row.items() if k.startswith("share_exit"))
        b1, b64 = row.get("predicted_ms_b1"), row.get("predicted_ms_b64")
        latency = "n/a" if b1 is None else f"{b1:.2f} / {b64:.2f}"
        lines.append(f"| {row['kind']} | {_fmt(row['target'])} | {row['test_acc'] * 100:.2f}% | "
                     f"{row['macs_fraction'] * 100:.1f}% | {shares} | {latency} |")
    lines += ["", "![accuracy vs MACs](accuracy_vs_macs.png)", "", "## Online load", "",
              "| scenario | mode | level | throughput/s | p50 ms | p90 ms | p95 ms | p99 ms | accuracy | exits "
              "| within budget | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, rows in scenarios.items():
        for r in rows:
            lat = r["latency_ms"]
            exits = ", ".join(f"{k}:{v}" for k, v in r["exits"].items())
            lines.append(f"| {name} | {r['mode']} | {r['level']:g} | {r['throughput']:.1f} | "
                         f"{lat.get('p50', 0):.2f} | {lat.get('p90', 0):.2f} | {lat.get('p95', 0):.2f} | "
                         f"{lat.get('p99', 0):.2f} | {_fmt(r['accuracy'], True)} | {exits} | "
                         f"{_fmt(r['within_budget'], True)} | {r['errors']} |")
    lines += ["", "![throughput vs concurrency](throughput_vs_concurrency.png)", "",
              "![p99 vs throughput](p99_vs_throughput.png)", "",
              "Closed loop: `level` concurrent clients, each sending its next request (one image, or 8 in the "
              "`_batch8` scenarios: throughput counts requests, accuracy and exits count images) when the "
              "previous returns. Open loop: Poisson arrivals at `level` requests/s, each request's latency "
              "from its scheduled arrival. The load generator runs on the same machine as the servers.", "",
              *cpu_section(summary, scenarios)]
    return "\n".join(lines)


def cpu_section(summary: dict, scenarios: dict) -> list[str]:
    pinning = summary.get("cpu_pinning")
    where = (f"The servers ran on cores {pinning['servers']} and the load generator on {pinning['loadgen']}."
             if pinning else "Servers and load generator shared every core (no pinning).")
    lines = ["## Where the CPU goes", "",
             "CPU milliseconds per request over each level's measured window (warm-up excluded), from "
             "/proc/<pid>/stat (utime + stime): the gateway process; the part of it inside backend calls "
             "(`gateway_backend_cpu_seconds_total` on its /metrics, the thread CPU time around each call); the "
             "difference, the gateway's own cost; tritonserver; its Python-backend stubs; the load generator. "
             f"{where}", "", *cpu_table(scenarios)]
    skipped = summary.get("skipped_scenarios") or {}
    if skipped:
        lines += ["", "Not run:", ""] + [f"- `{name}`: {why}" for name, why in skipped.items()]
    return lines + [""]


def write_report(directory: Path) -> Path:
    summary, sweep, scenarios = _load(directory)
    baseline = None
    if summary.get("compared_with"):
        earlier = (directory / summary["compared_with"]).resolve()
        baseline = (f"earlier run ({earlier.name})", json.loads((earlier / "sweep.json").read_text()))
    plot_accuracy_vs_macs(sweep, directory / "accuracy_vs_macs.png", baseline)
    plot_online(scenarios, directory / "throughput_vs_concurrency.png", directory / "p99_vs_throughput.png")
    report = directory / "REPORT.md"
    existing = report.read_text() if report.exists() else ""
    notes = existing.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in existing else "\n"
    report.write_text(render(summary, sweep, scenarios) + "\n<!-- notes -->" + notes)
    return report


if __name__ == "__main__":
    write_report(Path(sys.argv[1]))
    print(f"wrote {sys.argv[1]}/REPORT.md")
