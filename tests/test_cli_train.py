"""dsmoe/cli/train.py's pieces in-process: the learning-rate schedule written out, argument
resolution with every refusal in full, the signal handling, the loss plot's data. Whole runs
are in test_cli.py and test_cli_runs.py."""
from __future__ import annotations

import argparse
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from dsmoe.cli import train as train_mod
from dsmoe.cli.common import CLIError


def _ns(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    return p.parse_args(list(argv))


def _resolve(*argv: str, saved: dict | None = None) -> dict:
    return train_mod._resolve_args(_ns(*argv), saved)


def _refusal(*argv: str, saved: dict | None = None) -> str:
    with pytest.raises(CLIError) as e:
        _resolve(*argv, saved=saved)
    return str(e.value)


# ---- the schedule, written out: linear warm-up over `warmup` steps, then a half cosine to min_lr

def _expected_lr(step, lr, warmup, min_lr, steps):
    if step < warmup:
        return lr * (step + 1) / warmup
    if steps <= warmup:
        return lr
    t = min(1.0, (step - warmup) / (steps - warmup))
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("warmup, steps", [(0, 10), (2, 3), (3, 3), (5, 4), (1, 2), (4, 104)])
def test_lr_schedule_written_out(warmup, steps):
    a = dict(lr=2e-3, warmup=warmup, min_lr=2e-4, steps=steps)
    for step in range(steps + 3):
        assert train_mod.lr_at(step, a) == pytest.approx(_expected_lr(step, 2e-3, warmup, 2e-4, steps), rel=1e-12)
    if warmup == 0:
        assert train_mod.lr_at(0, a) == pytest.approx(2e-3)  # no warm-up: the first step at the peak
    if steps > warmup:
        assert train_mod.lr_at(steps, a) == pytest.approx(2e-4)  # the end of the decay
        assert train_mod.lr_at(steps + 50, a) == pytest.approx(2e-4)  # and it stays there


# ---- argument resolution

def test_defaults_and_derived_values():
    a = _resolve()
    assert {k: a[k] for k in train_mod.DEFAULTS if k not in ("warmup", "min_lr")} == \
        {k: v for k, v in train_mod.DEFAULTS.items() if k not in ("warmup", "min_lr")}
    assert a["warmup"] == 15 and a["min_lr"] == pytest.approx(2e-4)  # 5% of 300 steps; lr / 10
    assert _resolve("--steps", "1")["warmup"] == 0
    assert _resolve("--steps", "2")["warmup"] == 1
    assert _resolve("--steps", "39")["warmup"] == 1
    assert _resolve("--steps", "40")["warmup"] == 2
    assert _resolve("--steps", "40", "--warmup", "0")["warmup"] == 0
    assert _resolve("--lr", "0.5")["min_lr"] == pytest.approx(0.05)
    assert _resolve("--lr", "0.5", "--min-lr", "0.5")["min_lr"] == 0.5  # equal is allowed
    a = _resolve("--config", "x.json")
    assert a["config"] == "x.json" and a["preset"] is None
    assert _resolve("--eval-every", "0", "--save-every", "0", "--log-every", "0", "--keep-last", "1",
                    "--sample-tokens", "0")["keep_last"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--config", "x.json"], "--preset and --config exclude each other"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--batch-size", "-2"], "--batch-size must be a positive integer, got -2"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["--eval-batches", "0"], "--eval-batches must be a positive integer, got 0"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--sample-tokens", "-1"], "--sample-tokens must be >= 0, got -1"),
    (["--min-lr", "-1"], "--min-lr must be a finite number >= 0, got -1.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
    (["--lr", "0.1", "--min-lr", "0.2"], "--min-lr 0.2 must not exceed --lr 0.1"),
    (["--eval-every", "-1"], "--eval-every must be >= 0, got -1"),
    (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    (["--log-every", "-1"], "--log-every must be >= 0, got -1"),
    (["--keep-last", "0"], "--keep-last must be a positive integer, got 0"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1, got -1"),
    (["--sample-prompt", "a\udcff"], "--sample-prompt must be UTF-8 text; it has byte 0xff at character 1"),
])
def test_each_bad_value_is_refused_by_name(argv, message):
    assert _refusal(*argv) == message


def test_resume_takes_the_saved_settings_and_refuses_changes():
    saved = {**train_mod.DEFAULTS, "preset": "tiny", "lr": 0.01, "warmup": 3, "min_lr": 0.001, "seq_len": 32}
    a = _resolve("--steps", "500", "--keep-last", "2", "--lr", "0.01", saved=saved)
    assert a["steps"] == 500 and a["keep_last"] == 2  # what may change
    assert a["lr"] == 0.01 and a["warmup"] == 3 and a["min_lr"] == 0.001 and a["seq_len"] == 32 and a["preset"] == "tiny"
    assert _refusal("--seq-len", "64", "--lr", "0.02", "--steps", "9", saved=saved) == (
        "--resume continues the run with its own settings; these cannot change: --lr, --seq-len")
    assert _refusal("--batch-size", "3", saved=saved).endswith("these cannot change: --batch-size")
    # values refused for a new run are refused on resume too
    assert _refusal("--steps", "0", saved=saved) == "--steps must be a positive integer, got 0"
    # a hand-edited train_args.json: JSON true is not a count
    for name in ("steps", "batch_size", "seq_len", "eval_batches"):
        flag = "--" + name.replace("_", "-")
        assert _refusal(saved={**saved, name: True}) == f"{flag} must be a positive integer, got True"
        assert _refusal(saved={**saved, name: 2.0}) == f"{flag} must be a positive integer, got 2.0"


def test_a_saved_config_run_keeps_no_preset():
    saved = {**train_mod.DEFAULTS, "preset": None, "config": "c.json", "warmup": 1, "min_lr": 1e-4}
    a = _resolve(saved=saved)
    assert a["preset"] is None and a["config"] == "c.json"


# ---- small helpers

def test_inside(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run2").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    inside = train_mod._inside
    assert inside(tmp_path / "run", tmp_path / "run")
    assert inside(tmp_path / "run" / "checkpoints", tmp_path / "run")
    assert inside(tmp_path / "alias" / "checkpoints", tmp_path / "run")  # resolved
    assert not inside(tmp_path / "run2", tmp_path / "run")  # a name prefix is not a parent
    assert not inside(tmp_path / "run", tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("n, shown", [(0, "0"), (0.4, "0"), (999, "999"), (999.6, "1000"), (1000, "1.0k"),
                                      (1234.5, "1.2k"), (2.5e6, "2500.0k")])
def test_token_counts(n, shown):
    assert train_mod._fmt_tokens(n) == shown


# ---- signals

def test_first_signal_asks_to_stop_the_second_stops_at_once(capsys):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append("old"))
    try:
        with train_mod._Interrupt() as stop:
            assert stop.requested is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested == "SIGTERM"
            assert capsys.readouterr().err == ("\nSIGTERM: finishing this step and saving a checkpoint "
                                               "(SIGTERM again to stop without saving)\n")
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is back
        assert calls == ["old"]
        with train_mod._Interrupt() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == "Ctrl-C"
            assert "Ctrl-C: finishing this step" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signals_blocked_by_a_launcher_are_unblocked():
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        with train_mod._Interrupt():
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
            assert signal.SIGTERM not in blocked and signal.SIGINT not in blocked
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_outside_the_main_thread_signals_are_left_alone():
    handler = signal.getsignal(signal.SIGINT)
    seen = {}

    def body():
        with train_mod._Interrupt() as stop:
            seen["old"] = dict(stop._old)
            seen["handler"] = signal.getsignal(signal.SIGINT)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"old": {}, "handler": handler}
    assert signal.getsignal(signal.SIGINT) is handler


# ---- the loss plot

def test_the_plot_shows_train_and_validation_losses(tmp_path, monkeypatch):
    plt = train_mod.use_agg()
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    rows = [{"step": 1, "split": "train", "loss": 3.0}, {"step": 2, "split": "train", "loss": 2.5},
            {"step": 2, "split": "val", "loss": 2.7}, {"step": 3, "split": "train", "loss": None},
            {"step": 4, "split": "train", "loss": 2.0}, {"step": 4, "split": "val", "loss": 2.2},
            {"step": 4, "split": "other", "loss": 9.0}]
    run = tmp_path / "my-run"
    run.mkdir()
    train_mod.plot_losses(run, rows, run / "loss.png")
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = figures[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"train": ([1, 2, 4], [3.0, 2.5, 2.0]), "validation": ([2, 4], [2.7, 2.2])}
    assert ax.get_title() == "my-run" and ax.get_xlabel() == "step"
    assert ax.get_ylabel() == "cross entropy (nats / byte)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    figures.clear()
    train_mod.plot_losses(run, rows[:2], run / "train-only.png")  # no validation yet: one line
    assert [line.get_label() for line in figures[0].axes[0].get_lines()] == ["train"]


# ---- one whole run, every line and row of it checked (in-process: the mutation pass sees it)

TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2", "--eval-batches", "1",
        "--no-progress"]


@pytest.fixture
def one_run(tmp_path_factory, corpus):
    """(per test, not per module: mutmut attributes a module fixture's calls to the first test
    only, and would run only that one against a mutant of the training loop)"""
    import contextlib
    import io

    from dsmoe.cli import main

    out = tmp_path_factory.mktemp("one") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["train", *TINY, "--data", str(corpus), "--out", str(out), "--steps", "5", "--eval-every", "2",
                     "--save-every", "3", "--log-every", "2", "--sample-tokens", "6", "--sample-prompt", "def",
                     "--seed", "4"])
    return code, out, buf.getvalue()


