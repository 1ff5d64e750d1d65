"""What the HTTP front end reads and writes: request bodies within their size limit (and
decompressed), KServe v2 inference requests (JSON, or JSON followed by binary tensors) parsed and
validated into the dataplane's `InferRequest`, responses rendered back (JSON or binary), and
`/v1/classify` uploads read and decoded within the limits (`ImageDecoder`).

Every malformed body is a `GatewayError` (a 4xx naming what is wrong); serving.http_api's route
handlers call these and nothing here knows about routes.
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import orjson
from fastapi import Request, Response
from starlette.requests import ClientDisconnect

from serving.dataplane import InferRequest, InferResponse, RequestedOutput
from serving.errors import InvalidImage, InvalidInput, InvalidParameter, PayloadTooLarge, RequestTimeout
from serving.preprocess import MAX_PIXELS, declared_pixels, decode_image
from serving.tensors import Tensor, check_shape, from_list, from_raw, to_raw

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class HttpOptions:
    """Limits and security of the HTTP front end (serving.settings has them all, with their defaults)."""

    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = MAX_PIXELS
    max_request_pixels: int = 4 * MAX_PIXELS
    decode_threads: int = 2
    api_key: str | None = None
    docs: bool = True


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            if chunk:
                chunks.append(chunk)
    except ClientDisconnect:  # the client left, or was too slow (serving.http_server's read timeout)
        raise RequestTimeout("the client disconnected before sending the whole request") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)



def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo tritonclient's request compression (gzip or deflate), within the size limit."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding {encoding[:40]!r}; use gzip or deflate")
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decoder.decompress(body, limit + 1)
    except zlib.error as error:
        raise InvalidInput(f"body is not valid {encoding} data: {error}") from None
    if len(data) > limit or decoder.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    return data


def parse_json(text: bytes):
    """orjson (fast); what it refuses (NaN and Infinity literals, integers over 64 bits) goes to the
    standard library's json, so the accepted documents and the error messages stay json's."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"request is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidInput("request is not valid JSON: nested too deeply") from None


def json_object(value, where: str) -> dict:
    """`value` if it is a JSON object, {} if absent (null); anything else is the client's error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'{where}' must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(value, where: str) -> dict:
    """A `parameters` object whose numbers are finite (NaN or Infinity are no JSON, and no option)."""
    parameters = json_object(value, where)
    for name, item in parameters.items():
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(f"'{where}.{name}' must be a finite number, got {item!r}")
    return parameters


def _header_length(value: str, body_size: int) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) > body_size:
        raise InvalidInput(f"{HEADER_LENGTH} {value[:40]!r} is not a length within the body of {body_size} bytes")
    return int(value)


def parse_infer_request(model_name: str, version: str, body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        split = _header_length(header_length, len(body))
        json_part, binary = body[:split], body[split:]
    else:
        json_part, binary = body, b""
    document = parse_json(json_part)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInput("request must be a JSON object with an 'inputs' list")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(document.get("parameters"), "parameters")
    inputs, offset = [], 0
    for position, spec in enumerate(document["inputs"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"inputs[{position}] must be an object with a 'name' string")
        name, datatype = spec["name"], spec.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name!r}: 'datatype' must be a string such as \"FP32\"")
        shape = check_shape(name, spec.get("shape"))
        size = _parameters(spec.get("parameters"), f"inputs[{position}].parameters").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary_data_size {size!r} exceeds the binary data")
            data = from_raw(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in spec:
            data = from_list(name, datatype, shape, spec["data"])
        else:
            raise InvalidInput(f"input {name!r} has neither data nor binary_data_size")
        inputs.append(Tensor(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    requested = document.get("outputs")
    if requested is not None and not isinstance(requested, list):
        raise InvalidInput(f"'outputs' must be a list, got {type(requested).__name__}")
    outputs = []
    for position, spec in enumerate(requested or []):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"outputs[{position}] must be an object with a 'name' string")
        out_params = _parameters(spec.get("parameters"), f"outputs[{position}].parameters")
        classification = out_params.get("classification", 0)
        if isinstance(classification, bool) or not isinstance(classification, int):
            raise InvalidParameter(f"outputs[{position}].parameters.classification must be an integer")
        outputs.append(RequestedOutput(spec["name"], classification, out_params))
    return InferRequest(model_name, inputs, version, request_id, outputs, parameters)


def render_infer_response(response: InferResponse, binary_default: bool) -> Response:
    """The response document; NaN and infinite values in JSON data are written as null, as KServe's own
    server writes them (orjson) and as numpy reads them back into float arrays (NaN); binary outputs keep
    them exactly."""
    outputs, blobs = [], []
    for tensor, requested in zip(response.outputs, response.requested):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if requested.parameters.get("binary_data", binary_default):
            blob = to_raw(tensor.data, tensor.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode() for item in tensor.data.reshape(-1)]
        else:
            entry["data"] = tensor.data.reshape(-1).tolist()
        outputs.append(entry)
    header = orjson.dumps({"model_name": response.model_name, "model_version": response.model_version,
                           "id": response.id, "outputs": outputs})
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def json_response(document, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(document), status_code=status_code, media_type="application/json",
                    headers=headers)



def refuse_load_overrides(document: dict) -> None:
    """A load request's parameters (Triton: a config or files to load instead) are not supported here."""
    parameters = json_object(document.get("parameters"), "parameters")
    overrides = [name for name in parameters if name == "config" or name.startswith("file:")]
    if overrides:
        raise InvalidParameter(f"load parameters {', '.join(overrides)} are not supported: the gateway loads "
                               "what the repository's manifest names")


