"""The command line as a new user meets it, through subprocesses: `lorafuse` alone prints help, every
`--help` answers without importing torch, and every user error is one line on stderr naming the
argument, exit code 2, no traceback, reported before any model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("demo", "generate", "inspect", "kernel", "bench")
HEAVY = ("torch", "triton", "diffusers", "transformers", "peft")


def child(code: str, *, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def lorafuse(*args: str, cwd=None, hide: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``lorafuse ARGS`` in a child (``hide``: modules made unimportable there); also returns the
    heavy modules the child had imported when the command returned."""
    code = f"""
        import sys
        for name in {hide!r}:
            sys.modules[name] = None  # `import name` fails, importlib.util.find_spec(name) is None
        from lorafuse.cli import main
        try:
            rc = main({list(args)!r})
        except SystemExit as exc:
            rc = exc.code
        print("HEAVY", ",".join(m for m in {HEAVY!r} if sys.modules.get(m) is not None))
        sys.exit(rc)
    """
    proc = child(code, cwd=cwd)
    heavy = next(line for line in proc.stdout.splitlines() if line.startswith("HEAVY")).split()[1:]
    return proc, (heavy[0].split(",") if heavy else [])


def assert_usage_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit code 2, one line on stderr, no traceback, the line names every string of ``names``."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("lorafuse"), err
    for name in names:
        assert name in err, (name, err)
    return err


