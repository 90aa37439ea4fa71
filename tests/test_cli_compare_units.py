"""dsmoe/cli/compare.py in-process, piece by piece: the options and the budget, the train
namespace of each run, the routed-load recorder (on a tiny model), one run with its output in its
log, the sequential and parallel job runners (stand-in runs; the parallel ones are forked
processes), the statistics over seeds and their report (against hand-computed numbers), the plots
(their data, axes and pixel sizes), `--report` on a compare directory written here, and whole
`dsmoe compare` commands whose training runs are stand-ins writing their logs. Nothing here
trains; tests/test_cli_compare.py runs the real thing."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import struct
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

from dsmoe import DeepSeekMoEForCausalLM, get_preset
from dsmoe.cli import build_parser, compare, main
from dsmoe.cli.common import CLIError, claim_run_dir, format_table
from dsmoe.cli.models import compare_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
T1, T2 = 12.706, 4.303  # Student's t, 95% two-sided, 1 and 2 degrees of freedom
TOY = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--ffn", "32", "--experts", "4",
       "--granularity", "2", "--shared", "1"]


def _ns(*argv) -> argparse.Namespace:
    return build_parser("compare").parse_args(["compare", *argv])


def _compare_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser("compare")._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["compare"]


# ------------------------------------------------------------------------------- run folders written by hand


def _train(step, loss, aux=None, tps=400.0, elapsed=1.0):
    return {"step": step, "split": "train", "loss": loss, "aux_loss": aux, "lr": 0.002, "tokens": 16 * step,
            "tokens_per_s": tps, "elapsed_s": elapsed}


def _val(step, loss):
    return {"step": step, "split": "val", "loss": loss}


def _write_log(run_dir: Path, rows) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # as MetricsLog writes them


# (variant, seed): train losses at steps 10, 20, ..., their balance losses (None: no MoE layer),
# validation losses at steps 20, 40, finished? A 40-step budget: the last 5% are 2 logged steps.
RUNS = {
    ("dense", 0): ([4.0, 3.5, 3.2, 3.0], None, [3.0, 2.6], True),
    ("dense", 1): ([4.2, 3.7, 3.4, 3.2], None, [3.2, 2.8], True),
    ("dense", 2): ([4.4, 3.9], None, [], False),  # stopped before its first evaluation: no curve at all
    ("gshard", 0): ([4.0, 3.4, 3.1, 2.9], [0.05, 0.04, 0.03, 0.02], [3.1, 2.5], True),
    ("gshard", 1): ([4.1, 3.5, 3.2, 3.0], [0.05, 0.04, 0.03, 0.04], [3.3, 2.7], True),
    ("gshard", 2): ([4.2, 3.6, 3.3, 3.1], [0.05, 0.04, 0.02, 0.02], [3.5, 2.9], True),
    ("deepseekmoe", 0): ([3.9, 3.3, 3.0, 2.8], [0.06, 0.05, 0.04, 0.03], [2.9, 2.4], True),
    ("deepseekmoe", 1): ([4.0, 3.4, 3.1, 2.9], [0.06, 0.05, 0.04, 0.05], [3.0, 2.5], True),
    ("deepseekmoe", 2): ([4.1, 3.5], [0.06, 0.05], [3.1], False),  # stopped at step 20
}
TPS = [100.0, 200.0, 400.0, 400.0]  # tokens/s of the logged steps: over the last three, 300 (harmonic mean)
# the routed load of training windows (two MoE layers): GShard's seed 1, DeepSeekMoE's seed 0
LOADS = {
    ("gshard", 1): [{"end_step": 20, "loads": [[1, 1, 1, 1], [4, 0, 0, 0]]},
                    {"end_step": 40, "loads": [[6, 2, 0, 0], [2, 2, 2, 2]]}],
    ("deepseekmoe", 0): [{"end_step": 40, "loads": [[7, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]]}],
}


def _run_rows(train, aux, val):
    rows = []
    for i, loss in enumerate(train):
        rows.append(_train(10 * (i + 1), loss, aux[i] if aux else None, TPS[i], float(i + 1)))
        if i % 2 == 1 and i // 2 < len(val):
            rows.append(_val(10 * (i + 1), val[i // 2]))
    return rows


def _write_runs(root: Path, runs=RUNS, loads=LOADS) -> list[dict]:
    """The runs' folders under ``root``, seed-major as compare orders its jobs."""
    out = []
    for seed in sorted({s for _, s in runs}):
        for variant in compare.VARIANTS:
            if (variant, seed) not in runs:
                continue
            train, aux, val, complete = runs[(variant, seed)]
            run_dir = root / variant / f"seed-{seed}"
            _write_log(run_dir, _run_rows(train, aux, val))
            if (variant, seed) in loads:
                (run_dir / "loads.json").write_text(json.dumps({"window": 1, "windows": loads[(variant, seed)]}))
            out.append({"variant": variant, "seed": seed, "run_dir": str(run_dir), "complete": complete})
    return out


# ------------------------------------------------------------------------------- options


def test_defaults():
    assert vars(_ns()) == {
        "version": False, "command": "compare", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "ffn": 256,
        "experts": 16, "granularity": 4, "shared": 1, "variants": ["dense", "gshard", "deepseekmoe"],
        "budget": "short", "steps": None, "seeds": None, "seed": 0, "batch_size": 16, "seq_len": 128, "lr": 2e-3,
        "eval_every": None, "eval_batches": None, "data": None, "jobs": 1, "threads": 1, "device": "auto",
        "impl": "dsmoe", "bf16": False, "out": None, "overwrite": False, "no_progress": False, "report": None}


def test_options_parse_to_their_types_and_choices():
    ns = _ns("--hidden-size", "64", "--num-layers", "3", "--num-heads", "2", "--ffn", "48", "--experts", "5",
             "--granularity", "3", "--shared", "2", "--variants", "gshard", "dense", "--budget", "long", "--steps",
             "9", "--seeds", "2", "--seed", "7", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-3",
             "--eval-every", "3", "--eval-batches", "5", "--data", "d.txt", "--jobs", "2", "--threads", "3",
             "--device", "cpu", "--impl", "reference", "--bf16", "--out", "o", "--overwrite", "--no-progress",
             "--report", "r")
    assert vars(ns) == {
        "version": False, "command": "compare", "hidden_size": 64, "num_layers": 3, "num_heads": 2, "ffn": 48,
        "experts": 5, "granularity": 3, "shared": 2, "variants": ["gshard", "dense"], "budget": "long", "steps": 9,
        "seeds": 2, "seed": 7, "batch_size": 4, "seq_len": 32, "lr": 1e-3, "eval_every": 3, "eval_batches": 5,
        "data": "d.txt", "jobs": 2, "threads": 3, "device": "cpu", "impl": "reference", "bf16": True, "out": "o",
        "overwrite": True, "no_progress": True, "report": "r"}
    for argv in (["--variants", "moe"], ["--budget", "huge"], ["--impl", "torch"], ["--steps", "1.5"]):
        with pytest.raises(SystemExit):
            _ns(*argv)


def test_help_texts_groups_and_metavars():
    p = _compare_parser()
    helps = {a.option_strings[0]: a.help for a in p._actions if a.option_strings[0] != "-h"}
    assert helps == {
        "--hidden-size": "hidden size of all variants (default 128)",
        "--num-layers": "layers (default 4)",
        "--num-heads": "attention heads (default 4)",
        "--ffn": "intermediate size of a standard expert (default 256); the dense FFN is 2x this",
        "--experts": "GShard experts, top-2 (default 16, as the paper's 2B models)",
        "--granularity": "DeepSeekMoE splits each expert into this many (default 4)",
        "--shared": "DeepSeekMoE shared experts, of the fine-grained size (default 1)",
        "--variants": "which to train (default all)",
        # written out from the budget table
        "--budget": "short (default): steps 200, seeds 3, eval_every 25, eval_batches 8; medium: steps 600, seeds 3, "
                    "eval_every 50, eval_batches 16; long: steps 3000, seeds 3, eval_every 50, eval_batches 16",
        "--steps": "steps per run (default: the budget's)",
        "--seeds": "seeds per variant, >= 1 (default: the budget's, 3)",
        "--seed": "first seed: the runs use seeds S, S+1, ... (default 0)",
        "--batch-size": "default 16",
        "--seq-len": "default 128",
        "--lr": "peak learning rate (default 2e-3)",
        "--eval-every": "validate every N steps (default: the budget's)",
        "--eval-batches": "validation batches (default: the budget's)",
        "--data": "text file or folder (default: the Python standard library's sources)",
        "--jobs": "runs trained at the same time, in separate processes (default 1); a SIGTERM or Ctrl-C stops them "
                  "all, each saving a checkpoint, and starts no more",
        "--threads": "torch threads per run (default 1)",
        "--device": None, "--impl": None, "--bf16": None, "--no-progress": None,
        "--out": "output directory (default: runs/compare-<date>-<time>)",
        "--overwrite": "replace an existing, non-empty --out (its previous results are deleted)",
        "--report": "train nothing: the report, plots and compare.json again from an existing compare directory "
                    "(also a stopped one: its runs' logs as far as they got)",
    }
    groups = {g.title: [a.option_strings[0] for a in g._group_actions] for g in p._action_groups[2:]}
    assert groups == {
        "architectures (the paper's 2B layout, scaled down)": [
            "--hidden-size", "--num-layers", "--num-heads", "--ffn", "--experts", "--granularity", "--shared",
            "--variants"],
        "budget (the same for every variant and seed)": [
            "--budget", "--steps", "--seeds", "--seed", "--batch-size", "--seq-len", "--lr", "--eval-every",
            "--eval-batches", "--data"],
        "execution": ["--jobs", "--threads", "--device", "--impl", "--bf16", "--out", "--overwrite", "--no-progress",
                      "--report"],
    }
    metavars = {a.option_strings[0]: a.metavar for a in p._actions if a.metavar is not None}
    assert metavars == {"--data": "PATH", "--out": "DIR", "--report": "DIR"}
    assert next(a for a in p._actions if a.dest == "variants").nargs == "+"


# ------------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("budget, expected", [
    ("short", {"steps": 200, "seeds": 3, "eval_every": 25, "eval_batches": 8}),
    ("medium", {"steps": 600, "seeds": 3, "eval_every": 50, "eval_batches": 16}),
    ("long", {"steps": 3000, "seeds": 3, "eval_every": 50, "eval_batches": 16}),
])
def test_settings_of_each_budget(budget, expected):
    assert compare._settings(_ns("--budget", budget)) == expected


@pytest.mark.parametrize("argv, changed", [
    (["--steps", "7"], {"steps": 7}),
    (["--seeds", "1"], {"seeds": 1}),
    (["--eval-every", "1"], {"eval_every": 1}),
    (["--eval-batches", "2"], {"eval_batches": 2}),
    (["--steps", "1", "--seeds", "5", "--eval-every", "4", "--eval-batches", "1"],
     {"steps": 1, "seeds": 5, "eval_every": 4, "eval_batches": 1}),
])
def test_settings_take_each_explicit_value(argv, changed):
    assert compare._settings(_ns(*argv)) == {"steps": 200, "seeds": 3, "eval_every": 25, "eval_batches": 8, **changed}
    # the budget table itself is left as it was
    assert compare._settings(_ns()) == {"steps": 200, "seeds": 3, "eval_every": 25, "eval_batches": 8}


def test_settings_accept_the_smallest_values():
    ns = _ns("--steps", "1", "--seeds", "2", "--eval-every", "1", "--eval-batches", "1", "--batch-size", "1",
             "--seq-len", "1", "--jobs", "1", "--threads", "1", "--lr", "1e-12", "--seed", str(2**63 - 2))
    # seeds 2**63 - 2 and 2**63 - 1: the last one a seed can be
    assert compare._settings(ns) == {"steps": 1, "seeds": 2, "eval_every": 1, "eval_batches": 1}
    # the budget's 3 seeds from 2**63 - 3 end there too
    assert compare._settings(_ns("--seed", str(2**63 - 3)))["seeds"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    (["--eval-every", "0"], "--eval-every must be a positive integer, got 0"),
    (["--eval-batches", "-2"], "--eval-batches must be a positive integer, got -2"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["--jobs", "0"], "--jobs must be a positive integer, got 0"),
    (["--threads", "-1"], "--threads must be a positive integer, got -1"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1, got -1"),
    # the last of the runs' seeds, --seed + --seeds - 1, must be a seed too
    (["--seed", str(2**63 - 2), "--seeds", "3"],
     f"--seed {2**63 - 2} with --seeds 3: the last run's seed would pass 2**63 - 1"),
    (["--seed", str(2**63 - 2)],
     f"--seed {2**63 - 2} with --seeds 3: the last run's seed would pass 2**63 - 1"),  # the budget's 3
    (["--steps", "0", "--seeds", "0", "--jobs", "0"], "--steps must be a positive integer, got 0"),  # the first
    (["--eval-every", "0", "--batch-size", "0"], "--eval-every must be a positive integer, got 0"),
])
def test_settings_refuse_bad_values(argv, message):
    with pytest.raises(CLIError) as e:
        compare._settings(_ns(*argv))
    assert str(e.value) == message


