"""The `dsmoe` command line end to end at toy sizes: every subcommand, exact resumption (also
after Ctrl-C), and the one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.cli import main
from dsmoe.cli import train as train_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--eval-batches", "2", "--no-progress"]


def _train(out: Path, corpus: Path, *extra: str) -> int:
    return main(["train", *TINY, "--data", str(corpus), "--out", str(out), "--sample-tokens", "0", *extra])


def _losses(run_dir: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"]): r["loss"] for r in rows}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """One uninterrupted 12-step run, checkpointed every 6 steps (shared by several tests)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert _train(out, corpus, "--steps", "12", "--save-every", "6", "--eval-every", "4") == 0
    return out


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("dsmoe: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------- train


def test_train_writes_a_run_that_learns(trained, capsys):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_args.json", "log.csv", "log.jsonl", "loss.png"):
        assert (trained / name).is_file(), name
    for step in (6, 12):
        ck = trained / "checkpoints" / f"step-{step:06d}"
        for name in ("config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"):
            assert (ck / name).is_file(), (step, name)
    assert not list(trained.rglob("*.pt")) and not list(trained.rglob("*.bin"))  # no pickle
    losses = _losses(trained)
    assert sorted(s for s, split in losses if split == "val") == [4, 8, 12]
    assert losses[(12, "train")] < losses[(1, "train")] - 0.5
    header = (trained / "log.csv").read_text().splitlines()[0]
    assert header.split(",")[:4] == ["step", "split", "loss", "aux_loss"]
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["vocab_size"] == 259 and cfg["n_routed_experts"] == 8


def test_train_prints_progress_and_a_sample(tmp_path, corpus, capsys):
    code = main(["train", *TINY, "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "3",
                 "--sample-tokens", "8", "--sample-prompt", "def f", "--bf16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "step     3/3 | loss" in out and "val loss" in out and "tok/s" in out
    assert "sample (" in out and "\ndef f" in out


def test_reference_impl_trains_the_same_function(tmp_path, corpus, capsys):
    assert _train(tmp_path / "ref", corpus, "--steps", "2", "--impl", "reference") == 0
    assert _train(tmp_path / "ops", corpus, "--steps", "2") == 0
    ref, ops = _losses(tmp_path / "ref"), _losses(tmp_path / "ops")
    assert ref.keys() == ops.keys()
    for key in ref:
        assert ref[key] == pytest.approx(ops[key], abs=1e-4), key


def test_resume_continues_exactly(trained, corpus, tmp_path, capsys):
    half = trained / "checkpoints" / "step-000006"
    assert main(["train", "--resume", str(half), "--out", str(tmp_path / "b"), "--no-progress", "--sample-tokens", "0"]) == 0
    full, resumed = _losses(trained), _losses(tmp_path / "b")
    assert [k for k in resumed] == [k for k in full if k[0] > 6]
    for key, loss in resumed.items():
        assert loss == full[key], key  # bit-identical, not merely close
    # the final weights too
    from safetensors.torch import load_file

    a, b = load_file(str(trained / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_resume_in_place_matches(trained, corpus, tmp_path, monkeypatch, capsys):
    original = train_mod.Trainer.train_step

    def step_then_interrupt(self, step):
        result = original(self, step)
        if step == 4:  # Ctrl-C arrives in the middle of the 5th step
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_mod.Trainer, "train_step", step_then_interrupt)
    run = tmp_path / "run"
    code = _train(run, corpus, "--steps", "12", "--save-every", "6", "--eval-every", "4")
    out = capsys.readouterr().out
    assert code == 130
    assert "interrupted at step 5/12" in out and (run / "checkpoints" / "step-000005" / "trainer_state.json").is_file()
    monkeypatch.setattr(train_mod.Trainer, "train_step", original)
    assert main(["train", "--resume", str(run), "--no-progress", "--sample-tokens", "0"]) == 0
    assert _losses(run) == _losses(trained)  # in place: the log reads like the uninterrupted run


def test_resume_refuses_changed_settings_and_finished_runs(trained, capsys):
    code = main(["train", "--resume", str(trained / "checkpoints" / "step-000006"), "--lr", "0.5", "--out", "/nonexistent/x"])
    _one_line_error(capsys, code, "--lr")
    code = main(["train", "--resume", str(trained)])
    _one_line_error(capsys, code, "nothing left")


# ------------------------------------------------------------------------------- generate


def test_generate_streams_from_a_checkpoint(trained, capsys):
    argv = ["generate", "--model", str(trained), "--prompt", "def f", "--max-new-tokens", "24", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("def f") and len(first) > len("def f")
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # seeded
    assert main(["generate", "--model", str(trained), "--prompt", "x", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    assert main(["generate", "--model", str(trained / "checkpoints" / "step-000006"), "--max-new-tokens", "5", "--top-p", "0.9"]) == 0


def test_generate_reads_a_checkpoint_with_its_own_tokenizer(tmp_path, capsys):
    """A Hugging Face-layout checkpoint with a non-byte tokenizer.json (as released ones have)."""
    from conftest import save_word_level_tokenizer
    from dsmoe.config import get_preset
    from dsmoe.model import DeepSeekMoEForCausalLM

    model = DeepSeekMoEForCausalLM(get_preset("tiny", bos_token_id=1, eos_token_id=2))
    model.save_pretrained(tmp_path)
    save_word_level_tokenizer(tmp_path, [f"w{i}" for i in range(61)])
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w1 w2", "--max-new-tokens", "6", "--no-stop"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w1 w2") and len(out.split()) > 2


# ------------------------------------------------------------------------------- experts


def test_experts_load_heatmap_and_ablation(trained, corpus, tmp_path, capsys):
    out = tmp_path / "ex"
    code = main(["experts", "--model", str(trained), str(trained / "checkpoints" / "step-000006"), "--data", str(corpus),
                 "--tokens", "512", "--seq-len", "32", "--out", str(out), "--ratios", "0", "0.125", "0.25"])
    text = capsys.readouterr().out
    assert code == 0, text
    summary = json.loads((out / "experts.json").read_text())
    assert set(summary) == {"full", "step-000006"}
    for label, s in summary.items():
        assert (out / f"load_{label}.png").stat().st_size > 1000
        rows = s["ablation"]
        assert [r["disabled"] for r in rows] == [0, 1, 2]
        assert rows[0]["increase"] == 0.0
        # routing every token away from its top experts changes what the model computes
        assert rows[2]["loss"] != rows[0]["loss"]
        loads = s["load_per_layer"]["1"]
        assert len(loads) == 8 and sum(loads) == 2 * 512  # top-2 of 512 tokens
    assert (out / "ablation.png").is_file() and (out / "ablation.csv").read_text().count("\n") == 7
    assert "loss with each token's top routed experts disabled" in text


def test_disabling_top_experts_never_routes_to_them(trained):
    from dsmoe.cli.models import disable_top_experts, load_model

    model = load_model(trained, torch.device("cpu"))
    gate = model.moe_layers()[0].gate
    x = torch.randn(64, model.config.hidden_size)
    top2 = gate.logits(x).topk(2, dim=-1).indices
    with disable_top_experts(model, 2):
        ids = gate(x).expert_ids.long()
    assert not (ids[:, :, None] == top2[:, None, :]).any()
    assert torch.equal(gate(x).expert_ids.long().sort(-1).values, top2.sort(-1).values)  # restored


# ------------------------------------------------------------------------------- bench, info (compare: test_cli_compare.py)


def test_bench_prints_both_paths(capsys):
    code = main(["bench", "--tokens", "64", "--hidden", "32", "--inter", "16", "--experts", "4", "--topk", "2",
                 "--shared", "1", "--reps", "1", "--warmup", "0"])
    text = capsys.readouterr().out
    assert code == 0
    rows = [line for line in text.splitlines() if line.startswith("T64 ")]
    assert len(rows) == 2 and "fwd+bwd" in rows[1]
    diff = float(rows[0].split()[-1])
    assert diff < 1e-4


def test_info(capsys):
    assert main(["info", "--presets"]) == 0
    text = capsys.readouterr().out
    assert "dsmoe 0.1.0" in text and "torch" in text
    assert "deepseek-moe-16b" in text and "16.4B" in text and "compare-deepseekmoe" in text


# ------------------------------------------------------------------------------- errors


def test_errors_are_one_line(tmp_path, corpus, trained, capsys):
    _one_line_error(capsys, main(["generate", "--model", str(tmp_path / "missing")]), "does not exist")
    _one_line_error(capsys, main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r0")]), "--data")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ nope")
    _one_line_error(capsys, main(["train", "--config", str(bad_json), "--out", str(tmp_path / "r1")]), "not valid JSON")
    bad_cfg = tmp_path / "bad_cfg.json"
    bad_cfg.write_text(json.dumps({"hidden_size": 30, "num_attention_heads": 4}))
    _one_line_error(capsys, main(["train", "--config", str(bad_cfg), "--out", str(tmp_path / "r2")]), "num_attention_heads")
    _one_line_error(capsys, main(["train", "--preset", "nope", "--out", str(tmp_path / "r3")]), "unknown preset")
    _one_line_error(capsys, main(["train", *TINY, "--seq-len", "4096", "--out", str(tmp_path / "r4")]), "max_position_embeddings")
    assert not any((tmp_path / f"r{i}").exists() for i in range(5))  # failed starts leave nothing

    # corrupt checkpoints: truncated weights, missing tensor file, damaged optimizer state
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((trained / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:200])
    _one_line_error(capsys, main(["generate", "--model", str(broken)]), "cannot load checkpoint")
    (broken / "model.safetensors").unlink()
    _one_line_error(capsys, main(["generate", "--model", str(broken)]), "cannot load checkpoint")
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(trained / "checkpoints" / "step-000006", ck)
    (ck / "optimizer.safetensors").write_bytes(b"\x00" * 16)
    _one_line_error(capsys, main(["train", "--resume", str(ck), "--out", str(tmp_path / "r5")]), "optimizer")
    (ck / "trainer_state.json").write_text("[]")
    _one_line_error(capsys, main(["train", "--resume", str(ck), "--out", str(tmp_path / "r5")]), "JSON object")


def test_existing_run_dir_is_not_overwritten(tmp_path, corpus, capsys):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    _one_line_error(capsys, _train(run, corpus, "--steps", "2"), "already exists")
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    assert _train(run, corpus, "--steps", "2", "--overwrite") == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "model.safetensors").is_file()


def test_python_dash_m_entry_point(tmp_path, capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("dsmoe ")
    # one interpreter start (importing torch is slow on a busy machine): exit status and stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "dsmoe", "generate", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("dsmoe: error:") and len(bad.stderr.strip().splitlines()) == 1
