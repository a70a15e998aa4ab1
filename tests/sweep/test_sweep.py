"""``lorafuse sweep`` on the embedded tiny pipeline: one process vs ``torchrun --nproc_per_node 2`` on
the CPU (gloo), resume after a kill, failures recorded per item, and every bad SPEC rejected with exit
code 2 before any model loads.

The SPEC is the issue's: two subject and two style LoRA files (written here), one prompt, two methods,
two seeds (16 items), 2 steps at 16x16, tiny random-init CLIP / DINO scorers. Every process runs on one
thread (torchrun sets OMP_NUM_THREADS=1 for several processes; the in-process run sets it too), so
the images can be compared bit for bit."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
yaml = pytest.importorskip("yaml")

from lorafuse.cli import main as cli_main  # noqa: E402
from lorafuse.sweep import runner  # noqa: E402
from lorafuse.sweep.example import EXAMPLE_SPEC, write_loras_and_refs  # noqa: E402
from lorafuse.sweep.items import claim_output, make_items, pair_order  # noqa: E402
from lorafuse.sweep.spec import load_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

SPEC = {
    "model": "lorafuse:tiny-sd15", "steps": 2, "height": 16, "width": 16, "guidance_scale": 7.5, "backend": "torch",
    "subjects": [{"name": "dog", "file": "loras/dog.safetensors", "trigger": "sks dog", "text": "a dog",
                  "references": "refs/dog"},
                 {"name": "cat", "file": "loras/cat.safetensors", "trigger": "sks cat", "references": "refs/cat"}],
    "styles": [{"name": "ink", "file": "loras/ink.safetensors", "trigger": "in ink style", "reference": "refs/ink.png"},
               {"name": "oil", "file": "loras/oil.safetensors", "trigger": "in oil style",
                "reference": "refs/oil.png"}],
    "prompts": ["a photo of {subject} {style}"],
    "methods": ["klora", "kl"],
    "seeds": [0, 1],
    "scorers": {"clip": "lorafuse:tiny-clip", "dino": "lorafuse:tiny-dino", "batch_size": 5},
}
NUM_ITEMS = 2 * 2 * 1 * 2 * 2


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop(runner.KILL_AFTER_ENV, None)
    env.update(extra)
    return env


def torchrun(spec: Path, out: Path, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorafuse",
           "sweep", str(spec), "--out", str(out), "--no-progress", "--cpu"]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=400)


def run_here(*args: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli_main(["sweep", *args, "--no-progress", "--cpu"])
    finally:
        torch.set_num_threads(threads)


def records(out: Path) -> list[dict]:
    lines = []
    for f in sorted((out / "records").glob("*.jsonl")):
        lines += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return lines


def images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out / "images"))[:-4]: p.read_bytes() for p in (out / "images").rglob("*.png")}


def table(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_loras_and_refs(root)
    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def one_process(workspace):
    out = workspace / "one"
    assert run_here(str(workspace / "spec.yaml"), "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(workspace):
    out = workspace / "two"
    proc = torchrun(workspace / "spec.yaml", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_items_are_ordered_pair_major_in_snake_order(workspace):
    spec = load_spec(workspace / "spec.yaml")
    items = make_items(spec)
    assert len(items) == NUM_ITEMS and len({it.key for it in items}) == NUM_ITEMS
    assert pair_order(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]  # consecutive pairs share a LoRA
    pairs = [it.pair for it in items]
    assert pairs == sorted(pairs, key=[(0, 0), (0, 1), (1, 1), (1, 0)].index)  # each pair's items contiguous
    assert items[0].key == "dog+ink/klora/p0-s0" and items[-1].key == "cat+ink/kl/p0-s1"


def test_one_process_and_two_give_the_same_items_and_images(one_process, two_processes):
    two, proc = two_processes
    a, b = images(one_process), images(two)
    assert sorted(a) == sorted(b) == sorted(it for it in (r["key"] for r in records(one_process)))
    assert len(a) == NUM_ITEMS
    assert [k for k in a if a[k] != b[k]] == []  # bit-identical per item
    recs = records(two)
    assert Counter(r["key"] for r in recs) == Counter({k: 1 for k in a})  # no item twice, none lost
    by_rank = Counter(r["rank"] for r in recs)
    assert by_rank == {0: NUM_ITEMS // 2, 1: NUM_ITEMS // 2}
    # contiguous shares: each process loads its first pair (2 LoRAs) and one LoRA per pair change
    for rank in (0, 1):
        idx = sorted(r["index"] for r in recs if r["rank"] == rank)
        assert idx == list(range(idx[0], idx[0] + NUM_ITEMS // 2))
    assert "| klora |" in proc.stdout and "16/16 items done" in proc.stdout


def test_merged_table_has_one_row_per_method_with_expected_counts(one_process, two_processes):
    two, _ = two_processes
    for out in (one_process, two):
        t = table(out)
        assert list(t) == ["klora", "kl"]
        for row in t.values():
            assert (row["items"], row["ok"], row["failed"], row["missing"]) == ("8", "8", "0", "0")
            for col in ("subject_dino", "style_clip", "text_clip", "ms_per_step", "subject_share"):
                assert row[f"{col}_n"] == "8" and row[f"{col}_mean"] != "" and row[f"{col}_ci95"] != ""
            assert -1.0 <= float(row["style_clip_mean"]) <= 1.0 and 0.0 <= float(row["subject_share_mean"]) <= 1.0
        md = (out / "summary.md").read_text()
        assert md.count("| klora |") == 1 and md.count("| kl |") == 1
        assert sorted(p.name for p in (out / "sheets").glob("*.png")) == ["cat+ink.png", "cat+oil.png",
                                                                       "dog+ink.png", "dog+oil.png"]
        assert (out / "scatter.png").is_file() or "matplotlib is not installed" in md
    one, two_t = table(one_process), table(two)
    for m in ("klora", "kl"):  # same images: same scores and gates (scored in other batches: rounding only)
        for col in ("subject_dino", "style_clip", "text_clip", "subject_share"):
            assert float(one[m][f"{col}_mean"]) == pytest.approx(float(two_t[m][f"{col}_mean"]), abs=1e-6)
    rec = records(one_process)[0]
    assert rec["layers_fused"] == 32 and rec["fallback_calls"] == {} and rec["denoiser_calls"] == 2
    assert len(rec["subject_share_by_step"]) == 2 and len(rec["subject_share_by_layer"]) == 32


def test_resume_after_a_kill_generates_no_item_twice(workspace, one_process, capsys):
    """Both processes SIGKILL themselves after 3 items (a test hook); the rerun finishes the rest."""
    out = workspace / "resumed"
    killed = torchrun(workspace / "spec.yaml", out, **{runner.KILL_AFTER_ENV: "3"})
    assert killed.returncode != 0
    first = records(out)
    assert 1 <= len(first) <= 6 and all(r["status"] == "ok" for r in first)
    assert not (out / "summary.csv").exists()
    assert run_here(str(workspace / "spec.yaml"), "--out", str(out)) == 0  # rerun (here: one process)
    assert f"({len(first)} finished, {NUM_ITEMS - len(first)} to generate)" in capsys.readouterr().out
    recs = records(out)
    assert Counter(r["key"] for r in recs) == Counter({k: 1 for k in images(one_process)})  # none twice
    assert all(r in recs for r in first)  # the killed run's items were kept, not regenerated
    assert images(out) == images(one_process)
    fresh, resumed = table(one_process), table(out)
    assert list(fresh) == list(resumed)
    for m in fresh:
        for col, v in fresh[m].items():
            if col.startswith("ms_per_step_") and not col.endswith("_n"):
                continue  # timings differ from run to run
            if col.endswith(("_mean", "_ci95")):
                assert float(resumed[m][col]) == pytest.approx(float(v), abs=1e-6), (m, col)
            else:
                assert resumed[m][col] == v, (m, col)


def test_a_failing_item_is_recorded_and_the_sweep_goes_on(workspace, tmp_path):
    """A subject LoRA made for another model (wrong shapes) fails at load; the other pair runs."""
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 48),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, 4)},
              str(tmp_path / "other.safetensors"))
    spec = dict(SPEC, methods=["merge"], seeds=[0], scorers={"dino": "lorafuse:tiny-dino"})
    spec["subjects"] = [dict(SPEC["subjects"][0], file=str(workspace / "loras/dog.safetensors"),
                             references=str(workspace / "refs/dog")),
                        {"name": "other", "file": str(tmp_path / "other.safetensors"), "trigger": "sks thing"}]
    spec["styles"] = [dict(SPEC["styles"][0], file=str(workspace / "loras/ink.safetensors"), reference=None)]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert run_here(str(tmp_path / "spec.json"), "--out", str(tmp_path / "out"), "--score-every", "1") == 1
    recs = {r["key"]: r for r in records(tmp_path / "out")}
    scores = [json.loads(line) for line in (tmp_path / "out/scores/rank0.jsonl").read_text().splitlines()]
    assert [s["key"] for s in scores] == ["dog+ink/merge/p0-s0"]  # scored on the fly, once
    assert scores[0]["subject_dino"] is not None and scores[0]["style_clip"] is None
    assert recs["dog+ink/merge/p0-s0"]["status"] == "ok"
    bad = recs["other+ink/merge/p0-s0"]
    assert bad["status"] == "failed" and "Error" in bad["error"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "Failed items (1):" in md and "other+ink/merge/p0-s0" in md
    assert "style fidelity and text alignment skipped: no scorers.clip" in md
    assert "subject fidelity skipped for other: no references folder" in md
    assert (tmp_path / "out" / "sheets" / "other+ink.png").is_file()


# ------------------------------------------------------------------------------------------------
# bad SPECs: exit 2, one line naming the key, before any model loads
# ------------------------------------------------------------------------------------------------
def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


BAD = {
    "missing model": (lambda s: _without(s, "model"), "model: missing"),
    "missing subjects": (lambda s: _without(s, "subjects"), "subjects: missing"),
    "unknown key": (lambda s: dict(s, stepz=3), "stepz: unknown key"),
    "unknown method": (lambda s: dict(s, methods=["klora", "klorra"]), "methods[1]: unknown fusion method 'klorra'"),
    "unknown option": (lambda s: dict(s, methods=["klora patern=s"]), "methods[0]: unknown option 'patern'"),
    "bad option value": (lambda s: dict(s, methods=["klora pattern=q"]), "methods[0]:"),
    "D=auto without dino": (lambda s: dict(s, methods=["est D=auto"], scorers={"clip": "lorafuse:tiny-clip"}),
                            "scorers.dino: missing"),
    "missing LoRA file": (lambda s: dict(s, subjects=[dict(s["subjects"][0], file="loras/nope.safetensors")]),
                          "subjects[0].file: no such file"),
    "not a LoRA file": (lambda s: dict(s, styles=[dict(s["styles"][0], file="refs/ink.png")]),
                        "styles[0].file:"),
    "no subject placeholder": (lambda s: dict(s, prompts=["a photo {style}"]), "prompts[0]: no {subject} placeholder"),
    "unknown placeholder": (lambda s: dict(s, prompts=["{subject} {style} {mood}"]), "prompts[0]: unknown placeholder"),
    "no trigger": (lambda s: dict(s, subjects=[_without(s["subjects"][0], "trigger")]), "subjects[0].trigger: missing"),
    "missing references": (lambda s: dict(s, subjects=[dict(s["subjects"][0], references="refs/none")]),
                           "subjects[0].references: no such file or folder"),
    "scorer not a folder": (lambda s: dict(s, scorers={"clip": "models/clip"}), "scorers.clip: no such folder"),
    "bad seeds": (lambda s: dict(s, seeds=[0, "one"]), "seeds[1]:"),
    "model folder": (lambda s: dict(s, model="./models/sd"), "model: no such folder"),
}


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_pipeline", boom)
    monkeypatch.setattr(runner, "make_state", boom)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_exits_2_naming_the_key_before_any_load(case, workspace, tmp_path, capsys, no_model_load):
    edit, expected = BAD[case]
    path = workspace / f"bad-{case.replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump(edit(json.loads(json.dumps(SPEC))), sort_keys=False))
    assert cli_main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorafuse sweep: {path}: {expected}"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_changed_spec_in_the_same_folder_is_refused(workspace, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    claim_output(load_spec(workspace / "spec.yaml"), out)  # as a first run does
    changed = workspace / "changed.yaml"
    changed.write_text(yaml.safe_dump(dict(SPEC, seeds=[0, 1, 2], steps=3), sort_keys=False))
    assert cli_main(["sweep", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a sweep of a different SPEC (changed: steps, seeds)" in err and len(err.splitlines()) == 1
    # the same SPEC written differently (JSON, other key order) is the same sweep
    same = workspace / "same.json"
    same.write_text(json.dumps(dict(reversed(list(SPEC.items())))))
    assert cli_main(["sweep", str(same), "--out", str(out), "--check"]) == 0


def test_bad_spec_from_the_command_line_prints_one_line(workspace):
    path = workspace / "cli-bad.json"
    path.write_text(json.dumps(dict(SPEC, methods=["klora", "kl pattern=s"])))
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "sweep", str(path)], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lorafuse sweep: {path}: methods[1]: unknown option 'pattern' of method 'kl'; valid options: direction, "
        "reduction, tie, mode, compiled"]


def test_readme_example_spec_is_the_written_one_and_checks(tmp_path, capsys):
    readme = (REPO / "README.md").read_text()
    assert EXAMPLE_SPEC in readme
    assert cli_main(["sweep", "--write-example", str(tmp_path)]) == 0
    assert cli_main(["sweep", str(tmp_path / "spec.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "OK, 40 items" in out and "dog+ink/est_D=auto/p0-s1" in out
    shutil.rmtree(tmp_path / "loras")


def test_mean_and_95_interval_use_student_t():
    from lorafuse.sweep.summary import mean_ci

    m, h = mean_ci([1.0, 2.0, 3.0, None])  # s = 1, n = 3: t_{0.975, 2} = 4.303
    assert m == 2.0 and h == pytest.approx(4.303 / 3 ** 0.5)
    assert mean_ci([0.5]) == (0.5, None) and mean_ci([None]) == (None, None)
    assert mean_ci([1.0] * 40 + [3.0] * 40)[1] == pytest.approx(1.96 * (80 / 79) ** 0.5 / 80 ** 0.5)
