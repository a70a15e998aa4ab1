"""README.md as written: its commands (the demo, then `generate` on the pipeline and LoRA files the demo
saved) and its Python snippets, extracted from the file, run on tiny offline pipelines.

The demo command runs with `--tiny --steps 2 --rounds 1 --no-progress` appended (the default size
takes about a minute); every other command and snippet runs exactly as README.md prints it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
DEMO_SMALL = ["--tiny", "--steps", "2", "--rounds", "1", "--no-progress"]


def shell_commands() -> list[str]:
    """The `lorafuse ...` commands of README's indented shell blocks that run as they are (the
    synopsis lines with [optional] parts are left out); `a && b && lorafuse ...` keeps the last part."""
    out = []
    for line in README.splitlines():
        if not line.startswith("    ") or "lorafuse " not in line:
            continue
        cmd = line.strip().split("&& ")[-1]
        if cmd.startswith("lorafuse ") and "[" not in cmd and "#" not in cmd:
            out.append(cmd)
    return out


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def run_lorafuse(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    assert argv[0] == "lorafuse"
    # one OpenMP thread: on shared CI cores, two spinning threads make these tiny models many times slower
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lorafuse", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """README's demo command, run in an empty folder (small: see the module docstring)."""
    cwd = tmp_path_factory.mktemp("readme")
    cmd = next(c for c in shell_commands() if c.startswith("lorafuse demo"))
    proc = run_lorafuse(cmd + " " + " ".join(DEMO_SMALL), cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_readme_lists_the_commands_it_runs():
    cmds = shell_commands()
    assert [c.split()[1] for c in cmds] == ["demo", "generate"], cmds
    assert "--model lorafuse-demo/pipeline" in cmds[1]


def test_demo_report_images_heatmaps_and_saved_files(demo):
    cwd, proc = demo
    out = cwd / "lorafuse-demo"
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["merge", "klora", "est", "kl"]
    assert report["steps"] == 2 and report["size"] == "tiny" and report["rounds"] == 1
    for key in ("torch", "triton", "diffusers", "peft"):
        assert report["versions"][key]
    assert len(report["layer_names"]) == 32 and report["layer_names"][0].endswith("attn1.to_q")
    for row in ("peft_eager", "peft_eager_repeat", "lora_disabled"):
        t = report[row]
        assert 0 < t["p20_ms"] <= t["ms_per_step"] <= t["p80_ms"], (row, t)
    assert report["noise_floor"] >= 0 and report["samples_per_variant"] == 1  # 2 steps, the first left out
    for r in report["methods"]:
        assert r["layers_fused"] == 32 and r["fallback_calls"] == 0, r
        assert r["max_abs_diff"] < 1e-4, r  # fp32 on CPU: the fused path equals PEFT (replayed gates)
        assert 0 < r["p20_ms"] <= r["ms_per_step"] <= r["p80_ms"] and r["speedup_vs_peft_eager"] > 0
        assert 0.0 <= r["subject_share"] <= 1.0 and len(r["subject_share_by_step"]) == 2
        assert (out / r["image"]).stat().st_size > 0 and (out / r["heatmap"]).stat().st_size > 0
        assert r["method"] in proc.stdout
    assert report["methods"][0]["subject_share"] == 1.0 and report["methods"][0]["reference"].startswith("PEFT eager")
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "loras" / "style.safetensors").is_file()
    text = proc.stdout
    assert "PEFT (repeat)" in text and "LoRA disabled" in text and "noise floor" in text
    assert "cannot show the fused Triton kernels' speed" in text and "images are noise" in text
    assert " 1 layers " not in text and "Traceback" not in proc.stderr
    other = report["other_cpu_share"]
    assert ("WARNING: other processes used" in text) == (other is not None and other > 0.10)


