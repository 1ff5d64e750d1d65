"""What the several-models tests share: a second tiny model's checkpoint, a repository holding two models,
fresh copies, inputs and the exported final exit's reference logits, one inference call."""

from __future__ import annotations

import shutil

import numpy as np

from common.manifest import read_manifest
from common.onnxruntime_session import create_session

from .conftest import export_tiny, save_tiny_checkpoint

MODEL = "mwresnet8_3"
SECOND = "tiny_b"


def make_checkpoint(imagefolder, path, seed: int):
    """A tiny mwresnet8_3 like conftest's tiny_checkpoint, with weights from another seed."""
    return save_tiny_checkpoint(imagefolder, path, MODEL, seed=seed)


def export(checkpoint, repository, model_name=None):
    return export_tiny(checkpoint, repository, model_name)


def fresh_copy(tiny_repository, tmp_path):
    repository = tmp_path / "model_repository"
    shutil.copytree(tiny_repository, repository)
    return repository


def images_for(repository, count=4, seed=3):
    shape = read_manifest(repository).input.shape
    return (np.random.default_rng(seed).standard_normal((count, *shape)) * 2).astype(np.float32)


def final_logits(repository, model, images, version=None):
    """The exported final exit's ONNX model on `images` (the manifest's version, or `version`)."""
    entry = read_manifest(repository, model).exits[-1].exit_model
    path = repository / entry.name / str(version or entry.version) / "model.onnx"
    return create_session(str(path)).run(None, {"images": images})[0]


def infer(module, client, model, images):
    tensor = module.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], parameters={"policy": "full"})


def metric_series(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page: (name, its labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def by_model(series: dict, name: str, **labels: str) -> dict[str, float]:
    """The samples of metric `name` that have `labels`, summed by their `model` label ("": none)."""
    totals: dict[str, float] = {}
    for (sample, found), value in series.items():
        found = dict(found)
        if sample == name and all(found.get(key) == wanted for key, wanted in labels.items()):
            totals[found.get("model", "")] = totals.get(found.get("model", ""), 0.0) + value
    return totals
