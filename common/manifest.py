"""The model-repository manifest: what export writes and the gateway reads.

Stdlib only, so that export (with torch) and serving (without) share one schema
and one set of naming rules. Bump SCHEMA_VERSION on any incompatible change.

Layout: a repository holds one manifest per early-exit model, as files at its
root (Triton ignores files there, and loads only directories as models):
`manifest.json` for the first model exported into it (a repository of one model
is laid out as it always was), and `manifest.<model>.json` for each further one
(`write_manifest` picks the file by the manifest's model name). `read_manifest`
without a model reads `manifest.json`; `list_manifests` finds them all, the
`manifest.json` one first (the gateway's default model). A model's version is the
newest Triton version its manifest points to (`manifest_version`): exporting the
model again adds numbered version directories and rewrites its manifest.

Stages: exit k's segment model (`segment_model`) is stage k of the cascade. A stage
takes what its exit's `stage_input` says: "previous" (the default; absent in the
JSON, so manifests written before the field existed read unchanged) is the previous
stage's boundary activations (`features` output), or the image for the first stage;
"image" is the request's normalised image again (input `images`, the manifest's
`input.shape`), so a cascade can chain networks that do not share activations: a
cheap student answers the easy images, and the full network starts again from the
image for the rest (`export.compose`). The stage before an "image" stage outputs
logits only, and `macs` of every exit after it counts the stages before it too (a
sample that reaches the full network has paid for the student).

Exit ensembles: `ensemble` of exit k (absent: the exit answers alone) is k + 1 non-negative
weights over the log-probabilities (log-softmax of the logits) of exits 0..k; the cascade answers
exit k with their weighted sum, so it carries each continuing sample's earlier log-probabilities
between stages (10 floats an exit for CIFAR-10). Either every exit has one or none does.
`benchmarks.calibrate` fits them on the held-out split.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_MANIFEST_PREFIX = "manifest."  # manifest.<model>.json: the manifests of further models

# Tensor names of the exported models.
IMAGE_INPUT = "images"  # per-exit models and the first segment: normalised NCHW float32
FEATURES_INPUT = "features_in"  # later segments: the previous segment's activations
LOGITS_OUTPUT = "logits"
FEATURES_OUTPUT = "features"  # activations the next segment takes

BACKENDS = ("onnxruntime", "python", "tensorrt")
# What a stage takes (ExitEntry.stage_input): the previous stage's activations, or the image.
PREVIOUS_STAGE, IMAGE_STAGE = "previous", "image"
STAGE_INPUTS = (PREVIOUS_STAGE, IMAGE_STAGE)


def exit_model_name(model: str, depth: int) -> str:
    """Triton name of the per-exit model (image -> logits of the exit at `depth`)."""
    return f"{model}_exit{depth}"


def segment_model_name(model: str, from_depth: int, to_depth: int) -> str:
    """Triton name of the segment from exit `from_depth` (0: the image) to exit `to_depth`.

    It takes the activations after `from_depth` and returns the logits of the exit
    at `to_depth` and the activations the next segment takes.
    """
    return f"{model}_seg{from_depth}to{to_depth}"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or of another schema version."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int]  # without the batch axis
    dtype: str = "FP32"  # Triton data type name


@dataclass(frozen=True)
class DeployedModel:
    """One Triton model: its name, version and tensors."""

    name: str
    version: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # Independent branches in the graph that may run at once (an anytime ensemble's members).
    parallel_branches: int = 1

    def output(self, name: str) -> TensorSpec:
        return next(spec for spec in self.outputs if spec.name == name)


@dataclass(frozen=True)
class ExitEntry:
    index: int
    depth: int
    params: int
    macs: int
    heldout_acc: float | None
    exit_model: DeployedModel | None  # None when this exit was not exported per exit
    segment_model: DeployedModel
    threshold: float | None = None  # filled by calibration
    # {"exit_model" | "segment_model": {batch size (str): milliseconds}}
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    # `macs` is what reaching this exit costs through the cascade (every earlier head
    # included); `standalone_macs` what the per-exit model costs alone (None: the same).
    standalone_macs: int | None = None
    # What this exit's segment takes: "previous" (the previous stage's activations; the image for
    # the first stage) or "image" (the request's normalised image again); see the module's docs.
    stage_input: str = PREVIOUS_STAGE
    # Weights over the log-probabilities of exits 0..index that this exit answers with (None: alone).
    ensemble: list[float] | None = None


@dataclass(frozen=True)
class Manifest:
    model: str
    classes: list[str]
    input: TensorSpec
    mean: list[float]
    std: list[float]
    backend: str
    max_batch_size: int
    exits: list[ExitEntry]
    source: dict = field(default_factory=dict)  # checkpoint, commit, date
    profile: dict = field(default_factory=dict)  # machine, date, provider of latency_ms
    calibration: dict = field(default_factory=dict)  # target and method of thresholds
    schema_version: int = SCHEMA_VERSION

    @property
    def exit_depths(self) -> list[int]:
        return [entry.depth for entry in self.exits]

    @property
    def full_macs(self) -> int:
        """MACs of the full network without early exits: the baseline MAC fractions divide by."""
        final = self.exits[-1]
        return final.macs if final.standalone_macs is None else final.standalone_macs

    @property
    def image_stages(self) -> frozenset[int]:
        """Positions of the stages after the first that take the image instead of the previous activations."""
        return frozenset(position for position, entry in enumerate(self.exits)
                         if position and entry.stage_input == IMAGE_STAGE)

    def exit_by_depth(self, depth: int) -> ExitEntry:
        for entry in self.exits:
            if entry.depth == depth:
                return entry
        raise KeyError(f"no exit at depth {depth}; available: {', '.join(map(str, self.exit_depths))}")

    def with_exits(self, exits: list[ExitEntry], **changes) -> Manifest:
        return replace(self, exits=exits, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry in data["exits"]:  # the default is left out: such manifests read as they always did
            if entry["stage_input"] == PREVIOUS_STAGE:
                del entry["stage_input"]
            if entry["ensemble"] is None:
                del entry["ensemble"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"manifest schema version {version} is not the supported {SCHEMA_VERSION}")
        try:
            exits = [
                ExitEntry(
                    **{
                        **entry,
                        "exit_model": _deployed(entry["exit_model"]) if entry.get("exit_model") else None,
                        "segment_model": _deployed(entry["segment_model"]),
                    }
                )
                for entry in data["exits"]
            ]
            fields = {k: v for k, v in data.items() if k not in ("exits", "input")}
            manifest = cls(**fields, input=TensorSpec(**data["input"]), exits=exits)
        except (KeyError, TypeError) as error:
            raise ManifestError(f"manifest does not match schema {SCHEMA_VERSION}: {error}") from None
        _check_stage_inputs(manifest)
        _check_ensembles(manifest)
        return manifest


def _check_ensembles(manifest: Manifest) -> None:
    """Every exit has ensemble weights or none does; exit k's are k + 1 finite non-negative numbers."""
    given = [entry.ensemble is not None for entry in manifest.exits]
    if not any(given):
        return
    if not all(given):
        raise ManifestError("exit ensembles: either every exit has `ensemble` weights or none does")
    for position, entry in enumerate(manifest.exits):
        weights = entry.ensemble
        if (not isinstance(weights, list) or len(weights) != position + 1
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                           for w in weights)):
            raise ManifestError(f"exit {entry.depth}: `ensemble` must be {position + 1} finite non-negative "
                                f"weights (exits 0..{position}), got {weights!r}")


