"""The GPU check's dry run (CPU, tiny shapes, Triton through the interpreter) writes every file a real
run writes, and each part reports a status; a failing part is recorded without stopping the others.
``--fetch-wheels`` / ``--wheels`` (the lent machines' missing packages), the cold / warm Triton cache
helper and the official K-LoRA layer of the step table, each on its own.

Only the dry runs need diffusers; matplotlib only adds the PNGs (a bare lent-stack venv has none)."""

import csv
import importlib.util
import json

import pytest

HAS_PLOTS = importlib.util.find_spec("matplotlib") is not None


def test_gpu_check_dry_run_writes_everything(tmp_path):
    import math
    import tarfile

    pytest.importorskip("diffusers")
    from benchmarks import gpu_check as G

    out, back = tmp_path / "gpu", tmp_path / "OUT"
    G.main(["--out", str(out), "--dry-run", "--bundle", str(back)])
    for name in ("summary.md", "env.json", "results.json", "fuzz.csv", "layer.csv", "e2e.csv", "pytest.log") + (
            ("fuzz.png", "e2e.png") if HAS_PLOTS else ()):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "plots").glob("*.png")) or not HAS_PLOTS
    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(G.PARTS)
    assert results["fuzz"]["status"] == "ok" and results["layer"]["status"] == "ok"
    assert results["pytest"]["status"] in ("ok", "timeout")  # collect-only; a loaded CI box may be slow
    assert results["e2e_sdxl"]["distinct_specialisations"] == 0  # the interpreter compiles nothing
    rows = list(csv.DictReader((out / "fuzz.csv").open()))
    assert {r["kernel"] for r in rows} == set(G.FUZZ) and all(r["ok"] == "True" for r in rows)
    e2e = list(csv.DictReader((out / "e2e.csv").open()))
    assert {r["model"] for r in e2e} == {"sdxl", "flux"}
    assert not [r for r in e2e if r["status"].startswith("failed")], e2e
    bare = [r for r in e2e if r["variant"] == "bare" and r["mode"] == "eager"]
    assert len(bare) == 2 and all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in bare)
    # every eager row of the step table ran: bare, PEFT, the official K-LoRA layer, each method x weights mode
    eager = {(r["model"], r["variant"], r["weights"]) for r in e2e if r["mode"] == "eager" and r["status"] == "ok"}
    assert eager == {(m, v, w) for m in ("sdxl", "flux") for v, w, mode, _ in G.E2E_ROWS if mode == "eager"}
    assert ("sdxl", "klora_official", "") in eager and ("flux", "klora", "inplace") in eager
    for r in e2e:
        if r["status"] != "ok":
            continue
        assert math.isnan(float(r["peak_mem_mb"])) and math.isnan(float(r["extra_peak_mb"]))  # CPU: no CUDA peak
        assert float(r["first_call_s"]) > 0
    cold = [r for r in e2e if r["mode"] == "eager" and r["cold_first_call_s"]]
    assert {(r["model"], r["variant"], r["weights"]) for r in cold} == {
        (m, v, w) for m in ("sdxl", "flux") for v, w, mode, c in G.E2E_ROWS if c}
    for r in cold:  # the interpreter compiles nothing: an empty fresh cache
        assert float(r["cold_install_s"]) > 0 and float(r["install_s"]) > 0 and r["kernels_compiled"] == "0"
    summary = (out / "summary.md").read_text()
    for text in ("torch", "triton", "git_commit", "driver", "## Parts", "Denoiser step", "x bare", "peak MB",
                 "klora_official", "klora/inplace", "Time to first image", "cold cache s", "kernels compiled"):
        assert text in summary, text
    # --bundle: two files a lent machine can return, the tarball holding the whole folder
    assert sorted(p.name for p in back.iterdir()) == ["gpu_check.tar.gz", "summary.md"]
    with tarfile.open(back / "gpu_check.tar.gz") as t:
        names = set(t.getnames())
    assert {"gpu/summary.md", "gpu/e2e.csv", "gpu/e2e_sdxl.csv", "gpu/results.json", "gpu/logs"} <= names


def test_failing_part_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from benchmarks import gpu_check as G

    def boom(out, dry, limit):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setitem(G.RUNNERS, "fuzz", boom)
    out = tmp_path / "gpu"
    assert G.main(["--out", str(out), "--dry-run", "--parts", "fuzz,layer"]) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["fuzz"]["status"] == "failed" and "simulated CUDA error" in results["fuzz"]["note"]
    assert results["layer"]["status"] == "ok"
    assert "simulated CUDA error" in (out / "summary.md").read_text()


