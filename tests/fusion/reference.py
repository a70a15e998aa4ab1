"""fp64 dense references written from the formulas (algorithms.md), and random LoRA layers."""

from __future__ import annotations

import torch

from lorafuse.fusion import LayerLoRAs

from ..conftest import DEVICE


def rand_lora(r, K, N, scale, *, device=DEVICE, dtype=torch.float32):
    return ((torch.randn(r, K, device=device) / K**0.5).to(dtype), (torch.randn(N, r, device=device) / r**0.5).to(dtype), scale)


def rand_layers(n, *, seed=0, shapes=((48, 40), (64, 64), (32, 80)), ranks=((4, 8), (8, 8), (13, 4), (16, 6))):
    """n layers of varied (N, K), unequal ranks and scales spread so that the ratio R crosses the
    thresholds of S(tau) at different taus (some layers flip, some never do)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n):
        N, K = shapes[i % len(shapes)]
        rc, rs = ranks[i % len(ranks)]
        sc = float(torch.empty(()).uniform_(0.5, 2.0, generator=g))
        ss = float(torch.empty(()).uniform_(0.5, 2.0, generator=g)) * (-1.0 if i % 5 == 3 else 1.0)
        torch.manual_seed(seed * 1000 + i)
        layers.append(LayerLoRAs(f"blocks.{i}.to_{'qkvo'[i % 4]}", rand_lora(rc, K, N, sc), rand_lora(rs, K, N, ss)))
    return layers


def dense(lora):
    A, B, s = lora
    return float(s) * (B.double().cpu() @ A.double().cpu())


def topk_sum(dW, k):
    a = dW.abs().flatten()
    return torch.topk(a, min(k, a.numel())).values.sum().item()


def scores64(layers, kind):
    """Per layer (score_c, score_s, l1_c, l1_s, e_c, e_s) as Python floats; kind 'klora' | 'est'."""
    out = []
    for layer in layers:
        c, s = dense(layer.subject), dense(layer.style)
        k = layer.subject[0].shape[0] * layer.style[0].shape[0]
        e = ((c**2).sum().item(), (s**2).sum().item())
        sc = (topk_sum(c, k), topk_sum(s, k)) if kind == "klora" else e
        out.append((*sc, c.abs().sum().item(), s.abs().sum().item(), *e))
    return out


def gamma64(sc, balance):
    if balance == "official":  # rho_j = L1_c / L1_s, drop rho >= 3 mean, mean of the rest
        rho = [x[2] / x[3] for x in sc]
        mean = sum(rho) / len(rho)
        kept = [r for r in rho if r < 3 * mean]
        return sum(kept) / len(kept)
    if balance == "paper":
        return sum(x[2] for x in sc) / sum(x[3] for x in sc)
    return sum(x[4] for x in sc) / sum(x[5] for x in sc)  # energy


def scale64(tau, pattern, alpha, beta):
    s = alpha * tau + beta
    return s % alpha if pattern == "s*" else s


def decide64(sc, gamma, tau, pattern, alpha, beta):
    """True = subject: S_c / gamma > S_s * S(tau) (strict)."""
    S = scale64(tau, pattern, alpha, beta)
    return [x[0] / gamma > x[1] * S for x in sc]


def kl_rows64(x, W, b, lora):
    """Per row (forward KL(p0||p_i), reverse KL(p_i||p0)) in fp64 from softmaxes of f0 and f0 + d."""
    x64 = x.double().cpu().reshape(-1, x.shape[-1])
    f0 = x64 @ W.double().cpu().t() + (b.double().cpu() if b is not None else 0.0)
    A, B, s = lora
    f1 = f0 + float(s) * (x64 @ A.double().cpu().t()) @ B.double().cpu().t()
    lp0, lp1 = torch.log_softmax(f0, -1), torch.log_softmax(f1, -1)
    fwd = (lp0.exp() * (lp0 - lp1)).sum(-1)
    rev = (lp1.exp() * (lp1 - lp0)).sum(-1)
    return fwd, rev


def formula64(x, W, b, loras, gates):
    """y = x W^T + b + sum_i g_i d_i in fp64; gates (2,) or (G, 2) per leading-dim sample."""
    x64 = x.double().cpu()
    y = x64 @ W.double().cpu().t() + (b.double().cpu() if b is not None else 0.0)
    for i, (A, B, s) in enumerate(loras):
        d = float(s) * (x64 @ A.double().cpu().t()) @ B.double().cpu().t()
        g = gates.double().cpu()
        gi = g[i] if g.dim() == 1 else g[:, i].reshape(-1, *([1] * (x.dim() - 1)))
        y = y + gi * d
    return y


def kl_divergences64(x, W, b, loras, direction="forward", reduction="sample"):
    """(G, 2) fp64 divergences D_i of the KL method, G = x.shape[0] samples (1 for 1-D x):
    per token k_i = KL(p0 || p_i) ("forward") or KL(p_i || p0) ("reverse") over output channels,
    D_i,g = mean of k_i over sample g's tokens ("sample") or over every row ("batch", all g equal)."""
    G = x.shape[0] if x.dim() >= 2 else 1
    cols = []
    for lora in loras:
        fwd, rev = kl_rows64(x, W, b, lora)
        k = (fwd if direction == "forward" else rev).reshape(G, -1)
        cols.append(k.mean(1) if reduction == "sample" else k.mean().expand(G))
    return torch.stack(cols, 1)


def kl_decide64(D, tie="subject"):
    """Per sample True = subject: D_c > D_s, or D_c == D_s with tie "subject"."""
    return [bool(c > s or (c == s and tie == "subject")) for c, s in D.tolist()]
