"""The state every phase of the robustness run shares: the repository, the results directory, the
durations, the workload, the CPU split; how a phase starts a gateway and aims the load generator at it;
and the results and targets the phases add to."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from benchmarks.cpu import CoreSplit, Servers, pin_process_tree, pinned_self
from benchmarks.front_proxy import TEMPLATE, FrontProxy
from benchmarks.loadgen import Target
from benchmarks.servers import GatewayServer
from common.errors import UserError


class Session:
    """What the phases share; each phase is a method of a subclass (load, faults, hostile)."""

    def __init__(self, repository: Path, output: Path, durations: dict, images: np.ndarray, labels: np.ndarray | None,
                 model: str, log=print, pinning: CoreSplit | None = None, gateway_args: tuple[str, ...] = (),
                 front_proxy_limit: int | str | None = None, front_proxy_template: Path | None = None) -> None:
        self.repository, self.output, self.durations, self.log = repository, output, durations, log
        self.gateway_args = tuple(gateway_args)  # added to every gateway's command line (experiments)
        self.pinning = pinning  # capacity and overload: the gateway on pinning.servers, the load on .loadgen
        # capacity and overload through nginx (benchmarks.front_proxy) refusing calls beyond this many in flight,
        # on the gateway's cores (None: the load goes to the gateway itself)
        self.front_proxy_limit = front_proxy_limit  # calls, or "auto": the gateway's logged admission bound
        self.front_proxy_limits: list[int] = []  # the limits the proxied phases ran with
        self.front_proxy_template = front_proxy_template or TEMPLATE  # its configuration (deploy/nginx's by default)
        self.images, self.labels, self.model = images, labels, model
        self.results: dict = {}
        self.targets: list[dict] = []
        self.capacity_rps: float | None = None
        (output / "logs").mkdir(parents=True, exist_ok=True)

    def gateway(self, name: str, *args: str) -> GatewayServer:
        return GatewayServer(self.repository, *self.gateway_args, *args,
                             log_path=self.output / "logs" / f"gateway_{name}.log")

    def loadgen_target(self, url: str, parameters: dict | None = None, budget_ms: float | None = None) -> Target:
        return Target("grpc", url, self.model, parameters or {}, budget_ms=budget_ms)

    def labels_or_dummy(self) -> np.ndarray:
        return self.labels if self.labels is not None else np.full(len(self.images), -1)

    def pinned_gateway(self, name: str, *args: str) -> GatewayServer:
        """A gateway started on the servers' cores (so it sizes its default queue bound for them), its whole
        process tree kept there; this process runs the load from the other cores."""
        with pinned_self(self.pinning.servers if self.pinning else None):
            gateway = self.gateway(name, *args)
        if self.pinning is not None:
            pin_process_tree(gateway.process.pid, self.pinning.servers)
        return gateway

    @contextlib.contextmanager
    def pinned_front_end(self, name: str, *args: str):
        """`pinned_gateway`, behind the front proxy when the run has one (on the same cores): yields the
        gateway, the gRPC address the load goes to and the server processes whose CPU is measured."""
        with self.pinned_gateway(name, *args) as gateway:
            if self.front_proxy_limit is None:
                yield gateway, gateway.grpc_url, Servers(gateway.process.pid, gateway.metrics_url)
                return
            limit = self.front_proxy_limit
            if limit == "auto":
                limit = gateway.ready_fields().get("admission_images")
                if not isinstance(limit, int) or limit < 1:
                    raise UserError("--front-proxy-limit auto: the gateway logged no admission bound "
                                    f"(admission_images: {limit!r}); give the limit in calls")
            self.front_proxy_limits.append(limit)
            with FrontProxy(gateway.grpc_url, gateway.http_url, limit,
                            cores=self.pinning.servers if self.pinning else None,
                            template=self.front_proxy_template) as proxy:
                yield gateway, proxy.grpc_url, Servers(gateway.process.pid, gateway.metrics_url, proxy_pid=proxy.pid)
