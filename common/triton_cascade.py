"""The `<model>_cascade` Triton model's contract: its name, tensors, modes and config
parameters, shared by the repository writer (export), the gateway's triton-cascade
backend (serving) and the model itself (export/triton_cascade_model.py, beside which
the writer copies this file verbatim). Stdlib only.

The model runs the whole early-exit cascade for a batch of requests inside Triton
and answers like the gateway: inputs and outputs are named and shaped as the
gateway's KServe v2 ones, and it takes the same request parameters.
"""

from __future__ import annotations

# Inputs (exactly one per request): raw images as the gateway takes them, normalised
# inside with the manifest's mean and std; or images already normalised (what the
# gateway's triton-cascade backend sends, having normalised them itself).
IMAGES_INPUT = "images"  # UINT8 [N, H, W, C]
NORMALISED_INPUT = "normalised_images"  # FP32 [N, C, H, W]
# Outputs, as the gateway's: per sample, of the exit it left at.
OUTPUTS = {"logits": "FP32", "probabilities": "FP32", "exit_depth": "INT32", "confidence": "FP32"}
LABELS_FILE = "labels.txt"  # class names, one a line: Triton's classification extension reads it

# Modes (config parameter `mode`): the segments' ONNX files run with ONNX Runtime inside
# the model (the CPU tritonserver of nvidia-pytriton), or every stage is a BLS call to
# the per-segment model (onnxruntime or tensorrt backend in a full Triton image).
IN_PROCESS, BLS = "in_process", "bls"
MODES = (IN_PROCESS, BLS)
# config.pbtxt `parameters` (string values) the model reads, with their defaults.
PARAMETERS = {
    "mode": IN_PROCESS,
    "default_threshold": "0.9",  # threshold of exits the manifest has none for (as the gateway's)
    "intra_op_threads": "1",  # ONNX Runtime threads per segment session (in_process)
    # cpu | gpu | auto: where BLS stage outputs stay; gpu (via DLPack) needs torch or cupy, auto
    # uses the GPU where one of them sees one
    "bls_memory": "cpu",
    "budget_margin": "1.1",  # predicted stage time is multiplied by this for the budget policy
}


def cascade_model_name(model: str) -> str:
    """Triton name of the model that runs the whole cascade of `model`."""
    return f"{model}_cascade"


def cascaded_model(cascade_model: str) -> str:
    """The early-exit model whose cascade the Triton model `cascade_model` runs (its manifest's name)."""
    suffix = cascade_model_name("")
    if not cascade_model.endswith(suffix) or cascade_model == suffix:
        raise ValueError(f"{cascade_model!r} is not the name of a cascade model (<model>{suffix})")
    return cascade_model[:-len(suffix)]