def test_a_last_seed_past_the_limit_is_refused_with_the_values_given():
    with pytest.raises(CLIError) as e:
        compare._settings(_ns("--seed", str(2**63 - 2), "--seeds", "3"))
    assert "--seeds" in str(e.value) and str(2**63) not in str(e.value)


# ------------------------------------------------------------------------------- the namespace of each run


def test_train_namespace(tmp_path):
    ns = _ns("--impl", "reference", "--data", "corpus.txt", "--seq-len", "32", "--batch-size", "4", "--lr", "0.001",
             "--device", "cpu", "--steps", "99")
    s = {"steps": 7, "seeds": 2, "eval_every": 3, "eval_batches": 5}  # the settings, not ns's own values
    config, out = tmp_path / "configs" / "gshard.json", tmp_path / "gshard" / "seed-4"
    t = compare._train_namespace(ns, s, config, out, 4)
    assert vars(t) == {
        "preset": None, "config": str(config), "impl": "reference", "data": "corpus.txt", "seq_len": 32,
        "batch_size": 4, "steps": 7, "lr": 0.001, "warmup": None, "min_lr": None, "weight_decay": None,
        "grad_clip": None, "seed": 4, "bf16": None, "compile": None, "device": "cpu", "out": str(out),
        "overwrite": True, "resume": None, "eval_every": 3, "eval_batches": 5, "save_every": None, "log_every": None,
        "sample_tokens": 0, "sample_prompt": None, "no_progress": True}
    # bf16 only when asked (None leaves train's default); every name one `dsmoe train` has
    assert compare._train_namespace(_ns("--bf16"), s, config, out, 0).bf16 is True
    assert set(vars(t)) <= set(vars(build_parser("train").parse_args(["train"])))


# ------------------------------------------------------------------------------- the routed load


@pytest.fixture(scope="module")
def model():
    """A tiny model with two MoE layers of 8 routed experts, top-2."""
    torch.manual_seed(0)
    config = get_preset("tiny", vocab_size=258, bos_token_id=256, eos_token_id=257, first_k_dense_replace=0)
    return DeepSeekMoEForCausalLM(config)


def _forward(model, g) -> list[list[int]]:
    """One forward of 2 x 6 tokens; the tokens of each routed expert, per MoE layer, as the model reports them."""
    with torch.no_grad():
        out = model(torch.randint(0, 256, (2, 6), generator=g))
    return [t.tolist() for t in out.tokens_per_expert]


def _sum(*steps):
    return [[sum(v) for v in zip(*(s[layer] for s in steps))] for layer in range(2)]


def test_load_recorder_sums_training_steps_in_windows(model):
    g = torch.Generator().manual_seed(1)
    model.train()
    with compare.LoadRecorder(2) as rec:
        steps = []
        for i in range(5):
            steps.append(_forward(model, g))
            if i == 1:  # a validation between steps 2 and 3: eval mode, not counted
                model.eval()
                _forward(model, g)
                model.train()
        # a window is closed when the step after it begins: steps 3 and 5 closed 1-2 and 3-4
        assert [w["end_step"] for w in rec.windows] == [2, 4]
    assert rec.window == 2
    assert rec.windows == [{"end_step": 2, "loads": _sum(steps[0], steps[1])},
                           {"end_step": 4, "loads": _sum(steps[2], steps[3])},
                           {"end_step": 5, "loads": _sum(steps[4])}]  # the last, partial window at the end
    # every token goes to 2 routed experts of each layer: 2 steps x 12 tokens x 2, then 1 step
    assert [[sum(layer) for layer in w["loads"]] for w in rec.windows] == [[48, 48], [48, 48], [24, 24]]
    assert all(type(v) is int for w in rec.windows for layer in w["loads"] for v in layer)
    _forward(model, g)  # after the block: the hook is gone
    with rec:  # and entering again without a step adds nothing
        pass
    assert [w["end_step"] for w in rec.windows] == [2, 4, 5]


def test_load_recorder_of_one_step_windows_and_of_no_training(model):
    g = torch.Generator().manual_seed(2)
    model.train()
    with compare.LoadRecorder(1) as rec:
        steps = [_forward(model, g) for _ in range(3)]
    assert rec.windows == [{"end_step": i + 1, "loads": _sum(s)} for i, s in enumerate(steps)]
    model.eval()
    with compare.LoadRecorder(3) as rec:
        _forward(model, g)  # evaluation only
    assert rec.windows == []
    model.train()
    with compare.LoadRecorder(3) as rec:
        pass
    assert rec.windows == []


def test_run_one_writes_the_run_s_output_to_its_log_and_the_load_to_the_run(model, tmp_path, monkeypatch):
    seen = {}

    def fake_train(ns):
        seen["ns"], seen["threads"] = ns, torch.get_num_threads()
        print("train: hello")
        print("train: a warning", file=sys.stderr)
        Path(ns.out).mkdir(parents=True)
        g = torch.Generator().manual_seed(3)
        model.train()
        seen["steps"] = [_forward(model, g) for _ in range(3)]
        return 143  # stopped by a signal: the load of the steps it made is kept

    monkeypatch.setattr(compare.train, "run", fake_train)
    ns = argparse.Namespace(out=str(tmp_path / "gshard" / "seed-0"))
    job = {"threads": 2, "window": 2, "ns": ns, "log": str(tmp_path / "logs" / "deep" / "gshard-seed-0.log")}
    try:
        assert compare.run_one(job) == 143
    finally:
        torch.set_num_threads(1)
    assert seen["ns"] is ns and seen["threads"] == 2
    assert Path(job["log"]).read_text() == "train: hello\ntrain: a warning\n"
    steps = seen["steps"]
    assert json.loads((tmp_path / "gshard" / "seed-0" / "loads.json").read_text()) == {
        "window": 2, "windows": [{"end_step": 2, "loads": _sum(steps[0], steps[1])},
                                 {"end_step": 3, "loads": _sum(steps[2])}]}


@pytest.mark.parametrize("makes_dir, steps", [(False, 2), (True, 0), (False, 0)])
def test_run_one_writes_no_load_without_a_run_folder_or_without_steps(model, tmp_path, monkeypatch, makes_dir, steps):
    def fake_train(ns):
        if makes_dir:
            Path(ns.out).mkdir()
        g = torch.Generator().manual_seed(4)
        model.train()
        for _ in range(steps):
            _forward(model, g)
        return 0

    monkeypatch.setattr(compare.train, "run", fake_train)
    out = tmp_path / "run"
    job = {"threads": 1, "window": 1, "ns": argparse.Namespace(out=str(out)), "log": str(tmp_path / "run.log")}
    assert compare.run_one(job) == 0
    assert out.is_dir() == makes_dir and not (out / "loads.json").exists()
    assert (tmp_path / "run.log").read_text() == ""


def test_run_one_keeps_the_run_s_error_in_its_log(tmp_path, monkeypatch):
    def fake_train(ns):
        raise CLIError("--seq-len 2000 exceeds the model's max_position_embeddings 1024")

    monkeypatch.setattr(compare.train, "run", fake_train)
    job = {"threads": 1, "window": 1, "ns": argparse.Namespace(out=str(tmp_path / "run")),
           "log": str(tmp_path / "run.log")}
    code = compare.run_one(job)
    assert code == 2 and "--seq-len 2000 exceeds" in (tmp_path / "run.log").read_text()


# ------------------------------------------------------------------------------- progress and the job lines


def test_done_steps_counts_the_logged_training_steps(tmp_path):
    _write_log(tmp_path / "r", [_train(1, 3.0), _train(2, 2.9), _val(2, 2.8), _train(3, 2.7)])
    assert compare._done_steps(tmp_path / "r") == 3
    assert compare._done_steps(tmp_path / "none") == 0
    (tmp_path / "d" / "log.jsonl").mkdir(parents=True)  # unreadable
    assert compare._done_steps(tmp_path / "d") == 0
    _write_log(tmp_path / "e", [])
    assert compare._done_steps(tmp_path / "e") == 0


def _job(tmp_path, variant, seed, **extra):
    return {"variant": variant, "seed": seed, "log": f"L/{variant}-{seed}.log",
            "ns": argparse.Namespace(out=str(tmp_path / variant / f"seed-{seed}")), **extra}


@pytest.mark.parametrize("variant, code, val, line", [
    ("gshard", 0, [2.5, 2.123456], " GShard top-2 seed 3: final val loss 2.1235"),
    ("dense", 0, [1.0], "        Dense seed 3: final val loss 1.0000"),
    ("deepseekmoe", 0, [2.0], "  DeepSeekMoE seed 3: final val loss 2.0000"),
    ("gshard", 1, [2.5], " GShard top-2 seed 3: stopped (exit 1), see L/gshard-3.log"),
    ("dense", 130, [], "        Dense seed 3: stopped (exit 130), see L/dense-3.log"),
    ("deepseekmoe", 0, [], "  DeepSeekMoE seed 3: stopped (exit 0), see L/deepseekmoe-3.log"),  # no evaluation
])
def test_job_line(tmp_path, variant, code, val, line):
    job = _job(tmp_path, variant, 3)
    _write_log(Path(job["ns"].out), [_train(1, 9.0)] + [_val(i + 1, v) for i, v in enumerate(val)])
    assert compare._job_line(job, code) == line


def test_say_writes_through_the_bar_or_prints(capsys):
    class Bar:
        written = []

        def write(self, msg):
            self.written.append(msg)

    bar = Bar()
    compare._say(bar, "through the bar")
    compare._say(None, "printed")
    assert bar.written == ["through the bar"] and capsys.readouterr().out == "printed\n"


@pytest.fixture
def fake_run_one(monkeypatch):
    """run_one stand-in: logs job["train"] training steps and a validation, returns job["code"]."""
    calls = []

    def run_one(job):
        calls.append((job["variant"], job["seed"]))
        _write_log(Path(job["ns"].out), [_train(i + 1, 3.0) for i in range(job["train"])] + [_val(job["train"], 2.5)])
        if "then" in job:
            job["then"]()
        return job["code"]

    monkeypatch.setattr(compare, "run_one", run_one)
    return calls


def test_run_jobs_one_at_a_time(tmp_path, fake_run_one, capsys, monkeypatch):
    monkeypatch.setattr(compare, "stderr_is_tty", lambda: True)  # --no-progress: no bar all the same
    jobs = [_job(tmp_path, "dense", 0, code=0, train=2), _job(tmp_path, "gshard", 0, code=1, train=2),
            _job(tmp_path, "deepseekmoe", 0, code=0, train=2)]
    assert compare._run_jobs(jobs, argparse.Namespace(no_progress=True, jobs=1), 12) == [0, 1, 0]
    assert fake_run_one == [("dense", 0), ("gshard", 0), ("deepseekmoe", 0)]
    assert capsys.readouterr().out == ("        Dense seed 0: final val loss 2.5000\n"
                                       " GShard top-2 seed 0: stopped (exit 1), see L/gshard-0.log\n"
                                       "  DeepSeekMoE seed 0: final val loss 2.5000\n")


@pytest.mark.parametrize("code", [130, 143])
def test_run_jobs_one_at_a_time_stops_at_an_interrupted_run(tmp_path, fake_run_one, capsys, code):
    jobs = [_job(tmp_path, "dense", 0, code=0, train=1), _job(tmp_path, "gshard", 0, code=code, train=1),
            _job(tmp_path, "deepseekmoe", 0, code=0, train=1), _job(tmp_path, "dense", 1, code=0, train=1)]
    # the rest would be stopped too: they never start and count as stopped the same way
    assert compare._run_jobs(jobs, argparse.Namespace(no_progress=True, jobs=1), 4) == [0, code, code, code]
    assert fake_run_one == [("dense", 0), ("gshard", 0)]
    assert len(capsys.readouterr().out.splitlines()) == 2