async def read_uploads(request: Request, max_body_bytes: int, max_files: int) -> tuple[list, list[bytes]]:
    """The files of a multipart/form-data upload (any field name) and their contents; the body within
    `max_body_bytes`, at most `max_files` files."""
    # Enforce the size limit while reading, then let starlette parse the cached body.
    request._body = await read_body(request, max_body_bytes)
    try:
        form = await request.form(max_files=max_files, max_fields=16, max_part_size=64 << 10)
    except Exception as error:  # starlette raises several types for bad multipart
        message = str(getattr(error, "detail", "") or "malformed multipart body")
        if "Too many files" in message:
            raise PayloadTooLarge(f"more than {max_files} files in one upload") from None
        raise InvalidInput(f"expected a multipart/form-data upload: {message}") from None
    uploads = [item for _, item in form.multi_items() if hasattr(item, "read")]
    if not uploads:
        raise InvalidInput("no image files in the upload (use multipart field 'files')")
    return uploads, [await upload.read() for upload in uploads]


class ImageDecoder:
    """Uploads to uint8 images of the model's size, within the limits, decoded in a worker pool so the
    event loop keeps answering (health, other requests) while large images decode."""

    def __init__(self, input_shape: tuple[int, int, int], options: HttpOptions) -> None:
        self.channels, self.size, self.options = input_shape[0], tuple(input_shape[1:]), options
        self.pool = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="decode")

    def check(self, uploads: list, contents: list[bytes]) -> None:
        """Refuse before decoding anything: file sizes, and the pixels each header declares (a few
        microseconds a header), per image and per request."""
        total = 0
        for upload, content in zip(uploads, contents):
            name = upload.filename or "upload"
            if len(content) > self.options.max_image_bytes:
                raise PayloadTooLarge(f"{name}: file of {len(content)} bytes exceeds the limit of "
                                      f"{self.options.max_image_bytes}")
            try:
                width, height = declared_pixels(content)
            except InvalidImage as error:
                raise InvalidImage(f"{name}: {error}") from None
            if width * height > self.options.max_image_pixels:
                raise PayloadTooLarge(f"{name}: image of {width}x{height} pixels exceeds the limit of "
                                      f"{self.options.max_image_pixels} pixels per image")
            total += width * height
        if total > self.options.max_request_pixels:
            raise PayloadTooLarge(f"{total} pixels in one upload exceed the limit of "
                                  f"{self.options.max_request_pixels}")

    async def decode(self, uploads: list, contents: list[bytes],
                     input_shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """`input_shape` (C, H, W): the model's, when not the one the decoder was made for."""
        self.check(uploads, contents)
        channels, size = (input_shape[0], tuple(input_shape[1:])) if input_shape else (self.channels, self.size)
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, decode_image, content, size, self.options.max_image_pixels,
                                     channels) for content in contents]
        images = []
        try:
            for upload, job in zip(uploads, jobs):
                try:
                    images.append(await job)
                except InvalidImage as error:
                    raise InvalidImage(f"{upload.filename or 'upload'}: {error}") from None
        finally:
            for job in jobs:
                job.cancel()  # the ones not started yet: no work for a refused request
        return np.stack(images)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
