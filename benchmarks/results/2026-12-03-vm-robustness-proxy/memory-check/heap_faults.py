"""Minor page faults and CPU per call of the gateway at C calls at once (environment C, default 82) over 4 channels, per
--mmap-threshold-kb."""
import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
import numpy as np

from benchmarks.loadgen import MODEL_INFER, infer_messages
from benchmarks.servers import GatewayServer

repo = Path("model_repository")
model = json.loads((repo / "manifest.json").read_text())["model"]
msgs = infer_messages(model, np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32), 64)
C = int(os.environ.get("C", "82"))
TICKS = os.sysconf("SC_CLK_TCK")

def stat(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[7]), (int(f[11]) + int(f[12])) / TICKS  # minflt, cpu

async def load(url, rounds):
    chans = [grpc.aio.insecure_channel(url) for _ in range(4)]
    stubs = [c.unary_unary(MODEL_INFER) for c in chans]
    for r in range(rounds):
        await asyncio.gather(*(stubs[i % 4](msgs[(i + r) % 64]) for i in range(C)))
    for c in chans:
        await c.close()

for kb in sys.argv[1:]:
    with GatewayServer(repo, "--mmap-threshold-kb", kb) as gw:
        url = f"127.0.0.1:{gw.grpc_port}"
        asyncio.run(load(url, 20))
        f0, c0 = stat(gw.process.pid)
        asyncio.run(load(url, 60))
        f1, c1 = stat(gw.process.pid)
        n = C * 60
        print(kb, "minflt/call", round((f1 - f0) / n, 1), "cpu ms/call", round((c1 - c0) / n * 1000, 3), flush=True)
