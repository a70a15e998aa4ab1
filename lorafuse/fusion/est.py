"""EST-LoRA (Zhang & Xiong, arXiv 2508.02165): K-LoRA with energies and the style discrepancy D.

For layer l with dW_i = s_i B_i A_i:

    E_i    = ||dW_i||_F^2 = s_i^2 sum((B_i^T B_i) * (A_i A_i^T))      (Gram matrices, fp64)
    gamma  = "official": K-LoRA's filtered mean of per-layer L1 ratios (the EST code);
             "paper": sum_j ||dW_c,j||_1 / sum_j ||dW_s,j||_1;
             "energy": sum_j E_c,j / sum_j E_s,j  (energy is quadratic in the delta's scale, L1 linear)
    S(tau) = "s": alpha tau + D;  "s*": (alpha tau + D) mod alpha       (alpha 1.5)
    subject  iff  E_c / gamma > E_s S(tau)    (strict: ties go to style)

D = 1 - cos(DINO(I_c), DINO(I_s)) of two probe images in the paper's code (the probe, which needs a
pipeline: :func:`lorafuse.guidance.style_discrepancy`). Default D = 0.5: K-LoRA's beta, the constant D replaces (EST's FLUX script uses 0.75).
"""

from __future__ import annotations

from ..kernels.delta_stats import lora_delta_energy, lora_delta_l1
from ._common import BALANCES, StaticSelectMethod, check_float


class ESTLoRA(StaticSelectMethod):
    """EST-LoRA selection. Options: ``D`` (style discrepancy, default 0.5), ``pattern`` "s" | "s*"
    (default "s"), ``alpha`` (1.5), ``balance`` "official" | "paper" | "energy", ``tau_mode``
    "timestep" | "official", ``stats_backend`` "auto" | "triton" | "torch" (L1 pass of gamma)."""

    name = "est"

    def __init__(self, *, D: float = 0.5, pattern: str = "s", alpha: float = 1.5, balance: str = "official",
                 tau_mode: str = "timestep", stats_backend: str = "auto"):
        super().__init__(pattern=pattern, alpha=alpha, beta=check_float(D, "D", "est"), balance=balance,
                         tau_mode=tau_mode, stats_backend=stats_backend, balances=BALANCES + ("energy",))
        self.D = float(D)

    def _layer_stats(self, subject, style):
        e_c, e_s = lora_delta_energy(*subject), lora_delta_energy(*style)
        if self.balance == "energy":
            return e_c, e_s, e_c, e_s
        return e_c, e_s, lora_delta_l1(*subject, backend=self.stats_backend), lora_delta_l1(*style, backend=self.stats_backend)