class _Bar:
    """Stands in for tqdm: the bar's arguments, position, lines and closing."""

    made: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.n, self.updates, self.written, self.closed = kwargs, 0, [], [], False
        _Bar.made.append(self)

    def update(self, k):
        self.updates.append(k)
        self.n += k

    def write(self, msg):
        self.written.append(msg)

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    import tqdm

    _Bar.made = []
    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    return _Bar.made


def test_run_jobs_progress_bar_follows_the_logged_steps(tmp_path, fake_run_one, bars, capsys, monkeypatch):
    monkeypatch.setattr(compare, "stderr_is_tty", lambda: True)
    polled = []

    def wait_for_the_poll():  # the first run stays until the watcher has counted its 3 steps (once a second)
        deadline = time.monotonic() + 10
        while bars[0].n < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        polled.append(bars[0].n)

    jobs = [_job(tmp_path, "dense", 0, code=0, train=3, then=wait_for_the_poll),
            _job(tmp_path, "gshard", 0, code=2, train=2)]
    assert compare._run_jobs(jobs, argparse.Namespace(no_progress=False, jobs=1), 8) == [0, 2]
    bar, = bars
    assert bar.kwargs == {"total": 8, "unit": "step", "file": sys.stderr, "desc": "compare"}
    assert polled == [3] and bar.updates[0] == 3
    assert bar.n == 5 and sum(bar.updates) == 5 and bar.closed  # the last update after the runs: all 5 steps
    assert bar.written == ["        Dense seed 0: final val loss 2.5000",
                           " GShard top-2 seed 0: stopped (exit 2), see L/gshard-0.log"]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("no_progress, tty", [(True, True), (False, False)])
def test_run_jobs_without_a_bar(tmp_path, fake_run_one, bars, capsys, monkeypatch, no_progress, tty):
    monkeypatch.setattr(compare, "stderr_is_tty", lambda: tty)
    jobs = [_job(tmp_path, "dense", 0, code=0, train=1)]
    assert compare._run_jobs(jobs, argparse.Namespace(no_progress=no_progress, jobs=1), 1) == [0]
    assert bars == [] and capsys.readouterr().out == "        Dense seed 0: final val loss 2.5000\n"


def test_run_jobs_in_parallel_hands_them_to_the_workers(tmp_path, fake_run_one, monkeypatch):
    seen = []
    monkeypatch.setattr(compare, "_run_parallel", lambda jobs, n, bar: seen.append((jobs, n, bar)) or [0, 143])
    jobs = [_job(tmp_path, "dense", 0, code=0, train=1), _job(tmp_path, "gshard", 0, code=0, train=1)]
    assert compare._run_jobs(jobs, argparse.Namespace(no_progress=True, jobs=3), 2) == [0, 143]
    assert seen == [(jobs, 3, None)] and fake_run_one == []


# ------------------------------------------------------------------------------- worker processes
# forked instead of spawned, so that the stand-in run_one (monkeypatched here) is what they run


@pytest.fixture
def forked(monkeypatch):
    import multiprocessing
    import multiprocessing.connection  # noqa: F401  (compare waits on it; spawn would have imported it)

    real, asked = multiprocessing.get_context, []
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: asked.append(method) or real("fork"))
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    yield
    assert asked == ["spawn"]  # fresh interpreters in the real thing
    # the handlers of this process and its signal mask are as they were
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.SIGINT not in blocked and signal.SIGTERM not in blocked


