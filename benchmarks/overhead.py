"""Per-call overhead of one patched layer in eager mode, where tiny layers make it visible:

1. aten ops dispatched by one call of a patched attention linear of the tiny SD1.5 pipeline, for
   PEFT's own forward and for ``accelerate_fusion`` with each method (gate logging on and off);
   on a GPU each op is at least one kernel launch;
2. wall time per call of the public ``fused_lora_linear`` (torch backend, 128 x 64 -> 64, ranks 4
   and 16, gates (1, 0)) next to ``F.linear`` alone, median of 3 runs of 20000 calls, 1 thread.

    python -m benchmarks.overhead

Prints only (no CSV): the numbers are for reading code changes against each other on one machine.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from benchmarks.fusion_methods import count_ops


def layer_op_counts() -> dict[str, int]:
    """{"peft": n, "<method> log=<bool>": n} aten ops of one call of a patched to_q layer."""
    import tempfile
    from pathlib import Path

    from lorafuse import accelerate_fusion
    from lorafuse.commands._common import quiet_libraries
    from lorafuse.commands.demo import write_loras
    from lorafuse.integrations.tiny import sd15_pipeline

    quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd15_pipeline("tiny")
        with tempfile.TemporaryDirectory() as tmp:
            subject, style = write_loras(pipe, Path(tmp))
            pipe.load_lora_weights(str(subject), adapter_name="subject")
            pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["subject", "style"], [1.0, 1.0])
    m = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    x = torch.randn(2, 64, m.in_features)
    counts = {}
    with torch.no_grad():
        counts["peft"] = count_ops(lambda: m(x))
        for method in ("klora", "est", "merge", "kl"):
            for log in (True, False):
                h = accelerate_fusion(pipe, "subject", "style", method=method, log_gates=log)
                h._started = True  # as inside a denoiser call; the first call takes the step's log snapshot
                m(x)
                counts[f"{method} log={log}"] = count_ops(lambda: m(x))
                h.remove()
    return counts


def public_call_us(n: int = 20000, runs: int = 3) -> tuple[float, float]:
    """(median us per fused_lora_linear call, median us per F.linear call)."""
    from lorafuse.kernels import PackedLoRA, fused_lora_linear

    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(128, 64, generator=g), torch.randn(64, 64, generator=g), torch.randn(64, generator=g)
    packed = PackedLoRA.pack([(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 1.0),
                              (torch.randn(16, 64, generator=g), torch.randn(64, 16, generator=g), 1.0)])
    gates = torch.tensor([1.0, 0.0])

    def per_call(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    fused = [per_call(lambda: fused_lora_linear(x, W, b, packed, gates, backend="torch")) for _ in range(runs)]
    base = [per_call(lambda: F.linear(x, W, b)) for _ in range(runs)]
    return statistics.median(fused), statistics.median(base)


def main() -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, ops in layer_op_counts().items():
            print(f"aten ops per layer call  {name:18s} {ops:4d}")
        fused, base = public_call_us()
        print(f"fused_lora_linear (torch, 128x64->64, ranks 4/16, gates (1, 0)): {fused:.1f} us per call; "
              f"F.linear {base:.1f} us")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
