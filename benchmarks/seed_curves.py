"""Accuracy against absolute MACs per image for several multi-exit networks, on one plot.

    nice -n 19 python -m benchmarks.seed_curves --output /tmp/seed-curves \\
        checkpoints/seeds/mwresnet20_3.safetensors checkpoints/seeds/mwresnet20_3_split2.safetensors

Each model (the reference checkpoint first, then every checkpoint given, then every
already exported manifest given) goes through the benchmark's offline sweep: a checkpoint
is exported (validated ONNX, python backend) into a temporary model repository, every
exit's outputs are computed through the exported segments with ONNX Runtime on the
checkpoint's held-out split and on the test split, thresholds are calibrated on held-out
for each target (accuracy drop against the final exit, mean-MACs budget as a fraction of
the network without its early exits) and measured on test, beside every fixed exit (its
per-exit model's MACs) and the oracle (each image at its first correct exit).

The output directory gets:
  curves.json          per model: name, checkpoint, manifest, params / MACs per exit, the
                       sweep's rows (with each cascade row's held-out accuracy and MACs)
  accuracy_vs_macs.png test accuracy against mean MMAC per image (log x unless --linear-x):
                       each model's cascade (drop targets and budgets, one line), its fixed
                       exits (triangles, dotted) and its oracle (star), one colour a model
  README.md            command, commit, machine, date and a table of the figures

A model is `PATH` or `LABEL=PATH` (the label names its curve; default: the checkpoint's
file name without suffix, or the manifest's model name). Anytime ensembles (`*_split<S>`),
DelugeNets and cheap-convolution students export like any other network; `--manifest`
adds a repository exported elsewhere (a composed cascade, for example): a manifest file, or
a repository directory for its `manifest.json`. Its held-out split is the one its source
checkpoint's metadata names.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.calibration import evaluate
from benchmarks.exit_outputs import compute_exit_outputs, load_images
from benchmarks.sweep import DEFAULT_BUDGETS, DEFAULT_DROPS_PT, offline_sweep
from common.errors import UserError, run_cli
from common.manifest import Manifest, ManifestError, read_manifest, read_manifest_file
from common.paths import DEFAULT_CHECKPOINT, REPO_ROOT
from common.provenance import git_commit, machine_description, utc_timestamp
from serving.policy import SCORES

CASCADE_KINDS = ("accuracy_drop", "compute_budget")


@dataclass(frozen=True)
class ModelSource:
    label: str
    path: Path
    kind: str  # "reference", "checkpoint" or "manifest"


def parse_model(text: str, kind: str) -> ModelSource:
    """`PATH` or `LABEL=PATH`; the default label is the checkpoint's stem (a manifest's: filled in later)."""
    label, separator, path = text.partition("=")
    if not separator or "/" in label:
        label, path = "", text
    if not path:
        raise UserError(f"empty path in {text!r}")
    if not Path(path).exists():
        raise UserError(f"{kind} not found: {path}")
    if not label and kind != "manifest":
        label = Path(path).name.removesuffix(".safetensors")
    return ModelSource(label, Path(path), kind)


def open_manifest(path: Path) -> tuple[Path, Manifest]:
    """(repository, manifest) of a manifest file or of a repository directory's `manifest.json`."""
    try:
        if path.is_dir():
            return path, read_manifest(path)
        return path.parent, read_manifest_file(path)
    except ManifestError as error:
        raise UserError(str(error)) from None


def export_to(checkpoint: Path, repository: Path, validation_images: int, log) -> Manifest:
    from export.pipeline import ExportOptions, export_checkpoint

    return export_checkpoint(ExportOptions(checkpoint=checkpoint.resolve(), output=repository,
                                           validation_images=validation_images), log=log)


