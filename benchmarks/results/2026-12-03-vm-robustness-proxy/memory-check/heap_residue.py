"""Does the gateway hold heap per open gRPC connection? Baseline (warm, few connections), then N channels
sending calls at once (kept open, the idle trim passes), then closed and another trim."""
import asyncio
import json
import sys
from pathlib import Path

import grpc
import numpy as np

from benchmarks.loadgen import MODEL_INFER, infer_messages
from benchmarks.robustness.measure import rss_split_mb
from benchmarks.servers import GatewayServer

N = int(sys.argv[1]) if len(sys.argv) > 1 else 82
repo = Path("model_repository")
model = json.loads((repo / "manifest.json").read_text())["model"]
images = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
msgs = infer_messages(model, images, 64)

FEW = len(sys.argv) > 2  # N calls at once over 4 channels instead of N channels

async def calls(url, channels, per, close):
    concurrency = channels
    if FEW and channels == N:
        channels = 4
    opened = [grpc.aio.insecure_channel(url) for _ in range(channels)]
    stubs = [c.unary_unary(MODEL_INFER) for c in opened]
    for r in range(per):
        await asyncio.gather(*(stubs[i % channels](msgs[(i + r) % 64]) for i in range(concurrency)))
    if close:
        for c in opened:
            await c.close()
    return opened

def show(label, pid):
    print(label, rss_split_mb(pid), flush=True)

async def main():
    with GatewayServer(repo, log_path=Path("/work/scratch/conn/gw.log")) as gw:
        pid, url = gw.process.pid, f"127.0.0.1:{gw.grpc_port}"
        show("start", pid)
        for _ in range(3):
            await calls(url, 4, 100, True)
            await asyncio.sleep(3)
            show("warm, 4 channels x 100 calls, closed, trimmed", pid)
        held = await calls(url, N, 8, False)
        await asyncio.sleep(3)
        show(f"{N} channels x 8 calls, open, trimmed", pid)
        for c in held:
            await c.close()
        await asyncio.sleep(1)
        await calls(url, 4, 100, True)
        await asyncio.sleep(3)
        show(f"{N} closed, then 4 x 100 calls, trimmed", pid)
        for _ in range(2):
            held = await calls(url, N, 8, False)
            await asyncio.sleep(3)
            show(f"again {N} channels open, trimmed", pid)
            for c in held:
                await c.close()
            await asyncio.sleep(1)
            await calls(url, 4, 100, True)
            await asyncio.sleep(3)
            show("closed, trimmed", pid)

asyncio.run(main())
