"""Write validated models as a Triton model repository, atomically.

The new repository is built in a staging directory beside the target (existing
versions are hard-linked in, never rewritten), then swapped in with one rename.
A crash before the swap leaves the previous repository as it was. Without
`force`, a model that already exists gets a new version directory, so a server
that loaded the old version keeps a consistent copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from common import manifest as manifest_module
from common import onnxruntime_session, triton_cascade
from common.checkpoint_meta import CheckpointMeta, served_macs
from common.manifest import (
    IMAGE_INPUT,
    IMAGE_STAGE,
    MANIFEST_FILE,
    MODEL_MANIFEST_PREFIX,
    PREVIOUS_STAGE,
    DeployedModel,
    ExitEntry,
    Manifest,
    TensorSpec,
    exit_model_name,
    segment_model_name,
    write_manifest,
)
from common.paths import REPO_ROOT
from common.provenance import utc_timestamp
from common.triton_cascade import BLS, IN_PROCESS, LABELS_FILE, cascade_model_name
from export.onnx_export import ExportedModel
from export.triton_config import BatchingConfig, cascade_model_config, model_config, model_file_name

PYTHON_MODEL_TEMPLATE = Path(__file__).with_name("triton_python_model.py")
# model.py imports the session factory from beside it: copied verbatim, never reimplemented.
PYTHON_MODEL_FILES = {"model.py": PYTHON_MODEL_TEMPLATE, "onnxruntime_session.py": Path(onnxruntime_session.__file__)}
# The `<model>_cascade` model's files: its model.py and, copied verbatim (read as files,
# not imported: export never imports serving), the one implementation of each thing it
# shares with the gateway and the exporter.
CASCADE_MODEL_FILES = {
    "model.py": Path(__file__).with_name("triton_cascade_model.py"),
    "policy.py": REPO_ROOT / "serving" / "policy.py",
    "normalisation.py": REPO_ROOT / "serving" / "normalisation.py",
    "manifest.py": Path(manifest_module.__file__),
    "triton_cascade.py": Path(triton_cascade.__file__),
    "onnxruntime_session.py": Path(onnxruntime_session.__file__),
}
# Builds a TensorRT plan from ONNX bytes, the model's input spec and its name
# (export.tensorrt_build.TensorRTPlanBuilder is the real one; tests pass a stand-in).
PlanBuilder = Callable[[bytes, TensorSpec, str], bytes]


def _write_file(path: Path, data: bytes) -> None:
    """Replace `path` by rename: a hard-linked original is never modified in place."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _next_version(model_dir: Path) -> int:
    if not model_dir.exists():
        return 1
    return max((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), default=0) + 1