def _rows(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_prints_what_it_does(one_run, corpus):
    import re

    from dsmoe.cli.models import make_config, parameter_counts

    code, run, out = one_run
    assert code == 0
    lines = out.splitlines()
    cfg = make_config("tiny")
    total, active = parameter_counts(make_config("tiny", overrides=dict(vocab_size=259, bos_token_id=256,
                                                                         eos_token_id=257, pad_token_id=None)))
    assert lines[0] == f"dsmoe train -> {run}"
    assert lines[1] == (f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_shared_experts} shared + "
                        f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}); {total / 1e6:.2f}M "
                        f"parameters, {active / 1e6:.2f}M activated per token; impl dsmoe")
    assert re.fullmatch(rf"data: {re.escape(str(corpus))}: 1 documents, [\d,]+ train / [\d,]+ val tokens "
                        r"\(read in \d+\.\ds\)", lines[2]), lines[2]
    assert lines[3] == (f"device: cpu, {torch.get_num_threads()} threads; 5 steps x 4 x 16 tokens, lr 0.01 "
                        "(warm-up 1, cosine to 0.001)")
    step = r"step +{} ?/5 \| loss \d+\.\d{{4}} \| aux \d+\.\d{{4}} \| lr {} \| [\d.]+k? tok/s \| \d+s"
    val = r"step +{}/5 \| val loss \d+\.\d{{4}}"
    expected = [step.format(2, re.escape(f"{train_mod.lr_at(1, _args()):.2e}")), val.format(2),
                step.format(4, re.escape(f"{train_mod.lr_at(3, _args()):.2e}")), val.format(4),
                step.format(5, re.escape(f"{train_mod.lr_at(4, _args()):.2e}"))]
    progress = [line for line in lines[4:] if line.startswith(("step", "checkpoint"))]
    assert progress[2] == f"checkpoint: {run / 'checkpoints' / 'step-000003'}"
    del progress[2]
    assert len(progress) == len(expected) and all(re.fullmatch(e, p) for e, p in zip(expected, progress)), progress
    done = next(line for line in lines if line.startswith("done: "))
    rows = [r for r in _rows(run) if r["split"] == "train"]
    mean_last = sum(r["loss"] for r in rows) / 5
    assert re.fullmatch(rf"done: 5 steps, 320 tokens in \d+s \(~[\d.]+k? tokens/s\); train loss "
                        rf"{rows[0]['loss']:.3f} -> {mean_last:.3f} \(mean of last 5\), val loss \d+\.\d{{4}}", done), done
    assert f"saved: {run} (model), {run / 'checkpoints' / 'step-000005'} (checkpoint), {run / 'log.csv'}, " \
           f"{run / 'loss.png'}" in lines
    assert "sample (temperature 0.8, top-k 40, seed 4):" in lines
    sample = lines[lines.index("sample (temperature 0.8, top-k 40, seed 4):") + 1]
    assert sample.startswith("def")