# ------------------------------------------------------------------------------ --fetch-wheels / --wheels
def test_pinned_wheels_parse_and_add_only_what_the_lent_stack_lacks():
    from benchmarks import wheels as W

    pins = W.pinned()
    assert pins["diffusers"] == "0.42.1" and pins["peft"] == "0.21.2" and pins["pytest"]
    assert len(pins) == len(W.WHEELS)
    assert not set(pins) & {W.canonical(n) for n in W.LENT_STACK}  # nothing the lent machine already has
    plots = W.pinned(with_matplotlib=True)
    assert plots["matplotlib"] and set(pins) < set(plots)
    assert W.canonical("Pillow") == "pillow" and W.canonical("py-cpuinfo") == "py_cpuinfo"


def _wheel(folder, name, version, requires=(), files=None):
    """A minimal wheel: ``files`` {path in the wheel: text} (default: a package ``name`` with VALUE)."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\nA long description.\nRequires-Dist: not-a-header\n"
    files = files if files is not None else {f"{name}/__init__.py": f"VALUE = {version!r}\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
        z.writestr(f"{dist}/METADATA", meta)
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_closure_check_reads_each_wheels_requirements(tmp_path):
    from benchmarks import wheels as W

    ok = [_wheel(tmp_path, "lf_a", "1.0", ["lf_b>=2", "numpy", 'lf_win; sys_platform == "win32"',
                                           'lf_doc; extra == "doc"', 'lf_old; python_version < "3.8"']),
          _wheel(tmp_path, "lf_b", "2.1", ["packaging>=20"])]
    assert W.check_closure(ok, provided={"numpy": "2.0", "packaging": "26.0"}) == []
    bad = W.check_closure(ok, provided={"numpy": "2.0", "packaging": "19.0"})
    assert len(bad) == 1 and "packaging>=20" in bad[0] and "does not satisfy" in bad[0]
    missing = W.check_closure(ok, provided={"numpy": "2.0"})
    assert len(missing) == 1 and "neither pinned nor in the lent stack" in missing[0]


def test_wheels_install_into_a_temporary_target_and_reach_child_processes(tmp_path, monkeypatch):
    import subprocess
    import sys

    from benchmarks import wheels as W

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    src = tmp_path / "whl"
    src.mkdir()
    _wheel(src, "lf_dummy_pkg", "1.2.3")
    _wheel(src, "lf_dummy_data", "0.1", files={"lf_dummy_data.data/purelib/lf_dummy_data.py": "X = 7\n"})
    target = W.install(src, tmp_path / "site")
    try:
        import lf_dummy_data
        import lf_dummy_pkg
        from importlib.metadata import version

        assert lf_dummy_pkg.VALUE == "1.2.3" and lf_dummy_data.X == 7 and version("lf_dummy_pkg") == "1.2.3"
        assert sys.path[0] == str(target) and not list(target.glob("*.data"))
        code = "import lf_dummy_pkg, lf_dummy_data; print(lf_dummy_pkg.VALUE, lf_dummy_data.X)"
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert child.stdout.split() == ["1.2.3", "7"], child.stderr
        # imported already: this process keeps the loaded copy, and says so
        with pytest.warns(RuntimeWarning, match="imported before the wheels"):
            W.install(src, tmp_path / "site2")
    finally:
        for mod in ("lf_dummy_pkg", "lf_dummy_data"):
            sys.modules.pop(mod, None)
    _wheel(src, "lf_dummy_pkg", "1.2.4")
    with pytest.raises(ValueError, match="several versions"):
        W.install(src, tmp_path / "site3")
    with pytest.raises(FileNotFoundError):
        W.install(tmp_path / "empty", tmp_path / "site4")


def test_gpu_check_wheels_flag_installs_before_the_parts_run(tmp_path, monkeypatch):
    import sys

    from benchmarks import gpu_check as G

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    src = tmp_path / "whl"
    src.mkdir()
    _wheel(src, "lf_dummy_flag", "3.0")
    seen = {}

    def part(out, dry, limit):
        import lf_dummy_flag

        seen["value"] = lf_dummy_flag.VALUE
        return {"status": "ok", "note": ""}

    monkeypatch.setitem(G.RUNNERS, "fuzz", part)
    out = tmp_path / "gpu"
    try:
        assert G.main(["--wheels", str(src), "--out", str(out), "--dry-run", "--parts", "fuzz"]) == 0
    finally:
        sys.modules.pop("lf_dummy_flag", None)
    assert seen["value"] == "3.0"
    assert "lf_dummy_flag==3.0" in json.loads((out / "env.json").read_text())["wheels"]


# ------------------------------------------------------------------------------ Triton caches, K-LoRA layer
def test_cold_cache_empties_kernel_caches_and_counts_compiled_binaries(tmp_path, monkeypatch):
    import os
    import sys
    import types

    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from benchmarks.triton_cache import clear_memory_caches, cold_cache, compiled

    def kernel(x_ptr):
        pass

    jit = JITFunction(kernel)
    tuner = Autotuner.__new__(Autotuner)  # only its cache matters here
    tuner.cache, tuner.fn = {("key",): "config"}, jit
    caches = jit.device_caches if hasattr(jit, "device_caches") else jit.cache  # Triton 3.2+ / older
    caches[0] = "compiled kernels of device 0"
    mod = types.ModuleType("lorafuse.kernels._test_fake")
    mod.tuned, mod.plain = tuner, jit
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    assert clear_memory_caches() >= 1
    assert tuner.cache == {} and not caches
    monkeypatch.setenv("TRITON_CACHE_DIR", "/before")
    with cold_cache(tmp_path / "c"):
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "c")
    assert os.environ["TRITON_CACHE_DIR"] == "/before"
    for h, name in (("h1", "_fused_kernel"), ("h2", "_fused_kernel"), ("h3", "_shrink")):
        (tmp_path / "c" / h).mkdir()
        (tmp_path / "c" / h / f"{name}.cubin").write_bytes(b"x" * 10)
        (tmp_path / "c" / h / f"{name}.json").write_text("{}")
    (tmp_path / "c" / "h4").mkdir()
    (tmp_path / "c" / "h4" / "__triton_launcher.so").write_bytes(b"")
    got = compiled(tmp_path / "c")
    assert got["kernels"] == 3 and got["by_name"] == {"_fused_kernel": 2, "_shrink": 1} and got["launchers"] == 1
    assert got["keys"] == ["h1", "h2", "h3"]
    assert compiled(tmp_path / "missing")["kernels"] == 0


def test_official_klora_layer_adds_one_dense_delta_and_undoes():
    import torch

    peft = pytest.importorskip("peft")
    from benchmarks import klora_official

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    for name, r in (("subject", 4), ("style", 2)):
        model = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"]), model,
                                             adapter_name=name)
    layer = model[0]
    with torch.no_grad():
        for name in ("subject", "style"):
            layer.lora_B[name].weight.normal_()
    x = torch.randn(3, 5, 12)
    undo = klora_official.install(model, num_steps=2)
    with torch.no_grad():
        base = layer.base_layer(x)
        deltas = [x @ (layer.lora_B[n].weight @ layer.lora_A[n].weight).t() * layer.scaling[n]
                  for n in ("subject", "style")]
        y = model(x)
    assert "forward" in layer.__dict__
    assert min(float((y - base - d).abs().max()) for d in deltas) < 1e-5
    undo()
    assert "forward" not in layer.__dict__
    with pytest.raises(ValueError):
        klora_official.install(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fetch_wheels_asks_pip_for_cp312_manylinux_binaries_and_keeps_one_version_each(tmp_path, monkeypatch):
    import subprocess

    from benchmarks import gpu_check as G
    from benchmarks import wheels as W

    dest = tmp_path / "whl"
    dest.mkdir()
    _wheel(dest, "diffusers", "0.30.0")  # left by an earlier pin: dropped
    calls = []

    def fake_pip(cmd, **kwargs):  # what pip download would save: each pinned wheel, no requirements
        calls.append(cmd)
        for spec in cmd[cmd.index("-d") + 2:]:
            name, version = spec.split("==")
            _wheel(dest, name, version)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(W.subprocess, "run", fake_pip)
    assert G.main(["--fetch-wheels", str(dest)]) == 0
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--abi") + 1] == "cp312"
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64", "any"} <= {cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"}
    got = sorted(W.wheel_name(p) for p in dest.glob("*.whl"))
    assert got == sorted(W.pinned().items())  # the stale diffusers 0.30.0 is gone
    calls.clear()
    assert G.main(["--fetch-wheels", str(dest), "--with-matplotlib"]) == 0
    assert "matplotlib==3.11.2" in calls[0]