def _worker_run_one(job):
    """Runs in the worker: its process (group) ids, when it ran, then what job["do"] says."""
    out = Path(job["ns"].out)
    out.mkdir(parents=True)
    start = time.monotonic()
    (out / "ids").write_text(f"{os.getpid()} {os.getpgrp()}")
    (out / "blocked").write_text(" ".join(str(int(s)) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    do = job.get("do")
    if do == "sleep":
        time.sleep(1.0)  # long enough that the two first runs overlap on a loaded machine
    elif do == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif do is not None:  # a signal to the comparison (as a terminal's Ctrl-C or a scheduler's stop)
        os.kill(os.getppid(), do)
    _write_log(out, [_train(1, 3.0), _val(1, 2.5)])
    (out / "times").write_text(f"{start} {time.monotonic()}")
    return job["code"]


def test_run_parallel_runs_n_at_a_time_each_in_its_own_process_group(tmp_path, forked, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_one", _worker_run_one)
    jobs = [_job(tmp_path, "dense", 0, code=0, do="sleep"), _job(tmp_path, "gshard", 0, code=3, do="sleep"),
            _job(tmp_path, "deepseekmoe", 0, code=0, do="sleep")]
    assert compare._run_parallel(jobs, 2, None) == [0, 3, 0]
    times = []
    for j in jobs:
        out = Path(j["ns"].out)
        pid, pgrp = map(int, (out / "ids").read_text().split())
        assert pid != os.getpid() and pgrp == pid  # a group of its own: a terminal's Ctrl-C is not sent to it
        # started with the stop signals blocked: one that comes before the run's handlers waits for them
        blocked = {int(x) for x in (out / "blocked").read_text().split()}
        assert {int(signal.SIGINT), int(signal.SIGTERM)} <= blocked
        times.append(tuple(map(float, (out / "times").read_text().split())))
    (s0, e0), (s1, e1), (s2, _) = times
    assert s1 < e0 and s0 < e1  # the first two together
    assert s2 >= min(e0, e1)  # the third once one of them had finished
    assert sorted(capsys.readouterr().out.splitlines()) == sorted([
        "        Dense seed 0: final val loss 2.5000",
        " GShard top-2 seed 0: stopped (exit 3), see L/gshard-0.log",
        "  DeepSeekMoE seed 0: final val loss 2.5000"])


def test_run_parallel_a_worker_killed_by_a_signal(tmp_path, forked, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_one", _worker_run_one)
    jobs = [_job(tmp_path, "gshard", 1, code=0, do="kill")]
    assert compare._run_parallel(jobs, 2, None) == [128 + 9]  # killed by signal N: 128 + N, as a shell says
    assert capsys.readouterr().out == " GShard top-2 seed 1: stopped (exit 137), see L/gshard-1.log\n"


@pytest.mark.parametrize("sig, stopped", [pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
                                          pytest.param(signal.SIGINT, 130, id="SIGINT")])
def test_run_parallel_a_stop_signal_starts_no_further_run(tmp_path, forked, monkeypatch, capsys, sig, stopped):
    monkeypatch.setattr(compare, "run_one", _worker_run_one)
    jobs = [_job(tmp_path, "dense", 0, code=0, do=sig), _job(tmp_path, "gshard", 0, code=0),
            _job(tmp_path, "deepseekmoe", 0, code=0)]
    # the running one ends as it ends (here: 0); those that never started count as stopped by the signal
    assert compare._run_parallel(jobs, 1, None) == [0, stopped, stopped]
    assert not Path(jobs[1]["ns"].out).exists() and not Path(jobs[2]["ns"].out).exists()
    assert capsys.readouterr().out == "        Dense seed 0: final val loss 2.5000\n"


# ------------------------------------------------------------------------------- statistics over seeds


def _summary(values, mean, std):
    return {"mean": pytest.approx(mean), "std": pytest.approx(std, abs=1e-12), "min": pytest.approx(min(values)),
            "max": pytest.approx(max(values)), "n": len(values), "values": pytest.approx(values)}


CONFIGS = {"dense": {"n_routed_experts": None}, "gshard": {"n_routed_experts": 4},
           "deepseekmoe": {"n_routed_experts": 7}}
SIZES = {"dense": {"total": 1}, "gshard": {"total": 2}, "deepseekmoe": {"total": 3}}
SETTINGS = {"steps": 40, "batch_size": 2, "seq_len": 8, "tokens_per_run": 640}


def test_collect_the_runs_of_three_models(tmp_path):
    runs = _write_runs(tmp_path)
    results = compare._collect(SETTINGS, runs, SIZES, CONFIGS)
    assert list(results) == ["settings", "models", "gaps", "crossings"] and results["settings"] is SETTINGS
    models = results["models"]
    assert list(models) == ["dense", "gshard", "deepseekmoe"]
    for name, m in models.items():
        assert list(m) == ["config", "size", "per_seed", "final_val_loss", "final_train_loss", "final_aux_loss",
                           "val_curve"]
        assert m["config"] is CONFIGS[name] and m["size"] is SIZES[name]

    # one run written out: the last 5% of 40 steps = the last 2 logged steps, tokens/s over all
    # logged steps but the first (3 / (1/200 + 1/400 + 1/400) = 300)
    gs0 = models["gshard"]["per_seed"][0]
    assert gs0 == {"seed": 0, "run_dir": str(tmp_path / "gshard" / "seed-0"), "complete": True, "steps_done": 40,
                   "final_val_loss": 2.5, "final_train_loss": pytest.approx(3.0),
                   "final_aux_loss": pytest.approx(0.025),
                   "seconds": 4.0, "tokens_per_s": pytest.approx(300.0), "val_curve": [[20, 3.1], [40, 2.5]],
                   "train_curve": [[10, 4.0, 0.05], [20, 3.4, 0.04], [30, 3.1, 0.03], [40, 2.9, 0.02]],
                   "balance": None}
    # a stopped run: its curve as far as it got, no final validation loss
    ds2 = models["deepseekmoe"]["per_seed"][2]
    assert ds2 == {"seed": 2, "run_dir": str(tmp_path / "deepseekmoe" / "seed-2"), "complete": False,
                   "steps_done": 20, "final_val_loss": None, "final_train_loss": pytest.approx(3.8),
                   "final_aux_loss": pytest.approx(0.055), "seconds": 2.0, "tokens_per_s": pytest.approx(200.0),
                   "val_curve": [[20, 3.1]], "train_curve": [[10, 4.1, 0.06], [20, 3.5, 0.05]], "balance": None}
    # the dense model: no balance loss (logged as null: 0), no routed load
    d0 = models["dense"]["per_seed"][0]
    assert d0["final_aux_loss"] == 0.0 and d0["balance"] is None and d0["train_curve"][0] == [10, 4.0, None]
    # the dense seed that stopped before any evaluation is left out
    assert [(r["seed"], r["complete"]) for r in models["dense"]["per_seed"]] == [(0, True), (1, True)]
    assert [(r["seed"], r["complete"]) for r in models["gshard"]["per_seed"]] == [(0, True), (1, True), (2, True)]
    assert [(r["seed"], r["complete"], r["steps_done"]) for r in models["deepseekmoe"]["per_seed"]] == [
        (0, True, 40), (1, True, 40), (2, False, 20)]
    # balance of the last window of the runs that recorded their load (population std / mean)
    assert models["gshard"]["per_seed"][1]["balance"] == {
        "max_over_uniform": [3.0, 1.0], "cv": [pytest.approx(math.sqrt(6) / 2), 0.0], "unused": [2, 0]}
    assert models["deepseekmoe"]["per_seed"][0]["balance"] == {
        "max_over_uniform": [7.0, 1.0], "cv": [pytest.approx(math.sqrt(6)), 0.0], "unused": [6, 0]}

    # final values over the finished seeds (sample std, n - 1)
    d, g, s = models["dense"], models["gshard"], models["deepseekmoe"]
    assert d["final_val_loss"] == _summary([2.6, 2.8], 2.7, math.sqrt(0.02))
    assert g["final_val_loss"] == _summary([2.5, 2.7, 2.9], 2.7, 0.2)
    assert s["final_val_loss"] == _summary([2.4, 2.5], 2.45, math.sqrt(0.005))
    assert d["final_train_loss"] == _summary([3.1, 3.3], 3.2, math.sqrt(0.02))
    assert g["final_train_loss"] == _summary([3.0, 3.1, 3.2], 3.1, 0.1)
    assert s["final_train_loss"] == _summary([2.9, 3.0], 2.95, math.sqrt(0.005))
    assert d["final_aux_loss"] == _summary([0.0, 0.0], 0.0, 0.0)
    # 0.025, 0.035, 0.02: deviations -1/600, 5/600, -4/600
    assert g["final_aux_loss"] == _summary([0.025, 0.035, 0.02], 0.08 / 3, math.sqrt(42 / 600**2 / 2))
    assert s["final_aux_loss"] == _summary([0.035, 0.045], 0.04, math.sqrt(0.00005))
    # the curves over every seed that reached each evaluation
    assert d["val_curve"] == {"steps": [20, 40], "n": [2, 2], "mean": pytest.approx([3.1, 2.7]),
                              "std": pytest.approx([math.sqrt(0.02)] * 2)}
    assert g["val_curve"] == {"steps": [20, 40], "n": [3, 3], "mean": pytest.approx([3.3, 2.7]),
                              "std": pytest.approx([0.2, 0.2])}
    assert s["val_curve"] == {"steps": [20, 40], "n": [3, 2], "mean": pytest.approx([3.0, 2.45]),
                              "std": pytest.approx([0.1, math.sqrt(0.005)])}

    # the gaps: final values paired by the seeds both finished, the trend over the seeds both reached
    gaps = results["gaps"]
    assert list(gaps) == ["deepseekmoe-gshard", "gshard-dense", "deepseekmoe-dense"]
    keys = {"gap", "gap_std", "stderr", "ci95", "seed_spread", "n", "verdict", "per_seed", "seeds", "trend"}
    assert all(set(x) == keys for x in gaps.values())
    dg = gaps["deepseekmoe-gshard"]  # 2.4 - 2.5, 2.5 - 2.7
    assert (dg["seeds"], dg["n"], dg["verdict"]) == ([0, 1], 2, "within noise")
    assert dg["per_seed"] == pytest.approx([-0.1, -0.2]) and dg["gap"] == pytest.approx(-0.15)
    assert dg["gap_std"] == pytest.approx(math.sqrt(0.005)) and dg["stderr"] == pytest.approx(0.05)
    assert dg["ci95"] == pytest.approx(T1 * 0.05) and dg["seed_spread"] == pytest.approx(math.sqrt((0.005 + 0.02) / 2))
    # step 20: the stopped DeepSeekMoE seed 2 and GShard's seed 2 too: -0.2, -0.3, -0.4
    assert dg["trend"] == [
        {"step": 20, "n": 3, "gap": pytest.approx(-0.3), "ci95": pytest.approx(T2 * 0.1 / math.sqrt(3)),
         "verdict": "separated"},
        {"step": 40, "n": 2, "gap": pytest.approx(-0.15), "ci95": pytest.approx(T1 * 0.05), "verdict": "within noise"}]
    gd = gaps["gshard-dense"]  # -0.1 at both seeds: no spread of the gap, separated
    assert (gd["seeds"], gd["n"], gd["verdict"]) == ([0, 1], 2, "separated")
    assert gd["gap"] == pytest.approx(-0.1) and gd["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert gd["seed_spread"] == pytest.approx(math.sqrt(0.02))  # GShard over its seeds 0 and 1 only
    assert [(t["step"], t["n"], t["verdict"]) for t in gd["trend"]] == [(20, 2, "separated"), (40, 2, "separated")]
    assert [t["gap"] for t in gd["trend"]] == pytest.approx([0.1, -0.1])
    dd = gaps["deepseekmoe-dense"]
    assert (dd["seeds"], dd["n"], dd["verdict"]) == ([0, 1], 2, "within noise")
    assert dd["per_seed"] == pytest.approx([-0.2, -0.3]) and dd["gap"] == pytest.approx(-0.25)
    assert dd["seed_spread"] == pytest.approx(math.sqrt(0.0125))
    assert [(t["step"], t["n"]) for t in dd["trend"]] == [(20, 2), (40, 2)]
    assert [t["gap"] for t in dd["trend"]] == pytest.approx([-0.15, -0.25])
    assert results["crossings"] == {
        "deepseekmoe-gshard": {"step": None, "a_below_b": True,
                               "note": "DeepSeekMoE below GShard top-2 at every evaluation"},
        "gshard-dense": {"step": 40, "a_below_b": True, "note": "GShard top-2 below Dense from step 40 on"},
        "deepseekmoe-dense": {"step": None, "a_below_b": True, "note": "DeepSeekMoE below Dense at every evaluation"},
    }


def test_collect_without_a_seed_both_finished(tmp_path):
    runs = _write_runs(tmp_path, {
        ("dense", 0): ([4.0], None, [], True),  # logged no evaluation: nothing of it
        ("gshard", 0): ([4.0, 3.5, 3.2, 3.0], [0.1] * 4, [3.0, 2.8], True),
        ("gshard", 1): ([4.0, 3.5], [0.1] * 2, [3.2], False),
        ("deepseekmoe", 0): ([4.0, 3.5], [0.1] * 2, [2.9], False),
        ("deepseekmoe", 1): ([4.0, 3.5, 3.2, 3.0], [0.1] * 4, [3.1, 2.7], True),
    }, loads={})
    results = compare._collect(SETTINGS, runs, SIZES, CONFIGS)
    assert results["models"]["dense"] == {"config": CONFIGS["dense"], "size": SIZES["dense"], "per_seed": []}
    assert results["models"]["gshard"]["final_val_loss"] == _summary([2.8], 2.8, 0.0)
    assert results["models"]["deepseekmoe"]["final_val_loss"] == _summary([2.7], 2.7, 0.0)
    # no pair with the dense model (no curve); the MoEs finished different seeds, but both reached step 20
    assert list(results["gaps"]) == ["deepseekmoe-gshard"]
    g = results["gaps"]["deepseekmoe-gshard"]
    assert {k: g[k] for k in ("n", "verdict", "seeds")} == {"n": 0, "verdict": "no common seed", "seeds": []}
    assert [(t["step"], t["n"]) for t in g["trend"]] == [(20, 2)] and g["trend"][0]["gap"] == pytest.approx(-0.1)
    assert results["crossings"] == {"deepseekmoe-gshard": {
        "step": None, "a_below_b": True, "note": "DeepSeekMoE below GShard top-2 at every evaluation"}}


def test_collect_a_short_run_with_a_fast_step(tmp_path):
    """A 10-step budget: the last 5% is at least the last logged step. A step faster than 1e-9 s
    counts as 1e-9 s: 2 x 8 tokens / 1e-9 s."""
    _write_log(tmp_path / "r", [_train(5, 2.0, tps=100.0), _train(10, 1.0, tps=4e10), _val(10, 1.5)])
    runs = [{"variant": "gshard", "seed": 0, "run_dir": str(tmp_path / "r"), "complete": True}]
    settings = {"steps": 10, "batch_size": 2, "seq_len": 8}
    results = compare._collect(settings, runs, {"gshard": {}}, {"gshard": {"n_routed_experts": 4}})
    r, = results["models"]["gshard"]["per_seed"]
    assert r["final_train_loss"] == 1.0 and r["final_aux_loss"] == 0.0
    assert r["tokens_per_s"] == pytest.approx(16 / 1e-9)
    assert results["gaps"] == {} and results["crossings"] == {}


def test_by_step():
    per_seed = [{"seed": 0, "val_curve": [[20, 3.0], [40, 2.6]]}, {"seed": 5, "val_curve": [[20, 3.2]]},
                {"seed": 2, "val_curve": []}]
    assert compare._by_step(per_seed) == {20: {0: 3.0, 5: 3.2}, 40: {0: 2.6}}
    assert compare._by_step([]) == {}


def _trend(*gaps, start=10):
    return [{"step": start + 10 * i, "gap": g} for i, g in enumerate(gaps)]


@pytest.mark.parametrize("trend, expected", [
    ([], {"step": None, "note": "no common evaluations"}),
    (_trend(-0.1), {"step": None, "a_below_b": True, "note": "A below B at every evaluation"}),
    (_trend(-0.1, -0.2, -0.01), {"step": None, "a_below_b": True, "note": "A below B at every evaluation"}),
    (_trend(0.1, 0.2), {"step": None, "a_below_b": False, "note": "A never below B (no crossing yet)"}),
    (_trend(0.1, -0.1, -0.2), {"step": 20, "a_below_b": True, "note": "A below B from step 20 on"}),
    (_trend(-0.1, -0.1, 0.2), {"step": 30, "a_below_b": False, "note": "A above B from step 30 on"}),
    # the last change of sign counts
    (_trend(-0.1, 0.1, -0.1, -0.3, start=100), {"step": 120, "a_below_b": True, "note": "A below B from step 120 on"}),
    # a gap of exactly 0 is not below
    (_trend(-0.1, 0.0), {"step": 20, "a_below_b": False, "note": "A above B from step 20 on"}),
    (_trend(0.0, -0.5), {"step": 20, "a_below_b": True, "note": "A below B from step 20 on"}),
])
def test_crossing(trend, expected):
    assert compare._crossing(trend, "A", "B") == expected


def test_balance(tmp_path):
    (tmp_path / "loads.json").write_text(json.dumps({"window": 5, "windows": [
        {"end_step": 5, "loads": [[9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]]},  # only the last window counts
        {"end_step": 8, "loads": [[4, 0, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]}]}))
    # layer 0: mean 2, population std sqrt((4 + 4 + 0 + 0) / 4); a layer that routed nothing: zeros
    assert compare._balance(tmp_path) == {"max_over_uniform": [2.0, 1.0, 0.0],
                                          "cv": [pytest.approx(math.sqrt(2) / 2), 0.0, 0.0], "unused": [1, 0, 4]}
    (tmp_path / "loads.json").write_text(json.dumps({"window": 5, "windows": []}))
    assert compare._balance(tmp_path) is None
    assert compare._balance(tmp_path / "nowhere") is None
    (tmp_path / "d" / "loads.json").mkdir(parents=True)
    assert compare._balance(tmp_path / "d") is None
    (tmp_path / "loads.json").write_text("[]")
    with pytest.raises(CLIError, match="loads.json"):
        compare._balance(tmp_path)


@pytest.mark.parametrize("n, k, kept", [
    (3, 3, [0, 1, 2]),
    (8, 8, list(range(8))),
    (9, 8, [0, 1, 2, 3, 5, 6, 7, 8]),  # round(i x 8 / 7)
    (10, 8, [0, 1, 3, 4, 5, 6, 8, 9]),  # round(i x 9 / 7)
    (20, 8, [0, 3, 5, 8, 11, 14, 16, 19]),  # round(i x 19 / 7)
    (6, 3, [0, 2, 5]),  # round(2.5) = 2: to even
    (5, 2, [0, 4]),
])
def test_thin(n, k, kept):
    rows = [f"r{i}" for i in range(n)]
    assert compare._thin(rows, k) == [f"r{i}" for i in kept]


def test_means_load_and_ffn_descriptions():
    assert compare._mean([1, None, 2]) == 1.5 and compare._mean(x for x in (4.0,)) == 4.0
    assert math.isnan(compare._mean([])) and math.isnan(compare._mean([None]))
    m = {"per_seed": [{"balance": {"max_over_uniform": [2.0, 1.0]}}, {"balance": None}, {},
                      {"balance": {"max_over_uniform": [1.2, 1.0]}}]}
    assert compare._load_desc(m) == "1.30"  # the mean over seeds of the mean over layers: (1.5 + 1.1) / 2
    assert compare._load_desc({"per_seed": [{"balance": None}]}) == "-"
    assert compare._load_desc({"per_seed": []}) == "-"
    assert compare._ffn_desc({"n_routed_experts": None, "intermediate_size": 512}) == "dense 512"
    assert compare._ffn_desc({"n_routed_experts": 0, "intermediate_size": 64}) == "dense 64"
    assert compare._ffn_desc({"n_routed_experts": 16, "n_shared_experts": None, "num_experts_per_tok": 2,
                              "moe_intermediate_size": 256}) == "top-2 of 16 x 256"
    assert compare._ffn_desc({"n_routed_experts": 63, "n_shared_experts": 1, "num_experts_per_tok": 7,
                              "moe_intermediate_size": 64}) == "1 shared + top-7 of 63 x 64"


def test_mean_rate():
    rows = [{"tokens_per_s": t} for t in (100.0, 200.0, 400.0, 400.0)]
    assert compare._mean_rate(rows, 16) == pytest.approx(300.0)  # the first (set-up) left out
    assert compare._mean_rate(rows[:1], 16) == 100.0  # unless it is the only one
    assert compare._mean_rate([], 16) is None
    # a step under 1e-9 s counts as 1e-9 s: tokens per step / 1e-9
    assert compare._mean_rate([{"tokens_per_s": 1.0}, {"tokens_per_s": 4e10}], 16) == pytest.approx(1.6e10)
    assert compare._mean_rate([{"tokens_per_s": 1.0}, {"tokens_per_s": 4e10}], 32) == pytest.approx(3.2e10)


# ------------------------------------------------------------------------------- the report


def _model(config, finals=None, per_seed=()):
    m = {"config": config, "per_seed": list(per_seed)}
    if finals is not None:
        (mean, std, values), train, aux = finals
        m.update(final_val_loss={"mean": mean, "std": std, "values": values}, final_train_loss={"mean": train},
                 final_aux_loss={"mean": aux})
    return m


def _results():
    """compare.json's numbers as _report reads them, written by hand."""
    return {
        "settings": {"tokens_per_run": 1234567},
        "elapsed_s": 61.7,
        "models": {
            "dense": _model({"n_routed_experts": None, "aux_loss_alpha": 0.01, "num_hidden_layers": 4},
                            ((2.7, math.sqrt(0.02), [2.6, 2.8]), 3.2, 0.0),
                            [{"tokens_per_s": 300.0, "balance": None}, {"tokens_per_s": 500.0, "balance": None}]),
            "gshard": _model({"n_routed_experts": 16, "aux_loss_alpha": 0.001, "num_hidden_layers": 4},
                             ((2.7, 0.2, [2.5, 2.7, 2.9]), 3.1, 0.08 / 3),
                             [{"tokens_per_s": 200.0, "balance": {"max_over_uniform": [2.0, 1.0]}},
                              {"tokens_per_s": 300.0, "balance": None},
                              {"tokens_per_s": 400.0, "balance": {"max_over_uniform": [1.2, 1.0]}}]),
            "deepseekmoe": _model({"n_routed_experts": 63, "aux_loss_alpha": 0.003, "num_hidden_layers": 2},
                                  ((2.45, math.sqrt(0.005), [2.4, 2.5]), 2.95, 0.04),
                                  [{"tokens_per_s": 250.0, "balance": {"max_over_uniform": [3.0]}},
                                   {"tokens_per_s": None, "balance": None},  # (no timed step)
                                   {"tokens_per_s": 260.0, "balance": None}]),
        },
        "gaps": {
            "deepseekmoe-gshard": {"n": 2, "gap": -0.15, "ci95": T1 * 0.05, "seed_spread": math.sqrt(0.0125),
                                   "verdict": "within noise",
                                   "trend": [{"step": 20, "gap": -0.3, "n": 3}, {"step": 40, "gap": -0.15, "n": 2}]},
            "gshard-dense": {"n": 1, "gap": -0.1, "ci95": None, "seed_spread": 0.0, "verdict": "within noise",
                             "trend": [{"step": 40, "gap": 0.1234, "n": 1}]},
            "deepseekmoe-dense": {"n": 0, "verdict": "no common seed", "trend": [
                {"step": 10 * (i + 1), "gap": gap, "n": i % 3 + 1}
                for i, gap in enumerate([0.5, -0.25, 0.125, 1.0, -1.0, 0.062, 2.0, 0.75, -0.5, 0.2])]},
        },
        "crossings": {"deepseekmoe-gshard": {"note": "note one"}, "gshard-dense": {"note": "note two"},
                      "deepseekmoe-dense": {"note": "note three"}},
    }


REPORT = "\n".join([
    "",
    "final validation loss (nats/token), every finished seed:",
    "variant" + " " * 9 + "mean" + " " * 5 + "std" + " " * 14 + "per seed  train (last 5%)  balance loss  "
    "max load/uniform  tokens/s",
    "  ".join("-" * w for w in (12, 6, 6, 20, 15, 12, 16, 8)),
    "Dense" + " " * 9 + "2.7000  0.1414" + " " * 9 + "2.6000 2.8000" + " " * 11 + "3.2000" + " " * 8 + "0.0000"
    + " " * 17 + "-" + " " * 7 + "400",
    "GShard top-2  2.7000  0.2000  2.5000 2.7000 2.9000" + " " * 11 + "3.1000" + " " * 8 + "0.0267" + " " * 14
    + "1.30" + " " * 7 + "300",
    "DeepSeekMoE" + " " * 3 + "2.4500  0.0707" + " " * 9 + "2.4000 2.5000" + " " * 11 + "2.9500" + " " * 8
    + "0.0400" + " " * 14 + "3.00" + " " * 7 + "255",
    # alpha x MoE layers: 0.001 x 4, 0.003 x 2
    "balance loss at perfectly uniform routing: GShard top-2 0.0040, DeepSeekMoE 0.0060 "
    "(the sum over MoE layers of alpha x 1)",
    "",
    "gaps of final validation loss, paired by seed (mean ± 95% interval; seed spread = std of one model over seeds):",
    "  DeepSeekMoE − GShard top-2 = -0.1500 ± 0.6353 (seed spread 0.1118, 2 seeds): within noise",
    "    over training: note one; gap (seeds) at step 20: -0.300 (3), 40: -0.150 (2)",
    "  GShard top-2 − Dense = -0.1000 (one seed: no interval) (seed spread 0.0000, 1 seed): within noise",
    "    over training: note two; gap (seeds) at step 40: +0.123 (1)",
    "  DeepSeekMoE − Dense: no seed finished for both",
    # 10 evaluations thinned to 8: the 3rd and the 8th left out
    "    over training: note three; gap (seeds) at step 10: +0.500 (1), 20: -0.250 (2), 40: +1.000 (1), "
    "50: -1.000 (2), 60: +0.062 (3), 70: +2.000 (1), 90: -0.500 (3), 100: +0.200 (1)",
    "",
    "1,234,567 tokens per run in 62s in all. The paper's ranking (DeepSeekMoE < GShard < Dense at equal activated "
    "FLOPs) needs enough tokens for the MoEs' extra parameters to pay off; read the gaps' trend over steps, not only "
    "their final value.",
]) + "\n"


def test_report_text(capsys):
    compare._report(_results())
    assert capsys.readouterr().out == REPORT


def test_report_when_no_run_finished(capsys):
    results = {"settings": {"tokens_per_run": 999}, "elapsed_s": None, "gaps": {}, "crossings": {},
               "models": {"dense": _model({"n_routed_experts": None, "aux_loss_alpha": 0.01, "num_hidden_layers": 2})}}
    compare._report(results)
    assert capsys.readouterr().out == (
        "\nno run finished\n"
        "\ngaps of final validation loss, paired by seed (mean ± 95% interval; seed spread = std of one model over "
        "seeds):\n"
        "\n999 tokens per run. The paper's ranking (DeepSeekMoE < GShard < Dense at equal activated FLOPs) needs "
        "enough tokens for the MoEs' extra parameters to pay off; read the gaps' trend over steps, not only their "
        "final value.\n")


def test_report_lists_only_the_models_with_a_finished_run(capsys):
    results = _results()
    del results["elapsed_s"]
    for key in ("final_val_loss", "final_train_loss", "final_aux_loss"):
        del results["models"]["gshard"][key]
    results["gaps"] = {}
    compare._report(results)
    out = capsys.readouterr().out
    rows = out.split("every finished seed:\n", 1)[1].split("\nbalance loss at")[0].splitlines()
    assert [r.split("  ")[0] for r in rows[2:]] == ["Dense", "DeepSeekMoE"]
    # the balance loss at uniform routing is the config's: GShard's too
    assert "\nbalance loss at perfectly uniform routing: GShard top-2 0.0040, DeepSeekMoE 0.0060 (" in out
    assert "\n1,234,567 tokens per run. The paper's" in out


# ------------------------------------------------------------------------------- plots


class _Figures:
    """Stands in for pyplot: the figures stay open to be looked at; closing is recorded."""

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        self.plt, self.figures, self.closed = plt, [], []

    def subplots(self, *args, **kwargs):
        fig, ax = self.plt.subplots(*args, **kwargs)
        self.figures.append((fig, ax))
        return fig, ax

    def close(self, fig):
        self.closed.append(fig)

    def close_all(self):
        for fig, _ in self.figures:
            self.plt.close(fig)


@pytest.fixture
def no_plots(monkeypatch):
    """The report's figures not drawn (tests of what it computes and writes)."""
    monkeypatch.setattr(compare, "plot_curves", lambda *a: None)
    monkeypatch.setattr(compare, "plot_load_over_time", lambda *a: None)


@pytest.fixture
def figures(monkeypatch):
    f = _Figures()
    monkeypatch.setattr(compare, "use_agg", lambda: f)
    yield f
    f.close_all()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _band(collection) -> dict:
    """{x: (lowest y, highest y)} of a fill_between polygon."""
    out: dict = {}
    for x, y in collection.get_paths()[0].vertices:
        lo, hi = out.get(float(x), (math.inf, -math.inf))
        out[float(x)] = (min(lo, float(y)), max(hi, float(y)))
    return out


def _curves_results():
    # GShard: the seeds' balance losses 2j and 2j + 2 (None at the first step of seed 1), 80 and 81
    # logged steps: the mean over the first 80 is 0, then 2j + 1, and smoothed over 80 // 40 = 2 steps:
    # 0, 1.5, then 2j
    gs_train = [[[j + 1, 4.0, 2.0 * j] for j in range(80)],
                [[j + 1, 4.0, None if j == 0 else 2.0 * j + 2.0] for j in range(81)]]
    return {"models": {
        "dense": {"per_seed": []},  # nothing to draw, but it keeps its colour C0
        "gshard": {"per_seed": [{"seed": 0, "val_curve": [[2, 3.0], [4, 2.5]], "train_curve": gs_train[0]},
                                {"seed": 1, "val_curve": [[2, 3.4], [4, 2.7]], "train_curve": gs_train[1]}]},
        "deepseekmoe": {"per_seed": [{"seed": 0, "val_curve": [[2, 2.9], [4, 2.4]],
                                      "train_curve": [[1, 4.0, None], [2, 3.9, None]]}]},  # no balance loss
    }}


def test_loss_curves(figures, tmp_path):
    compare.plot_curves(_curves_results(), tmp_path / "c.png")
    (fig, (ax, ax2)), = figures.figures
    assert figures.closed == [fig]
    assert tuple(fig.get_size_inches()) == pytest.approx((11, 4.2))
    assert _png_size(tmp_path / "c.png") == (1100, 420)
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "step", "validation cross entropy (nats / token)", "validation loss: mean, band = min..max of seeds")
    assert ax.title.get_fontsize() == 10
    assert (ax2.get_xlabel(), ax2.get_ylabel(), ax2.get_title()) == (
        "step", "balance loss (sum over layers)", "expert-level balance loss (train, mean of seeds)")
    # the mean over seeds at each evaluation, in the model's colour
    gs, ds = ax.lines
    assert list(gs.get_xdata()) == [2, 4] and list(gs.get_ydata()) == pytest.approx([3.2, 2.6])
    assert list(ds.get_xdata()) == [2, 4] and list(ds.get_ydata()) == pytest.approx([2.9, 2.4])
    assert [(x.get_color(), x.get_marker(), x.get_linestyle(), x.get_markersize()) for x in (gs, ds)] == [
        ("C1", "o", "-", 3), ("C2", "o", "-", 3)]
    # the band from the lowest to the highest seed
    band_gs, band_ds = ax.collections
    assert _band(band_gs) == {2.0: pytest.approx((3.0, 3.4)), 4.0: pytest.approx((2.5, 2.7))}
    assert _band(band_ds) == {2.0: pytest.approx((2.9, 2.9)), 4.0: pytest.approx((2.4, 2.4))}
    assert band_gs.get_alpha() == 0.2 and list(band_gs.get_linewidths()) == [0]
    from matplotlib.colors import to_rgba

    assert tuple(band_gs.get_facecolor()[0]) == pytest.approx(to_rgba("C1", 0.2))
    assert tuple(band_ds.get_facecolor()[0]) == pytest.approx(to_rgba("C2", 0.2))
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["GShard top-2 (2 seeds)", "DeepSeekMoE (1 seed)"]
    assert legend.get_texts()[0].get_fontsize() == 8
    # the balance loss: GShard only, the mean of the seeds over the steps all logged, smoothed
    aux, = ax2.lines
    assert aux.get_color() == "C1" and list(aux.get_xdata()) == list(range(1, 81))
    assert list(aux.get_ydata()) == pytest.approx([0.0, 1.5] + [2.0 * j for j in range(2, 80)])
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == ["GShard top-2"]
    assert ax2.get_legend().get_texts()[0].get_fontsize() == 8
    for a in (ax, ax2):
        grid = a.xaxis.get_gridlines()[0]
        assert grid.get_visible() and grid.get_alpha() == 0.3


def test_loss_curves_without_a_balance_loss(figures, tmp_path):
    results = _curves_results()
    del results["models"]["gshard"]
    compare.plot_curves(results, tmp_path / "c.png")
    (fig, (ax, ax2)), = figures.figures
    assert len(ax2.lines) == 0 and ax2.get_legend() is None  # no empty legend
    assert [line.get_color() for line in ax.lines] == ["C1"]  # the colour of its place among the models
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["DeepSeekMoE (1 seed)"]


def test_loss_curves_of_no_curve_warn_nothing(figures, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare.plot_curves({"models": {"dense": {"per_seed": []}, "gshard": {"per_seed": []}}}, tmp_path / "c.png")
    assert (tmp_path / "c.png").is_file()


def _windows(E, layers, n):
    return [{"end_step": 10 * (w + 1) - (5 if w == n - 1 else 0),
             "loads": [[(3 * e + 5 * w + layer) % 7 for e in range(E)] for layer in range(layers)]} for w in range(n)]


@pytest.mark.parametrize("E, layers", [(4, 2), (40, 1)])
def test_load_over_time(figures, tmp_path, E, layers):
    windows = _windows(E, layers, 3)
    if E == 4:  # written out: windows of layer 0 far from uniform (one of 1 token), one of layer 1 with none
        windows = [{"end_step": 10, "loads": [[2, 2, 4, 0], [1, 1, 1, 1]]},
                   {"end_step": 20, "loads": [[9, 1, 1, 1], [0, 0, 0, 0]]},
                   {"end_step": 25, "loads": [[1, 0, 0, 0], [3, 1, 2, 2]]}]
    (tmp_path / "loads.json").write_text(json.dumps({"window": 10, "windows": windows}))
    compare.plot_load_over_time(tmp_path / "loads.json", "GShard top-2 (seed 0)", tmp_path / "l.png")
    (fig, axes), = figures.figures
    assert figures.closed == [fig]
    width, height = 2.2 + 2.6 * layers, 1.5 + 0.09 * E
    assert tuple(fig.get_size_inches()) == pytest.approx((width, height))
    pixels = _png_size(tmp_path / "l.png")
    assert abs(pixels[0] - width * 90) <= 1 and abs(pixels[1] - height * 90) <= 1
    assert axes.shape == (1, layers)
    assert fig.get_suptitle() == "GShard top-2 (seed 0): routed load over training"
    assert fig._suptitle.get_fontsize() == 10
    if E == 4:
        # tokens of the window / its mean over the experts; a window of no token: zeros
        expected = [[[1, 3, 4], [1, 1 / 3, 0], [2, 1 / 3, 0], [0, 1 / 3, 0]],
                    [[1, 0, 1.5], [1, 0, 0.5], [1, 0, 1], [1, 0, 1]]]
        vmax = [4.0, 2.0]  # at least 2
    else:
        expected, vmax = [], []
        for layer in range(layers):
            means = [sum(w["loads"][layer]) / E for w in windows]
            expected.append([[w["loads"][layer][e] / m for w, m in zip(windows, means)] for e in range(E)])
            vmax.append(max(2.0, max(max(row) for row in expected[-1])))
    for li in range(layers):
        ax = axes[0][li]
        image, = ax.images
        array = image.get_array()
        assert array.shape == (E, 3)  # experts by windows
        assert [v for row in array.tolist() for v in row] == pytest.approx([v for row in expected[li] for v in row])
        assert image.get_clim() == (0, pytest.approx(vmax[li]))
        assert (image.get_cmap().name, image.get_interpolation(), ax.get_aspect()) == ("viridis", "nearest", "auto")
        assert image.get_extent() == [0, 25, E - 0.5, -0.5]  # up to the last window's end
        assert (ax.get_title(), ax.title.get_fontsize(), ax.get_xlabel()) == (f"MoE layer {li}", 9, "step")
        assert ax.get_ylabel() == ("routed expert" if li == 0 else "")
    colorbar = fig.axes[layers]
    assert colorbar.get_ylabel() == "load / uniform"


def test_load_over_time_of_no_window(figures, tmp_path):
    (tmp_path / "loads.json").write_text(json.dumps({"window": 10, "windows": []}))
    compare.plot_load_over_time(tmp_path / "loads.json", "t", tmp_path / "l.png")
    assert figures.figures == [] and not (tmp_path / "l.png").exists()


# ------------------------------------------------------------------------------- --report on a compare directory


ARGS = {"steps": 40, "batch_size": 2, "seq_len": 8, "lr": 0.002, "eval_every": 20, "eval_batches": 1,
        "impl": "dsmoe", "data": "corpus.txt"}


def _compare_dir(root: Path, runs=RUNS, loads=LOADS, variants=compare.VARIANTS) -> Path:
    """A compare directory as `dsmoe compare` leaves it: the configs, and a `dsmoe train` run
    folder per (variant, seed); a run that finished has its model and logged every step."""
    configs = compare_configs(32, 2, 2, 32, 4, 2, 1)
    (root / "configs").mkdir(parents=True)
    for name in variants:
        (root / "configs" / f"{name}.json").write_text(json.dumps(configs[name]))
    for r in _write_runs(root, {k: v for k, v in runs.items() if k[0] in variants}, loads):
        run_dir = Path(r["run_dir"])
        (run_dir / "train_args.json").write_text(json.dumps({**ARGS, "seed": r["seed"]}))
        if r["complete"]:
            (run_dir / "model.safetensors").write_bytes(b"")
    return root


def test_report_of_a_compare_directory(tmp_path, figures, capsys):
    from dsmoe.analysis import model_size
    from dsmoe.config import DeepSeekMoEConfig

    d = _compare_dir(tmp_path / "cmp")
    # a model saved but not every step logged, a model and no step logged: unfinished
    (d / "deepseekmoe" / "seed-2" / "model.safetensors").write_bytes(b"")
    (d / "deepseekmoe" / "seed-3").mkdir()
    (d / "deepseekmoe" / "seed-3" / "train_args.json").write_text(json.dumps({**ARGS, "seed": 3}))
    (d / "deepseekmoe" / "seed-3" / "model.safetensors").write_bytes(b"")
    (d / "gshard" / "seed-05").mkdir()  # never started (no train_args.json); its name sorts before seed-1
    (d / "gshard" / "seed-notes.txt").write_text("")
    # the settings of the earlier compare.json are kept, the run's own arguments win
    (d / "compare.json").write_text(json.dumps({"settings": {"budget": "short", "steps": 999, "jobs": 2}}))
    assert main(["compare", "--report", str(d)]) == 0
    out = capsys.readouterr().out
    table = format_table(
        ["variant", "mean", "std", "per seed", "train (last 5%)", "balance loss", "max load/uniform", "tokens/s"],
        [["Dense", "2.7000", "0.1414", "2.6000 2.8000", "3.2000", "0.0000", "-", "300"],
         ["GShard top-2", "2.7000", "0.2000", "2.5000 2.7000 2.9000", "3.1000", "0.0267", "2.00", "300"],
         ["DeepSeekMoE", "2.4500", "0.0707", "2.4000 2.5000", "2.9500", "0.0400", "4.00", "267"]])
    assert out == "\n".join([
        "stopped or unfinished runs (their curves are used as far as they got; no final values): dense seed 2, "
        "deepseekmoe seed 2, deepseekmoe seed 3",
        "",
        "final validation loss (nats/token), every finished seed:",
        table,
        "balance loss at perfectly uniform routing: GShard top-2 0.0200, DeepSeekMoE 0.0200 "
        "(the sum over MoE layers of alpha x 1)",
        "",
        "gaps of final validation loss, paired by seed (mean ± 95% interval; seed spread = std of one model over "
        "seeds):",
        "  DeepSeekMoE − GShard top-2 = -0.1500 ± 0.6353 (seed spread 0.1118, 2 seeds): within noise",
        "    over training: DeepSeekMoE below GShard top-2 at every evaluation; gap (seeds) at step 20: -0.300 (3), "
        "40: -0.150 (2)",
        "  GShard top-2 − Dense = -0.1000 ± 0.0000 (seed spread 0.1414, 2 seeds): separated",
        "    over training: GShard top-2 below Dense from step 40 on; gap (seeds) at step 20: +0.100 (2), "
        "40: -0.100 (2)",
        "  DeepSeekMoE − Dense = -0.2500 ± 0.6353 (seed spread 0.1118, 2 seeds): within noise",
        "    over training: DeepSeekMoE below Dense at every evaluation; gap (seeds) at step 20: -0.150 (2), "
        "40: -0.250 (2)",
        "",
        "640 tokens per run. The paper's ranking (DeepSeekMoE < GShard < Dense at equal activated FLOPs) needs "
        "enough tokens for the MoEs' extra parameters to pay off; read the gaps' trend over steps, not only their "
        "final value.",
        "",
        f"wrote {d}: compare.json, loss_curves.png, load_<variant>.png; checkpoints in <variant>/seed-<s>, "
        "training logs in logs/",
    ]) + "\n"
    summary = json.loads((d / "compare.json").read_text())
    assert summary["settings"] == {"budget": "short", "steps": 40, "jobs": 2, "batch_size": 2, "seq_len": 8,
                                   "lr": 0.002, "eval_every": 20, "eval_batches": 1, "seeds_list": [0, 1, 2, 3],
                                   "impl": "dsmoe", "data": "corpus.txt", "tokens_per_run": 40 * 2 * 8}
    assert summary["elapsed_s"] is None
    models = summary["models"]
    assert [(r["seed"], r["complete"]) for r in models["deepseekmoe"]["per_seed"]] == [(0, True), (1, True),
                                                                                       (2, False)]
    configs = compare_configs(32, 2, 2, 32, 4, 2, 1)
    for name in compare.VARIANTS:
        assert models[name]["config"] == configs[name]
        assert models[name]["size"] == model_size(DeepSeekMoEConfig(**configs[name]), 8)
    # the plots: the curves, and the load of the first run of each MoE that recorded it
    assert [f.get_suptitle() for f, _ in figures.figures[1:]] == [
        "GShard top-2 (seed 1): routed load over training", "DeepSeekMoE (seed 0): routed load over training"]
    assert sorted(p.name for p in d.iterdir() if p.suffix == ".png") == [
        "load_deepseekmoe.png", "load_gshard.png", "loss_curves.png"]


def test_report_of_some_variants_and_a_finished_run(tmp_path, figures, capsys):
    runs = {k: v for k, v in RUNS.items() if k[1] == 0}
    d = _compare_dir(tmp_path / "cmp", runs, loads={}, variants=("gshard",))
    _write_log(d / "dense" / "seed-0", [])  # a variant without its config: not part of the comparison
    assert main(["compare", "--report", str(d)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\nfinal validation loss")  # all finished: no list of stopped runs
    summary = json.loads((d / "compare.json").read_text())
    assert list(summary["models"]) == ["gshard"] and summary["gaps"] == {}
    assert summary["settings"]["seeds_list"] == [0] and "budget" not in summary["settings"]
    assert [f.get_suptitle() for f, _ in figures.figures[1:]] == []  # no recorded load, no load plot


def test_report_keeps_the_seeds_in_order(no_plots, tmp_path, capsys):
    runs = {("gshard", s): ([4.0, 3.5, 3.2, 3.0], [0.1] * 4, [3.0, 2.0 + s / 10], True) for s in (8, 9, 10)}
    d = _compare_dir(tmp_path / "cmp", runs, loads={}, variants=("gshard",))
    assert main(["compare", "--report", str(d)]) == 0
    per_seed = json.loads((d / "compare.json").read_text())["models"]["gshard"]["per_seed"]
    assert [r["seed"] for r in per_seed] == [8, 9, 10]


def test_report_refusals(tmp_path, capsys, monkeypatch):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert main(["compare", "--report", str(nothing)]) == 2
    assert capsys.readouterr().err == (f"dsmoe: error: --report {nothing}: not a `dsmoe compare` directory "
                                       "(it has no configs/)\n")
    d = tmp_path / "cmp"
    (d / "configs").mkdir(parents=True)
    assert main(["compare", "--report", str(d)]) == 2
    assert capsys.readouterr().err == f"dsmoe: error: --report {d}: no run has started in it\n"
    (d / "configs" / "gshard.json").write_text(json.dumps(compare_configs(32, 2, 2, 32, 4, 2, 1)["gshard"]))
    _write_log(d / "gshard" / "seed-0", [_train(10, 3.0)])  # no train_args.json: never started
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["compare", "--report", "~/cmp"]) == 2  # ~ is the home folder
    assert capsys.readouterr().err == "dsmoe: error: --report ~/cmp: no run has started in it\n"
    assert sorted(p.name for p in d.iterdir()) == ["configs", "gshard"]  # nothing written, not even a lock
    (d / "configs" / "gshard.json").write_text("{")
    assert main(["compare", "--report", str(d)]) == 2
    assert capsys.readouterr().err.startswith(f"dsmoe: error: --report: {d / 'configs' / 'gshard.json'} is not valid")


# ------------------------------------------------------------------------------- whole commands, stand-in runs


@pytest.fixture
def fake_training(monkeypatch):
    """The training runs stand-in: each job's run folder gets the log of a short run (2 steps and
    an evaluation more if it finished) and, for the MoEs (but DeepSeekMoE's seed 5), its routed
    load; ``state["codes"]`` are their exit statuses. The comparison takes 12.34 s on its clock, and
    the plots are only recorded (they have tests of their own)."""
    state = {"codes": None, "calls": [], "plots": []}

    def run_jobs(jobs, ns, total_steps):
        state["calls"].append((jobs, ns, total_steps))
        codes = state["codes"] or [0] * len(jobs)
        for j, code in zip(jobs, codes):
            base = {"dense": 3.0, "gshard": 2.9, "deepseekmoe": 2.8}[j["variant"]] + 0.1 * (j["seed"] % 2)
            rows = [_train(1, base + 1), _train(2, base + 0.5), _val(2, base + 0.4)]
            if code == 0:
                rows += [_train(3, base + 0.2), _train(4, base + 0.1), _val(4, base)]
            _write_log(Path(j["ns"].out), rows)
            if j["variant"] != "dense" and (j["variant"], j["seed"]) != ("deepseekmoe", 5):
                (Path(j["ns"].out) / "loads.json").write_text(json.dumps(
                    {"window": j["window"], "windows": [{"end_step": 4, "loads": [[1, 2], [3, 4]]}]}))
        return codes

    clock = iter([100.0, 112.34])
    monkeypatch.setattr(compare, "_run_jobs", run_jobs)
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(compare, "plot_curves", lambda results, path: state["plots"].append(("curves", str(path))))
    monkeypatch.setattr(compare, "plot_load_over_time",
                        lambda loads, title, path: state["plots"].append((str(loads), title, str(path))))
    return state


SIZE_TABLE = format_table(  # the toy variants' parameters counted by hand; 2 layers, vocabulary 259, h = 32
    ["variant", "FFN per token", "total params", "activated", "expert total", "expert activated", "fwd FLOPs/token"],
    [["Dense", "dense 64", "0.037M", "0.037M", "0.012M", "0.012M", "0.07M"],
     ["GShard top-2", "top-2 of 4 x 32", "0.050M", "0.037M", "0.025M", "0.012M", "0.07M"],
     ["DeepSeekMoE", "1 shared + top-3 of 7 x 16", "0.050M", "0.038M", "0.025M", "0.012M", "0.07M"]])


@pytest.mark.parametrize("codes, exit_code, failed", [
    (None, 0, []),
    ([0, 0, 0, 0, 1, 0], 1, [("GShard top-2", 6, 1, "gshard")]),
    ([0, 0, 0, 130, 143, 1], 130, [("Dense", 6, 130, "dense"), ("GShard top-2", 6, 143, "gshard"),
                                   ("DeepSeekMoE", 6, 1, "deepseekmoe")]),  # the first signal's code
    ([2, 143, 0, 0, 130, 0], 143, [("Dense", 5, 2, "dense"), ("GShard top-2", 5, 143, "gshard"),
                                   ("GShard top-2", 6, 130, "gshard")]),
])
def test_compare_with_stand_in_runs(tmp_path, fake_training, capsys, codes, exit_code, failed):
    fake_training["codes"] = codes
    data = tmp_path / "corpus.txt"
    data.write_text("text")
    out = tmp_path / "cmp"
    argv = ["compare", *TOY, "--steps", "80", "--seeds", "2", "--seed", "5", "--batch-size", "8", "--seq-len", "32",
            "--lr", "0.0015", "--threads", "3", "--jobs", "2", "--impl", "reference", "--bf16", "--data", str(data),
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == exit_code
    text = capsys.readouterr().out
    assert text.startswith(
        f"dsmoe compare -> {out}\n"
        "budget short: 80 steps x 8 x 32 = 20,480 tokens per run, lr 0.0015, seeds [5, 6]; the same data order "
        f"(per seed), steps and hyper-parameters for every variant\n{SIZE_TABLE}\n")
    assert [x for x in text.splitlines() if x.startswith("compare: ")] == [
        f"compare: {label} seed {seed} stopped (exit {code}); see {out}/logs/{name}-seed-{seed}.log"
        for label, seed, code, name in failed]
    assert "\n20,480 tokens per run in 12s in all. The paper's" in text
    wrote = (f"\nwrote {out}: compare.json, loss_curves.png, load_<variant>.png; checkpoints in <variant>/seed-<s>, "
             "training logs in logs/\n")
    assert text.endswith(wrote if failed else
                         wrote + f"specialisation of both MoEs over the seeds: dsmoe experts --compare-run {out}\n")

    (jobs, ns, total_steps), = fake_training["calls"]
    assert ns.jobs == 2 and total_steps == 80 * 6
    # seed-major: the first seed of every variant first; a load window of 80 // 40 steps
    assert [(j["variant"], j["seed"], j["threads"], j["window"], j["log"]) for j in jobs] == [
        (v, s, 3, 2, f"{out}/logs/{v}-seed-{s}.log") for s in (5, 6) for v in ("dense", "gshard", "deepseekmoe")]
    for j in jobs:
        t = j["ns"]
        assert (t.config, t.out, t.seed) == (f"{out}/configs/{j['variant']}.json",
                                             f"{out}/{j['variant']}/seed-{j['seed']}", j["seed"])
        assert (t.steps, t.batch_size, t.seq_len, t.lr, t.impl, t.data, t.bf16, t.device) == (
            80, 8, 32, 0.0015, "reference", str(data), True, "cpu")
    configs = compare_configs(32, 2, 2, 32, 4, 2, 1)
    for name in compare.VARIANTS:
        assert json.loads((out / "configs" / f"{name}.json").read_text()) == configs[name]

    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["settings"].items()) == [
        ("budget", "short"), ("steps", 80), ("seeds", 2), ("eval_every", 25), ("eval_batches", 8), ("batch_size", 8),
        ("seq_len", 32), ("lr", 0.0015), ("seeds_list", [5, 6]), ("impl", "reference"), ("bf16", True),
        ("data", str(data)), ("jobs", 2), ("threads", 3), ("tokens_per_run", 20480)]
    assert summary["elapsed_s"] == 12.3
    codes = codes or [0] * 6
    for i, name in enumerate(compare.VARIANTS):
        assert [(r["seed"], r["run_dir"], r["complete"]) for r in summary["models"][name]["per_seed"]] == [
            (s, f"{out}/{name}/seed-{s}", codes[3 * k + i] == 0) for k, s in enumerate((5, 6))]
    # parameters and forward FLOPs per token (2 x weight-matrix parameters + 4 x layers x 32 x h), by hand
    sizes = {n: summary["models"][n]["size"] for n in compare.VARIANTS}
    assert sizes == {
        "dense": {"total": 37216, "activated": 37216, "expert_total": 12288, "expert_activated": 12288, "router": 0,
                  "flops_per_token": 2 * 28768 + 4 * 2 * 32 * 32},
        "gshard": {"total": 49760, "activated": 37472, "expert_total": 24576, "expert_activated": 12288,
                   "router": 256, "flops_per_token": 2 * 29024 + 4 * 2 * 32 * 32},
        "deepseekmoe": {"total": 49952, "activated": 37664, "expert_total": 24576, "expert_activated": 12288,
                        "router": 448, "flops_per_token": 2 * 29216 + 4 * 2 * 32 * 32}}
    # the load plots of the first run of each MoE that recorded its load
    assert fake_training["plots"] == [
        ("curves", f"{out}/loss_curves.png"),
        (f"{out}/gshard/seed-5/loads.json", "GShard top-2 (seed 5)", f"{out}/load_gshard.png"),
        (f"{out}/deepseekmoe/seed-6/loads.json", "DeepSeekMoE (seed 6)", f"{out}/load_deepseekmoe.png")]


def test_compare_of_two_variants_in_the_default_folder(tmp_path, fake_training, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *TOY, "--steps", "4", "--seeds", "1", "--variants", "gshard", "dense"]) == 0
    out, = (tmp_path / "runs").iterdir()
    assert out.name.startswith("compare-")
    text = capsys.readouterr().out
    assert text.startswith(f"dsmoe compare -> runs/{out.name}\nbudget short: 4 steps x 16 x 128 = 8,192 tokens per "
                           "run, lr 0.002, seeds [0]; ")
    assert "specialisation" not in text  # one MoE only
    (jobs, _, total_steps), = fake_training["calls"]
    assert [(j["variant"], j["seed"], j["threads"], j["window"]) for j in jobs] == [("gshard", 0, 1, 1),
                                                                                    ("dense", 0, 1, 1)]
    assert total_steps == 8
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["dense.json", "gshard.json"]
    assert list(json.loads((out / "compare.json").read_text())["models"]) == ["gshard", "dense"]


def test_compare_overwrites_only_with_overwrite(tmp_path, fake_training, capsys):
    out = tmp_path / "cmp"
    (out / "gshard" / "seed-0").mkdir(parents=True)
    (out / "compare.json").write_text("{}")
    (out / "mine.txt").write_text("keep")
    argv = ["compare", *TOY, "--steps", "4", "--seeds", "1", "--variants", "dense", "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"dsmoe: error: output directory {out} already exists and is not empty; "
                                       "choose another --out, pass --overwrite to replace it, or --resume to "
                                       "continue it\n")
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "gshard", "mine.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert f"--overwrite: removed gshard/, compare.json from {out}\n" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.name != ".dsmoe.lock") == [
        "compare.json", "configs", "dense", "mine.txt"]
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("argv, message", [
    (["--num-heads", "3"], "--num-heads 3 must divide --hidden-size 128 into even head sizes"),
    (["--hidden-size", "96", "--num-heads", "32"], "--num-heads 32 must divide --hidden-size 96 into even head sizes"),
    # head sizes 4 and 2 are even: on to the next check
    (["--hidden-size", "12", "--num-heads", "3", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--hidden-size", "8", "--num-heads", "4", "--seeds", "0"], "--seeds must be a positive integer, got 0"),
    # the architecture's own checks, each option where it belongs
    (["--hidden-size", "0"], "--hidden-size must be >= 2, got 0"),
    (["--num-layers", "0"], "--num-layers must be >= 1, got 0"),
    (["--ffn", "0"], "--ffn must be >= 1, got 0"),
    (["--experts", "1"], "--experts must be >= 2, got 1"),
    (["--granularity", "3"], "--granularity 3 must divide --ffn 256"),
    (["--shared", "9"], "--shared 9 leaves no routed expert to choose (granularity 4)"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["--jobs", "0"], "--jobs must be a positive integer, got 0"),
    (["--data", "DIR/missing.txt"], "--data: DIR/missing.txt does not exist"),
    (["--data", "~/missing.txt"], "--data: ~/missing.txt does not exist"),
    (["--data", "~/corpus.txt", "--steps", "-1"], "--steps must be a positive integer, got -1"),  # it is there
])
def test_compare_refusals(tmp_path, capsys, monkeypatch, fake_training, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("text")
    argv = [a.replace("DIR", str(tmp_path)) for a in argv]
    out = tmp_path / "out"
    assert main(["compare", *argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"dsmoe: error: {message.replace('DIR', str(tmp_path))}\n"
    assert not out.exists() and not (tmp_path / "runs").exists() and fake_training["calls"] == []


def test_compare_refuses_a_file_as_output_directory(tmp_path, capsys, fake_training):
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["compare", *TOY, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"dsmoe: error: output directory {out} exists and is not a directory\n"
    assert out.read_text() == "x"


def test_compare_passes_the_architecture_options_and_checks_only_the_variants_asked(tmp_path, capsys, monkeypatch,
                                                                                       fake_training):
    seen = []
    real = compare_configs(32, 2, 2, 32, 4, 2, 1)
    bad = {**real, "gshard": {**real["gshard"], "num_experts_per_tok": 5}}  # 5 of 4 experts

    def configs(*args):
        seen.append(args)
        return bad

    monkeypatch.setattr(compare, "compare_configs", configs)
    out = tmp_path / "out"
    assert main(["compare", "--hidden-size", "64", "--num-layers", "3", "--num-heads", "2", "--ffn", "48", "--experts",
                 "5", "--granularity", "3", "--shared", "2", "--out", str(out)]) == 2
    assert seen == [(64, 3, 2, 48, 5, 3, 2)]
    assert capsys.readouterr().err == ("dsmoe: error: the gshard variant is not a valid config: DeepSeekMoEConfig: "
                                       "num_experts_per_tok=5 must be <= n_routed_experts=4\n")
    assert not out.exists()
    assert main(["compare", "--variants", "dense", "deepseekmoe", "--seeds", "1", "--out", str(out)]) == 0


def test_compare_refuses_zero_heads(tmp_path, capsys, fake_training):
    out = tmp_path / "out"
    assert main(["compare", "--num-heads", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("dsmoe: error: --num-heads")
    assert not out.exists()


def test_compare_refuses_a_sequence_longer_than_the_models_positions(tmp_path, capsys, fake_training):
    fake_training["codes"] = [2]  # as train refuses it
    out = tmp_path / "out"
    assert main(["compare", *TOY, "--variants", "dense", "--seeds", "1", "--seq-len", "2000", "--out", str(out)]) == 2
    assert "--seq-len 2000 exceeds" in capsys.readouterr().err
    assert not out.exists() and fake_training["calls"] == []


def test_report_of_a_gap_without_a_trend(capsys):
    # no evaluation both models reached: the note alone, no empty list of steps after it
    compare._report({"models": {}, "gaps": {"gshard-dense": {"n": 0, "trend": []}},
                     "crossings": {"gshard-dense": {"note": "no evaluation in common"}},
                     "settings": {"tokens_per_run": 1000}, "elapsed_s": None})
    out = capsys.readouterr().out
    assert "\n  GShard top-2 − Dense: no seed finished for both\n    over training: no evaluation in common\n" in out


# ------------------------------------------------------------------------------- what the mutation pass asked for


def test_report_locks_its_own_directory_and_creates_nothing_else(no_plots, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a lock taken on no directory would make runs/compare-<date> here
    d = _compare_dir(tmp_path / "cmp")
    real, seen = compare._write_results, {}

    def write_results(out_dir, *a):
        with pytest.raises(CLIError, match="is in use by another dsmoe process"):
            claim_run_dir(d, "compare", existing=True)  # the report holds it while it writes
        seen["out"] = out_dir
        return real(out_dir, *a)

    monkeypatch.setattr(compare, "_write_results", write_results)
    assert main(["compare", "--report", str(d)]) == 0
    assert seen["out"] == d and not (tmp_path / "runs").exists()
    capsys.readouterr()
    held = claim_run_dir(d, "compare", existing=True)  # released by the report: another process now
    try:
        assert main(["compare", "--report", str(d)]) == 2
        assert capsys.readouterr().err.startswith(
            f"dsmoe: error: --report directory {d} is in use by another dsmoe process (pid {os.getpid()})")
    finally:
        held.release()


def test_compare_into_a_directory_another_process_holds(tmp_path, fake_training, capsys):
    out = tmp_path / "cmp"
    held = claim_run_dir(out, "compare")
    try:
        argv = ["compare", *TOY, "--steps", "4", "--seeds", "1", "--variants", "dense", "--out", str(out), "--overwrite"]
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"dsmoe: error: output directory {out} is in use by another dsmoe "
                                                  "process")
    finally:
        held.release()
    assert fake_training["calls"] == []


def test_a_seq_len_at_the_models_limit_is_accepted(tmp_path, fake_training, capsys):
    limit = min(c["max_position_embeddings"] for c in compare_configs(32, 2, 2, 32, 4, 2, 1).values())
    argv = ["compare", *TOY, "--steps", "4", "--seeds", "1", "--variants", "dense", "--out", str(tmp_path / "cmp")]
    assert main([*argv, "--seq-len", str(limit)]) == 0
    assert main([*argv[:-1], str(tmp_path / "cmp2"), "--seq-len", str(limit + 1)]) == 2
    assert f"--seq-len {limit + 1} exceeds the compared models' max_position_embeddings {limit}" in capsys.readouterr().err


def test_the_load_window_is_a_whole_number_of_steps(tmp_path, fake_training):
    argv = ["compare", *TOY, "--steps", "100", "--seeds", "1", "--variants", "gshard", "--out", str(tmp_path / "cmp")]
    assert main(argv) == 0
    (jobs, _, _), = fake_training["calls"]
    assert [j["window"] for j in jobs] == [2] and isinstance(jobs[0]["window"], int)  # 100 // 40 windows of 40


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    """warnings' own way of showing a warning (pytest replaces it to record them)."""
    if sys.stderr is not None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def test_run_one_logs_warnings_and_direct_writes_and_a_crash(tmp_path, monkeypatch):
    def fake_train(ns):
        warnings.warn("a warning of the run")
        sys.stderr.write("written to stderr\n")
        raise RuntimeError("the run broke")

    monkeypatch.setattr(compare.train, "run", fake_train)
    job = {"threads": 1, "window": 1, "ns": argparse.Namespace(out=str(tmp_path / "run")),
           "log": str(tmp_path / "run.log")}
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_on_stderr  # as outside pytest, which records them
        assert compare.run_one(job) == 1  # a crash: 1, as `dsmoe train` exits on one (2 is a refusal)
    log = (tmp_path / "run.log").read_text()
    assert "UserWarning: a warning of the run" in log and "written to stderr\n" in log
    assert "Traceback (most recent call last)" in log and log.rstrip().endswith("RuntimeError: the run broke")


def test_seed_order_numbers_first_then_names():
    names = ["seed-x", "seed-10", "seed-a", "seed-2", "seed-0"]
    assert [n for n in sorted(names, key=lambda n: compare._seed_order(Path(n)))] == [
        "seed-0", "seed-2", "seed-10", "seed-a", "seed-x"]


def test_report_of_a_finished_run_whose_last_evaluation_came_earlier(no_plots, tmp_path, capsys):
    # finished: its model is saved and it logged its last step, whatever step it last evaluated at
    runs = {("gshard", 0): ([4.0, 3.5, 3.2, 3.0], [0.1] * 4, [3.0], True)}  # evaluated at step 20 only
    d = _compare_dir(tmp_path / "cmp", runs, loads={}, variants=("gshard",))
    assert main(["compare", "--report", str(d)]) == 0
    assert "stopped or unfinished" not in capsys.readouterr().out
    per_seed = json.loads((d / "compare.json").read_text())["models"]["gshard"]["per_seed"]
    assert [(r["seed"], r["complete"], r["final_val_loss"]) for r in per_seed] == [(0, True, 3.0)]


def test_report_with_a_compare_json_without_settings_and_a_seed_never_started(no_plots, tmp_path, capsys):
    runs = {("gshard", s): ([4.0, 3.5, 3.2, 3.0], [0.1] * 4, [3.0, 2.5], True) for s in (0, 2)}
    d = _compare_dir(tmp_path / "cmp", runs, loads={}, variants=("gshard",))
    (d / "gshard" / "seed-1").mkdir()  # never started (no train_args.json): seed 2 after it still counts
    (d / "compare.json").write_text(json.dumps({"models": {}}))  # an older file, no settings in it
    assert main(["compare", "--report", str(d)]) == 0
    summary = json.loads((d / "compare.json").read_text())
    assert [r["seed"] for r in summary["models"]["gshard"]["per_seed"]] == [0, 2]
    assert summary["settings"]["seeds_list"] == [0, 2] and summary["settings"]["steps"] == 40


def test_collect_skips_a_run_without_an_evaluation_but_not_the_seeds_after_it(tmp_path):
    runs = {("dense", 0): ([4.0, 3.5], None, [], False),  # stopped before its first evaluation
            ("dense", 1): ([4.0, 3.5, 3.2, 3.0], None, [3.0, 2.6], True),
            ("gshard", 0): ([4.0, 3.4], [0.05, 0.04], [], False),
            ("gshard", 1): ([4.0, 3.4, 3.1, 2.9], [0.05, 0.04, 0.03, 0.02], [3.1, 2.5], True)}
    written = _write_runs(tmp_path, runs, loads={})
    configs = {n: c for n, c in compare_configs(32, 2, 2, 32, 4, 2, 1).items() if n in ("dense", "gshard")}
    sizes = {n: {"total": 1} for n in configs}
    settings = {"steps": 40, "batch_size": 2, "seq_len": 8}
    res = compare._collect(settings, written, sizes, configs)
    assert [r["seed"] for r in res["models"]["dense"]["per_seed"]] == [1]
    assert [r["seed"] for r in res["models"]["gshard"]["per_seed"]] == [1]
    # the first pair (DeepSeekMoE - GShard) has no DeepSeekMoE: skipped, the next ones still computed
    assert list(res["gaps"]) == ["gshard-dense"] and res["gaps"]["gshard-dense"]["seeds"] == [1]
    assert list(res["crossings"]) == ["gshard-dense"]


@pytest.mark.parametrize("damaged, label", [
    ("gshard/seed-0/train_args.json", "--report"), ("compare.json", "--report"),
    ("gshard/seed-0/loads.json", "loads.json"),  # read for the balance and the load plot
])
def test_report_names_the_damaged_file(tmp_path, monkeypatch, capsys, damaged, label):
    monkeypatch.setattr(compare, "plot_curves", lambda *a: None)
    runs = {("gshard", 0): ([4.0, 3.5, 3.2, 3.0], [0.1] * 4, [3.0, 2.5], True)}
    d = _compare_dir(tmp_path / "cmp", runs, loads={("gshard", 0): LOADS[("gshard", 1)]}, variants=("gshard",))
    (d / damaged).write_text("{")
    assert main(["compare", "--report", str(d)]) == 2
    assert capsys.readouterr().err.startswith(f"dsmoe: error: {label}: {d / damaged} is not valid JSON")


def test_loss_curves_of_a_short_run_are_not_smoothed(figures, tmp_path):
    # under 80 logged steps the window is one step: the balance loss as logged (mean of seeds)
    results = {"models": {"gshard": {"per_seed": [
        {"seed": 0, "val_curve": [[2, 3.0]], "train_curve": [[1, 4.0, 1.0], [2, 3.9, 2.0], [3, 3.8, 3.0]]},
        {"seed": 1, "val_curve": [[2, 3.2]], "train_curve": [[1, 4.0, 3.0], [2, 3.9, 2.0], [3, 3.8, 5.0]]}]}}}
    compare.plot_curves(results, tmp_path / "c.png")
    (fig, (ax, ax2)), = figures.figures
    aux, = ax2.lines
    assert list(aux.get_xdata()) == [1, 2, 3] and list(aux.get_ydata()) == pytest.approx([2.0, 2.0, 4.0])
    assert ax2.get_position().x0 > ax.get_position().x1  # side by side, the balance loss on the right
    assert abs(ax2.get_position().y0 - ax.get_position().y0) < 1e-6


def test_run_jobs_one_at_a_time_an_interrupted_later_run_stops_the_rest(tmp_path, fake_run_one, capsys):
    # the runs not started take the interrupted run's status, not that of an earlier finished one
    jobs = [_job(tmp_path, "dense", 0, code=0, train=1), _job(tmp_path, "gshard", 0, code=0, train=1),
            _job(tmp_path, "deepseekmoe", 0, code=130, train=1), _job(tmp_path, "dense", 1, code=0, train=1),
            _job(tmp_path, "gshard", 1, code=0, train=1)]
    assert compare._run_jobs(jobs, argparse.Namespace(no_progress=True, jobs=1), 5) == [0, 0, 130, 130, 130]
    assert fake_run_one == [("dense", 0), ("gshard", 0), ("deepseekmoe", 0)]


@pytest.mark.parametrize("impl", ["dsmoe", "reference"])
def test_impl_takes_each_of_its_choices(impl):
    assert _ns("--impl", impl).impl == impl
