"""Every exit's logits on a dataset split, through the exported segments (ONNX Runtime).

What calibration and the offline sweep measure is what the gateway serves: the
same ONNX segment chain, the same normalisation. No torch needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.checkpoint_meta import CheckpointMeta, metadata_path, read_checkpoint_meta
from common.errors import UserError
from common.manifest import Manifest
from common.paths import REPO_ROOT
from serving.backends import OnnxRuntimeBackend
from serving.policy import confidence_scores, ensemble_step, softmax
from serving.preprocess import normalise_uint8
from training.datasets import heldout_split, load_split_for_model


@dataclass(frozen=True)
class ExitOutputs:
    logits: np.ndarray  # (exits, N, classes): each exit's own, as its segment outputs them
    labels: np.ndarray  # (N,)
    # Per exit, weights over the log-probabilities of exits 0..k (the manifest's `ensemble`), or None.
    ensembles: tuple | None = None

    def with_ensembles(self, ensembles) -> ExitOutputs:
        return replace(self, ensembles=None if ensembles is None else tuple(ensembles))

    def served(self) -> np.ndarray:
        """(exits, N, classes): what the cascade answers at each exit (an exit's ensemble where the
        manifest gives one, computed as the gateway does: `serving.policy.ensemble_step`)."""
        if self.ensembles is None:
            return self.logits
        answers, history = [], None
        for weights, logits in zip(self.ensembles, self.logits):
            combined, history = ensemble_step(np.asarray(weights, np.float32), logits, history)
            answers.append(combined)
        return np.stack(answers)

    def scores(self, score: str = "max_prob") -> np.ndarray:
        """Per-exit confidence as the gateway and the cascade model compute it (float32 softmax), so that
        a sample at a calibrated threshold takes the same exit offline as in serving."""
        return np.stack([confidence_scores(softmax(row.astype(np.float32)), score) for row in self.served()])

    def correct(self) -> np.ndarray:
        """(exits, N): the cascade's answer at each exit is right."""
        return self.served().argmax(axis=2) == self.labels[None, :]

    def own_correct(self) -> np.ndarray:
        """(exits, N): each exit alone is right (a per-exit model called directly: `fixed`, `full`)."""
        return self.logits.argmax(axis=2) == self.labels[None, :]

    def drop_correct(self) -> np.ndarray:
        """(exits + 1, N): `correct()` and, last, the final exit alone, which accuracy drops are measured
        against (the full network's own answer; with ensembles the cascade's final answer differs)."""
        return np.concatenate([self.correct(), self.own_correct()[-1:]])


def checkpoint_metadata(manifest: Manifest, checkpoint: Path | None = None) -> CheckpointMeta:
    path = metadata_path(checkpoint or manifest.source.get("checkpoint", ""))
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path  # the exporter records paths relative to where it ran: usually the repository
    if not path.exists():
        raise UserError(f"checkpoint metadata {path} not found (pass --checkpoint): it names the held-out split")
    return read_checkpoint_meta(path)


def load_images(manifest: Manifest, split: str, checkpoint: Path | None = None, data: Path | None = None,
                limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and labels of "heldout" (the checkpoint's) or "test"."""
    meta = checkpoint_metadata(manifest, checkpoint)
    source = meta.dataset_source(data)
    if split == "heldout":
        train = load_split_for_model(source, "train", manifest.input.shape)
        _, index = heldout_split(len(train), meta.heldout.size, meta.heldout.seed)
        images, labels = train.images[index], train.labels[index]
    elif split == "test":
        test = load_split_for_model(source, "test", manifest.input.shape)
        images, labels = test.images, test.labels
    else:
        raise UserError(f"unknown split {split!r}: use heldout or test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def compute_exit_outputs(repository: Path, manifest: Manifest, images: np.ndarray, labels: np.ndarray,
                         threads: int = 2, batch_size: int = 250, progress: bool = True) -> ExitOutputs:
    backend = OnnxRuntimeBackend(repository, manifest, intra_op_threads=threads)
    stages = len(manifest.exits)
    logits = np.zeros((stages, len(images), len(manifest.classes)), np.float32)
    for start in tqdm(range(0, len(images), batch_size), desc="exit outputs", disable=not progress):
        normalised = features = normalise_uint8(images[start:start + batch_size], manifest.mean, manifest.std)
        for stage in range(stages):  # a stage that takes the image (a composed cascade's) gets it again
            stage_logits, features = backend.run(stage, normalised if stage in backend.image_stages else features)
            logits[stage, start:start + len(stage_logits)] = stage_logits
    backend.close()
    ensembles = None if manifest.exits[0].ensemble is None else tuple(entry.ensemble for entry in manifest.exits)
    return ExitOutputs(logits, np.asarray(labels), ensembles)
