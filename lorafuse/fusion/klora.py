"""K-LoRA (Ouyang et al., CVPR 2025): per layer, the LoRA with the larger top-K importance acts.

For layer l with dW_i = s_i B_i A_i (i = c subject, s style) and K = r_c r_s:

    S_i    = sum of the K largest |dW_i| entries            (exact, tiled: kernels.delta_stats)
    gamma  = "official": mean of rho_j = ||dW_c,j||_1 / ||dW_s,j||_1 over layers j after dropping
             rho_j >= 3 mean(rho);  "paper": sum_j ||dW_c,j||_1 / sum_j ||dW_s,j||_1
    S(tau) = "s": alpha tau + beta  (alpha 1.5, beta 0.5);  "s*": (alpha tau + beta) mod alpha, beta 1.275
    subject  iff  S_c / gamma > S_s S(tau)    (strict: ties go to style)

Scores are fp64. A zero LoRA has S = 0: a zero subject never wins, a zero style loses to any
non-zero subject, two zero LoRAs select the style (gamma falls back to 1 when undefined).
"""

from __future__ import annotations

from ..kernels.delta_stats import lora_delta_topk_l1
from ._common import StaticSelectMethod


class KLoRA(StaticSelectMethod):
    """K-LoRA selection. Options: ``pattern`` "s" | "s*" (default "s*", the official scripts'),
    ``alpha`` (1.5), ``beta`` (None: 0.5 for "s", 1.275 for "s*"), ``balance`` "official" | "paper",
    ``k`` (None: r_c * r_s), ``tau_mode`` "timestep" | "official", ``stats_backend`` "auto" |
    "triton" | "torch" (for the top-K / L1 pass in :meth:`prepare`)."""

    name = "klora"

    def __init__(self, *, pattern: str = "s*", alpha: float = 1.5, beta: float | None = None,
                 balance: str = "official", k: int | None = None, tau_mode: str = "timestep",
                 stats_backend: str = "auto"):
        super().__init__(pattern=pattern, alpha=alpha, beta=beta, balance=balance, tau_mode=tau_mode,
                         stats_backend=stats_backend)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"klora: k must be a positive int or None, got {k!r}")
        self.k = k

    def _layer_stats(self, subject, style):
        k = self.k or subject[0].shape[0] * style[0].shape[0]
        top_c, l1_c = lora_delta_topk_l1(*subject, k, backend=self.stats_backend)
        top_s, l1_s = lora_delta_topk_l1(*style, k, backend=self.stats_backend)
        return top_c, top_s, l1_c, l1_s
