"""A generated segmented classification task: each segment follows its own rule.

It is what an MoE is for (experts can take a segment each) and what a single linear model cannot
fit, so it shows the engine learning on a fresh machine with no data. Everything it makes is
generated, not real.
"""

from __future__ import annotations

import numpy as np


def segmented_classification(n_rows: int, *, n_numeric: int = 8, n_segments: int = 4,
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns numeric (n, n_numeric) float32, segment (n,) int64, label (n,) float32.

    The label's log-odds are a segment-specific linear function of the numeric features plus an
    interaction, so the best model must condition on the segment.
    """
    rng = np.random.default_rng(seed)
    numeric = rng.standard_normal((n_rows, n_numeric)).astype(np.float32)
    segment = rng.integers(0, n_segments, n_rows)
    weights = rng.standard_normal((n_segments, n_numeric)) * 1.5
    log_odds = np.einsum("nf,nf->n", numeric, weights[segment]) + 0.8 * numeric[:, 0] * numeric[:, 1]
    label = (rng.random(n_rows) < 1 / (1 + np.exp(-log_odds))).astype(np.float32)
    return numeric, segment.astype(np.int64), label
