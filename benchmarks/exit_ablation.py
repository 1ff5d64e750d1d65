"""Compare checkpoints' exits as a cascade: per-exit accuracy and mean MACs at an accuracy-drop target.

    python -m benchmarks.exit_ablation checkpoints/mwresnet56_5.safetensors \\
        checkpoints/experiments/heads/c2-kd.safetensors --output checkpoints/experiments/heads/ablation
    python -m benchmarks.exit_ablation ... --test     # test figures: once, for the final choice

Choosing uses the held-out split only: thresholds are calibrated on one half of it and
measured on the other, both ways round (2-fold), so the figures are honest estimates of
what calibrating on held-out data gives on new data. With `--test`, thresholds are also
calibrated on the whole held-out split and measured on the test split, as the benchmark
does. Each checkpoint can also be measured with per-exit temperatures (`temperature`), with
a geometric ensemble of each exit with every earlier one (`ensemble`) or with the one just
before it (`pair`), weights fitted on the calibration half (an offline measurement: serving
`ensemble` needs the earlier exits' log-probabilities carried between stages; `pair` could
recompute the previous head from the segment's input). Logits come from PyTorch in float32.

A candidate may also be a composed cascade as `export.compose` builds it: stages joined by `+`,
each a checkpoint with, after a colon, the exit depths it serves, cheapest network first:

    python -m benchmarks.exit_ablation \
        "checkpoints/mwresnet20_3.safetensors+checkpoints/mwresnet56_5.safetensors:45,56" ...

Its exits cost what the served exits cost through the cascade (a skipped exit's head is not
run; a later network's exits add the earlier networks' served prefix), and its drop and MACs
are measured against the last network's final exit alone, as the composed manifest does.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.calibration import (
    DROP_MEASURES,
    drop_correctness,
    evaluate,
    oracle,
    pick_accuracy_drop,
    threshold_frontier,
)
from common.errors import UserError, run_cli
from common.provenance import git_commit, machine_description, utc_timestamp
from training.checkpoint import load_checkpoint
from training.datasets import heldout_split, load_split_for_model
from training.temperature import exit_logits, fit_temperature


@dataclass(frozen=True)
class Logits:
    heldout: np.ndarray  # (exits, N, classes)
    heldout_labels: np.ndarray
    test: np.ndarray | None
    test_labels: np.ndarray | None
    macs: np.ndarray  # through the cascade, per exit
    full_macs: float  # the network without early heads


@functools.lru_cache(maxsize=8)  # composed candidates share their networks: run each once
def checkpoint_logits(path: Path, with_test: bool) -> Logits:
    model, meta = load_checkpoint(path)
    train = load_split_for_model(meta.dataset_source(), "train", meta.input_size)
    _, heldout_idx = heldout_split(len(train), meta.heldout.size, meta.heldout.seed)
    norm = meta.normalization

    def logits_of(images) -> np.ndarray:
        return torch.stack(exit_logits(model, images, norm.mean, norm.std)).double().numpy()

    test = load_split_for_model(meta.dataset_source(), "test", meta.input_size) if with_test else None
    final = meta.exits[-1]
    return Logits(logits_of(train.images[heldout_idx]), train.labels[heldout_idx],
                  logits_of(test.images) if test else None, test.labels if test else None,
                  np.array([e.macs for e in meta.exits], np.float64), float(final.standalone_macs or final.macs))


def candidate_logits(text: str, with_test: bool) -> Logits:
    """Logits of one checkpoint, or of a composed cascade `A[:depths]+B[:depths]+...`."""
    from common.checkpoint_meta import read_checkpoint_meta, served_macs
    from export.compose import parse_stage
    from export.pipeline import parse_exit_depths

    if "+" not in text:
        return checkpoint_logits(Path(text), with_test)
    parts = []
    macs_before = 0.0
    for spec in (parse_stage(part) for part in text.split("+")):
        meta = read_checkpoint_meta(spec.checkpoint)
        depths = parse_exit_depths(spec.exits, [e.depth for e in meta.exits])
        indices = [i for i, e in enumerate(meta.exits) if e.depth in depths]
        own = checkpoint_logits(spec.checkpoint, with_test)
        through = served_macs(meta.exits, indices)
        parts.append((own, indices, np.array([macs_before + through[i] for i in indices], np.float64)))
        macs_before += through[indices[-1]]
    first = parts[0][0]
    for own, _, _ in parts[1:]:
        if not np.array_equal(own.heldout_labels, first.heldout_labels):
            raise UserError(f"{text}: the stages' held-out splits differ (they must share seed and size)")

    def stacked(field: str):
        return None if getattr(first, field) is None else np.concatenate(
            [getattr(own, field)[indices] for own, indices, _ in parts])
    return Logits(stacked("heldout"), first.heldout_labels, stacked("test"), first.test_labels,
                  np.concatenate([macs for _, _, macs in parts]), parts[-1][0].full_macs)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def fit_ensemble(log_probs: np.ndarray, labels: np.ndarray, span: int | None = None) -> list[np.ndarray]:
    """Per exit k, non-negative weights over exits 0..k (the last `span` of them only, if given; the
    others weigh 0) of log-probabilities, minimising held-out NLL."""
    weights = []
    target = torch.as_tensor(labels).long()
    for k in range(len(log_probs)):
        first = 0 if span is None else max(0, k + 1 - span)
        inputs = torch.as_tensor(log_probs[first: k + 1])
        raw = torch.full((k + 1 - first,), -4.0, dtype=torch.float64)
        raw[-1] = 0.55  # softplus(0.55) ~ 1: start from the exit alone
        raw.requires_grad_(True)
        optimizer = torch.optim.LBFGS([raw], max_iter=100, line_search_fn="strong_wolfe")

        def closure(inputs=inputs, raw=raw, optimizer=optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy((F.softplus(raw)[:, None, None] * inputs).sum(0), target)
            loss.backward()
            return loss

        optimizer.step(closure)
        weights.append(np.concatenate([np.zeros(first), F.softplus(raw).detach().numpy()]))
    return weights


def apply_ensemble(log_probs: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    return np.stack([(w[:, None, None] * log_probs[: len(w)]).sum(0) for w in weights])


def transform(fit_logits: np.ndarray, fit_labels: np.ndarray, mode: str):
    """A function of logits fitted on (fit_logits, fit_labels): identity, temperatures, or ensemble."""
    if mode == "plain":
        return lambda logits: logits
    temperatures = np.array([fit_temperature(torch.as_tensor(z), torch.as_tensor(fit_labels)) for z in fit_logits])
    temperatures[-1] = 1.0  # the final exit stays as it is
    scaled = lambda logits: logits / temperatures[:, None, None]  # noqa: E731
    if mode == "temperature":
        return scaled
    weights = fit_ensemble(log_softmax(scaled(fit_logits)), fit_labels, span=2 if mode == "pair" else None)
    return lambda logits: apply_ensemble(log_softmax(scaled(logits)), weights)


def cascade(fit: tuple[np.ndarray, np.ndarray], measure: tuple[np.ndarray, np.ndarray], macs: np.ndarray,
            full_macs: float, mode: str, max_drop: float, margin: float = 0.0, drop_measure: str = "net") -> dict:
    """Calibrate on `fit`, measure on `measure`; the drop is against the plain final exit (the target
    bounds it as `drop_measure` says; the figures returned are net drops)."""
    function = transform(*fit, mode)
    fit_logits, fit_labels = function(fit[0]), fit[1]
    measure_logits, measure_labels = function(measure[0]), measure[1]
    probabilities = np.exp(log_softmax(fit_logits))
    # The drop is against the plain final exit: its correctness is the last row.
    fit_correct = np.concatenate([probabilities.argmax(-1) == fit_labels, (fit[0][-1:].argmax(-1) == fit_labels)])
    fit_correct = drop_correctness(fit_correct, drop_measure)
    frontier = threshold_frontier(probabilities.max(-1), fit_correct[:-1], macs)
    thresholds = pick_accuracy_drop(frontier, fit_correct, max_drop, margin)
    measured = np.exp(log_softmax(measure_logits))
    correct = measured.argmax(-1) == measure_labels
    outcome = evaluate(measured.max(-1), correct, macs, thresholds)
    final = (measure[0][-1].argmax(-1) == measure_labels).mean()
    return {"acc": outcome.accuracy, "drop_pt": (final - outcome.accuracy) * 100,
            "macs_fraction": outcome.mean_macs / full_macs,
            "oracle_macs_fraction": oracle(correct, macs).mean_macs / full_macs,
            "exit_acc": correct.mean(axis=1).tolist(), "thresholds": thresholds.tolist()}


def two_fold(logits: Logits, mode: str, max_drop: float, margin: float = 0.0, seed: int = 0,
             measure: str = "net", repeats: int = 1) -> dict:
    """Calibrate on one half of the held-out split, measure on the other, both ways; averaged over
    `repeats` random halvings (seeds seed, seed + 1, ...); `drop_pt_sd`: the spread of the folds' drops."""
    results = []
    for repeat in range(repeats):
        order = np.random.default_rng(seed + repeat).permutation(len(logits.heldout_labels))
        halves = [order[: len(order) // 2], order[len(order) // 2:]]
        results += [cascade((logits.heldout[:, a], logits.heldout_labels[a]), (logits.heldout[:, b],
                            logits.heldout_labels[b]), logits.macs, logits.full_macs, mode, max_drop, margin,
                            measure) for a, b in (halves, halves[::-1])]
    summary = {key: float(np.mean([r[key] for r in results]))
               for key in ("acc", "drop_pt", "macs_fraction", "oracle_macs_fraction")}
    summary["drop_pt_sd"] = float(np.std([r["drop_pt"] for r in results], ddof=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exit_ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+",
                        help="checkpoints (.safetensors), or composed cascades A[:depths]+B[:depths]")
    parser.add_argument("--max-drop", type=float, default=0.5, help="accuracy-drop target in points (default 0.5)")
    parser.add_argument("--modes", default="plain,temperature,ensemble",
                        help="comma-separated: plain, temperature, ensemble (every earlier exit), pair (the "
                             "exit and the one before it) (default: plain,temperature,ensemble)")
    parser.add_argument("--margins", default="0",
                        help="comma-separated standard-error margins of the drop constraint to compare (default 0)")
    parser.add_argument("--drop-measures", default="net",
                        help="comma-separated: what the target bounds (benchmarks.calibration.drop_correctness): "
                             "net = final accuracy - cascade accuracy; lost = share of the final exit's right "
                             "answers the cascade gets wrong (default: net)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="random halvings of the held-out split for the 2-fold figures (default 1)")
    parser.add_argument("--test", action="store_true", help="also calibrate on all held-out and measure on test")
    parser.add_argument("--output", type=Path, required=True, help="writes <output>.json and <output>.md")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    try:
        margins = [float(m) for m in args.margins.split(",")]
    except ValueError:
        raise UserError(f"--margins: {args.margins!r} is not a list of numbers") from None
    if not set(modes) <= {"plain", "temperature", "ensemble", "pair"}:
        raise UserError(f"--modes: unknown mode in {args.modes!r}")
    measures = args.drop_measures.split(",")
    if not set(measures) <= set(DROP_MEASURES):
        raise UserError(f"--drop-measures: one or more of {', '.join(DROP_MEASURES)}, not {args.drop_measures!r}")
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    rows = []
    for path in args.checkpoints:
        logits = candidate_logits(path, args.test)
        heldout_acc = (logits.heldout.argmax(-1) == logits.heldout_labels).mean(axis=1)
        for mode, measure, margin in ((a, b, c) for a in modes for b in measures for c in margins):
            row = {"checkpoint": path, "mode": mode, "drop_measure": measure, "margin": margin,
                   "heldout_exit_acc": heldout_acc.tolist(),
                   "exit_macs_fraction": (logits.macs / logits.full_macs).tolist(),
                   "heldout_2fold": two_fold(logits, mode, args.max_drop / 100, margin, measure=measure,
                                             repeats=args.repeats)}
            if args.test:
                row["test"] = cascade((logits.heldout, logits.heldout_labels),
                                      (logits.test, logits.test_labels), logits.macs, logits.full_macs, mode,
                                      args.max_drop / 100, margin, measure)
            rows.append(row)
            print(render_row(row), flush=True)
    result = {"rows": rows, "max_drop_pt": args.max_drop, "command": "python -m benchmarks.exit_ablation "
              + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "commit": git_commit(), "machine": machine_description(), "date": utc_timestamp()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(render_markdown(result))
    print(f"wrote {args.output.with_suffix('.json')} and {args.output.with_suffix('.md')}")
    return 0


def _figures(part: dict) -> tuple[str, str, str]:
    """Mean MACs, drop and oracle MACs of a 2-fold or test result, formatted."""
    return (f"{part['macs_fraction'] * 100:.1f}%", f"{part['drop_pt']:.2f}",
            f"{part['oracle_macs_fraction'] * 100:.1f}%")


def _accuracies(values, separator: str) -> str:
    return separator.join(f"{a * 100:.1f}" for a in values)


def label(candidate: str) -> str:
    """A checkpoint's stem; a composed cascade's stems (with their served depths) joined by arrows."""
    from export.compose import parse_stage

    if "+" not in candidate:
        return Path(candidate).stem
    specs = [parse_stage(part) for part in candidate.split("+")]
    return " -> ".join(spec.checkpoint.stem + (f":{spec.exits}" if spec.exits else "") for spec in specs)


def render_row(row: dict) -> str:
    parts = [("2-fold", row["heldout_2fold"])] + ([("test", row["test"])] if "test" in row else [])
    text = (f"{label(row['checkpoint']):>16} {row['mode']:>11} {row.get('drop_measure', 'net')} "
            f"m{row['margin']:g}: held-out exits "
            + _accuracies(row["heldout_exit_acc"], "/"))
    for name, part in parts:
        macs, drop, best = _figures(part)
        text += f" | {name}: MACs {macs} drop {drop} pt (oracle {best})"
    return text


def render_markdown(result: dict) -> str:
    with_test = any("test" in row for row in result["rows"])
    lines = [f"# Exit ablation at a {result['max_drop_pt']:g}-point accuracy-drop target", "",
             "Held-out: thresholds calibrated on one half of the held-out split, measured on the other, "
             "both ways (mean)." + (" Test: calibrated on the whole held-out split, measured once on test."
                                    if with_test else ""), "",
             "| checkpoint | scores | drop measure | margin | held-out acc per exit (%) | 2-fold mean MACs "
             "| 2-fold drop (pt) | 2-fold oracle |"
             + (" test acc per exit (%) | test mean MACs | test drop (pt) | test oracle |" if with_test else ""),
             "|---|---|---|---:|---|---:|---:|---:|" + ("---|---:|---:|---:|" if with_test else "")]
    for row in result["rows"]:
        cells = [label(row["checkpoint"]), row["mode"], row.get("drop_measure", "net"), f"{row['margin']:g}",
                 _accuracies(row["heldout_exit_acc"], " / "), *_figures(row["heldout_2fold"])]
        if "test" in row:
            cells += [_accuracies(row["test"]["exit_acc"], " / "), *_figures(row["test"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Produced by `{result['command']}` at commit `{result['commit']}` on {result['machine']}, "
              f"{result['date']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
