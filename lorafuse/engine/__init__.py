"""The per-layer runtime of lorafuse, shared by :func:`lorafuse.fuse_modules` (plain ``nn.Linear``)
and :func:`lorafuse.accelerate_fusion` (diffusers + PEFT). Needs neither diffusers nor PEFT.

    runtime.py   FusionEngine: per layer call merged / fused path, per denoiser call the method's step
    run.py       SamplingRun: one sampling run's state (step, tau, the call's gate-log recorder);
                 RunTable: the runs of concurrent requests, bounded
    merged.py    MergedWeights: W_eff = W + g_c dW_c + g_s dW_s per layer, rebuilt at flips
    gate_log.py  GateLog: the decisions (last run by default), recorded on the device, read as dicts
    gate_plot.py the layers x steps heatmap of a gate log
    module.py    fuse_module / fuse_modules / ModuleFusion on plain nn.Linear layers
"""

from .gate_log import GateLog, JsonLinesSink, check_log_options
from .merged import WEIGHT_MODES, MergedWeights
from .module import LoRATriple, ModuleFusion, fuse_module, fuse_modules
from .run import RunTable, SamplingRun
from .runtime import FusionEngine, LayerSlot, check_engine_options

__all__ = [
    "WEIGHT_MODES", "FusionEngine", "GateLog", "JsonLinesSink", "LayerSlot", "LoRATriple", "MergedWeights",
    "ModuleFusion", "RunTable", "SamplingRun", "check_engine_options", "check_log_options", "fuse_module",
    "fuse_modules",
]