def _args() -> dict:
    return dict(lr=1e-2, warmup=1, min_lr=1e-3, steps=5)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_logs_every_step_and_each_validation(one_run):
    code, run, _ = one_run
    rows = _rows(run)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "val"), (3, "train"),
                                                        (4, "train"), (4, "val"), (5, "train"), (5, "val")]
    for r in rows:
        assert r["tokens"] == r["step"] * 4 * 16 and r["elapsed_s"] >= 0
        if r["split"] == "train":
            assert r["lr"] == pytest.approx(train_mod.lr_at(r["step"] - 1, _args()))
            assert r["tokens_per_s"] > 0 and r["aux_loss"] > 0 and r["loss"] > 0
        else:
            assert set(r) == {"step", "split", "loss", "tokens", "elapsed_s"}
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    csv_lines = (run / "log.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and csv_lines[0].startswith("step,split,loss,aux_loss,lr")


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_leaves_its_files(one_run):
    import json

    code, run, _ = one_run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000005"]
    assert (run / "model.safetensors").is_file() and (run / "loss.png").is_file() and (run / "tokenizer.json").is_file()
    args = json.loads((run / "train_args.json").read_text())
    assert args["steps"] == 5 and args["warmup"] == 1 and args["min_lr"] == pytest.approx(1e-3) and args["seed"] == 4
    state = json.loads((run / "checkpoints" / "step-000005" / "trainer_state.json").read_text())
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    first = json.loads((run / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["tokens"] == 320 and state["run_id"] == run_id
    assert state["parent"] == {"run_id": run_id, "checkpoint_id": first["checkpoint_id"], "step": 3}
    assert first["parent"] is None and state["checkpoint_id"] != first["checkpoint_id"]
    assert state["args"] == args
    from dsmoe.cli.models import load_model

    final = load_model(run, torch.device("cpu")).state_dict()  # the run directory is the final model
    last = load_model(run / "checkpoints" / "step-000005", torch.device("cpu")).state_dict()
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


# ---- the Trainer's pieces, and the distributed glue with stand-ins

@pytest.fixture
def trainer(corpus):
    a = _resolve(*TINY, "--data", str(corpus), "--steps", "4", "--eval-batches", "2", "--seed", "1")
    return train_mod.Trainer(a, None, None, progress=False)


def test_autocast_follows_bf16():
    from types import SimpleNamespace

    on = train_mod.Trainer.autocast(SimpleNamespace(device=torch.device("cpu"), a={"bf16": True}))
    off = train_mod.Trainer.autocast(SimpleNamespace(device=torch.device("cpu"), a={"bf16": None}))
    assert on.fast_dtype == torch.bfloat16 and on._enabled is True and off._enabled is False
    import contextlib

    # without CUDA autocast disables itself (a warning) but keeps the dtype asked for
    with contextlib.nullcontext() if torch.cuda.is_available() else pytest.warns(UserWarning):
        cuda = train_mod.Trainer.autocast(SimpleNamespace(device=torch.device("cuda"), a={"bf16": True}))
    assert cuda.fast_dtype == torch.bfloat16  # not CUDA's default, fp16


@pytest.mark.usefixtures("one_torch_thread")
def test_each_step_sets_the_schedule_s_learning_rate(trainer):
    for step in range(3):
        trainer.train_step(step)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [train_mod.lr_at(step, trainer.a)] * 2


@pytest.mark.usefixtures("one_torch_thread")
def test_evaluate_is_the_mean_loss_over_the_validation_batches(trainer):
    import torch.nn.functional as F

    assert len(trainer.eval_data) == 2
    with torch.no_grad():
        expected = sum(F.cross_entropy(trainer.model(x).logits.reshape(-1, trainer.config.vocab_size), y.reshape(-1))
                       .item() for x, y in trainer.eval_data) / 2
    assert trainer.model.training
    assert trainer.evaluate() == pytest.approx(expected, rel=1e-6)
    assert trainer.model.training  # back in training mode


class _FakeDist:
    """The DistributedTraining calls a Trainer makes, recorded; one rank's half of each batch."""

    def __init__(self):
        self.calls = []
        self.is_main = True

    def local_batch(self, x, y):
        self.calls.append(("local_batch", x.shape[0], y.shape[0]))
        return x[: x.shape[0] // 2], y[: y.shape[0] // 2]

    def mean(self, value):
        self.calls.append(("mean", value))
        return value + 100.0

    def save(self, path, model, optimizer, state, extra_files):
        self.calls.append(("save", path, model, optimizer, state, extra_files))
        Path(path).mkdir(parents=True)


@pytest.mark.usefixtures("one_torch_thread")
def test_evaluate_on_several_ranks(trainer):
    import torch.nn.functional as F

    fake = _FakeDist()
    trainer.dist = fake
    with torch.no_grad():
        local = sum(F.cross_entropy(trainer.model(x[:2]).logits.reshape(-1, trainer.config.vocab_size),
                                    y[:2].reshape(-1)).item() for x, y in trainer.eval_data) / 2
    assert trainer.evaluate() == pytest.approx(local + 100.0, rel=1e-6)  # this rank's rows, then the mean over ranks
    assert fake.calls[:2] == [("local_batch", 4, 4)] * 2 and fake.calls[2][0] == "mean"
    assert fake.calls[2][1] == pytest.approx(local, rel=1e-6)


@pytest.mark.usefixtures("one_torch_thread")
def test_save_once_per_step_with_lineage_and_pruning(trainer, tmp_path):
    import json

    from dsmoe.cli import checkpoint as ck

    run = tmp_path / "run"
    run.mkdir()
    trainer.run_dir, trainer.run_id = run, "r1"
    foreign = ck.step_dir(run, 1)
    foreign.mkdir(parents=True)
    (foreign / ck.TRAINER_STATE).write_text(json.dumps({"step": 1, "run_id": "other"}))
    trainer.a["keep_last"] = 1
    trainer.step = 2
    first = trainer.save()
    state = json.loads((first / ck.TRAINER_STATE).read_text())
    assert trainer.parent == {"run_id": "r1", "checkpoint_id": state["checkpoint_id"], "step": 2}
    assert trainer.save() == first  # the same step again: nothing written
    assert json.loads((first / ck.TRAINER_STATE).read_text())["checkpoint_id"] == state["checkpoint_id"]
    trainer.step = 3
    second = trainer.save()
    assert json.loads((second / ck.TRAINER_STATE).read_text())["parent"] == trainer.parent | {
        "checkpoint_id": state["checkpoint_id"], "step": 2}
    assert [s for s, _ in ck.checkpoints(run)] == [1, 3]  # --keep-last 1 of this run's; the other run's stays


@pytest.mark.usefixtures("one_torch_thread")
def test_save_on_several_ranks_hands_everything_to_the_run(trainer, tmp_path):
    from safetensors.torch import load_file

    fake = _FakeDist()
    trainer.dist, trainer.run_dir, trainer.run_id, trainer.step = fake, tmp_path, "r1", 2
    path = trainer.save()
    (name, where, model, optimizer, state, extra_files), = [c for c in fake.calls if c[0] == "save"]
    assert where == path == tmp_path / "checkpoints" / "step-000002"
    assert model is trainer.model and optimizer is trainer.optimizer
    assert state["param_names"] == trainer.param_names and state["step"] == 2 and state["run_id"] == "r1"
    (tmp_path / "x").mkdir()
    extra_files(tmp_path / "x")
    assert (tmp_path / "x" / "tokenizer.json").is_file()
    assert torch.equal(load_file(str(tmp_path / "x" / "rng.safetensors"))["cpu"], torch.get_rng_state())


def test_an_error_inside_interrupt_handling_propagates():
    with pytest.raises(ValueError):
        with train_mod._Interrupt():
            raise ValueError("x")


def test_the_plot_s_size_and_styles(tmp_path, monkeypatch):
    from PIL import Image

    plt = train_mod.use_agg()
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    rows = [{"step": s, "split": "train", "loss": 3.0 - s / 10} for s in range(1, 5)] + \
        [{"step": 4, "split": "val", "loss": 2.9}]
    train_mod.plot_losses(tmp_path, rows, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (770, 440)  # 7 x 4 inches at 110 dpi
    ax = figures[0].axes[0]
    train, val = ax.get_lines()
    assert train.get_linewidth() == 1 and train.get_marker() in ("None", None, "")
    assert val.get_marker() == "o" and val.get_linestyle() == "-"
    assert ax.xaxis.get_gridlines()[0].get_alpha() == 0.3 and ax.xaxis.get_gridlines()[0].get_visible()


def test_run_glue(monkeypatch):
    from dsmoe.cli.distributed import options as dist_cli

    calls = []

    class Dist:
        def close(self):
            calls.append("close")

    ns = _ns("--device", "cpu")
    monkeypatch.setattr(dist_cli, "maybe_launch", lambda n, fn: calls.append(("launch", n, fn)) or 7)
    assert train_mod.run(ns) == 7 and calls == [("launch", ns, train_mod.add_arguments)]  # --nproc: the launcher's status

    import contextlib

    dist = Dist()
    monkeypatch.setattr(dist_cli, "maybe_launch", lambda n, fn: None)
    monkeypatch.setattr(dist_cli, "join", lambda n, device=None: calls.append(("join", n, device)) or dist)
    monkeypatch.setattr(dist_cli, "quiet_unless_main",
                        lambda d: calls.append(("quiet", d)) or contextlib.nullcontext())
    for code, stop, dist_or_none, expected in [(130, True, dist, 0), (130, False, dist, 130), (143, True, dist, 143),
                                               (130, True, None, 130), (0, True, dist, 0)]:
        calls.clear()
        monkeypatch.setattr(dist_cli, "join", lambda n, device=None, d=dist_or_none: calls.append(("join", n, device)) or d)
        monkeypatch.setattr(dist_cli, "stop_requested", lambda s=stop: s)
        monkeypatch.setattr(train_mod, "_run", lambda n, d, c=code: calls.append(("_run", n, d)) or c)
        assert train_mod.run(ns) == expected, (code, stop, dist_or_none)
        assert calls[:3] == [("join", ns, "cpu"), ("quiet", dist_or_none), ("_run", ns, dist_or_none)]
        assert calls[3:] == (["close"] if dist_or_none is not None else [])


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_the_run_continues_it_exactly(one_run, tmp_path, capsys):
    from dsmoe.cli import main

    _, run, first_out = one_run
    ck3 = run / "checkpoints" / "step-000003"
    assert main(["train", "--resume", str(ck3), "--out", str(tmp_path / "b"), "--sample-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1] == first_out.splitlines()[1]  # the checkpoint's architecture, not a preset's
    assert (f"resuming from {ck3} at step 3 into this new run directory (the checkpoint is left as it is)"
            in out.splitlines())
    original = {(r["step"], r["split"]): r["loss"] for r in _rows(run)}
    resumed = {(r["step"], r["split"]): r["loss"] for r in _rows(tmp_path / "b")}
    assert resumed == {k: v for k, v in original.items() if k[0] > 3}  # bit for bit
    rows = _rows(tmp_path / "b")
    assert [r["tokens"] for r in rows if r["split"] == "train"] == [4 * 64, 5 * 64]  # counted on from the checkpoint
    import json

    branched = json.loads((tmp_path / "b" / "run.json").read_text())["branched_from"]
    state3 = json.loads((ck3 / "trainer_state.json").read_text())
    assert branched == {"run_id": state3["run_id"], "checkpoint_id": state3["checkpoint_id"], "step": 3,
                        "path": str(ck3.resolve())}


def test_every_option_parses_to_its_type_and_defaults_to_unset():
    ns = _ns()
    # unset options are None, so a resumed run can tell what was given from what was not
    assert {k: getattr(ns, k) for k in train_mod.DEFAULTS} == {k: None for k in train_mod.DEFAULTS}
    assert ns.out is None and ns.resume is None and ns.overwrite is False and ns.no_progress is False
    assert ns.nproc is None and ns.ep is None
    ints = ("steps", "batch_size", "seq_len", "warmup", "seed", "eval_every", "eval_batches", "save_every", "log_every",
            "sample_tokens", "keep_last", "nproc", "ep")
    floats = ("lr", "min_lr", "weight_decay", "grad_clip")
    for name in ints + floats:
        value = getattr(_ns(f"--{name.replace('_', '-')}", "3"), name)
        assert value == 3 and type(value) is (int if name in ints else float), name
    flags = _ns("--bf16", "--compile", "--overwrite", "--no-progress")
    assert flags.bf16 is True and flags.compile is True and flags.overwrite is True and flags.no_progress is True
    strings = _ns("--preset", "p", "--config", "c", "--data", "d", "--device", "cpu", "--out", "o", "--resume", "r",
                  "--sample-prompt", "s", "--impl", "reference")
    assert (strings.preset, strings.config, strings.data, strings.device, strings.out, strings.resume,
            strings.sample_prompt, strings.impl) == ("p", "c", "d", "cpu", "o", "r", "s", "reference")
    with pytest.raises(SystemExit):
        _ns("--impl", "fast")
    with pytest.raises(SystemExit):
        _ns("--steps", "1.5")
    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    helps = {a.dest: a.help for a in p._actions if a.option_strings and a.dest != "help"}
    assert all(helps.values()), [k for k, v in helps.items() if not v]  # every option says what it does
    for name in ("seq_len", "batch_size", "steps", "lr", "weight_decay", "grad_clip", "seed", "eval_batches",
                 "sample_tokens"):
        assert f"(default {train_mod.DEFAULTS[name]})" in helps[name], name  # the defaults it states are the real ones


def _train_quietly(*argv) -> tuple[int, str]:
    import contextlib
    import io

    from dsmoe.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["train", *argv])
    return code, buf.getvalue()


def _config(tmp_path, name, **overrides) -> str:
    from dsmoe.cli.models import make_config

    folder = tmp_path / name
    make_config("tiny", overrides=overrides).save_pretrained(folder)
    return str(folder / "config.json")


@pytest.mark.usefixtures("one_torch_thread")
def test_the_default_cadences_of_a_longer_run(tmp_path, corpus):
    """40 steps with no --eval-every / --save-every / --log-every: 5 validations, a line every
    2 steps, one checkpoint at the end; a model without shared experts says so."""
    config = _config(tmp_path, "noshared", n_shared_experts=None)
    code, out = _train_quietly("--config", config, "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "40",
                               "--batch-size", "1", "--seq-len", "8", "--eval-batches", "1", "--no-progress",
                               "--sample-tokens", "0", "--bf16")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith("model: 2 layers, hidden 32, 0 shared + 8 routed experts (top-2); ")
    assert lines[3].startswith("device: cpu bf16, ")
    assert [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step") and "| loss" in line] == \
        list(range(2, 41, 2))
    assert [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step") and "val loss" in line] == \
        [8, 16, 24, 32]
    assert [(r["step"], r["split"]) for r in _rows(tmp_path / "r") if r["split"] == "val"] == \
        [(8, "val"), (16, "val"), (24, "val"), (32, "val"), (40, "val")]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step-000040"]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_dense_model_and_large_counts_in_the_header(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train_mod, "parameter_counts", lambda cfg: (2_005_001, 1_005_001))
    config = _config(tmp_path, "dense", n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None)
    code, out = _train_quietly("--config", config, "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "1",
                               "--batch-size", "1", "--seq-len", "8", "--eval-batches", "1", "--no-progress",
                               "--sample-tokens", "0")
    assert code == 0
    assert out.splitlines()[1] == ("model: 2 layers, hidden 32, dense; 2.01M parameters, 1.01M activated per token; "
                                   "impl dsmoe")
    assert out.splitlines()[3].startswith("device: cpu, ")  # no bf16


@pytest.mark.usefixtures("one_torch_thread")
def test_on_a_terminal_a_progress_bar_replaces_the_step_lines(tmp_path, corpus, monkeypatch, capsys):
    import shutil

    from dsmoe.cli import main

    monkeypatch.setattr(train_mod, "stderr_is_tty", lambda: True)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: __import__("os").terminal_size((100, 30)))
    tiny = [a for a in TINY if a != "--no-progress"]
    assert main(["train", *tiny, "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "4",
                 "--eval-every", "2", "--sample-tokens", "0"]) == 0
    out, err = capsys.readouterr()
    assert "| loss" not in out  # no step lines: the bar shows them
    assert "step     2/4 | val loss" in out  # validations are written above the bar
    bar = err.replace("\r", "\n").splitlines()
    last = [line for line in bar if "4/4" in line][-1]
    assert "100%" in last and "step" in last and "loss" in last and "aux" in last and "tok/s" in last
    assert max(len(line) for line in bar) <= 100  # the terminal's width
    assert main(["train", *tiny, "--data", str(corpus), "--out", str(tmp_path / "q"), "--steps", "2",
                 "--sample-tokens", "0", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "| loss" in out and "2/2" not in err  # --no-progress: lines, no bar


def test_a_new_trainer(corpus):
    from dsmoe.cli.data import ByteTokenizer

    a = _resolve(*TINY, "--data", str(corpus), "--steps", "4", "--eval-batches", "3", "--seed", "5",
                 "--weight-decay", "0.25")
    t = train_mod.Trainer(a, None, None, progress=False)
    assert t.device == torch.device("cpu") and t.model.training and t.forward is t.model
    assert isinstance(t.tokenizer, ByteTokenizer) and t.data_load_s >= 0
    cfg = t.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (259, 256, 257, None)
    assert t.param_names == [n for n, _ in t.model.named_parameters()]
    assert (t.step, t.tokens, t.elapsed, t.parent, t.run_id, t.last_saved) == (0, 0, 0.0, None, None, None)
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.25 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(t.param_names)
    for g in (decay, no_decay):
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == train_mod.lr_at(0, a)
        assert g["fused"] is True  # on CPU: torch's fused AdamW
    assert len(t.eval_data) == 3 and all(x.shape == (4, 16) and y.shape == (4, 16) for x, y in t.eval_data)
    same = train_mod.Trainer(a, None, None, progress=False)
    other = train_mod.Trainer({**a, "seed": 6}, None, None, progress=False)
    w = lambda tr: torch.cat([p.detach().flatten() for p in tr.model.parameters()])  # noqa: E731
    assert torch.equal(w(t), w(same)) and not torch.equal(w(t), w(other))  # initialised from --seed
    with pytest.raises(CLIError) as e:
        train_mod.Trainer({**a, "seq_len": 4096}, None, None, progress=False)
    assert str(e.value) == "--seq-len 4096 exceeds the model's max_position_embeddings 128"


def test_resuming_a_checkpoint_of_other_parameters_is_refused(corpus, tmp_path):
    import json

    code, _ = _train_quietly(*TINY, "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "2",
                             "--sample-tokens", "0")
    assert code == 0
    ck = tmp_path / "r" / "checkpoints" / "step-000002"
    state = json.loads((ck / "trainer_state.json").read_text())
    (ck / "trainer_state.json").write_text(json.dumps({**state, "param_names": state["param_names"][::-1]}))
    saved = train_mod.ckpt.load_training_state(ck)
    a = train_mod._resolve_args(_ns(), saved[0]["args"])
    with pytest.raises(CLIError) as e:
        train_mod.Trainer({**a, "steps": 4}, None, ck, progress=False, saved=saved)
    assert str(e.value) == f"checkpoint {ck}: its optimizer state does not match the model's parameters"
    (ck / "trainer_state.json").write_text(json.dumps(state))
    saved = train_mod.ckpt.load_training_state(ck)
    t = train_mod.Trainer({**a, "steps": 4}, None, ck, progress=False, saved=saved)
    assert (t.step, t.tokens) == (2, 2 * 64) and t.elapsed == state["elapsed_s"]
    assert t.parent == {"run_id": state["run_id"], "checkpoint_id": state["checkpoint_id"], "step": 2,
                        "path": str(ck.resolve())}
    for g in t.optimizer.param_groups:  # JSON lists back to what AdamW holds; this run's fused choice
        assert g["betas"] == (0.9, 0.95) and isinstance(g["betas"], tuple) and g["fused"] is True
    assert len(t.optimizer.state) == len(t.param_names)  # the moments came back
    opt_sd = saved[1]
    opt_sd["param_groups"][0]["params"] = opt_sd["param_groups"][0]["params"][:-1]
    with pytest.raises(CLIError) as e:
        train_mod.Trainer({**a, "steps": 4}, None, ck, progress=False, saved=saved)
    assert str(e.value).startswith(f"checkpoint {ck}: bad optimizer state (")
    # saved by a run that did not fuse (e.g. sharded): this run's choice wins; --impl is this run's
    saved = train_mod.ckpt.load_training_state(ck)
    for g in saved[1]["param_groups"]:
        g["fused"] = None
    t = train_mod.Trainer({**a, "steps": 4, "impl": "reference"}, None, ck, progress=False, saved=saved)
    assert all(g["fused"] is True for g in t.optimizer.param_groups) and t.model.moe_impl == "reference"


def test_trainer_refuses_bf16_on_a_gpu_without_it(corpus, monkeypatch):
    a = _resolve(*TINY, "--data", str(corpus), "--bf16")
    monkeypatch.setattr(train_mod, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kw: False)
    with pytest.raises(CLIError) as e:
        train_mod.Trainer(a, None, None, progress=False)
    assert str(e.value) == "--bf16: this GPU does not support bfloat16"


def test_trainer_under_a_distributed_run(corpus, tmp_path, monkeypatch):
    """With a stand-in DistributedTraining: its device, its wrapping of model and optimizer."""
    calls = []

    class Dist:
        device = torch.device("cpu")

        def wrap(self, model, optimizer):
            calls.append((model, optimizer, [g.get("fused") for g in optimizer.param_groups]))
            return model, optimizer

    seen = []
    monkeypatch.setattr(train_mod, "pick_device", lambda name: seen.append(name) or torch.device("cpu"))
    train_mod.Trainer(_resolve(*TINY, "--data", str(corpus), "--device", "cpu"), None, None, progress=False)
    assert seen == ["cpu"]  # --device reaches the choice
    a = _resolve(*TINY, "--data", str(corpus), "--device", "meta")  # the run's device wins over --device
    dist = Dist()
    t = train_mod.Trainer(a, tmp_path, None, progress=True, dist=dist)
    assert seen == ["cpu"] and t.dist is dist and t.device == torch.device("cpu") and t.run_dir == tmp_path and t.progress is True
    (model, optimizer, fused), = calls
    assert model is t.model and optimizer is t.optimizer and isinstance(model, torch.nn.Module)
    assert fused == [None, None]  # not torch's fused AdamW on sharded (DTensor) parameters


@pytest.mark.usefixtures("one_torch_thread")
def test_a_trainer_reads_its_checkpoint_itself(corpus, tmp_path):
    code, _ = _train_quietly(*TINY, "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "2",
                             "--sample-tokens", "0")
    assert code == 0
    ck = tmp_path / "r" / "checkpoints" / "step-000002"
    saved = train_mod.ckpt.load_training_state(ck)
    a = {**train_mod._resolve_args(_ns(), saved[0]["args"]), "steps": 4}
    given = train_mod.Trainer(a, None, ck, progress=False, saved=saved)
    read = train_mod.Trainer(a, None, ck, progress=False)  # saved=None: read from the checkpoint
    assert (read.step, read.tokens, read.parent) == (given.step, given.tokens, given.parent) == (
        2, 128, given.parent)
    assert all(torch.equal(x, y) for x, y in zip(read.model.state_dict().values(), given.model.state_dict().values()))


def test_a_config_file_gets_the_byte_vocabulary_and_the_full_context(corpus, tmp_path):
    config = _config(tmp_path, "padded", pad_token_id=5, vocab_size=1000)
    a = _resolve("--config", config, "--data", str(corpus), "--batch-size", "1", "--seq-len", "128", "--no-progress")
    t = train_mod.Trainer(a, None, None, progress=False)  # seq_len = max_position_embeddings: allowed
    assert (t.config.vocab_size, t.config.bos_token_id, t.config.eos_token_id, t.config.pad_token_id) == \
        (259, 256, 257, None)
    assert 0 <= t.data_load_s < 60


@pytest.mark.usefixtures("one_torch_thread")
def test_resuming_in_place_a_run_of_an_older_dsmoe_with_leftovers(one_run, capsys):
    """In place (no --out): what killed saves left is cleaned and said; a run without run.json
    (written by a dsmoe before run ids) gets one, keeping the id its checkpoints carry; the
    resume line says nothing of a new directory."""
    import json

    from dsmoe.cli import main

    _, run, _ = one_run
    ck = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = json.loads((ck / "trainer_state.json").read_text())
    (run / "run.json").unlink()
    (run / "checkpoints" / "step-000009.tmp-ab12").mkdir()
    (run / ".model.safetensors.saving-x1").write_bytes(b"half")
    assert main(["train", "--resume", str(ck), "--steps", str(state["step"] + 1), "--sample-tokens", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{run}: removed the unfinished .model.safetensors.saving-x1 (left by a save that was stopped)" in lines
    assert f"{run}: removed the unfinished step-000009.tmp-ab12 (left by a save that was stopped)" in lines
    assert f"resuming from {ck} at step {state['step']}" in lines
    info = json.loads((run / "run.json").read_text())
    assert info["run_id"] == state["run_id"] and info["branched_from"] is None
    assert not (run / "checkpoints" / "step-000009.tmp-ab12").exists()


def test_a_new_run_publishes_its_config_under_its_name(corpus, tmp_path, monkeypatch):
    labels = []
    real = train_mod.ckpt.publish_files
    monkeypatch.setattr(train_mod.ckpt, "publish_files", lambda d, write, label: (labels.append(label),
                                                                                  real(d, write, label))[1])
    code, _ = _train_quietly(*TINY, "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "1",
                             "--sample-tokens", "0", "--impl", "reference")
    assert code == 0 and labels[0] == "the run's config"  # how a failure to write it is reported
    a = _resolve(*TINY, "--data", str(corpus), "--impl", "reference")
    assert train_mod.Trainer(a, None, None, progress=False).model.moe_impl == "reference"


# ---- the training loop's edges: signals, cadences, what the log and the lines say


def _signal_during(monkeypatch, method: str, sig, when) -> None:
    """Sends ``sig`` to this process once ``Trainer.<method>`` returns and ``when(trainer, args)``
    holds (the handler then runs at once, as it does for a signal from outside)."""
    real = getattr(train_mod.Trainer, method)

    def wrapped(self, *args):
        result = real(self, *args)
        if when(self, args):
            os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(train_mod.Trainer, method, wrapped)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("sig, name, code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_a_signal_mid_run_saves_and_says_how_to_continue(tmp_path, corpus, monkeypatch, capsys, sig, name, code):
    _signal_during(monkeypatch, "train_step", sig, lambda trainer, args: args[0] == 1)  # during the second step
    run = tmp_path / "r"
    got, out = _train_quietly(*TINY, "--data", str(corpus), "--out", str(run), "--steps", "6", "--eval-every", "3",
                              "--log-every", "1", "--sample-tokens", "0")
    assert got == code  # 128 + the signal's number for SIGTERM, as shells report it; 130 for Ctrl-C
    lines = out.splitlines()
    assert lines[-2:] == [f"interrupted at step 2/6 ({name}); checkpoint saved to {run / 'checkpoints' / 'step-000002'}",
                          f"continue with: dsmoe train --resume {run}"]
    assert [line.split("|")[0].split()[1] for line in lines if line.startswith("step")] == ["1/6", "2/6"]  # the step finished
    assert not [line for line in lines if line.startswith(("done:", "saved:"))]
    assert [(r["step"], r["split"]) for r in _rows(run)] == [(1, "train"), (2, "train")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert capsys.readouterr().err == f"\n{name}: finishing this step and saving a checkpoint ({name} again to stop without saving)\n"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("sig, name, code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_a_signal_during_the_final_evaluation_stops_after_the_final_save(tmp_path, corpus, monkeypatch, sig, name, code):
    _signal_during(monkeypatch, "evaluate", sig, lambda trainer, args: trainer.step == 3)
    run = tmp_path / "r"
    got, out = _train_quietly(*TINY, "--data", str(corpus), "--out", str(run), "--steps", "3", "--sample-tokens", "0")
    assert got == code
    assert out.splitlines()[-1] == f"stopped ({name}) after the final save"
    assert (run / "model.safetensors").is_file() and (run / "checkpoints" / "step-000003").is_dir()  # finished first
    assert [(r["step"], r["split"]) for r in _rows(run)][-1] == (3, "val")


@pytest.mark.usefixtures("one_torch_thread")
def test_the_log_s_numbers_agree_with_the_printed_lines(one_run):
    import re

    _, run, out = one_run
    rows = _rows(run)
    printed_val = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step +(\d+)/5 \| val loss (\d+\.\d{4})", out)}
    printed_val[5] = float(re.search(r"val loss (\d+\.\d{4})\n", out[out.index("done: "):]).group(1))
    logged_val = {r["step"]: r["loss"] for r in rows if r["split"] == "val"}
    assert logged_val.keys() == printed_val.keys() == {2, 4, 5}
    assert all(isinstance(v, float) and abs(v - printed_val[s]) <= 5e-5 for s, v in logged_val.items())
    train = [r for r in rows if r["split"] == "train"]
    for r in train:
        assert r["tokens_per_s"] == round(r["tokens_per_s"], 1)  # one decimal, as documented
    assert any(r["tokens_per_s"] != int(r["tokens_per_s"]) for r in train)  # (not whole numbers)
    # the final validation comes after the last step: the run's time as that step left it
    assert rows[-1]["split"] == "val" and rows[-1]["elapsed_s"] == train[-1]["elapsed_s"]
    # each step's duration (tokens / tokens_per_s) fits between two rows' elapsed times, and the
    # elapsed time is this run's (the steps plus evaluations and saves, not a clock's reading)
    durations = [64 / r["tokens_per_s"] for r in train]
    assert all(d <= later["elapsed_s"] - earlier["elapsed_s"] + 0.06
               for d, earlier, later in zip(durations[1:], train, train[1:]))
    assert train[-1]["elapsed_s"] <= sum(durations) + 60
    # a step line's tokens/s: over the steps so far (at most 20), tokens over their summed durations
    for m in re.finditer(r"step +(\d+)/5 \| loss .* \| ([\d.]+)(k?) tok/s", out):
        n = int(m.group(1))
        shown = float(m.group(2)) * (1000 if m.group(3) else 1)
        want = 64 * n / sum(durations[:n])
        assert shown == pytest.approx(want, rel=0.06, abs=1), (n, shown, want)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("steps, lines_at, evals_at", [
    (7, list(range(1, 8)), [1, 2, 3, 4, 5, 6, 7]),  # steps // 5 == 1: every step; steps // 20 == 0: a line a step
    (30, list(range(1, 31)), [6, 12, 18, 24, 30]),  # every 30 // 5 steps; 30 // 20 == 1: still a line a step
])
def test_default_cadences_of_short_runs(tmp_path, corpus, steps, lines_at, evals_at):
    code, out = _train_quietly("--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", str(steps),
                               "--batch-size", "1", "--seq-len", "8", "--eval-batches", "1", "--no-progress",
                               "--sample-tokens", "0")
    assert code == 0
    lines = out.splitlines()
    assert [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step") and "| loss" in line] == lines_at
    assert [r["step"] for r in _rows(tmp_path / "r") if r["split"] == "val"] == evals_at


@pytest.mark.usefixtures("one_torch_thread")
def test_periodic_saves_leave_the_last_step_to_the_final_save(tmp_path, corpus):
    run = tmp_path / "r"
    code, out = _train_quietly(*TINY, "--data", str(corpus), "--out", str(run), "--steps", "4", "--save-every", "2",
                               "--sample-tokens", "0")
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("checkpoint:")] == \
        [f"checkpoint: {run / 'checkpoints' / 'step-000002'}"]  # step 4 is saved once, as the final checkpoint
    assert f"saved: {run} (model), {run / 'checkpoints' / 'step-000004'} (checkpoint), {run / 'log.csv'}, " \
           f"{run / 'loss.png'}" in out.splitlines()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_resumed_run_s_progress_bar_counts_from_the_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    import re
    import shutil

    from dsmoe.cli import main

    assert main(["train", *TINY, "--data", str(corpus), "--out", str(tmp_path / "a"), "--steps", "4",
                 "--save-every", "2", "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(train_mod, "stderr_is_tty", lambda: True)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((90, 30)))
    assert main(["train", "--resume", str(tmp_path / "a" / "checkpoints" / "step-000002"), "--out", str(tmp_path / "b"),
                 "--sample-tokens", "0"]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    counts = [line for line in bar if "/4 [" in line]
    final = [line for line in bar if re.search(r"step/s|s/step", line)][-1]  # the bar as it closed
    assert counts and "2/4 [" in counts[0] and "4/4 [" in final and "100%" in final
    assert not [line for line in counts if "0/4 [" in line or "1/4 [" in line]  # starts at the checkpoint's step
    assert max(len(line) for line in bar) <= 90 and re.search(r"\dstep/s|s/step", final)  # its unit: steps


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("main", [True, False])
def test_a_distributed_run_s_header_and_the_other_ranks_files(corpus, tmp_path, capsys, main):
    """`_train` under a stand-in DistributedTraining: the header says how the run is spread and
    what --batch-size means there; only rank 0 (``main``) writes the log and the plot."""

    class Dist:
        def describe(self):
            return "2 processes (gloo), mesh dp 1 x ep 2"

        def should_stop(self, requested):
            return requested is not None

        def export_hf(self, model, run_dir):
            exported.append((model, run_dir))
            return model

    exported = []
    run = tmp_path / "r"
    run.mkdir()
    a = _resolve(*TINY, "--data", str(corpus), "--steps", "2", "--sample-tokens", "0")
    trainer = train_mod.Trainer(a, run, None, progress=False)
    assert train_mod._train(None, a, trainer, run, None, False, main, Dist()) == 0
    assert exported == [(trainer.model, run)]  # every rank takes part in gathering the final model
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == "distributed: 2 processes (gloo), mesh dp 1 x ep 2; --batch-size 4 is the global batch"
    assert (run / "log.jsonl").is_file() is main and (run / "loss.png").is_file() is main
    assert (run / "checkpoints" / "step-000002").is_dir()  # every rank takes part in the save


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("signalled_here", [True, False])
def test_a_distributed_run_stops_when_any_process_asks(corpus, tmp_path, monkeypatch, capsys, signalled_here):
    """Every rank asks the group after each step (`should_stop`, a collective) with what it saw
    itself; the answer decides, also where this process got no signal."""
    asked = []

    class Dist:
        def describe(self):
            return "2 processes (gloo), mesh dp 2 x ep 1"

        def should_stop(self, requested):
            asked.append(requested)
            return requested is not None or len(asked) == 2  # another process was signalled in step 2

    if signalled_here:
        _signal_during(monkeypatch, "train_step", signal.SIGTERM, lambda trainer, args: args[0] == 0)
    run = tmp_path / "r"
    run.mkdir()
    a = _resolve(*TINY, "--data", str(corpus), "--steps", "5", "--sample-tokens", "0")
    trainer = train_mod.Trainer(a, run, None, progress=False)
    code = train_mod._train(None, a, trainer, run, None, False, True, Dist())
    lines = capsys.readouterr().out.splitlines()
    if signalled_here:
        assert code == 143 and asked == ["SIGTERM"]
        assert lines[-2] == f"interrupted at step 1/5 (SIGTERM); checkpoint saved to {run / 'checkpoints' / 'step-000001'}"
    else:
        assert code == 130 and asked == [None, None]
        assert lines[-2] == (f"interrupted at step 2/5 (stop requested by another process); checkpoint saved to "
                             f"{run / 'checkpoints' / 'step-000002'}")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("extra, refusal", [
    (["--steps", "2"], "--resume: the checkpoint is at step 2; nothing left to do for --steps 2"),
    (["--steps", "1"], "--resume: the checkpoint is at step 2; nothing left to do for --steps 1"),
    (["--steps", "3", "--out", "{ckpt}/inner"], "--out {ckpt}/inner is inside the checkpoint {ckpt} being resumed; "
                                "a checkpoint is never written into: choose another --out"),
    (["--steps", "3", "--out", "{parent}", "--overwrite"],
     "--overwrite of --out {parent} could delete the checkpoint {ckpt} being resumed; choose another --out"),
])
def test_resumes_with_nothing_to_do_or_into_the_checkpoint_are_refused(tmp_path, corpus, capsys, extra, refusal):
    from dsmoe.cli import main

    assert main(["train", *TINY, "--data", str(corpus), "--out", str(tmp_path / "a"), "--steps", "2",
                 "--sample-tokens", "0"]) == 0
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    capsys.readouterr()
    assert main(["train", "--resume", str(ckpt), *[x.format(ckpt=ckpt, parent=tmp_path) for x in extra]]) == 2
    assert capsys.readouterr().err == f"dsmoe: error: {refusal.format(ckpt=ckpt, parent=tmp_path)}\n"
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-000002"]  # untouched


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("steps", [1, 30])
def test_the_closing_summary_is_computed_from_the_log(tmp_path, corpus, steps):
    """done: the first step's loss, the mean of the last (at most) 10, and tokens/s over the
    steps after the first (which includes one-off set-up) as total tokens over total time."""
    import re

    run = tmp_path / "r"
    code, out = _train_quietly("--preset", "tiny", "--data", str(corpus), "--out", str(run), "--steps", str(steps),
                               "--batch-size", "1", "--seq-len", "8", "--eval-batches", "1", "--no-progress",
                               "--sample-tokens", "0")
    assert code == 0
    train = [r for r in _rows(run) if r["split"] == "train"]
    last = train[-10:]
    timed = train[1:] or train
    tps = len(timed) * 8 / sum(8 / r["tokens_per_s"] for r in timed)
    done = next(line for line in out.splitlines() if line.startswith("done: "))
    want = (f"done: {steps} steps, {8 * steps:,} tokens in \\d+s \\(~{re.escape(train_mod._fmt_tokens(tps))} tokens/s\\); "
            f"train loss {train[0]['loss']:.3f} -> {sum(r['loss'] for r in last) / len(last):.3f} "
            f"\\(mean of last {len(last)}\\), val loss \\d+\\.\\d{{4}}")
    assert re.fullmatch(want, done), (done, want)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("argv, own_data, prompt", [
    (["--sample-tokens", "1"], True, "\n"),  # a corpus of the user's: a new line
    (["--sample-tokens", "3", "--sample-prompt", "x = "], True, "x = "),
    (["--sample-tokens", "2"], False, "def "),  # the embedded corpus (Python code)
])
def test_the_closing_sample_s_settings(tmp_path, corpus, monkeypatch, argv, own_data, prompt):
    from dsmoe.cli import generate

    calls = []
    monkeypatch.setattr(generate, "stream", lambda *args, **kw: calls.append((args, kw)))
    data = ["--data", str(corpus)] if own_data else []
    code, out = _train_quietly(*TINY, *data, "--out", str(tmp_path / "r"), "--steps", "1", "--seed", "9", *argv)
    assert code == 0
    (args, kw), = calls
    assert args[2:] == (prompt, int(argv[1])) and kw["seed"] == 9
    assert (kw["temperature"], kw["top_k"], kw["top_p"]) == (0.8, 40, None)  # as the header says:
    assert out.splitlines()[-1] == "sample (temperature 0.8, top-k 40, seed 9):"
    calls.clear()
    code, out = _train_quietly(*TINY, "--data", str(corpus), "--out", str(tmp_path / "q"), "--steps", "1",
                               "--sample-tokens", "0")
    assert code == 0 and calls == [] and not [line for line in out.splitlines() if line.startswith("sample")]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_failed_final_save_says_what_was_not_saved(tmp_path, corpus, monkeypatch, capsys):
    import errno

    from dsmoe import DeepSeekMoEForCausalLM
    from dsmoe.cli import main

    real = DeepSeekMoEForCausalLM.save_pretrained

    def disk_full_for_the_final_model(self, folder, *args, **kw):
        if Path(folder).name.startswith(".publish.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, folder, *args, **kw)

    monkeypatch.setattr(DeepSeekMoEForCausalLM, "save_pretrained", disk_full_for_the_final_model)
    run = tmp_path / "r"
    assert main(["train", *TINY, "--data", str(corpus), "--out", str(run), "--steps", "2", "--sample-tokens", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dsmoe: error: cannot save the final model into {run} (No space left on device); the partial files were removed")
    assert (run / "checkpoints" / "step-000002").is_dir() and not (run / "model.safetensors").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_training_step_on_several_ranks(corpus):
    """Under a stand-in DistributedTraining: the step trains on this rank's half of the global
    batch, asks every rank whether a loss went bad, clips with the group's norm and reports the
    mean over ranks (the stand-in adds 100)."""
    import copy

    import torch.nn.functional as F

    from dsmoe.cli.data import train_batch

    a = _resolve(*TINY, "--data", str(corpus), "--steps", "4", "--seed", "1", "--grad-clip", "0.5")
    trainer = train_mod.Trainer(a, None, None, progress=False)
    twin = copy.deepcopy(trainer.model)  # the same step by hand, on the first half of the batch
    x, y = train_batch(trainer.data.train, 0, 1, 4, 16)
    out = twin(x[:2])
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y[:2].reshape(-1))
    (ce + out.aux_loss).backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)

    class Dist(_FakeDist):
        def any(self, flag):
            self.calls.append(("any", bool(flag)))
            return flag

        def clip_grad_norm_(self, params, max_norm):
            params = list(params)
            self.calls.append(("clip", len(params), max_norm))
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        def mean(self, value):
            self.calls.append(("mean", value.tolist()))
            return (value + 100.0).tolist()

    fake = Dist()
    trainer.dist = fake
    r = trainer.train_step(0)
    assert [c[0] for c in fake.calls] == ["local_batch", "any", "clip", "mean"]
    assert fake.calls[0] == ("local_batch", 4, 4) and fake.calls[1] == ("any", False)
    assert fake.calls[2] == ("clip", len(list(trainer.model.parameters())), 0.5)
    loss, aux, got_ce = fake.calls[3][1]
    assert got_ce == pytest.approx(ce.item(), rel=1e-5) and aux == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert loss == pytest.approx(ce.item() + out.aux_loss.item(), rel=1e-5)
    assert (r.loss, r.aux_loss, r.ce) == pytest.approx((loss + 100, aux + 100, got_ce + 100))
    assert float(norm) > 0


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_loss_that_is_not_finite_stops_the_run_in_one_line(corpus, monkeypatch, ranks):
    a = _resolve(*TINY, "--data", str(corpus), "--steps", "4")
    trainer = train_mod.Trainer(a, None, None, progress=False)
    real = trainer.forward

    def nan_logits(x):
        out = real(x)
        out.logits = out.logits * float("nan")
        return out

    trainer.forward = nan_logits
    votes = []
    if ranks == 2:
        class Dist(_FakeDist):
            def any(self, flag):
                votes.append(bool(flag))
                return flag

        trainer.dist = Dist()
    with pytest.raises(CLIError) as e:
        trainer.train_step(2)
    assert str(e.value) == "the loss became nan at step 3; try a lower --lr"
    assert votes == ([True] if ranks == 2 else [])  # every rank stops together


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("clip, calls", [("0", []), ("0.5", [0.5]), ("2", [2.0])])
def test_gradient_clipping_only_when_asked(corpus, monkeypatch, clip, calls):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: seen.append(max_norm) or real(params, max_norm))
    trainer = train_mod.Trainer(_resolve(*TINY, "--data", str(corpus), "--steps", "4", "--grad-clip", clip), None, None,
                                progress=False)
    trainer.train_step(0)
    assert seen == calls  # 0 turns clipping off


def test_compile_wraps_the_model_for_the_steps(corpus):
    a = _resolve(*TINY, "--data", str(corpus), "--steps", "4", "--compile")
    trainer = train_mod.Trainer(a, None, None, progress=False)
    assert trainer.forward is not trainer.model and trainer.forward._orig_mod is trainer.model  # compiled lazily
    plain = train_mod.Trainer(_resolve(*TINY, "--data", str(corpus), "--steps", "4"), None, None, progress=False)
    assert plain.forward is plain.model


def test_an_existing_run_directory_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from dsmoe.cli import main

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    built = []
    monkeypatch.setattr(train_mod, "Trainer", lambda *a, **kw: built.append(a))
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"),
                 "--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err == (f"dsmoe: error: run directory {tmp_path / 'r'} already exists and is not empty; "
                                       "choose another --out, pass --overwrite to replace it, or --resume to continue it\n")
    assert built == [] and (tmp_path / "r" / "notes.txt").read_text() == "mine"  # no data read, no model built
