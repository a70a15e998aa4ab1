"""The command line: ``lorafuse generate | inspect | kernel`` through subprocess on tiny inputs, and the
error paths that need a real model in-process (``lorafuse.cli.main`` returns 2 and prints one line
naming the problem). The demo and `generate` on its pipeline: tests/test_readme.py; usage errors and
`--help`: tests/test_cli_usage.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from lorafuse.cli import main as cli_main  # noqa: E402
from lorafuse.commands.demo import write_loras  # noqa: E402
from lorafuse.integrations.tiny import sd15_pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lorafuse(*args: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "lorafuse", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SD1.5-style pipeline saved as a local diffusers folder, with two LoRA files beside it."""
    root = tmp_path_factory.mktemp("cli")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd15_pipeline("tiny")
        pipe.save_pretrained(root / "model")
    write_loras(pipe, root / "loras")
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.randn(4, 32),
               "unet.no_such_block.to_q.lora_B.weight": torch.randn(32, 4)}, str(root / "loras" / "elsewhere.safetensors"))
    return root


def test_kernel_demo_tiny():
    proc = lorafuse("kernel", "--tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lorafuse torch backend" in proc.stdout and "max |err| vs fp64" in proc.stdout


def _dense(lora):
    A, B, s = lora
    return s * B.double() @ A.double()


def test_inspect_two_files_matches_dense_statistics(model_dir):
    from lorafuse.integrations.lora_files import load_lora_layers

    sub, sty = model_dir / "loras" / "subject.safetensors", model_dir / "loras" / "style.safetensors"
    proc = lorafuse("inspect", str(sub), str(sty), "--steps", "12", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    files = report["files"]
    assert [f["format"] for f in files] == ["peft", "peft"] and [f["family"] for f in files] == ["sd", "sd"]
    assert files[0]["ranks"] == {"4": 32} and files[1]["ranks"] == {"16": 32}
    pair = report["pair"]
    c, s = load_lora_layers(sub), load_lora_layers(sty)
    assert pair["layers"] == [p for p in c if p in s] and len(pair["layers"]) == 32
    for i, name in enumerate(pair["layers"]):
        d_c, d_s = _dense(c[name]), _dense(s[name])
        k = c[name][0].shape[0] * s[name][0].shape[0]
        want_klora = [d.abs().flatten().topk(k).values.sum().item() for d in (d_c, d_s)]
        want_est = [d.square().sum().item() for d in (d_c, d_s)]
        assert pair["klora"]["scores"][i] == pytest.approx(want_klora, rel=1e-9)
        assert pair["est"]["scores"][i] == pytest.approx(want_est, rel=1e-9)
    for key, method_pattern, beta in (("klora", "s*", 1.275), ("est", "s", 0.5)):
        m = pair[key]
        for i, row in enumerate(m["decisions"]):
            assert len(row) == 12 and set(row) <= {"c", "s"}
            (num, den) = m["scores"][i]
            for k_step, ch in enumerate(row):  # the rule, written out: subject iff S_c / gamma > S_s S(k / N)
                scale = 1.5 * (k_step / 12) + beta
                scale = scale % 1.5 if method_pattern == "s*" else scale
                assert (ch == "c") == (num / m["gamma"] > den * scale), (key, i, k_step)
            flip = next((j for j in range(1, 12) if row[j] != row[0]), None)
            assert m["first_flip"][i] == flip


def test_inspect_one_file_text(model_dir):
    proc = lorafuse("inspect", str(model_dir / "loras" / "style.safetensors"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "format peft, family sd" in proc.stdout and "r=16 x32" in proc.stdout


def test_generate_end_to_end(model_dir, tmp_path):
    out = tmp_path / "gen"
    proc = lorafuse("generate", "--model", str(model_dir / "model"),
                    "--subject", str(model_dir / "loras" / "subject.safetensors"),
                    "--style", str(model_dir / "loras" / "style.safetensors"), "--method", "est",
                    "--option", "D=0.3", "--prompt", "a photo of sks dog", "--steps", "2", "--height", "32",
                    "--width", "32", "--seed", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "est" and run["options"] == {"D": 0.3} and run["layers_fused"] == 32
    assert run["fallbacks"] == {} and 0.0 <= run["gates"]["subject_share"] <= 1.0
    assert (out / "image.png").stat().st_size > 0 and (out / "gates.png").stat().st_size > 0


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing-model", "no such folder"),
        ("not-a-pipeline", "no model_index.json"),
        ("missing-lora", "no such file"),
        ("bad-option", "option"),
        ("targets-nothing", "targets none of the model's layers"),
        ("not-safetensors", "not a readable safetensors file"),
        ("cuda", "no CUDA GPU"),
    ],
)
def test_generate_errors(model_dir, tmp_path, capsys, case, expect):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    loras = model_dir / "loras"
    args = {"--model": str(model_dir / "model"), "--subject": str(loras / "subject.safetensors"),
            "--style": str(loras / "style.safetensors"), "--prompt": "x", "--steps": "1", "--out": str(tmp_path)}
    extra = []
    if case == "missing-model":
        args["--model"] = str(tmp_path / "nowhere")
    elif case == "not-a-pipeline":
        args["--model"] = str(loras)
    elif case == "missing-lora":
        args["--style"] = str(tmp_path / "style.safetensors")
    elif case == "bad-option":
        extra = ["--option", "pattern"]
    elif case == "targets-nothing":
        args["--style"] = str(loras / "elsewhere.safetensors")
    elif case == "not-safetensors":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"this is not a safetensors file")
        args["--subject"] = str(bad)
    elif case == "cuda":
        extra = ["--device", "cuda"]
    argv = ["generate", *[v for kv in args.items() for v in kv], *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading bars, if any
    assert err.startswith("lorafuse generate:") and expect in err, err
    assert not (tmp_path / "image.png").exists()


def test_inspect_errors(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert cli_main(["inspect", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert cli_main(["inspect", "a", "b", "c"]) == 2
    assert "one or two" in capsys.readouterr().err
    other = model_dir / "loras" / "elsewhere.safetensors"
    assert cli_main(["inspect", str(model_dir / "loras" / "subject.safetensors"), str(other)]) == 2
    assert "no common layer" in capsys.readouterr().err



def test_inspect_kohya_file_with_alpha(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from lorafuse.integrations.lora_files import load_lora_layers
    from lorafuse.integrations.tiny import to_kohya

    peft_file = model_dir / "loras" / "subject.safetensors"
    kohya = tmp_path / "kohya.safetensors"
    save_file(to_kohya(load_file(str(peft_file)), alpha=2.0), str(kohya))
    assert cli_main(["inspect", str(kohya), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["files"][0]
    assert info["format"] == "kohya" and info["family"] == "sd" and info["ranks"] == {"4": 32}
    assert info["scales"] == {"0.5": 32}  # alpha / r = 2 / 4
    want = load_lora_layers(peft_file)
    assert sorted(info["layers"]) == sorted(want)


def test_inspect_checks_layers_against_a_model_folder(model_dir, capsys):
    loras = model_dir / "loras"
    argv = ["inspect", str(loras / "subject.safetensors"), "--model", str(model_dir / "model"), "--json"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["family"] == "sd"
    assert cli_main(["inspect", str(loras / "elsewhere.safetensors"), "--model", str(model_dir / "model")]) == 2
    assert "targets none of the model's layers" in capsys.readouterr().err


def test_load_pipeline_uses_the_current_dtype_keyword(model_dir):
    """diffusers deprecated ``torch_dtype`` (a FutureWarning on every `inspect --model` / `generate`)."""
    from lorafuse.commands.generate import load_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # not ours
        pipe = load_pipeline(str(model_dir / "model"), "cpu", torch.float32)
    assert pipe.unet.dtype == torch.float32
