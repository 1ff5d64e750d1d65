"""Triton Python-backend model that runs the `model.onnx` beside it with ONNX Runtime.

Copied as `model.py` into every version directory of a `backend: "python"`
repository: the form that the CPU-only `tritonserver` of nvidia-pytriton can
load. Inputs and outputs are taken from the model's config.pbtxt. The session
comes from the project's one factory, `common/onnxruntime_session.py`, which the
repository writer copies verbatim beside this file (the stub imports it from there).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from onnxruntime_session import create_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_names = [spec["name"] for spec in config["input"]]
        self.output_names = [spec["name"] for spec in config["output"]]
        threads = int(config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "1"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = create_session(path, threads, device="cpu")

    def execute(self, requests):
        # Triton's dynamic batcher hands over several requests: run them as one batch.
        arrays = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        sizes = [len(inputs[self.input_names[0]]) for inputs in arrays]
        feed = {name: np.concatenate([inputs[name] for inputs in arrays]) for name in self.input_names}
        results = self.session.run(self.output_names, feed)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, result[start:start + size])
                       for name, result in zip(self.output_names, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
