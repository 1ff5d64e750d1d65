"""Calibrate exit thresholds on the held-out split and write them into the manifest.

    python -m benchmarks.calibrate --model-repository model_repository               # <= 0.5 pt drop
    python -m benchmarks.calibrate --macs-budget 0.4                                   # mean MACs <= 40%
    python -m benchmarks.calibrate --max-drop 0.5 --guarantee --delta 0.1              # Learn-then-Test
    python -m benchmarks.calibrate --max-drop 0.5 --margin 1                           # a fixed margin
    python -m benchmarks.calibrate --max-drop 0.5 --within mean                        # the mean out of fold
    python -m benchmarks.calibrate --ensemble off                                      # exits answer alone

Scores come from the exported ONNX segments on the checkpoint's held-out split
(carved from train/ with the seed the checkpoint records); the test split is
never used here. The gateway reads the thresholds from the manifest.

Exit ensembles (`--ensemble`, benchmarks/ensembles.py): each exit may answer with a weighted
sum of its and the earlier exits' log-probabilities, weights fitted on the held-out split and
written into the manifest beside the thresholds. `auto` (the default, with an accuracy-drop
target and `--margin auto`) keeps them only if they take fewer MACs at the target out of fold
(the same repeated 2-fold measure that chooses the margin, with the weights refitted on each
calibration half); `on` always, `off` never.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.calibration import (
    DROP_MEASURES,
    OUT_OF_FOLD_WITHIN,
    calibrate_accuracy_drop,
    calibrate_compute_budget,
    calibrate_with_guarantee,
    evaluate,
    holds_out_of_fold,
    select_margin,
)
from benchmarks.ensembles import fit_ensembles
from benchmarks.exit_outputs import ExitOutputs, compute_exit_outputs, load_images
from common.errors import UserError, run_cli
from common.manifest import Manifest, ManifestError, manifest_path, read_manifest, write_manifest
from common.provenance import utc_timestamp
from serving.policy import SCORES

# Standard errors of margin on the held-out drop: `auto` chooses it per model and target on the
# held-out split (benchmarks.calibration.select_margin: repeated 2-fold). One fixed margin did not fit
# every cascade: at 0.5 points, margin 1 let 0.51 points through out of fold on the reference
# ResNet-56 and 0.67 on the ResNet-20 composed in front of it (checkpoints/experiments/little-long/
# drop-measure.md), which needs 1.5-2.
DEFAULT_MARGIN = "auto"
ENSEMBLE_MODES = ("auto", "on", "off")
_KEEP = object()


def calibrate(outputs: ExitOutputs, macs, score: str = "max_prob", max_drop: float | None = 0.005,
              macs_budget: float | None = None, guarantee: bool = False, delta: float = 0.1,
              full_macs: float | None = None, margin: float | str = DEFAULT_MARGIN,
              drop_measure: str = "net", within: float | None = OUT_OF_FOLD_WITHIN) -> tuple[np.ndarray, dict]:
    """Thresholds and a description of how they were chosen (drops and budgets as fractions).

    `macs`: what reaching each exit costs through the cascade; `full_macs`: the network
    without early exits, which budgets and fractions refer to (default: the last exit's `macs`).
    `margin`: standard errors by which the held-out drop must clear `max_drop` (see
    `benchmarks.calibration.pick_accuracy_drop`), or `auto` (`benchmarks.calibration.select_margin`:
    the smallest that keeps the repeated 2-fold out-of-fold drop within `max_drop` in at least `within`
    of the trials, or on their mean with `within` None).
    `drop_measure`: `net` (final exit's accuracy minus the cascade's) or `lost` (the final exit's
    right answers the cascade gets wrong; `benchmarks.calibration.drop_correctness`).
    """
    scores, correct = outputs.scores(score), outputs.drop_correct()  # + the final exit alone, last
    macs = np.asarray(macs, np.float64)
    full_macs = float(macs[-1] if full_macs is None else full_macs)
    details: dict = {"score": score}
    if macs_budget is not None:
        thresholds = calibrate_compute_budget(scores, correct, macs, macs_budget * full_macs)
        details.update(method="compute_budget", macs_budget_fraction=macs_budget)
    elif guarantee:
        thresholds, ltt = calibrate_with_guarantee(scores, correct, max_drop, delta)
        details.update(method="learn_then_test", max_drop=max_drop, delta=delta, ltt=ltt,
                       guarantee=f"with probability >= {1 - delta:g}, the expected accuracy drop against the final "
                                 f"exit on new i.i.d. data is at most {max_drop * 100:g} points")
    else:
        if margin == "auto":
            margin, tried = select_margin(scores, correct, macs, max_drop, measure=drop_measure, within=within,
                                          refit=None if outputs.ensembles is None else _refit_ensembles(outputs, score))
            kept = "the mean drop" if within is None else f"the drop in at least {within:g} of those 20 trials"
            details.update(margin_selection={"rule": "the smallest margin whose thresholds, calibrated on one "
                                                     "half of the held-out split and measured on the other (both "
                                                     f"ways, 10 random halvings), keep {kept} within max_drop"
                                                     + ("; exit ensembles refitted on each calibration half"
                                                        if outputs.ensembles is not None else ""),
                                             "within": within, "tried": tried})
        thresholds = calibrate_accuracy_drop(scores, correct, macs, max_drop, margin=margin, measure=drop_measure)
        details.update(method="accuracy_drop", max_drop=max_drop, margin_standard_errors=margin,
                       drop_measure=drop_measure)
    outcome = evaluate(scores, correct, macs, thresholds)
    details.update(heldout_size=int(scores.shape[1]), heldout_final_acc=float(correct[-1].mean()),
                   heldout_acc=outcome.accuracy, heldout_macs_fraction=outcome.mean_macs / full_macs,
                   heldout_exit_share=list(outcome.exit_share))
    return thresholds, details


def _refit_ensembles(outputs: ExitOutputs, score: str):
    """For out-of-fold measures: scores and drop correctness of every sample with exit ensembles fitted
    on some samples only (the calibration half), not on all of them."""
    plain = outputs.with_ensembles(None)

    def refit(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fitted = plain.with_ensembles(fit_ensembles(plain.logits[:, indices], plain.labels[indices]))
        return fitted.scores(score), fitted.drop_correct()
    return refit


def calibrate_ensembles(outputs: ExitOutputs, macs, mode: str = "auto", **options) -> tuple[ExitOutputs, np.ndarray,
                                                                                            dict]:
    """`calibrate` with exit ensembles fitted on `outputs` (`mode` on), without (off), or the one of the
    two that takes fewer out-of-fold MACs within the target (auto; off unless the target is an accuracy
    drop with an automatic margin). Returns the outputs as chosen (their `ensembles`), thresholds, details."""
    plain = outputs.with_ensembles(None)
    auto = mode == "auto" and options.get("max_drop") is not None and options.get("macs_budget") is None \
        and not options.get("guarantee") and options.get("margin", DEFAULT_MARGIN) == "auto"
    if mode == "off" or (mode == "auto" and not auto):
        thresholds, details = calibrate(plain, macs, **options)
        return plain, thresholds, {**details, "ensemble": {"mode": mode, "used": False}}
    fitted = plain.with_ensembles(fit_ensembles(plain.logits, plain.labels))
    thresholds, details = calibrate(fitted, macs, **options)
    if mode == "on":
        return fitted, thresholds, {**details, "ensemble": {"mode": mode, "used": True}}
    alone_thresholds, alone = calibrate(plain, macs, **options)
    chosen = min(((fitted, thresholds, details), (plain, alone_thresholds, alone)), key=_out_of_fold_cost)
    compared = {"with": _out_of_fold_cost((fitted, thresholds, details)),
                "without": _out_of_fold_cost((plain, alone_thresholds, alone))}
    return chosen[0], chosen[1], {**chosen[2], "ensemble": {
        "mode": mode, "used": chosen[0] is fitted,
        "rule": "kept if, at the margin each chooses, the out-of-fold mean MACs within the target are lower "
                "(a choice missing the target out of fold counts as more costly than any meeting it)",
        "out_of_fold_with_without": compared}}


def _out_of_fold_cost(choice) -> tuple[bool, float]:
    """(misses the target out of fold, out-of-fold mean MACs) of the margin `select_margin` chose."""
    details = choice[2]
    selection = details["margin_selection"]
    chosen = selection["tried"][-1]
    return not holds_out_of_fold(chosen, details["max_drop"], selection["within"]), chosen["out_of_fold_macs"]


def apply_thresholds(manifest: Manifest, thresholds, details: dict, command: str | None = None,
                     ensembles=_KEEP) -> Manifest:
    """`manifest` with these thresholds (and exit ensembles, when given: a list per exit, or None for
    none) and how they were chosen (writing it is the caller's choice)."""
    exits = [replace(entry, threshold=float(t)) for entry, t in zip(manifest.exits, thresholds)]
    if ensembles is not _KEEP:
        exits = [replace(entry, ensemble=None if ensembles is None else list(weights))
                 for entry, weights in zip(exits, ensembles or [None] * len(exits))]
    details = {**details, "date": utc_timestamp(),
               "command": command or "python -m benchmarks.calibrate " + " ".join(sys.argv[1:])}
    return manifest.with_exits(exits, calibration=details)


def _within(text: str) -> float | None:
    if text == "mean":
        return None
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor mean") from None
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share in (0, 1]")
    return share


def _margin(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default=None,
                        help="which model of the repository (default: its first, the one in manifest.json)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--max-drop", type=float, default=0.5,
                        help="largest accuracy drop against the final exit, in points (default 0.5)")
    target.add_argument("--macs-budget", type=float, default=None,
                        help="largest mean MACs as a fraction of the full network (e.g. 0.4)")
    parser.add_argument("--guarantee", action="store_true",
                        help="Learn-then-Test: the drop holds on new data with probability >= 1 - delta")
    parser.add_argument("--delta", type=float, default=0.1, help="failure probability of --guarantee")
    parser.add_argument("--margin", type=_margin, default=DEFAULT_MARGIN,
                        help="standard errors by which the held-out drop must clear --max-drop: the cheapest of "
                             "many feasible thresholds tends to be one whose drop the held-out split underestimates; "
                             "auto (default): the smallest of 0, 0.5, ..., 4 whose thresholds keep the drop within "
                             "--max-drop out of fold (repeated 2-fold on the held-out split; how often: --within); "
                             "0 = the drop as measured")
    parser.add_argument("--within", type=_within, default=OUT_OF_FOLD_WITHIN,
                        help="with --margin auto: the share of the 20 out-of-fold trials in which the drop must stay "
                             f"within --max-drop (default {OUT_OF_FOLD_WITHIN:g}: four in five); mean: the mean "
                             "out-of-fold drop within --max-drop instead, which leaves the drop on new data above "
                             "the target about half the time")
    parser.add_argument("--drop-measure", choices=DROP_MEASURES, default="net",
                        help="what --max-drop bounds: net = the final exit's accuracy minus the cascade's "
                             "(default); lost = the share of images the final exit gets right and the cascade "
                             "wrong (no credit for an early exit beating the final one on held-out)")
    parser.add_argument("--ensemble", choices=ENSEMBLE_MODES, default="auto",
                        help="exit ensembles (each exit answers with a weighted sum of its and the earlier exits' "
                             "log-probabilities, weights fitted on held-out): auto (default) keeps them if they "
                             "take fewer MACs at the target out of fold (accuracy-drop targets with --margin auto; "
                             "otherwise off); on; off")
    parser.add_argument("--score", choices=SCORES, default="max_prob")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint whose held-out split to use (default: the one the manifest names)")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not 0 <= args.max_drop <= 100 or not 0 < args.delta < 1:
        raise UserError("--max-drop must be in [0, 100] points and --delta in (0, 1)")
    if args.macs_budget is not None and not 0 < args.macs_budget <= 1:
        raise UserError("--macs-budget is a fraction of the full network's MACs, in (0, 1]")
    if args.margin != "auto" and args.margin < 0:
        raise UserError("--margin is a number of standard errors, 0 or more, or auto")
    if args.guarantee and args.macs_budget is not None:
        raise UserError("--guarantee applies to --max-drop, not --macs-budget")
    try:
        manifest = read_manifest(args.model_repository, args.model)
    except ManifestError as error:
        raise UserError(str(error)) from None
    images, labels = load_images(manifest, "heldout", args.checkpoint, args.data)
    outputs = compute_exit_outputs(args.model_repository, manifest, images, labels, args.threads)
    chosen, thresholds, details = calibrate_ensembles(
        outputs, [e.macs for e in manifest.exits], args.ensemble, score=args.score,
        max_drop=None if args.macs_budget is not None else args.max_drop / 100, macs_budget=args.macs_budget,
        guarantee=args.guarantee, delta=args.delta, full_macs=manifest.full_macs, margin=args.margin,
        drop_measure=args.drop_measure, within=args.within)
    write_manifest(args.model_repository, apply_thresholds(manifest, thresholds, details, ensembles=chosen.ensembles))
    print(f"{details['method']} on {details['heldout_size']} held-out images ({args.score}):")
    for entry, threshold, share in zip(manifest.exits, thresholds, details["heldout_exit_share"]):
        print(f"  exit {entry.depth:>3}: threshold {threshold:.4f}  leaves here {share * 100:5.1f}%")
    if "margin_selection" in details:
        print("margin chosen out of fold (repeated 2-fold on held-out): "
              + ", ".join(f"{t['margin']:g}: drop {t['out_of_fold_drop'] * 100:.2f} pt "
                          f"(within {t['out_of_fold_within'] * 100:.0f}% of trials) at "
                          f"{t['out_of_fold_macs'] / manifest.full_macs * 100:.1f}% MACs"
                          for t in details["margin_selection"]["tried"])
              + f" -> {details['margin_standard_errors']:g}")
    ensemble = details["ensemble"]
    if "out_of_fold_with_without" in ensemble:
        (miss_with, with_macs), (miss_without, without_macs) = (ensemble["out_of_fold_with_without"][key]
                                                                for key in ("with", "without"))
        print(f"exit ensembles: out of fold {with_macs / manifest.full_macs * 100:.1f}% MACs with"
              f"{' (misses the target)' if miss_with else ''}, {without_macs / manifest.full_macs * 100:.1f}% "
              f"without{' (misses the target)' if miss_without else ''} -> "
              f"{'kept' if ensemble['used'] else 'not used'}")
    else:
        print(f"exit ensembles: {'fitted and used' if ensemble['used'] else 'not used'} (--ensemble {args.ensemble})")
    print(f"held-out accuracy {details['heldout_acc'] * 100:.2f}% "
          f"(final exit {details['heldout_final_acc'] * 100:.2f}%), "
          f"mean MACs {details['heldout_macs_fraction'] * 100:.1f}% of the full network")
    print(f"wrote thresholds into {manifest_path(args.model_repository, manifest.model)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