def test_generate_on_the_demo_pipeline_as_written(demo):
    cwd, _ = demo
    cmd = next(c for c in shell_commands() if c.startswith("lorafuse generate"))
    proc = run_lorafuse(cmd, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / shlex.split(cmd)[shlex.split(cmd).index("--out") + 1]
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "klora" and run["layers_fused"] == 32 and run["fallbacks"] == {}
    assert run["steps"] == 10 and len(run["layer_names"]) == 32 and 0.0 <= run["gates"]["subject_share"] <= 1.0
    assert (out / "image.png").stat().st_size > 0 and (out / "gates.png").stat().st_size > 0


# ---------------------------------------------------------------------------------- Python snippets
def snippet(marker: str) -> str:
    found = [s for s in python_snippets() if marker in s]
    assert len(found) == 1, (marker, len(found))
    return found[0]


SNIPPET_MARKERS = ("fused_lora_linear(x, W, b, packed", "method=\"klora\")  # or", "fuse_module(my_linear",
                   "GuidanceConfig(")


def test_every_snippet_is_tested():
    assert sorted(python_snippets()) == sorted(snippet(m) for m in SNIPPET_MARKERS)


@pytest.fixture()
def one_thread():
    # 2 shared cores: OpenMP spinning with 2 threads under load is much slower for these tiny models
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def tiny_pipe(tmp_path, one_thread):
    """The tests' tiny SD1.5 pipeline and its two LoRA files (not loaded)."""
    from lorafuse.commands._common import quiet_libraries
    from lorafuse.commands.demo import write_loras
    from lorafuse.integrations.tiny import sd15_pipeline

    quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd15_pipeline("tiny")
    subject, style = write_loras(pipe, tmp_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe, subject, style


def test_kernel_snippet():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(41, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    A_c, B_c, A_s, B_s = (torch.randn(*s, generator=g) for s in ((4, 64), (48, 4), (13, 64), (48, 13)))
    ns = {"x": x, "W": W, "b": b, "A_subject": A_c, "B_subject": B_c, "A_style": A_s, "B_style": B_s}
    exec(snippet("fused_lora_linear(x, W, b, packed"), ns)
    d = x.double()
    base = d @ W.double().T + b.double()
    c, s = (d @ A.double().T @ B.double().T for A, B in ((A_c, B_c), (A_s, B_s)))
    assert ns["stats"].kl.shape == (41, 2)
    assert torch.allclose(ns["y"].double(), base + c + 0.8 * s, rtol=1e-4, atol=1e-4)  # the last line: no gates


def test_pipeline_snippet(tiny_pipe):
    pipe, subject, style = tiny_pipe
    before = [p.clone() for p in pipe.unet.parameters()][:4]
    ns = {"pipe": pipe, "subject_file": str(subject), "style_file": str(style), "prompt": "a photo of sks dog"}
    exec(snippet('method="klora")  # or'), ns)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert ns["image"].size == (side, side)
    assert ns["handle"].num_layers == 32 and ns["handle"].gate_log
    assert "forward" not in vars(next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q")))
    assert all(torch.equal(a, b) for a, b in zip(before, list(pipe.unet.parameters())[:4]))


def test_plain_module_snippet(tiny_pipe, tmp_path, monkeypatch):
    _, subject, style = tiny_pipe
    monkeypatch.chdir(tmp_path)  # the snippet reads subject.safetensors / style.safetensors from here
    assert subject.parent == tmp_path and style.parent == tmp_path
    from lorafuse.integrations import load_lora_pair

    A, B, _ = load_lora_pair(str(subject), str(style)).subject["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    my_linear = torch.nn.Linear(A.shape[1], B.shape[0])
    x = torch.randn(5, A.shape[1])
    base = my_linear(x).detach()
    ns = {"my_linear": my_linear, "x": x}
    exec(snippet("fuse_module(my_linear"), ns)
    assert ns["y"].shape == base.shape and not torch.allclose(ns["y"], base)  # a LoRA acts at tau 0.3
    ns["fusion"].remove()
    with torch.no_grad():
        assert torch.equal(my_linear(x), base)


def test_guidance_snippet(tiny_pipe, monkeypatch):
    from lorafuse.guidance import CLIPScorer, DINOScorer

    pipe, subject, style = tiny_pipe
    pipe.load_lora_weights(str(subject), adapter_name="sbj")
    pipe.load_lora_weights(str(style), adapter_name="sty")
    pipe.set_adapters(["sbj", "sty"], [1.0, 1.0])
    # the snippet's local model folders, replaced by tiny random scorers
    monkeypatch.setattr(DINOScorer, "from_pretrained", classmethod(lambda cls, path, **kw: cls.tiny(seed=1)))
    monkeypatch.setattr(CLIPScorer, "from_pretrained", classmethod(lambda cls, path, **kw: cls.tiny(seed=2)))
    g = torch.Generator().manual_seed(3)
    ns = {"pipe": pipe, "prompt": "a photo of sks dog", "subject_refs": torch.rand(2, 3, 40, 40, generator=g),
          "style_ref": torch.rand(1, 3, 64, 48, generator=g)}
    exec(snippet("GuidanceConfig("), ns)
    assert 0.0 <= ns["D"] <= 2.0
    handle = ns["handle"]
    assert handle.guidance is not None
    handle.remove()
