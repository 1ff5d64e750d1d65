"""Triton Python-backend model `<model>_cascade`: the whole early-exit cascade in one call.

Copied as `model.py` into the cascade model's version directory. Beside it the
repository writer copies, verbatim, the files it imports (the stub cannot import the
project): `policy.py` and `normalisation.py` (serving's one implementation of the exit
policies and of the input normalisation), `manifest.py` (the manifest schema),
`triton_cascade.py` (this model's contract) and `onnxruntime_session.py` (the
session factory).

Triton's dynamic batcher hands `execute` several requests. Their images are run
together through the first segment; at every stage the samples that continue, from
all the requests of the batch, are run together through the next segment. Each
request has its own policy options (request parameters, as the gateway's);
thresholds come from its model's manifest (calibrated; `manifest.json` for the repository's first model,
`manifest.<model>.json` for the others), like the gateway's.

Modes (config parameter `mode`): `in_process` runs the segments' ONNX files with ONNX
Runtime here; `bls` sends every stage to the per-segment model with a BLS request
(`bls_memory` gpu, or auto where torch or cupy sees a GPU, keeps the activations on the
GPU via DLPack).

Where the manifest gives exit ensembles, every exit answers as its ensemble with the exits
before it (policy.ensemble_step), as in the gateway's cascade.

A stage whose manifest entry takes the image (`stage_input` "image": a composed cascade's
next network, export.compose) gets the continuing samples' normalised images again
instead of the previous stage's activations, as in the gateway.

`budget_ms` counts from when this model starts running the cascade for the batch that
holds the request (Triton's queueing before that and the network are not included);
the next stage's time is predicted from the manifest's profile (else from one warm-up
run at the first execution), then from a moving average of the stage times measured here.
"""

import json
import os
import time

import numpy as np
import policy
import triton_python_backend_utils as pb_utils
from manifest import read_manifest
from normalisation import normalise_uint8
from triton_cascade import BLS, IMAGES_INPUT, IN_PROCESS, MODES, NORMALISED_INPUT, PARAMETERS, cascaded_model


class StageError(RuntimeError):
    """A stage could not run (a failed BLS call): the requests of the batch fail."""


class InProcessStages:
    """The segments' ONNX files, one ONNX Runtime session each."""

    def __init__(self, repository, manifest, threads):
        from onnxruntime_session import create_session

        self.sessions, self.feeds, self.fetches = [], [], []
        for entry in manifest.exits:
            model = entry.segment_model
            path = os.path.join(repository, model.name, str(model.version), "model.onnx")
            if not os.path.exists(path):
                raise pb_utils.TritonModelException(f"{path} not found: mode {IN_PROCESS} needs the segments' "
                                                    f"ONNX files (use mode {BLS} with tensorrt segments)")
            self.sessions.append(create_session(path, threads, device="cpu"))
            self.feeds.append(model.inputs[0].name)
            self.fetches.append([spec.name for spec in model.outputs])

    def run(self, stage, inputs):
        """(logits as numpy, activations for the next stage or None)."""
        results = self.sessions[stage].run(self.fetches[stage], {self.feeds[stage]: inputs})
        return results[0], (results[1] if len(results) > 1 else None)

    @staticmethod
    def rows(stage, features, rows):
        """The continuing samples' activations, as stage `stage`'s input."""
        return features[rows]


class BlsStages:
    """Every stage a BLS request to the per-segment model (any backend)."""

    def __init__(self, manifest, memory):
        self.models = [entry.segment_model for entry in manifest.exits]
        self.device = _device_arrays(required=memory == "gpu") if memory in ("gpu", "auto") else None
        if self.device:
            self.preferred = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, 0)

    def run(self, stage, inputs):
        model = self.models[stage]
        tensor = inputs if isinstance(inputs, pb_utils.Tensor) else pb_utils.Tensor(model.inputs[0].name, inputs)
        outputs = [spec.name for spec in model.outputs]
        options = {"preferred_memory": self.preferred} if self.device else {}
        request = pb_utils.InferenceRequest(model_name=model.name, model_version=int(model.version),
                                            requested_output_names=outputs, inputs=[tensor], **options)
        response = request.exec()
        if response.has_error():
            raise StageError(f"{model.name}: {response.error().message()}")
        logits = self._numpy(pb_utils.get_output_tensor_by_name(response, outputs[0]))
        if len(outputs) == 1:
            return logits, None
        features = pb_utils.get_output_tensor_by_name(response, outputs[1])
        return logits, (features if self.device else features.as_numpy())

    def rows(self, stage, features, rows):
        """The continuing samples' activations, as stage `stage`'s input tensor."""
        name = self.models[stage].inputs[0].name
        if not self.device:
            return pb_utils.Tensor(name, features[rows])
        if features.is_cpu():
            return pb_utils.Tensor(name, features.as_numpy()[rows])
        return pb_utils.Tensor.from_dlpack(name, self.device.take(features.to_dlpack(), rows))

    def _numpy(self, tensor):
        if tensor.is_cpu():
            return tensor.as_numpy()
        return self.device.numpy(tensor.to_dlpack())