def _check_stage_inputs(manifest: Manifest) -> None:
    """Every `stage_input` is known, and an image stage's segment takes the manifest's image."""
    for position, entry in enumerate(manifest.exits):
        if entry.stage_input not in STAGE_INPUTS:
            raise ManifestError(f"exit {entry.depth}: stage_input {entry.stage_input!r} is not one of "
                                f"{', '.join(STAGE_INPUTS)}")
        if entry.stage_input != IMAGE_STAGE:
            continue
        taken = entry.segment_model.inputs[0] if entry.segment_model.inputs else None
        if taken is None or taken.name != IMAGE_INPUT or list(taken.shape) != list(manifest.input.shape):
            raise ManifestError(f"exit {entry.depth}: an image stage's segment {entry.segment_model.name} must "
                                f"take {IMAGE_INPUT!r} of shape {manifest.input.shape}, not {taken}")
        if position and len(manifest.exits[position - 1].segment_model.outputs) > 1:
            raise ManifestError(f"exit {entry.depth} takes the image: the stage before it, "
                                f"{manifest.exits[position - 1].segment_model.name}, must output logits only")


def _deployed(data: dict) -> DeployedModel:
    return DeployedModel(
        name=data["name"],
        version=data["version"],
        inputs=[TensorSpec(**spec) for spec in data["inputs"]],
        outputs=[TensorSpec(**spec) for spec in data["outputs"]],
        parallel_branches=data.get("parallel_branches", 1),
    )


