"""Where the CPU goes under load: per-process CPU time (the kernel's process CPU clock,
the utime + stime of /proc/<pid>/stat at nanosecond resolution), the gateway's CPU
inside backend calls from its /metrics, and CPU pinning of servers and load generator
(stdlib only; Linux).

A `CpuMeter` is read before and after a measured window (the load generator calls
`start()` after its warm-up and `stop()` when the window ends) and reports, per role,
the CPU seconds spent in the window and milliseconds per request:

- `gateway`: the gateway process (and any process it started),
- `gateway_backend`: the part of the gateway's CPU spent inside backend calls (the
  thread CPU time around each call, `gateway_backend_cpu_seconds_total` on /metrics),
- `gateway_outside_backend`: the difference, the gateway's own cost per request,
- `tritonserver`: the tritonserver process alone,
- `triton_stubs`: its Python-backend stubs (`triton_python_backend_stub` children),
- `loadgen`: this process, the load generator.

It also reports how each core spent the window (`cores_s`, from /proc/stat): `busy`
(user, system), `nice` (niced processes: a background job), `irq` (hard and soft
interrupts), `idle` (idle and iowait) and `steal` (time the hypervisor gave to another
guest), so that a slow window can be told apart: servers' cores idle (the servers
waited), stolen (the host was busy elsewhere) or busy with something other than the
servers.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
BACKEND_CPU_METRIC = "gateway_backend_cpu_seconds_total"


# -- reading /proc -------------------------------------------------------------
def _process_clock(pid: int) -> int:
    """Linux's CPU-time clock of process `pid` (what clock_getcpuclockid returns: CPUCLOCK_SCHED)."""
    return ((~pid) << 3) | 2


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of every thread of `pid`, live or ended: the kernel's process CPU
    clock (nanoseconds), else utime + stime from /proc/<pid>/stat (clock ticks); 0.0 once it has gone."""
    try:
        return time.clock_gettime(_process_clock(pid))
    except OSError:
        pass
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND  # utime, stime


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every live process started (directly or not) by `pid`."""
    parents = _parent_pids()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def tree_cpu_s(pid: int) -> float:
    return process_cpu_s(pid) + sum(process_cpu_s(child) for child in descendants(pid))


def cores_cpu_s() -> dict[str, dict[str, float]]:
    """Per core (`cpu0`, `cpu1`, ...): seconds busy, niced, in interrupts, idle and stolen since boot (/proc/stat)."""
    cores = {}
    try:
        lines = (PROC / "stat").read_text().splitlines()
    except OSError:
        return cores
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        ticks = [int(value) for value in fields[:8]] + [0] * (8 - len(fields[:8]))
        user, nice, system, idle, iowait, irq, softirq, steal = ticks
        cores[name] = {"busy": (user + system) / TICKS_PER_SECOND, "nice": nice / TICKS_PER_SECOND,
                       "irq": (irq + softirq) / TICKS_PER_SECOND,
                       "idle": (idle + iowait) / TICKS_PER_SECOND, "steal": steal / TICKS_PER_SECOND}
    return cores


