"""The released M-IDoL code's teacher Sinkhorn, restated independently of midol."""

from __future__ import annotations

import numpy as np


def authors_reference(logits: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """The released M-IDoL code's teacher Sinkhorn, restated in NumPy float64 loops
    (our restatement of main_MoE_Uni.py at commit cacb728: Q is N x B there)."""
    tiny = 1e-12
    x = logits - logits.max(axis=1, keepdims=True)
    Q = np.maximum(np.exp(x / eps).T, tiny)
    Q = Q / (Q.sum() + tiny)
    K, B = Q.shape
    for _ in range(iters):
        Q = Q / (Q.sum(axis=1, keepdims=True) + tiny) / K
        Q = Q / (Q.sum(axis=0, keepdims=True) + tiny) / B
        Q = np.maximum(Q, tiny)
    out = np.maximum((Q * B).T, tiny)
    out = out / (out.sum(axis=1, keepdims=True) + tiny)
    return np.log(np.maximum(out, tiny))