def test_no_arguments_prints_help_without_running_anything(tmp_path):
    proc, heavy = lorafuse(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: lorafuse" in proc.stdout and all(c in proc.stdout for c in COMMANDS)
    assert heavy == [] and list(tmp_path.iterdir()) == []  # nothing imported, nothing written


def test_help_of_every_command_imports_no_torch():
    """Every command registered in lorafuse.cli.COMMANDS (merged ones too), read from the parser."""
    code = f"""
        import argparse, sys, time
        from lorafuse.cli import build_parser, main
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        names = list(sub.choices)
        assert set({COMMANDS!r}) <= set(names), names
        for argv in ([], ["--help"], *([c, "--help"] for c in names)):
            t0 = time.perf_counter()
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
            print("TIME", " ".join(argv), round(time.perf_counter() - t0, 3), file=sys.stderr)
            assert not [m for m in {HEAVY!r} if m in sys.modules], (argv, [m for m in {HEAVY!r} if m in sys.modules])
        print("COMMANDS", *names)
    """
    proc = child(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = next(line for line in proc.stdout.splitlines() if line.startswith("COMMANDS")).split()[1:]
    for command in names:  # the description is plain text: no RST markup
        assert f"usage: lorafuse {command}" in proc.stdout
    assert ":mod:" not in proc.stdout and ":func:" not in proc.stdout and "``" not in proc.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pipeline-shaped folder (model_index.json + unet/config.json; no weights: no test here may load
    it) and LoRA files: a valid-looking header, a broken one, and a plain file to block paths with."""
    import struct

    root = tmp_path_factory.mktemp("usage")
    (root / "model" / "unet").mkdir(parents=True)
    (root / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "model" / "unet" / "config.json").write_text("{}")
    header = b'{"__metadata__": {}}'
    (root / "ok.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (root / "bad.safetensors").write_bytes(b"this is not a safetensors file")
    (root / "a_file").write_text("x")
    return root


def _generate(files, *extra, **replace):
    args = {"--model": str(files / "model"), "--subject": str(files / "ok.safetensors"),
            "--style": str(files / "ok.safetensors"), "--prompt": "x", "--out": str(files / "out")}
    args.update({f"--{k}": v for k, v in replace.items()})
    return ["generate", *[t for kv in args.items() for t in kv], *extra]


# (case id, argv builder, names the one line must contain); none of these may import diffusers
CASES = [
    ("demo-out-is-a-file", lambda f: ["demo", "--out", str(f / "a_file")], ["--out", "not a folder"]),
    ("demo-out-under-a-file", lambda f: ["demo", "--out", str(f / "a_file" / "sub")], ["--out", "writable"]),
    ("demo-device-gpu", lambda f: ["demo", "--device", "gpu"], ["--device", "'gpu'", "cpu or cuda"]),
    ("demo-steps-0", lambda f: ["demo", "--steps", "0"], ["--steps", "at least 1"]),
    ("demo-rounds-0", lambda f: ["demo", "--rounds", "0"], ["--rounds"]),
    ("demo-bad-method", lambda f: ["demo", "--methods", "fast"], ["--methods", "invalid choice"]),
    ("generate-out-under-a-file", lambda f: _generate(f, out=str(f / "a_file" / "o")), ["--out"]),
    ("generate-device-mps", lambda f: _generate(f, "--device", "mps"), ["--device", "'mps'"]),
    ("generate-method", lambda f: _generate(f, "--method", "fastest"), ["--method", "invalid choice"]),
    ("generate-missing-model", lambda f: _generate(f, model=str(f / "nowhere")), ["--model", "no such folder"]),
    ("generate-not-a-pipeline", lambda f: _generate(f, model=str(f)), ["--model", "model_index.json"]),
    ("generate-missing-subject", lambda f: _generate(f, subject=str(f / "no.safetensors")), ["--subject", "no such file"]),
    ("generate-broken-style", lambda f: _generate(f, style=str(f / "bad.safetensors")), ["--style", "safetensors"]),
    ("generate-option-no-equals", lambda f: _generate(f, "--option", "pattern"), ["--option", "KEY=VALUE"]),
    ("generate-height", lambda f: _generate(f, "--height", "30"), ["--height", "multiple of 8"]),
    ("generate-steps", lambda f: _generate(f, "--steps", "0"), ["--steps"]),
    ("generate-no-prompt", lambda f: _generate(f)[:-4] + ["--out", str(f / "out")], ["--prompt"]),
    ("inspect-missing-file", lambda f: ["inspect", str(f / "missing.safetensors")], ["FILE", "no such file"]),
    ("inspect-three-files", lambda f: ["inspect", "a", "b", "c"], ["FILE", "one or two"]),
    ("inspect-steps", lambda f: ["inspect", str(f / "ok.safetensors"), "--steps", "0"], ["--steps"]),
    ("kernel-device", lambda f: ["kernel", "--device", "tpu"], ["--device"]),
    ("bench-csv-is-a-folder", lambda f: ["bench", "--csv", str(f)], ["--csv", "folder"]),
    ("bench-rounds", lambda f: ["bench", "--rounds", "0", "--no-csv"], ["--rounds"]),
    ("bench-backend", lambda f: ["bench", "--backend", "cuda"], ["--backend", "invalid choice"]),
]


@pytest.mark.parametrize("case, argv, names", CASES, ids=[c[0] for c in CASES])
def test_usage_error_is_one_line_exit_2_before_any_model(files, case, argv, names):
    proc, heavy = lorafuse(*argv(files), cwd=files)
    assert_usage_error(proc, *names)
    assert "diffusers" not in heavy, heavy  # reported before anything heavy (no model) was loaded
    assert not (files / "out" / "image.png").exists()


def test_generate_est_option_out_of_range(files):
    proc, heavy = lorafuse(*_generate(files, "--method", "est", "--option", "D=5"))
    assert_usage_error(proc, "--option D=5", "[0, 2]")
    assert "diffusers" not in heavy, heavy


def test_generate_unknown_option_names_the_valid_ones(files):
    proc, _ = lorafuse(*_generate(files, "--option", "colour=red"))
    assert_usage_error(proc, "--option", "colour", "pattern")


@pytest.mark.parametrize("command", ["demo", "generate", "inspect"])
def test_missing_extra_names_the_pip_install(files, command):
    argv = {"demo": ["demo", "--out", str(files / "demo")], "generate": _generate(files),
            "inspect": ["inspect", str(files / "ok.safetensors")]}[command]
    proc, _ = lorafuse(*argv, hide=("diffusers",))
    assert_usage_error(proc, "diffusers", 'pip install "lorafuse[diffusers]"')


def test_cuda_without_a_gpu():
    proc, _ = lorafuse("kernel", "--device", "cuda")
    if proc.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert_usage_error(proc, "--device cuda", "no CUDA GPU")


def test_method_names_match_the_library():
    from lorafuse.commands.generate import METHODS
    from lorafuse.fusion import METHODS as LIBRARY

    assert METHODS == tuple(LIBRARY)


def test_bench_provider_names_match_the_providers():
    pytest.importorskip("peft")
    from benchmarks import options, providers

    assert providers.PROVIDERS is options.PROVIDERS and len(set(options.PROVIDERS)) == len(options.PROVIDERS)


def test_bench_writes_under_the_current_directory(tmp_path):
    """Default CSV and plot folder are relative to where it runs, never the repository's results."""
    from benchmarks import options

    args = options.resolve_paths(options.build_parser().parse_args([]))
    assert not args.csv.is_absolute() and args.csv.parts[0] == "lorafuse-bench"
    assert not args.plot_dir.is_absolute() and args.plot_dir.parts[0] == "lorafuse-bench"
    assert "benchmarks" not in str(args.csv)
