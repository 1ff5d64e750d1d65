"""OpenAPI descriptions of the request bodies that the HTTP handlers read themselves
(they take the raw body, for speed and for the binary-tensor extension, so FastAPI
cannot infer them): schema-driven clients and fuzzers see what they may send."""

from __future__ import annotations

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES"]

_PARAMETERS = {
    "type": "object",
    "description": "KServe v2 parameters; the gateway reads policy (confidence, budget, fixed, full), score "
                   "(max_prob, margin, entropy), threshold (a number, or one per exit), budget_ms, exit_depth, "
                   "binary_data_output",
    "properties": {
        "policy": {"type": "string", "enum": ["confidence", "budget", "fixed", "full"]},
        "score": {"type": "string", "enum": ["max_prob", "margin", "entropy"]},
        "threshold": {"oneOf": [{"type": "number"}, {"type": "string"}]},
        "budget_ms": {"type": "number"},
        "exit_depth": {"type": "integer"},
        "binary_data_output": {"type": "boolean"},
    },
    "additionalProperties": True,
}

_INPUT = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "description": "images"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": DATATYPES},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array", "description": "the tensor's values, flat or nested, row-major"},
    },
}

_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "enum": ["logits", "probabilities", "exit_depth", "confidence"]},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"},
                                                        "classification": {"type": "integer", "minimum": 0}}},
    },
}

INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "inputs": {"type": "array", "items": _INPUT},
        "outputs": {"type": "array", "items": _OUTPUT},
    },
}

INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": INFER_REQUEST},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary",
                           "description": "the JSON request, then the binary tensors; header "
                                          "Inference-Header-Content-Length gives the JSON's length"}},
        },
    },
}

CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["files"],
                           "properties": {"files": {"type": "array",
                                                    "items": {"type": "string", "format": "binary"}}}}},
        },
    },
}