def _swap_directories(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; atomic on Linux (renameat2 RENAME_EXCHANGE)."""
    if not target.exists():
        os.rename(staging, target)
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(staging), at_fdcwd, os.fsencode(target),
                                           rename_exchange) == 0:
        shutil.rmtree(staging)  # now holds the previous repository
        return
    backup = target.with_name(f".{target.name}.previous-{os.getpid()}")
    os.rename(target, backup)
    os.rename(staging, target)
    shutil.rmtree(backup)


def _clean_stale_staging(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def _is_manifest(file_name: str) -> bool:
    """`manifest.json` or a further model's `manifest.<model>.json` (see common.manifest)."""
    return file_name == MANIFEST_FILE or (file_name.startswith(MODEL_MANIFEST_PREFIX) and file_name.endswith(".json"))


def _prepare_staging(target: Path, force: bool) -> Path:
    _clean_stale_staging(target)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    if target.exists() and not force:
        shutil.copytree(target, staging, copy_function=os.link, symlinks=True)
    else:
        staging.mkdir(parents=True)
        if target.exists():  # --force: keep the repository's own files (README), drop models
            for item in target.iterdir():
                if item.is_file() and not _is_manifest(item.name):
                    os.link(item, staging / item.name)
    return staging


def _write_model(staging: Path, name: str, backend: str, exported: ExportedModel, batching: BatchingConfig,
                 plan_builder: PlanBuilder | None) -> DeployedModel:
    model_dir = staging / name
    model_dir.mkdir(exist_ok=True)
    version = _next_version(model_dir)
    version_dir = model_dir / str(version)
    version_dir.mkdir()
    if backend == "tensorrt":
        if plan_builder is None:
            raise ValueError("the tensorrt backend needs a plan builder")
        _write_file(version_dir / model_file_name(backend), plan_builder(exported.onnx_bytes, exported.inputs[0], name))
    else:
        _write_file(version_dir / "model.onnx", exported.onnx_bytes)
        if backend == "python":
            for file_name, source in PYTHON_MODEL_FILES.items():
                _write_file(version_dir / file_name, source.read_bytes())
    config = model_config(name, backend, exported.inputs, exported.outputs, batching)
    _write_file(model_dir / "config.pbtxt", config.encode())
    return DeployedModel(name, version, exported.inputs, exported.outputs, exported.parallel_branches)


def _cascade_configs(backend: str) -> dict[str, dict[str, str]]:
    """Parameters of each mode's config of the cascade model; the first is config.pbtxt."""
    bls = {"mode": BLS, "bls_memory": "cpu" if backend == "python" else "auto"}
    in_process = {"mode": IN_PROCESS, "intra_op_threads": "1"}
    if backend == "tensorrt":  # no ONNX files to run in the model
        return {BLS: bls}
    return {IN_PROCESS: in_process, BLS: bls} if backend == "python" else {BLS: bls, IN_PROCESS: in_process}


def _write_cascade_model(staging: Path, model: str, backend: str, input_shape: list[int], classes: list[str],
                         batching: BatchingConfig) -> None:
    """`<model>_cascade`: config.pbtxt in the mode that suits `backend` (in_process for python,
    bls for the full image's onnxruntime and tensorrt), and every mode's config under
    configs/ (`tritonserver --model-config-name=bls` picks one)."""
    model_dir = staging / cascade_model_name(model)
    version_dir = model_dir / str(_next_version(model_dir))
    (model_dir / "configs").mkdir(parents=True, exist_ok=True)
    version_dir.mkdir()
    for file_name, source in CASCADE_MODEL_FILES.items():
        _write_file(version_dir / file_name, source.read_bytes())
    _write_file(model_dir / LABELS_FILE, "".join(f"{label}\n" for label in classes).encode())
    configs = {mode: cascade_model_config(model_dir.name, input_shape, len(classes), batching, parameters)
               for mode, parameters in _cascade_configs(backend).items()}
    for mode, text in configs.items():
        _write_file(model_dir / "configs" / f"{mode}.pbtxt", text.encode())
    _write_file(model_dir / "config.pbtxt", next(iter(configs.values())).encode())


def write_repository(
    target: Path,
    exported: list[ExportedModel],
    checkpoint_meta: CheckpointMeta,
    backend: str = "python",
    batching: BatchingConfig | None = None,
    force: bool = False,
    source: dict | None = None,
    plan_builder: PlanBuilder | None = None,
    progress: Callable[[str], None] = lambda message: None,
    model_name: str | None = None,
) -> Manifest:
    """Lay out `exported` models under `target` with a manifest; returns the manifest.

    `model_name` (default: the checkpoint's registry name) names the model and its Triton models.
    Models of other names already in the repository stay (their manifests too): the first model's
    manifest is `manifest.json`, each further one's `manifest.<model>.json` (common.manifest). Without
    `force`, exporting a model that is already there adds a new version of it; with `force`, the
    repository holds only this model afterwards."""
    batching = batching or BatchingConfig()
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _prepare_staging(target, force)
    try:
        model_name = model_name or checkpoint_meta.model
        exits_meta = checkpoint_meta.exits
        heldout_acc = checkpoint_meta.heldout_acc or [None] * len(exits_meta)
        exit_models, segment_models = {}, {}
        segments = sorted((m for m in exported if m.kind == "segment"), key=lambda m: m.exit_index)
        previous_depth = 0
        # A later segment whose input is the image (a composed cascade's next network) is an image stage.
        stage_inputs = {item.exit_index: IMAGE_STAGE if position and item.inputs[0].name == IMAGE_INPUT
                        else PREVIOUS_STAGE for position, item in enumerate(segments)}
        for item in segments:
            depth = exits_meta[item.exit_index].depth
            name = segment_model_name(model_name, previous_depth, depth)
            progress(f"writing {name}")
            segment_models[item.exit_index] = _write_model(staging, name, backend, item, batching, plan_builder)
            previous_depth = depth
        for item in (m for m in exported if m.kind == "exit"):
            name = exit_model_name(model_name, exits_meta[item.exit_index].depth)
            progress(f"writing {name}")
            exit_models[item.exit_index] = _write_model(staging, name, backend, item, batching, plan_builder)
        through = served_macs(exits_meta, segment_models)  # the skipped exits' heads are not run
        entries = [
            ExitEntry(index=index, depth=exits_meta[index].depth, params=exits_meta[index].params,
                      macs=through[index], standalone_macs=exits_meta[index].standalone_macs,
                      heldout_acc=heldout_acc[index],
                      exit_model=exit_models.get(index), segment_model=segment_models[index],
                      stage_input=stage_inputs[index])
            for index in sorted(segment_models)
        ]
        progress(f"writing {cascade_model_name(model_name)}")
        _write_cascade_model(staging, model_name, backend, list(checkpoint_meta.input_size),
                             list(checkpoint_meta.classes), batching)
        norm = checkpoint_meta.normalization
        manifest = Manifest(
            model=model_name, classes=list(checkpoint_meta.classes),
            input=TensorSpec("images", list(checkpoint_meta.input_size)),
            mean=list(norm.mean), std=list(norm.std), backend=backend,
            max_batch_size=batching.max_batch_size, exits=entries,
            source={**(source or {}), "exported": utc_timestamp()},
        )
        write_manifest(staging, manifest)
        _swap_directories(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
