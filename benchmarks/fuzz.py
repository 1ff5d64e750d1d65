"""Mutation fuzzing of a running gateway's front ends (issue 25): malformed KServe v2 JSON and
binary-tensor requests, raw bodies, multipart uploads and gRPC messages (well-formed protobuf
with hostile values, and undecodable bytes), many thousands a minute, seeded and repeatable.
Counts the answers by status; an unexpected 5xx, a gRPC UNKNOWN or INTERNAL, a dropped connection,
invalid JSON or a request that hangs past its timeout is a finding (the first few are kept with
their request). Expected is one 5xx only: 504 DeadlineExceeded for a request that set its own
`timeout` (counted as "504-own-timeout"): the client chose a deadline that passed, and 504 is where
the gRPC-to-HTTP mapping (google.rpc.Code) puts DEADLINE_EXCEEDED; no 4xx means that (408 is a
client too slow to send its request).

    python -m benchmarks.fuzz --requests 50000                       # a gateway started here
    python -m benchmarks.fuzz --http 127.0.0.1:8080 --grpc 127.0.0.1:8081 --model r20_r56

Every request starts from a valid one and is mutated: a field replaced by any JSON value
(nested, huge integers, NaN and Infinity), a shape of booleans or overflowing sizes, a wrong
Inference-Header-Content-Length (non-ASCII digits included), truncated or extended binary data,
bytes flipped, JSON nested thousands deep, gzip bodies that are not gzip, image uploads that
are truncated or declare 64 megapixels.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2

from common.errors import UserError, run_cli
from common.manifest import ManifestError, read_manifest
from common.paths import REPO_ROOT
from common.provenance import git_commit, machine_description, utc_timestamp
from serving.kserve_grpc_client import set_parameter

KINDS = ("json", "binary", "raw", "classify", "grpc", "grpc_bytes")
FIELDS = ["name", "shape", "datatype", "data", "parameters", "id", "outputs", "inputs", "binary_data_size",
          "classification", "binary_data", "policy", "threshold", "budget_ms", "exit_depth", "score", "timeout"]
DATATYPES = ["FP32", "UINT8", "BYTES", "FP64", "INT64", "BOOL", "FP16", "", "fp32", "FP32 "]
WEIRD_NUMBERS = [0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63), 4611686018427387904, 1e308, -1e-308, 0.5, 3e38]
HEADER_LENGTHS = ["-1", "0", "99999999999999999999", "\u0661\u0662", "\u00b2", "1e3", "1 2", "0x10", ""]
KEPT_FINDINGS = 10


class Mutator:
    """Hostile variants of valid requests, from one seeded random generator."""

    def __init__(self, seed: int, model: str, input_shape: tuple[int, int, int]) -> None:
        self.random = random.Random(seed)
        self.model, self.input_shape = model, input_shape
        channels, height, width = input_shape
        self.images = np.random.default_rng(seed).standard_normal((2, channels, height, width)).astype(np.float32)
        raw = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(raw).save(buffer, format="PNG")
        self.png = buffer.getvalue()
        buffer = io.BytesIO()
        Image.new("1", (7999, 7999)).save(buffer, format="PNG")
        self.bomb = buffer.getvalue()

    # -- values ---------------------------------------------------------------
    def value(self, depth: int = 0):
        """Any JSON value (NaN and Infinity included), nested a little."""
        choice = self.random.random()
        if depth > 3 or choice < 0.5:
            return self.random.choice([None, True, False, self.random.choice(WEIRD_NUMBERS),
                                       self.random.uniform(-1e6, 1e6), float("nan"), float("inf"),
                                       "".join(self.random.choice("ab0.9,-é\x00") for _ in range(4)),
                                       self.random.choice(FIELDS), self.random.choice(DATATYPES)])
        if choice < 0.75:
            return [self.value(depth + 1) for _ in range(self.random.randint(0, 4))]
        return {self.random.choice(FIELDS): self.value(depth + 1) for _ in range(self.random.randint(0, 4))}

    def shape(self):
        return self.random.choice([
            [self.random.choice(WEIRD_NUMBERS) for _ in range(self.random.randint(0, 5))],
            [True, 3, 32, 32], [1, 3.0, 32, 32], [-1, *self.input_shape], [0, 2 ** 63, 2 ** 63],
            [1, *self.input_shape], [2, *self.input_shape], self.value()])

    # -- requests ---------------------------------------------------------------
    def document(self, binary: bool) -> dict:
        images = self.images[: self.random.randint(1, 2)]
        spec = {"name": "images", "shape": list(images.shape), "datatype": "FP32"}
        if binary:
            spec["parameters"] = {"binary_data_size": images.nbytes}
        else:
            spec["data"] = images.reshape(-1).tolist()
        document = {"inputs": [spec], "parameters": {"policy": self.random.choice(["confidence", "full", "fixed"])}}
        for _ in range(self.random.randint(1, 3)):
            where = self.random.random()
            if where < 0.4:
                spec[self.random.choice(FIELDS)] = self.shape() if self.random.random() < 0.3 else self.value()
            elif where < 0.7:
                document[self.random.choice(["parameters", "outputs", "id", "inputs"])] = self.value()
            elif where < 0.85 and isinstance(document["parameters"], dict):
                document["parameters"][self.random.choice(FIELDS)] = self.value()
            else:
                document["outputs"] = [{"name": self.random.choice(["logits", "exit_depth", "nope"]),
                                        "parameters": self.value()}]
        return document

    def encode(self, document: dict) -> bytes:
        body = json.dumps(document, allow_nan=True).encode()
        roll = self.random.random()
        if roll < 0.05:
            depth = self.random.choice([500, 1000, 5000])
            body = body.replace(b'"images"', b"[" * depth + b"]" * depth, 1)
        elif roll < 0.1 and len(body) > 2:
            cut = self.random.randrange(1, len(body))
            body = body[:cut]
        elif roll < 0.15:
            position = self.random.randrange(len(body))
            body = body[:position] + bytes([self.random.randrange(256)]) + body[position + 1:]
        return body

    def http_request(self, kind: str) -> tuple[str, str, dict, bytes | None, list | None]:
        """(method, path, headers, body, files) of one HTTP request of `kind`."""
        infer = f"/v2/models/{self.model if self.random.random() < 0.9 else 'nope'}/infer"
        if kind == "json":
            return "POST", infer, {"Content-Type": "application/json"}, self.encode(self.document(False)), None
        if kind == "binary":
            prefix = self.encode(self.document(True))
            blob = self.images[:1].tobytes()
            roll = self.random.random()
            if roll < 0.3:
                blob = blob[: self.random.randrange(len(blob))]
            elif roll < 0.5:
                blob += bytes(self.random.randrange(1, 64))
            length = str(len(prefix)) if self.random.random() < 0.6 else self.random.choice(
                HEADER_LENGTHS + [str(len(prefix) + self.random.randint(-20, 20))])
            return "POST", infer, {"Inference-Header-Content-Length": length}, prefix + blob, None
        if kind == "raw":
            content_type = self.random.choice(["application/json", "application/octet-stream", "text/plain"])
            headers = {"Content-Type": content_type}
            if self.random.random() < 0.3:
                headers["Content-Encoding"] = self.random.choice(["gzip", "deflate", "br", "identity"])
            body = bytes(self.random.randrange(256) for _ in range(self.random.randint(0, 200)))
            path = self.random.choice([infer, "/v2/models/x/versions/%00/infer", f"/v2/models/{self.model}",
                                       "/v2/health/ready", "/v2", "/metrics"])
            return self.random.choice(["POST", "GET", "PUT"]), path, headers, body, None
        files = []
        for index in range(self.random.randint(0, 4)):
            content = self.random.choice([self.png, self.png[: self.random.randrange(1, len(self.png))], self.bomb,
                                          b"GIF89a" + bytes(20), b"", b"\xff\xd8\xff" + bytes(30)])
            files.append((self.random.choice(["files", "file", "x"]), (f"f{index}.png", content, "image/png")))
        query = "?" + self.random.choice(["top_k=3", "top_k=0", "top_k=abc", "budget_ms=nan", "exit_depth=1e9",
                                          "policy=fixed&exit_depth=3", "threshold=%00", ""])
        return "POST", "/v1/classify" + query, {}, None, files

    def grpc_request(self) -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name=self.model if self.random.random() < 0.9 else "nope")
        images = self.images[: self.random.randint(1, 2)]
        shape = self.shape()
        valid_shape = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                      and -(2 ** 63) <= d < 2 ** 63 for d in shape)
        spec = request.inputs.add(name=self.random.choice(["images", "images", "x"]),
                                  datatype=self.random.choice(DATATYPES),
                                  shape=shape if valid_shape and self.random.random() < 0.5 else list(images.shape))
        if self.random.random() < 0.7:
            blob = images.tobytes()
            request.raw_input_contents.append(blob[: self.random.randrange(len(blob) + 1)]
                                              if self.random.random() < 0.3 else blob)
        else:
            spec.contents.fp32_contents.extend(images.reshape(-1)[: self.random.randrange(images.size + 1)].tolist())
        for _ in range(self.random.randint(0, 3)):
            value = self.random.choice([True, 7, -(2 ** 63), 2 ** 63 - 1, float("nan"), float("inf"), 1e308, "x",
                                        "0.5,0.5", ""])
            set_parameter(request.parameters[self.random.choice(FIELDS)], value)
        if self.random.random() < 0.3:
            output = request.outputs.add(name=self.random.choice(["logits", "exit_depth", "nope"]))
            output.parameters["classification"].int64_param = self.random.randint(-3, 5)
        return request

    def grpc_bytes(self) -> bytes:
        data = bytearray(self.grpc_request().SerializeToString())
        for _ in range(self.random.randint(1, 4)):
            if data:
                data[self.random.randrange(len(data))] = self.random.randrange(256)
        return bytes(data[: self.random.randrange(len(data) + 1)]) if self.random.random() < 0.3 else bytes(data)


class Tally:
    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.findings: list[dict] = []
        self.count = 0
        self.bad = 0  # findings: unexpected 5xx, UNKNOWN/INTERNAL, dropped, invalid JSON, hangs
        self.hangs = 0

    def add(self, kind: str, status: str, bad: bool, detail: str = "") -> None:
        self.count += 1
        key = f"{kind}:{status}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        self.bad += bad
        self.hangs += status == "hang"
        if bad and len(self.findings) < KEPT_FINDINGS:
            self.findings.append({"kind": kind, "status": status, "detail": detail[:500]})


def own_timeout_expired(status: int, answer: bytes, body: bytes | None, headers: dict) -> bool:
    """A 504 DeadlineExceeded for a request that carried its own deadline (a `timeout` parameter or
    header): the answer the client asked for, not a finding."""
    return (status == 504 and b"deadline" in answer.lower()
            and ("timeout" in {name.lower() for name in headers} or (body is not None and b'"timeout"' in body)))


async def fuzz(http_url: str, grpc_url: str, model: str, input_shape: tuple[int, int, int], requests: int,
               concurrency: int = 8, seed: int = 0, timeout_s: float = 10.0) -> dict:
    """Send `requests` mutated requests (spread over KINDS) with `concurrency` at once; the tally."""
    mutator, tally = Mutator(seed, model, input_shape), Tally()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://{http_url}", timeout=timeout_s, limits=limits) as client, \
            grpc.aio.insecure_channel(grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out

        async def one(kind: str) -> None:
            if kind in ("grpc", "grpc_bytes"):
                payload = mutator.grpc_request().SerializeToString() if kind == "grpc" else mutator.grpc_bytes()
                try:
                    await infer(payload, timeout=timeout_s)
                    tally.add(kind, "OK", False)
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    hang = code == grpc.StatusCode.DEADLINE_EXCEEDED and "Deadline Exceeded" == error.details()
                    status = "hang" if hang else code.name
                    tally.add(kind, status, hang or code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL),
                              f"{error.details()} <- {payload[:200]!r}")
                return
            method, path, headers, body, files = mutator.http_request(kind)
            try:
                response = await client.request(method, path, content=body, files=files,
                                                headers={name: value.encode() for name, value in headers.items()})
            except httpx.TimeoutException:
                tally.add(kind, "hang", True, f"{method} {path} {body[:200] if body else files!r}")
                return
            except httpx.LocalProtocolError as error:  # the client would not send it: no finding
                tally.add(kind, "unsendable", False, str(error))
                return
            except httpx.TransportError as error:
                tally.add(kind, "dropped", True, f"{type(error).__name__} {method} {path} {body[:200]!r}")
                return
            status = str(response.status_code)
            bad = response.status_code >= 500
            if bad and own_timeout_expired(response.status_code, response.content, body, headers):
                bad, status = False, "504-own-timeout"
            if not bad and response.headers.get("content-type", "").startswith("application/json"):
                try:
                    json.loads(response.content, parse_constant=lambda constant: 1 / 0)
                except (ValueError, ZeroDivisionError):
                    bad = True
            tally.add(kind, status, bad,
                      f"{method} {path} -> {response.text[:200]} <- {body[:200] if body else files!r}")

        async def worker() -> None:
            while True:
                try:
                    index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await one(KINDS[index % len(KINDS)])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"requests": tally.count, "seconds": round(elapsed, 2), "requests_per_s": round(tally.count / elapsed, 1),
            "bad": tally.bad, "hangs": tally.hangs, "answers": dict(sorted(tally.statuses.items())),
            "findings": tally.findings,
            "seed": seed, "concurrency": concurrency, "timeout_s": timeout_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--http", help="host:port of a running gateway (default: start one here)")
    parser.add_argument("--grpc", help="its gRPC host:port")
    parser.add_argument("--model", help="the model name (default: the repository manifest's)")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the tally here as JSON")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.model_repository)
    except ManifestError as error:
        raise UserError(str(error)) from None
    model = args.model or manifest.model
    shape = tuple(manifest.input.shape)
    if args.http:
        if not args.grpc:
            raise UserError("--http needs --grpc")
        result = asyncio.run(fuzz(args.http, args.grpc, model, shape, args.requests, args.concurrency, args.seed))
    else:
        from benchmarks.servers import GatewayServer

        with GatewayServer(args.model_repository) as gateway:
            result = asyncio.run(fuzz(gateway.http_url, gateway.grpc_url, model, shape, args.requests,
                                      args.concurrency, args.seed))
    arguments = sys.argv[1:] if argv is None else argv
    result.update({"command": "python -m benchmarks.fuzz " + " ".join(arguments), "commit": git_commit(),
                   "machine": machine_description(), "date": utc_timestamp()})
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