def shown(path: str | Path | None) -> str | None:
    """A path as results files name it: relative to the repository when inside it."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def exit_table(manifest: Manifest) -> list[dict]:
    return [{"depth": e.depth, "params": e.params, "macs": e.macs, "standalone_macs": e.standalone_macs,
             "heldout_acc": e.heldout_acc} for e in manifest.exits]


def model_curve(source: ModelSource, repository: Path, manifest: Manifest, score: str, limit: int, threads: int,
                data: Path | None, drops_pt=DEFAULT_DROPS_PT, budgets=DEFAULT_BUDGETS, log=print) -> dict:
    """The offline sweep of one exported model, as one entry of curves.json."""
    checkpoint = source.path if source.kind != "manifest" else None
    outputs = {}
    for split in ("heldout", "test"):
        images, labels = load_images(manifest, split, checkpoint, data, limit)
        log(f"  {source.label}: every exit's outputs on {len(labels)} {split} images")
        outputs[split] = compute_exit_outputs(repository, manifest, images, labels, threads, progress=False)
    rows = offline_sweep(manifest, outputs["heldout"], outputs["test"], score, drops_pt, budgets)
    macs = np.asarray([entry.macs for entry in manifest.exits], np.float64)
    heldout_scores, heldout_correct = outputs["heldout"].scores(score), outputs["heldout"].correct()
    for row in rows:
        if row["kind"] in CASCADE_KINDS:  # what calibration saw: the targets hold here
            seen = evaluate(heldout_scores, heldout_correct, macs, row["thresholds"])
            row["heldout_acc"] = seen.accuracy
            row["heldout_macs_fraction"] = seen.mean_macs / manifest.full_macs
    return {"name": source.label, "kind": source.kind, "model": manifest.model,
            "checkpoint": shown(source.path if checkpoint else manifest.source.get("checkpoint")),
            "manifest": shown(source.path) if source.kind == "manifest" else None,
            "full_macs": manifest.full_macs, "exits": exit_table(manifest),
            "images": {"heldout": len(outputs["heldout"].labels), "test": len(outputs["test"].labels)},
            "rows": rows}


def named(sources: list[ModelSource]) -> list[ModelSource]:
    """Every source with its label (a manifest's model name by default); two of one name are an error."""
    labelled = [source if source.label else ModelSource(open_manifest(source.path)[1].model, source.path, source.kind)
                for source in sources]
    names = [source.label for source in labelled]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"two models are named {', '.join(duplicates)}: name them with LABEL=PATH")
    return labelled


def collect(sources: list[ModelSource], score: str = "max_prob", limit: int = 0, threads: int = 2,
            data: Path | None = None, validation_images: int = 250, log=print) -> list[dict]:
    """Every model's curve; checkpoints are exported into temporary repositories, removed after."""
    curves = []
    for source in named(sources):
        if source.kind == "manifest":
            repository, manifest = open_manifest(source.path)
            log(f"{source.label}: exported repository {repository}")
            curves.append(model_curve(source, repository, manifest, score, limit, threads, data, log=log))
            continue
        with tempfile.TemporaryDirectory(prefix="seed-curves-") as directory:
            repository = Path(directory) / "model_repository"
            log(f"{source.label}: exporting {source.path}")
            manifest = export_to(source.path, repository, validation_images, lambda message: None)
            curves.append(model_curve(source, repository, manifest, score, limit, threads, data, log=log))
    return curves


def cascade_rows(curve: dict) -> list[dict]:
    return sorted((r for r in curve["rows"] if r["kind"] in CASCADE_KINDS), key=lambda r: r["mean_macs"])


def plot_curves(curves: list[dict], path: Path, log_x: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = plt.get_cmap("tab10")
    for index, curve in enumerate(curves):
        colour = colours(index % 10)
        rows = cascade_rows(curve)
        ax.plot([r["mean_macs"] / 1e6 for r in rows], [r["test_acc"] * 100 for r in rows], "o-", color=colour,
                markersize=4, zorder=3, label=f"{curve['name']}: early-exit cascade")
        fixed = sorted((r for r in curve["rows"] if r["kind"] == "fixed_exit"), key=lambda r: r["mean_macs"])
        ax.plot([r["mean_macs"] / 1e6 for r in fixed], [r["test_acc"] * 100 for r in fixed], "^:", color=colour,
                markersize=7, label=f"{curve['name']}: fixed exits")
        for r in fixed:
            ax.annotate(str(r["target"]), (r["mean_macs"] / 1e6, r["test_acc"] * 100), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=colour)
        oracle = next(r for r in curve["rows"] if r["kind"] == "oracle")
        ax.plot([oracle["mean_macs"] / 1e6], [oracle["test_acc"] * 100], "*", color=colour, markersize=11,
                markeredgecolor="k", markeredgewidth=0.5)
    ax.plot([], [], "*", color="0.5", markersize=11, markeredgecolor="k", markeredgewidth=0.5,
            label="oracle (first correct exit), per model")
    if log_x:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="both", labelsize=8)
    ax.set_xlabel("mean MMAC per image" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs compute, thresholds calibrated on held-out, measured on test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}"