class _TorchArrays:
    def __init__(self, torch):
        self.torch = torch

    def take(self, capsule, rows):
        array = self.torch.from_dlpack(capsule)
        return array[self.torch.as_tensor(rows, device=array.device)].contiguous()

    def numpy(self, capsule):
        return self.torch.from_dlpack(capsule).cpu().numpy()


class _CupyArrays:
    def __init__(self, cupy):
        self.cupy = cupy

    def take(self, capsule, rows):
        return self.cupy.ascontiguousarray(self.cupy.from_dlpack(capsule)[self.cupy.asarray(rows)])

    def numpy(self, capsule):
        return self.cupy.asnumpy(self.cupy.from_dlpack(capsule))


def _device_arrays(required):
    """Row selection on the GPU (`bls_memory` gpu or auto): torch or cupy, whichever is installed
    with a GPU; None (stay on the CPU) for auto without them."""
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchArrays(torch)
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return _CupyArrays(cupy)
    except Exception:  # ImportError, or cupy without a usable GPU
        pass
    if required:
        raise pb_utils.TritonModelException("bls_memory gpu needs torch or cupy with a GPU in the Python "
                                            "backend's environment (rows are selected on the GPU via DLPack)")
    return None


class _Request:
    """One request of the batch: its images (normalised), options and answers."""

    def __init__(self, images, options, classes):
        count = len(images)
        self.images, self.options = images, options
        self.logits = np.zeros((count, classes), np.float32)
        self.exit_index = np.zeros(count, np.int32)
        self.confidence = np.zeros(count, np.float32)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        given = {name: value.get("string_value", "") for name, value in config.get("parameters", {}).items()}
        settings = {**PARAMETERS, **given}
        if settings["mode"] not in MODES:
            raise pb_utils.TritonModelException(f"parameter mode must be one of {', '.join(MODES)}, "
                                                f"not {settings['mode']!r}")
        repository = os.path.dirname(os.path.abspath(args["model_repository"]))
        # Its own model's manifest: manifest.json for the repository's first model, else manifest.<model>.json.
        self.manifest = read_manifest(repository, cascaded_model(args["model_name"]))
        self.plan = policy.exit_plan(self.manifest, float(settings["default_threshold"]))
        self.image_stages = self.manifest.image_stages  # stages that take the images again
        self.classes = len(self.manifest.classes)
        self.budget_margin = float(settings["budget_margin"])
        if settings["mode"] == IN_PROCESS:
            self.stages = InProcessStages(repository, self.manifest, int(settings["intra_op_threads"]))
        else:
            self.stages = BlsStages(self.manifest, settings["bls_memory"])
        # Predicted time of each stage (ms): the profile's batch-1 latency, then measured here.
        self.stage_ms = [entry.latency_ms.get("segment_model", {}).get("1") for entry in self.manifest.exits]
        self.warm = False

    # -- requests ------------------------------------------------------------
    def _images(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, IMAGES_INPUT)
        normalised = pb_utils.get_input_tensor_by_name(request, NORMALISED_INPUT)
        if (raw is None) == (normalised is None):
            raise policy.PolicyError(f"give exactly one of the inputs {IMAGES_INPUT!r} (UINT8 NHWC) and "
                                     f"{NORMALISED_INPUT!r} (FP32 NCHW, normalised)")
        if normalised is not None:
            images = normalised.as_numpy()
            if not np.isfinite(images).all():
                raise policy.PolicyError(f"input {NORMALISED_INPUT!r} contains NaN or Inf values")
            return np.ascontiguousarray(images, dtype=np.float32)
        return normalise_uint8(raw.as_numpy(), self.manifest.mean, self.manifest.std)

    def _parse(self, request):
        """A `_Request`, or the error response its inputs or parameters deserve."""
        try:
            parameters = json.loads(request.parameters() or "{}")
            chosen = {name: parameters[name] for name in policy.POLICY_PARAMETERS if name in parameters}
            options = policy.resolve_options(policy.options_from_parameters(chosen), self.plan)
            return _Request(self._images(request), options, self.classes)
        except policy.PolicyError as error:
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))

    def _warm_up(self):
        """One batch-1 run through every stage, timing the stages the profile left out (as the
        gateway's warm-up does); at the first execution, when the segment models are loaded."""
        shape = self.manifest.input.shape
        image = inputs = np.zeros((1, *shape), np.float32)
        for stage, estimate in enumerate(list(self.stage_ms)):
            if stage in self.image_stages:
                inputs = image
            started = time.monotonic()
            _, features = self.stages.run(stage, inputs)
            if estimate is None:
                self.stage_ms[stage] = (time.monotonic() - started) * 1000
            if features is not None:
                inputs = self.stages.rows(stage + 1, features, np.arange(1))
        self.warm = True

    def execute(self, requests):
        parsed = [self._parse(request) for request in requests]
        valid = [item for item in parsed if isinstance(item, _Request)]
        if valid:
            try:
                if not self.warm:
                    self._warm_up()
                started = time.monotonic()
                self._cascade(valid, started)
            except StageError as error:
                failure = pb_utils.TritonError(str(error), pb_utils.TritonError.UNAVAILABLE)
                return [item if not isinstance(item, _Request)
                        else pb_utils.InferenceResponse(output_tensors=[], error=failure) for item in parsed]
        return [item if not isinstance(item, _Request) else self._response(item) for item in parsed]

    # -- the cascade ---------------------------------------------------------
    def _cascade(self, batch, started):
        """Every sample of `batch` to its exit; the continuing ones re-batched at every stage."""
        owners = [np.arange(len(request.images)) for request in batch]  # per request: its samples still running
        inputs = np.concatenate([request.images for request in batch]) if len(batch) > 1 else batch[0].images
        images, origin = inputs, np.arange(len(inputs))  # origin: each running row's row in `images`
        last = len(self.plan.depths) - 1
        history = None  # exit ensembles: the running rows' log-probabilities at the exits they passed
        for stage in range(last + 1):
            stage_started = time.monotonic()
            logits, features = self.stages.run(stage, inputs)
            if self.plan.ensembles is not None:  # the exit answers as an ensemble (as the gateway's cascade)
                logits, history = policy.ensemble_step(self.plan.ensembles[stage], logits, history)
            now = time.monotonic()
            self._record_stage_time(stage, (now - stage_started) * 1000)
            probabilities = policy.softmax(logits.astype(np.float32, copy=False))  # as the gateway's cascade
            next_ms = None if stage == last else self._predicted_ms(stage + 1)
            keep, offset = [], 0
            for position, (request, samples) in enumerate(zip(batch, owners)):
                rows = np.arange(offset, offset + len(samples))
                offset += len(samples)
                scores = policy.confidence_scores(probabilities[rows], request.options.score)
                stop = policy.should_stop(stage, scores, request.options, self.plan,
                                          elapsed_ms=(now - started) * 1000, next_stage_ms=next_ms)
                done = samples[stop]
                request.logits[done] = logits[rows[stop]]
                request.exit_index[done] = stage
                request.confidence[done] = scores[stop]
                owners[position] = samples[~stop]
                keep.append(rows[~stop])
            continuing = np.concatenate(keep)
            if not len(continuing):
                return
            origin = origin[continuing]
            if history is not None:
                history = history[:, continuing]
            if stage + 1 in self.image_stages:  # the next network starts again from the images
                inputs = images[origin]
            else:
                inputs = self.stages.rows(stage + 1, features, continuing)

    def _record_stage_time(self, stage, milliseconds, alpha=0.1):
        previous = self.stage_ms[stage]
        self.stage_ms[stage] = milliseconds if previous is None else (1 - alpha) * previous + alpha * milliseconds

    def _predicted_ms(self, stage):
        estimate = self.stage_ms[stage]
        return None if estimate is None else estimate * self.budget_margin

    def _response(self, request):
        depths = np.asarray(self.plan.depths, np.int32)[request.exit_index]
        probabilities = policy.softmax(request.logits).astype(np.float32)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("logits", request.logits), pb_utils.Tensor("probabilities", probabilities),
            pb_utils.Tensor("exit_depth", depths), pb_utils.Tensor("confidence", request.confidence)])
