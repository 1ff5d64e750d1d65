"""Exit ensembles fitted on held-out outputs (issue 20).

Exit k answers with a weighted sum of the log-probabilities of exits 0..k (a geometric ensemble,
as zero-time-waste early exiting does): a sample that reaches exit k has already paid for the
earlier exits, so their opinion costs no MACs. The weights are non-negative, start from the exit
alone (weight 1 on itself, 0 elsewhere) and minimise the negative log-likelihood of the ensemble's
softmax on the held-out split (L-BFGS-B). They pay most where the exits come from different
networks (a composed cascade: the final network's exits ensembled with the cheap network's).
`serving.policy.ensemble_step` applies them, in the gateway and in the `<model>_cascade` model.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax


def fit_ensembles(logits: np.ndarray, labels: np.ndarray) -> list[list[float]]:
    """Per exit k of `logits` (exits, N, classes), its k + 1 weights over exits 0..k."""
    log_probs = log_softmax(np.asarray(logits, np.float64), axis=-1)
    labels = np.asarray(labels)
    rows = np.arange(log_probs.shape[1])
    fitted = []
    for k in range(len(log_probs)):
        inputs = log_probs[: k + 1]

        def objective(weights: np.ndarray, inputs=inputs) -> tuple[float, np.ndarray]:
            answer = log_softmax(np.tensordot(weights, inputs, axes=1), axis=-1)
            residual = np.exp(answer)
            residual[rows, labels] -= 1.0  # d NLL / d answer's logits, per sample
            return -answer[rows, labels].mean(), np.einsum("nc,knc->k", residual, inputs) / len(rows)

        start = np.zeros(k + 1)
        start[-1] = 1.0
        result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * (k + 1))
        fitted.append([round(float(weight), 6) for weight in result.x])
    return fitted
