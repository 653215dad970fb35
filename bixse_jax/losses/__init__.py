"""The in-batch losses: one module each, and the registry (registry.py) where each records its forms.

BiXSE (`bixse`) is the pointwise sigmoid BCE; the others are the baselines it is compared against
(InfoNCE, grade-weighted InfoNCE, soft-label InfoNCE, RankNet, Margin-MSE).
"""

from bixse_jax.losses.registry import REGISTRY, Loss, RingFold, get, register, supporting

# Importing a loss's module registers it; this order is the order error messages list them in.
from bixse_jax.losses import bixse, infonce, graded_infonce, soft_infonce, pairwise_bce, margin_mse  # noqa: E402,F401

__all__ = ["REGISTRY", "Loss", "RingFold", "get", "register", "supporting"]