def render_readme(result: dict) -> str:
    lines = ["# Seed networks' accuracy-vs-MACs curves", "",
             f"Made by `{result['command']}` at commit `{result['commit']}` on {result['machine']}, "
             f"{result['date']}.", "",
             f"Each model: checkpoint exported to ONNX (validated against PyTorch), every exit's outputs through "
             f"the exported segments (ONNX Runtime), thresholds calibrated on the checkpoint's held-out split "
             f"(score `{result['score']}`) for accuracy-drop targets {result['drops_pt']} points and MACs budgets "
             f"{result['budgets']} (fractions of the model's network without early exits), measured once on the "
             f"test split. "
             f"Fixed exits cost their per-exit model's MACs; the oracle sends each image to its first correct "
             f"exit." + (f" Only the first {result['limit']} images of each split." if result["limit"] else ""),
             "", "![accuracy vs MACs](accuracy_vs_macs.png)", "",
             "| model | exit depths | params per exit (M) | MMAC per exit | fixed exits' test acc (%) | "
             "cascade at 0.5 pt drop: test acc (%) / MMAC | oracle: test acc (%) / MMAC | test images |",
             "|---|---|---|---|---|---|---|---:|"]
    for curve in result["models"]:
        exits = curve["exits"]
        fixed = {r["target"]: r for r in curve["rows"] if r["kind"] == "fixed_exit"}
        half = next((r for r in curve["rows"] if r["kind"] == "accuracy_drop" and r["target"] == 0.5), None)
        oracle = next(r for r in curve["rows"] if r["kind"] == "oracle")
        params = " / ".join(f"{e['params'] / 1e6:.3f}" for e in exits)
        macs = " / ".join(f"{e['macs'] / 1e6:.1f}" for e in exits)
        lines.append(
            f"| `{curve['name']}` | {' / '.join(str(e['depth']) for e in exits)} | {params} | {macs} | "
            f"{' / '.join(_pct(fixed[e['depth']]['test_acc']) for e in exits)} | "
            + (f"{_pct(half['test_acc'])} / {half['mean_macs'] / 1e6:.1f} | " if half else "n/a | ")
            + f"{_pct(oracle['test_acc'])} / {oracle['mean_macs'] / 1e6:.1f} | {curve['images']['test']} |")
    lines += ["", "Every row of every model's sweep (test accuracy, mean MACs, exit shares, thresholds, and each "
              "cascade row's held-out accuracy and MACs) is in `curves.json`.", ""]
    return "\n".join(lines)


def run(sources: list[ModelSource], output: Path, command: str, score: str = "max_prob", limit: int = 0,
        threads: int = 2, data: Path | None = None, validation_images: int = 250, log_x: bool = True,
        log=print) -> dict:
    curves = collect(sources, score, limit, threads, data, validation_images, log)
    result = {"command": command, "commit": git_commit(), "machine": machine_description(), "date": utc_timestamp(),
              "score": score, "limit": limit, "drops_pt": list(DEFAULT_DROPS_PT), "budgets": list(DEFAULT_BUDGETS),
              "models": curves}
    output.mkdir(parents=True, exist_ok=True)
    (output / "curves.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_curves(curves, output / "accuracy_vs_macs.png", log_x)
    (output / "README.md").write_text(render_readme(result))
    log(f"wrote curves.json, accuracy_vs_macs.png and README.md to {output}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seed_curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", metavar="[LABEL=]CHECKPOINT",
                        help="trained checkpoints (.safetensors beside their .json metadata)")
    parser.add_argument("--manifest", action="append", default=[], metavar="[LABEL=]PATH",
                        help="an exported model: its manifest file, or a repository directory (its manifest.json); "
                             "repeatable")
    parser.add_argument("--reference", default=str(DEFAULT_CHECKPOINT), metavar="[LABEL=]CHECKPOINT",
                        help="the reference checkpoint, drawn first (default: %(default)s)")
    parser.add_argument("--no-reference", action="store_true", help="leave the reference out")
    parser.add_argument("--output", type=Path, required=True, help="directory for curves.json, the plot, README.md")
    parser.add_argument("--score", choices=SCORES, default="max_prob", help="confidence score (default max_prob)")
    parser.add_argument("--limit", type=int, default=0,
                        help="only the first N held-out and N test images (default 0: all; for quick looks)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: each checkpoint's own)")
    parser.add_argument("--validation-images", type=int, default=250,
                        help="held-out images each export is validated on against PyTorch (default 250)")
    parser.add_argument("--linear-x", action="store_true", help="linear MACs axis instead of log")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.threads < 1 or args.validation_images < 1:
        raise UserError("--limit must be 0 or more, --threads and --validation-images positive")
    sources = [] if args.no_reference else [parse_model(args.reference, "reference")]
    sources += [parse_model(text, "checkpoint") for text in args.checkpoints]
    sources += [parse_model(text, "manifest") for text in args.manifest]
    if not sources:
        raise UserError("nothing to plot: give checkpoints, --manifest, or keep the reference")
    sources = named(sources)  # before any export: a clash is found at once
    command = "python -m benchmarks.seed_curves " + " ".join(sys.argv[1:] if argv is None else argv)
    run(sources, args.output, command, args.score, args.limit, args.threads, args.data, args.validation_images,
        not args.linear_x)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
