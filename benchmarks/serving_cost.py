"""The serving-cost keys of summary.json (issue 19): where each request's CPU goes, what
batching and the Triton cascade buy, and what the gateway adds in front of Triton.

All read the closed-loop level at the headline concurrency `c` of a scenario's
results (`gateway_added_p50_ms` the level at concurrency 1), and the `cpu` record
the load generator's meter left there (benchmarks.cpu). A key whose scenarios or
CPU figures are missing is None.
"""

from __future__ import annotations


def closed_level(scenarios: dict[str, list[dict]], name: str, concurrency: int) -> dict | None:
    return next((r for r in scenarios.get(name, []) if r["mode"] == "closed" and r["level"] == concurrency), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def cpu_ms(level: dict | None, role: str) -> float | None:
    """CPU milliseconds per request of `role` (benchmarks.cpu's roles) in a level result."""
    return ((level or {}).get("cpu") or {}).get("ms_per_request", {}).get(role)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def serving_cost(scenarios: dict[str, list[dict]], c: int, mean_macs_fraction: float, batch: int) -> dict:
    def at(name: str, concurrency: int = c) -> dict | None:
        return closed_level(scenarios, name, concurrency)

    def throughput(name: str) -> float | None:
        level = at(name)
        return level["throughput"] if level else None

    full, early = at("full_gateway_onnxruntime"), at("early_gateway_onnxruntime")
    overhead = cpu_ms(full, "gateway_outside_backend")
    full_backend, early_gateway = cpu_ms(full, "gateway_backend"), cpu_ms(early, "gateway")
    staging = (early_gateway - overhead - mean_macs_fraction * full_backend
               if None not in (early_gateway, overhead, full_backend) else None)
    cascade_direct = at("early_triton_cascade_direct")
    direct_c1, gateway_c1 = at("early_triton_cascade_direct", 1), at("early_gateway_triton_cascade", 1)
    added_p50 = (gateway_c1["latency_ms"].get("p50") - direct_c1["latency_ms"].get("p50")
                 if direct_c1 and gateway_c1 and gateway_c1["completed"] and direct_c1["completed"] else None)
    backend_ratio = ratio(throughput("early_gateway_triton"), throughput("full_triton_direct"))
    return {
        "gateway_overhead_cpu_ms": _round(overhead),
        "staging_overhead_cpu_ms": _round(staging),
        f"batched_throughput_ratio_c{c}": ratio(throughput(f"early_gateway_onnxruntime_batch{batch}"),
                                                throughput(f"full_gateway_onnxruntime_batch{batch}")),
        # Early exit through the <model>_cascade Triton model, else (no such model) through the gateway's
        # Triton backend, over the full network on Triton; the source key says which.
        "triton_throughput_ratio": (ratio(throughput("early_triton_cascade_direct"), throughput("full_triton_direct"))
                                    if cascade_direct else backend_ratio),
        "triton_throughput_ratio_source": ("early_triton_cascade_direct" if cascade_direct
                                           else "early_gateway_triton" if backend_ratio else None),
        "triton_backend_throughput_ratio": backend_ratio,
        "gateway_forward_cpu_ms": _round(cpu_ms(at("early_gateway_triton_cascade"), "gateway")),
        "gateway_added_p50_ms": _round(added_p50),
        "cascade_gateway_overhead_ratio": ratio(throughput("early_gateway_triton_cascade"),
                                                throughput("early_triton_cascade_direct")),
        f"cpu_ms_per_request_c{c}": {name: level["cpu"]["ms_per_request"] for name in scenarios
                                     if (level := at(name)) and level.get("cpu")},
    }
