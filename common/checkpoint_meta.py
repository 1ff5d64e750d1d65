"""Checkpoint metadata: what training writes beside the weights and export reads.

Stdlib only, so that training (which writes it) and export and benchmarks (which
read it) share one typed, versioned schema. On disk it is `<stem>.json` beside
`<stem>.safetensors`. Bump FORMAT_VERSION on any incompatible change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from common.errors import UserError
from common.manifest import read_json_object
from common.paths import DEFAULT_DATA

FORMAT_VERSION = 1
DEFAULT_INPUT_SIZE = (3, 32, 32)  # C, H, W of checkpoints written before the input size came from the data


class CheckpointMetaError(UserError):
    """Checkpoint metadata that is missing, unreadable or of another format version."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel statistics: the network takes (uint8 / 255 - mean) / std."""

    mean: list[float]
    std: list[float]
    scale: str = "uint8 / 255"


@dataclass(frozen=True)
class HeldoutSplit:
    """Training images carved out for calibration, rebuilt from `seed` and `size`."""

    seed: int
    size: int
    source: str | None = None  # the dataset trained on
    num_train: int | None = None  # images in its training split, held-out included


@dataclass(frozen=True)
class CheckpointExit:
    """One exit as measured when the checkpoint was written (cumulative cost)."""

    index: int
    depth: int
    params: int
    macs: int
    block: int | None = None
    standalone_macs: int | None = None


def served_macs(exits: list[CheckpointExit], indices) -> dict[int, int]:
    """MACs to reach each served exit (`indices`) through a cascade that computes only the served
    exits' heads: the exported segments leave an unserved exit's head out (its output is unused), so
    `CheckpointExit.macs`, which counts every earlier head, overcounts when exits are skipped.

    `macs - standalone_macs` of exit i is what the heads of exits 0..i-1 cost together, so the head
    of exit i costs the difference of that figure between exits i+1 and i. Exits without
    `standalone_macs` (older metadata) are taken as they are.
    """
    before = [e.macs - (e.macs if e.standalone_macs is None else e.standalone_macs) for e in exits]
    result, paid = {}, 0
    for index in sorted(indices):
        own = exits[index]
        alone = own.macs if own.standalone_macs is None else own.standalone_macs
        result[index] = own.macs if own.standalone_macs is None else alone + paid
        if index + 1 < len(exits):
            paid += before[index + 1] - before[index]
    return result


@dataclass(frozen=True)
class CheckpointMeta:
    model: str
    num_classes: int
    classes: list[str]
    input_size: list[int]  # C, H, W (C = 1 for grayscale, 3 for RGB); [3, 32, 32] where older metadata has none
    normalization: Normalization
    exits: list[CheckpointExit]
    heldout: HeldoutSplit
    training: dict = field(default_factory=dict)  # the recorded training configuration
    git_commit: str | None = None
    machine: str | None = None
    date: str | None = None
    epochs_completed: int | None = None
    epochs_planned: int | None = None
    heldout_acc: list[float] | None = None  # per exit
    extra: dict = field(default_factory=dict)  # any other top-level keys (averaged_from, ...)
    format_version: int = FORMAT_VERSION

    @property
    def model_kwargs(self) -> dict:
        """Keyword arguments of `create_model` beyond the name and class count."""
        return dict(self.training.get("model_kwargs") or {})

    def dataset_source(self, data: str | Path | None = None) -> Path:
        """The dataset to use: `data` if given, else the one trained on if it is here, else the default."""
        if data is not None:
            return Path(data)
        recorded = self.heldout.source
        return Path(recorded) if recorded and Path(recorded).exists() else DEFAULT_DATA

    def updated(self, **changes) -> CheckpointMeta:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The JSON form: the typed fields, then the extra keys, at the top level."""
        data = {"format_version": self.format_version}
        for item in fields(self):
            if item.name in ("format_version", "extra"):
                continue
            value = getattr(self, item.name)
            if item.name in ("epochs_completed", "epochs_planned", "heldout_acc") and value is None:
                continue
            data[item.name] = value
        data["normalization"] = asdict(self.normalization)
        data["heldout"] = _without_none(asdict(self.heldout))
        data["exits"] = [_without_none(asdict(entry)) for entry in self.exits]
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> CheckpointMeta:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointMetaError(f"checkpoint metadata format_version {version} is not the supported "
                                      f"{FORMAT_VERSION}")
        known = {item.name for item in fields(cls)} - {"extra"}
        try:
            values = {key: value for key, value in data.items() if key in known}
            values.setdefault("input_size", list(DEFAULT_INPUT_SIZE))
            values.update(normalization=Normalization(**data["normalization"]),
                          heldout=HeldoutSplit(**data["heldout"]),
                          exits=[CheckpointExit(**entry) for entry in data["exits"]])
            return cls(**values, extra={key: value for key, value in data.items() if key not in known})
        except KeyError as error:
            problem = f"no {error} field"
        except TypeError as error:
            problem = str(error)
        raise CheckpointMetaError(f"checkpoint metadata does not match format {FORMAT_VERSION}: {problem}")


def _without_none(data: dict) -> dict:
    return {key: value for key, value in data.items() if value is not None}


def metadata_path(checkpoint: str | Path) -> Path:
    """`<stem>.json` beside `<stem>.safetensors`."""
    return Path(checkpoint).with_suffix(".json")


def read_checkpoint_meta(checkpoint: str | Path) -> CheckpointMeta:
    """The metadata of `checkpoint` (the .safetensors path or the .json beside it)."""
    path = metadata_path(checkpoint)
    data = read_json_object(path, CheckpointMetaError, "checkpoint metadata")
    try:
        return CheckpointMeta.from_dict(data)
    except CheckpointMetaError as error:
        raise CheckpointMetaError(f"{path}: {error}") from None