def read_json_object(path: Path, error: type[Exception], what: str) -> dict:
    """The JSON object in `path`; `error` with a one-line message if it is missing, invalid or not an object."""
    if not path.exists():
        raise error(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as problem:
        raise error(f"{what} {path} is not valid JSON: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} is not a JSON object")
    return data


def model_manifest_file(model: str) -> str:
    """File name of the manifest of a model that is not the repository's first."""
    return f"{MODEL_MANIFEST_PREFIX}{model}.json"


def manifest_version(manifest: Manifest) -> int:
    """The model's version: the newest Triton version among the models its manifest points to."""
    deployed = [entry.segment_model for entry in manifest.exits]
    deployed += [entry.exit_model for entry in manifest.exits if entry.exit_model is not None]
    return max((model.version for model in deployed), default=1)


def _root_model(repository: Path) -> str | None:
    """The model name in `manifest.json`, None if there is none (or it is unreadable)."""
    try:
        data = json.loads((repository / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str) else None


def manifest_path(repository: str | Path, model: str | None = None) -> Path:
    """Where the manifest of `model` is (or goes): `manifest.json` for the repository's first model
    (or when `model` is None), `manifest.<model>.json` for the others."""
    repository = Path(repository)
    if model is None or _root_model(repository) in (None, model):
        return repository / MANIFEST_FILE
    return repository / model_manifest_file(model)


def list_manifests(repository: str | Path) -> dict[str, Path]:
    """Every model's manifest file by model name, `manifest.json`'s model first, the others sorted.
    The names come from the file names (an unreadable `manifest.json` is listed as "")."""
    repository = Path(repository)
    found: dict[str, Path] = {}
    if (repository / MANIFEST_FILE).exists():
        found[_root_model(repository) or ""] = repository / MANIFEST_FILE
    for path in sorted(repository.glob(f"{MODEL_MANIFEST_PREFIX}*.json")):
        model = path.name[len(MODEL_MANIFEST_PREFIX):-len(".json")]
        if model and path.name != MANIFEST_FILE:
            found.setdefault(model, path)
    return found


def read_manifest_file(path: str | Path) -> Manifest:
    return Manifest.from_dict(read_json_object(Path(path), ManifestError, "manifest"))


def read_manifest(repository: str | Path, model: str | None = None) -> Manifest:
    """The manifest of `model` in `repository` (default: the first model's, `manifest.json`)."""
    path = manifest_path(repository, model)
    if not path.exists():
        what = MANIFEST_FILE if model is None else f"manifest of {model!r}"
        raise ManifestError(f"no {what} in {repository}: export a model there first")
    manifest = read_manifest_file(path)
    if model is not None and manifest.model != model:
        raise ManifestError(f"{path} is the manifest of {manifest.model!r}, not of {model!r}")
    return manifest


def write_manifest(repository: str | Path, manifest: Manifest) -> None:
    """Atomically replace the manifest of `manifest.model` (write a temporary file, then rename):
    `manifest.json` when the repository has none or it is this model's, else `manifest.<model>.json`."""
    path = manifest_path(repository, manifest.model)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    os.replace(temporary, path)
