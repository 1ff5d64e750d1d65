"""Per-exit temperature scaling fitted on the held-out split, folded into the exit heads.

    python -m training.temperature --checkpoint checkpoints/experiments/heads/c2-kd.safetensors \\
        --output checkpoints/mwresnet56_5.safetensors

For every early exit, the temperature T that minimises the negative log-likelihood of
its held-out logits (Guo et al., 2017) is found, and the head's last linear layer is
divided by it, so the exported logits are already calibrated and every confidence score
(max probability, margin, entropy) the policies use comes from calibrated probabilities.
Predictions do not change (argmax is scale-free); the final exit is left as it is, unless
`--final` (a network that goes in front of another in a composed cascade, `export.compose`,
where its last exit is an early one too). The temperatures and their held-out NLL before and
after are recorded in the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import UserError, run_cli
from training.checkpoint import build_metadata, load_checkpoint, save_checkpoint
from training.datasets import heldout_split, load_split_for_model
from training.models import MultiExitNet
from training.transforms import to_normalized


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of softmax(logits / T), by L-BFGS on log T."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def fold_temperature(head: torch.nn.Module, temperature: float) -> None:
    """Divide the head's final linear layer by `temperature` (its logits become logits / T)."""
    with torch.no_grad():
        head.fc.weight.div_(temperature)
        head.fc.bias.div_(temperature)


@torch.no_grad()
def exit_logits(model: MultiExitNet, images: np.ndarray, mean, std, batch_size: int = 500) -> list[torch.Tensor]:
    """Every exit's float32 logits for uint8 images."""
    model.eval()
    outputs = [model(to_normalized(images[start:start + batch_size], mean, std))
               for start in range(0, len(images), batch_size)]
    return [torch.cat([batch[k] for batch in outputs]) for k in range(len(model.exits))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.temperature", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint to calibrate")
    parser.add_argument("--output", type=Path, required=True, help="where to write the calibrated checkpoint")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--final", action="store_true", help="scale the final exit too (for the first network "
                        "of a composed cascade, whose final exit is an early one of the cascade)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, metadata = load_checkpoint(args.checkpoint)
    if metadata.training.get("temperatures"):
        raise UserError(f"{args.checkpoint} is already temperature-scaled: calibrate the checkpoint it came from")
    train = load_split_for_model(metadata.dataset_source(args.data), "train", metadata.input_size)
    _, heldout_idx = heldout_split(len(train), metadata.heldout.size, metadata.heldout.seed)
    if not len(heldout_idx):
        raise UserError("the checkpoint has no held-out split to fit temperatures on")
    labels = torch.as_tensor(train.labels[heldout_idx])
    logits = exit_logits(model, train.images[heldout_idx], metadata.normalization.mean, metadata.normalization.std)
    fitted = []
    scaled = len(model.exits) if args.final else len(model.exits) - 1
    for spec, head, exit_out in zip(model.exits[:scaled], model.heads[:scaled], logits[:scaled]):
        temperature = fit_temperature(exit_out, labels)
        before = F.cross_entropy(exit_out.double(), labels).item()
        after = F.cross_entropy(exit_out.double() / temperature, labels).item()
        fold_temperature(head, temperature)
        fitted.append({"depth": spec.depth, "temperature": round(temperature, 5),
                       "heldout_nll_before": round(before, 5), "heldout_nll_after": round(after, 5)})
        print(f"exit {spec.depth}: T = {temperature:.4f}, held-out NLL {before:.4f} -> {after:.4f}")
    training = {**metadata.training, "temperatures": {"from": str(args.checkpoint), "exits": fitted}}
    calibrated = build_metadata(model, classes=metadata.classes, mean=metadata.normalization.mean,
                                std=metadata.normalization.std, heldout=vars(metadata.heldout), training=training,
                                heldout_acc=metadata.heldout_acc, epochs_completed=metadata.epochs_completed,
                                epochs_planned=metadata.epochs_planned)
    save_checkpoint(args.output, model, calibrated.updated(extra=metadata.extra))
    print(f"wrote {args.output} and {args.output.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