def cores_record(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict:
    """Seconds per core and kind between two `cores_cpu_s()` samples."""
    return {core: {kind: round(max(0.0, after[core][kind] - before[core].get(kind, 0.0)), 2) for kind in after[core]}
            for core in after if core in before}


def backend_cpu_s(metrics_url: str) -> float | None:
    """The gateway's `gateway_backend_cpu_seconds_total`, summed over its labels (None: not exported)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    values = re.findall(rf"^{BACKEND_CPU_METRIC}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return sum(float(value) for value in values) if values else None


# -- the meter -----------------------------------------------------------------
@dataclass(frozen=True)
class Servers:
    """The server processes of a scenario (None where the scenario has none)."""

    gateway_pid: int | None = None
    gateway_metrics_url: str | None = None  # http://host:port/metrics
    triton_pid: int | None = None
    proxy_pid: int | None = None  # a front proxy (nginx: its master process and workers)


class CpuMeter:
    """CPU per role over a window; `stop()` returns the window's `cpu` record."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self._before: dict[str, float | None] | None = None
        self._cores: dict[str, dict[str, float]] = {}
        self._started = 0.0

    def _sample(self) -> dict[str, float | None]:
        servers, sample = self.servers, {"loadgen": process_cpu_s(os.getpid())}
        if servers.gateway_pid is not None:
            sample["gateway"] = tree_cpu_s(servers.gateway_pid)
        if servers.triton_pid is not None:
            sample["tritonserver"] = process_cpu_s(servers.triton_pid)
            sample["triton_stubs"] = sum(process_cpu_s(child) for child in descendants(servers.triton_pid))
        if servers.proxy_pid is not None:
            sample["front_proxy"] = tree_cpu_s(servers.proxy_pid)
        return sample

    def start(self) -> None:
        backend = backend_cpu_s(self.servers.gateway_metrics_url) if self.servers.gateway_metrics_url else None
        self._before = {**self._sample(), "gateway_backend": backend}  # /metrics read before the CPU
        self._cores = cores_cpu_s()
        self._started = time.perf_counter()

    def stop(self, requests: int) -> dict:
        if self._before is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        window = time.perf_counter() - self._started
        after = self._sample()  # the CPU read before /metrics: scraping it is not counted
        cores = cores_cpu_s()
        url = self.servers.gateway_metrics_url
        after["gateway_backend"] = backend_cpu_s(url) if url else None
        return cpu_record(self._before, after, requests, window) | {"cores_s": cores_record(self._cores, cores)}


def cpu_record(before: dict[str, float | None], after: dict[str, float | None], requests: int,
               window_s: float) -> dict:
    """CPU seconds per role between two samples, and milliseconds per request."""
    cpu_s = {role: max(0.0, after[role] - before[role]) for role in after
             if after.get(role) is not None and before.get(role) is not None}
    if "gateway" in cpu_s and "gateway_backend" in cpu_s:
        cpu_s["gateway_outside_backend"] = cpu_s["gateway"] - cpu_s["gateway_backend"]
    per_request = {role: round(seconds * 1000 / requests, 4) if requests else None
                   for role, seconds in cpu_s.items()}
    return {"requests": requests, "window_s": round(window_s, 3),
            "cpu_s": {role: round(seconds, 6) for role, seconds in cpu_s.items()}, "ms_per_request": per_request}


# -- pinning -------------------------------------------------------------------
@dataclass(frozen=True)
class CoreSplit:
    """Disjoint CPU sets: the servers on `servers`, the load generator on `loadgen`."""

    servers: tuple[int, ...]
    loadgen: tuple[int, ...]

    def as_dict(self) -> dict:
        return {role: list(cores) for role, cores in asdict(self).items()}


def split_cores(available: set[int] | None = None) -> CoreSplit | None:
    """A quarter of the cores (at least one) for the load generator, the rest for the servers;
    None with fewer than two cores."""
    cores = sorted(os.sched_getaffinity(0) if available is None else available)
    if len(cores) < 2:
        return None
    loadgen = max(1, len(cores) // 4)
    return CoreSplit(tuple(cores[:-loadgen]), tuple(cores[-loadgen:]))


def _pin_threads(pid: int, cores: tuple[int, ...]) -> None:
    """Every thread of `pid` (a mask set on a process only moves its main thread)."""
    with contextlib.suppress(OSError):
        for task in (PROC / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), cores)


def pin_process_tree(pid: int, cores: tuple[int, ...]) -> None:
    """`pid`, every process it started and all their threads onto `cores` (threads and processes
    they start later inherit the mask)."""
    for process in (pid, *descendants(pid)):
        _pin_threads(process, cores)


@contextlib.contextmanager
def pinned_self(cores: tuple[int, ...] | None):
    """This process's threads on `cores` for the block (no change for None), then as they were."""
    if cores is None:
        yield
        return
    original = tuple(os.sched_getaffinity(0))
    _pin_threads(os.getpid(), cores)
    try:
        yield
    finally:
        _pin_threads(os.getpid(), original)
