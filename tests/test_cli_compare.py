"""`dsmoe compare` and `dsmoe experts --compare-run` end to end at a toy budget: several seeds,
the statistics, the plots and the JSON, all inside the run directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsmoe.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOY = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--ffn", "32", "--experts", "4",
       "--granularity", "2", "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
       "--seq-len", "16", "--no-progress"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("cmp")
    out = root / "run"
    code = main(["compare", *TOY, "--seeds", "2", "--data", str(corpus), "--out", str(out)])
    assert code == 0
    return out


def test_compare_runs_every_variant_and_seed(compared):
    out = compared
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["models"]) == ["dense", "gshard", "deepseekmoe"]
    assert summary["settings"]["seeds_list"] == [0, 1] and summary["settings"]["steps"] == 4
    for name, m in summary["models"].items():
        assert [r["seed"] for r in m["per_seed"]] == [0, 1]
        vals = [r["final_val_loss"] for r in m["per_seed"]]
        assert m["final_val_loss"]["values"] == vals
        assert m["final_val_loss"]["mean"] == pytest.approx(sum(vals) / 2)
        assert m["val_curve"]["steps"] == [2, 4]
        for r in m["per_seed"]:
            run = Path(r["run_dir"])
            assert run.parent.parent == out and (run / "model.safetensors").is_file()
    # iso-FLOPs / iso-parameters, printed and recorded
    sizes = {n: m["size"] for n, m in summary["models"].items()}
    assert len({z["expert_activated"] for z in sizes.values()}) == 1
    assert sizes["gshard"]["expert_total"] == sizes["deepseekmoe"]["expert_total"] == 2 * 8 * 3 * 32 * 16
    # the three pairs, each against the seed spread, with a verdict and the gap at every evaluation
    assert set(summary["gaps"]) == {"deepseekmoe-gshard", "gshard-dense", "deepseekmoe-dense"}
    for key, g in summary["gaps"].items():
        a, b = key.split("-")
        per = [x["final_val_loss"] - y["final_val_loss"]
               for x, y in zip(summary["models"][a]["per_seed"], summary["models"][b]["per_seed"])]
        assert g["per_seed"] == pytest.approx(per) and g["gap"] == pytest.approx(sum(per) / 2)
        assert g["verdict"] in ("separated", "within noise")
        assert [t["step"] for t in g["trend"]] == [2, 4]
        assert "note" in summary["crossings"][key]
    # balance: the routed load of every MoE run over training; 4 steps x 32 tokens x top-k per layer
    loads = json.loads((out / "gshard" / "seed-0" / "loads.json").read_text())
    for layer in range(2):
        assert sum(sum(w["loads"][layer]) for w in loads["windows"]) == 4 * 32 * 2
    assert summary["models"]["deepseekmoe"]["final_aux_loss"]["mean"] > 0
    for name in ("loss_curves.png", "load_gshard.png", "load_deepseekmoe.png"):
        assert (out / name).stat().st_size > 1000, name
    assert not (out / "load_dense.png").exists()
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(
        f"{v}-seed-{s}.log" for v in ("dense", "gshard", "deepseekmoe") for s in (0, 1))


def test_compare_prints_the_gaps_against_the_spread(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "two"
    code = main(["compare", *TOY, "--variants", "gshard", "deepseekmoe", "--seeds", "1", "--jobs", "2",
                 "--data", str(corpus), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "expert activated" in text and "fwd FLOPs/token" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("DeepSeekMoE − GShard top-2 ="))
    assert "seed spread" in line and "one seed: no interval" in line and "within noise" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # nothing written outside --out
    assert set(json.loads((out / "compare.json").read_text())["models"]) == {"gshard", "deepseekmoe"}


def test_experts_over_the_seeds_of_a_compare_run(compared, corpus, tmp_path, capsys):
    out = tmp_path / "ex"
    code = main(["experts", "--compare-run", str(compared), "--data", str(corpus), "--tokens", "256",
                 "--seq-len", "16", "--ratios", "0", "0.125", "0.25", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads((out / "experts.json").read_text())
    assert set(result["models"]) == {f"{v}_seed-{s}" for v in ("gshard", "deepseekmoe") for s in (0, 1)}
    groups = result["groups"]
    gs, ds = groups["gshard"], groups["deepseekmoe"]
    assert gs["top_k"] == 2 and ds["top_k"] == 3
    # ratio 1/8 disables round(0.5) = 0 of GShard's 4 experts (kept as 0) and 1 of DeepSeekMoE's 7
    assert [r["disabled"] for r in ds["ablation"]] == [0, 1, 2]
    for r in ds["ablation"]:
        per_seed = [next(a["increase"] for a in result["models"][f"deepseekmoe_seed-{s}"]["ablation"]
                         if a["ratio"] == r["ratio"]) for s in (0, 1)]
        assert r["increase"]["values"] == pytest.approx(per_seed)
    assert [r["top_k"] for r in ds["activated"]] == [1, 2, 3]
    # DeepSeekMoE at its full top-k is the intact model
    for s in (0, 1):
        m = result["models"][f"deepseekmoe_seed-{s}"]
        assert m["activated"][-1]["loss"] == pytest.approx(m["loss"])
    cmp = groups["deepseekmoe_vs_gshard"]
    assert [r["top_k"] for r in cmp["activated"]] == [1, 2, 3] and cmp["seeds"] == ["0", "1"]
    for name in ("ablation.png", "activated.png", "load_deepseekmoe_seed-0.png"):
        assert (out / name).stat().st_size > 1000
    assert "DeepSeekMoE with k=1 − GShard full top-2" in text


def test_compare_refuses_bad_budgets(tmp_path, capsys):
    for argv, needle in ((["--seeds", "0"], "--seeds"), (["--jobs", "0"], "--jobs"), (["--steps", "-1"], "--steps")):
        code = main(["compare", *argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_report_of_a_stopped_comparison(compared, tmp_path, capsys):
    import shutil

    out = tmp_path / "stopped"
    shutil.copytree(compared, out)
    (out / "compare.json").unlink()
    run = out / "deepseekmoe" / "seed-1"
    (run / "model.safetensors").unlink()  # as a run stopped at step 2 leaves it
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2))
    assert main(["compare", "--report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unfinished runs" in text and "deepseekmoe seed 1" in text
    summary = json.loads((out / "compare.json").read_text())
    ds = summary["models"]["deepseekmoe"]
    assert [r["complete"] for r in ds["per_seed"]] == [True, False] and ds["per_seed"][1]["steps_done"] == 2
    assert ds["final_val_loss"]["n"] == 1
    assert summary["gaps"]["deepseekmoe-gshard"]["n"] == 1  # finals: the seed both finished
    assert [t["n"] for t in summary["gaps"]["deepseekmoe-gshard"]["trend"]] == [2, 1]  # curves: as far as they got
    assert ds["val_curve"]["n"] == [2, 1]
    code = main(["compare", "--report", str(tmp_path / "nothing")])
    assert code == 2 and "not a `dsmoe compare` directory" in capsys.readouterr().err


def test_sigterm_reaches_every_running_job(tmp_path, corpus):
    """SIGTERM to `dsmoe compare --jobs 2` (what a scheduler's stop or `timeout` sends) is passed
    on: both running runs save a checkpoint and stop, the queued runs never start, compare exits
    143 with compare.json recording the runs as stopped, and no worker process is left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "dsmoe", "compare", *TOY, "--steps", "100000", "--seeds", "2", "--jobs", "2", "--data", str(corpus), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = [out / "dense" / "seed-0", out / "gshard" / "seed-0"]  # seed-major: the first two jobs
    try:
        deadline = time.monotonic() + 240
        while not all((r / "log.jsonl").is_file() and '"val"' in (r / "log.jsonl").read_text() for r in running):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() else "slow"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = proc.communicate()[0]
    assert code == 143, text
    for r in running:
        assert any((r / "checkpoints").glob("step-*")), f"{r} saved no checkpoint\n{text}"
        assert not (r / "model.safetensors").exists()
    # the queued runs never started
    assert not (out / "deepseekmoe" / "seed-0").exists() and not (out / "dense" / "seed-1").exists()
    summary = json.loads((out / "compare.json").read_text())
    for name in ("dense", "gshard"):
        assert [(r["seed"], r["complete"]) for r in summary["models"][name]["per_seed"]] == [(0, False)]
    assert summary["models"]["deepseekmoe"]["per_seed"] == []
    logs = sorted((out / "logs").glob("*.log"))
    assert [p.name for p in logs] == ["dense-seed-0.log", "gshard-seed-0.log"]
    sizes = [p.stat().st_size for p in logs]
    time.sleep(2)
    assert [p.stat().st_size for p in logs] == sizes  # no run is left training
