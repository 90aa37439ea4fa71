"""dsmoe/cli/checkpoint.py in-process, on small stand-ins for the model and tokenizer: atomic
checkpoints and files, what a killed save leaves and how it is cleaned, run identity and
lineage, abandoned branches, pruning, resolving --resume, and every refusal in full. The same
paths under real runs, kills and full disks are in test_cli_runs.py and test_cli_faults.py."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsmoe.cli import checkpoint as ck
from dsmoe.cli.common import CLIError


class _Model:
    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

    def save_pretrained(self, folder):
        (Path(folder) / "config.json").write_text('{"hidden_size": 8}')
        if self.fail is not None:
            raise self.fail
        save_file({"w": torch.ones(2)}, str(Path(folder) / "model.safetensors"))


class _Tokenizer:
    def save(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def _optimizer():
    p = torch.nn.Parameter(torch.ones(3, 2))
    q = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.1}, {"params": [q], "weight_decay": 0.0}], lr=0.5)
    (p.sum() + 2 * q.sum()).backward()
    opt.step()
    return opt


def _checkpoint(run: Path, step: int, run_id: str | None = "r1", **extra) -> Path:
    path = ck.step_dir(run, step)
    path.mkdir(parents=True)
    state = {"step": step, **({"run_id": run_id} if run_id is not None else {}), **extra}
    (path / ck.TRAINER_STATE).write_text(json.dumps(state))
    return path


# ---- names and messages

def test_ids_and_step_folders(tmp_path):
    ids = {ck.new_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)
    assert ck.step_dir(tmp_path, 12) == tmp_path / "checkpoints" / "step-000012"
    assert ck.step_dir(str(tmp_path), 1234567) == tmp_path / "checkpoints" / "step-1234567"


def test_save_error_lines(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))
    e = ck.save_error("checkpoint", tmp_path / "step-2", full, tmp_path / "step-1")
    assert str(e) == (f"cannot save checkpoint {tmp_path / 'step-2'} ({tmp_path / 'x.safetensors'}: No space left "
                      f"on device); the partial files were removed; {tmp_path / 'step-1'} is intact")
    e = ck.save_error("the final model into", tmp_path, OSError(errno.EACCES, "Permission denied"))
    assert str(e) == f"cannot save the final model into {tmp_path} (Permission denied); the partial files were removed"
    e = ck.save_error("checkpoint", tmp_path, RuntimeError("  header too large\nsecond line  "))
    assert str(e) == f"cannot save checkpoint {tmp_path} (header too large); the partial files were removed"
    assert f"{tmp_path} (OSError);" in str(ck.save_error("checkpoint", tmp_path, OSError()))
    assert f"{tmp_path} (disk on fire);" in str(ck.save_error("checkpoint", tmp_path, OSError("disk on fire")))


# ---- optimizer and generator state

def test_optimizer_state_splits_into_tensors_and_json_and_back():
    opt = _optimizer()
    p = opt.param_groups[0]["params"][0]
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].t()  # non-contiguous: stored contiguous
    opt.state[p]["note"] = 7  # a non-tensor entry goes to the JSON
    tensors, meta = ck.optimizer_to_files(opt)
    assert set(tensors) == {"state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq", "state.1.step",
                            "state.1.exp_avg", "state.1.exp_avg_sq"}
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    assert meta["scalar_state"] == {"0": {"note": 7}}
    meta = json.loads(json.dumps(meta))  # as trainer_state.json holds it
    back = ck.optimizer_from_files(tensors, meta)
    sd = opt.state_dict()
    assert back["param_groups"] == json.loads(json.dumps(sd["param_groups"]))
    assert set(back["state"]) == {0, 1}
    for idx, state in sd["state"].items():
        assert set(back["state"][idx]) == set(state)
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(back["state"][idx][key], value)
            else:
                assert back["state"][idx][key] == value
    assert ck.optimizer_from_files({}, {"param_groups": []}) == {"state": {}, "param_groups": []}


def test_generator_state_round_trip():
    saved = ck.rng_tensors()
    assert set(saved) == {"cpu"} or torch.cuda.is_available()
    first = torch.rand(5)
    ck.restore_rng(saved)
    assert torch.equal(torch.rand(5), first)


# ---- atomic checkpoints and files

def test_save_checkpoint_writes_all_or_nothing(tmp_path):
    run = tmp_path / "run"
    path = ck.step_dir(run, 2)
    opt = _optimizer()
    assert ck.save_checkpoint(path, _Model(), opt, _Tokenizer(), {"step": 2, "args": {}, "run_id": "r1"},
                              ["a", "b"]) == path
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", ck.OPTIMIZER_FILE, ck.RNG_FILE, ck.TRAINER_STATE])
    state = json.loads((path / ck.TRAINER_STATE).read_text())
    assert state["step"] == 2 and state["run_id"] == "r1" and state["param_names"] == ["a", "b"]
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    loaded_state, opt_sd, rng = ck.load_training_state(path)
    assert loaded_state == state and "cpu" in rng
    assert torch.equal(opt_sd["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]

    # the same step again: replaced as a whole, nothing left beside it
    (path / "stale").write_text("from the first save")
    ck.save_checkpoint(path, _Model(), opt, _Tokenizer(), {"step": 2, "run_id": "r2"}, ["a", "b"])
    assert not (path / "stale").exists() and json.loads((path / ck.TRAINER_STATE).read_text())["run_id"] == "r2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]

    # a failed save: a one-line error naming the last good checkpoint, which stays as it was
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CLIError) as e:
        ck.save_checkpoint(ck.step_dir(run, 4), _Model(fail=full), opt, _Tokenizer(), {"step": 4}, ["a", "b"])
    assert str(e.value) == (f"cannot save checkpoint {ck.step_dir(run, 4)} (No space left on device); the partial "
                            f"files were removed; {path} is intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    with pytest.raises(CLIError) as e:  # replacing a step: the old one stays
        ck.save_checkpoint(path, _Model(fail=full), opt, _Tokenizer(), {"step": 2, "run_id": "r3"}, ["a", "b"])
    assert json.loads((path / ck.TRAINER_STATE).read_text())["run_id"] == "r2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    with pytest.raises(CLIError) as e:  # no earlier checkpoint: nothing said to be intact
        ck.save_checkpoint(ck.step_dir(tmp_path / "new", 1), _Model(fail=full), opt, _Tokenizer(), {}, [])
    assert str(e.value).endswith("; the partial files were removed")


def test_publish_files_renames_weights_before_json(tmp_path, monkeypatch):
    dest = tmp_path / "run"
    dest.mkdir()
    (dest / "config.json").write_text("old config")
    (dest / "mine.txt").write_text("kept")

    def write(folder):
        for name in ("config.json", "b.safetensors", "a.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "model.safetensors"):
            (folder / name).write_text(name)

    order = []
    real = os.replace
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b)))
    ck.publish_files(dest, write, "the run's config")
    assert order == ["a.safetensors", "b.safetensors", "model.safetensors", "config.json", "model.safetensors.index.json",
                     "tokenizer.json"]  # every weight file before any JSON, whatever the names
    assert sorted(p.name for p in dest.iterdir()) == sorted(order + ["mine.txt"])
    assert (dest / "config.json").read_text() == "config.json"


def test_publish_files_failure_keeps_what_was_there(tmp_path):
    dest = tmp_path / "run"
    dest.mkdir()
    (dest / "config.json").write_text("old config")

    def write(folder):
        (folder / "config.json").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    with pytest.raises(CLIError) as e:
        ck.publish_files(dest, write, "the final model into")
    assert re.fullmatch(rf"cannot save the final model into {re.escape(str(dest))} \({re.escape(str(dest))}/"
                        r"\.publish\.tmp-[0-9a-f]{12}/model\.safetensors: No space left on device\); "
                        r"the partial files were removed", str(e.value)), str(e.value)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json"]
    assert (dest / "config.json").read_text() == "old config"


# ---- what killed saves leave

def test_clean_partial_saves(tmp_path):
    run = tmp_path / "run"
    cks = run / "checkpoints"
    cks.mkdir(parents=True)
    (run / ".model.safetensors.saving-Ab_9").mkdir()  # dsmoe.checkpoint.save_pretrained's staging folder
    (run / ".publish.tmp-00ff").mkdir()
    (run / "notes.old-12").write_text("a user's file of that shape outside checkpoints/: left alone")
    (run / "model.safetensors").write_text("w")
    (cks / "step-000002").mkdir()
    (cks / "step-000002.tmp-abc1").mkdir()
    (cks / "step-000004.old-abc2").mkdir()  # its replacement never arrived: restored
    (cks / "step-000006").mkdir()
    (cks / "step-000006.old-abc3").mkdir()  # the replacement arrived: the old one goes
    (cks / "stray.tmp-9").write_text("a file")
    (cks / "step-000008.tmp-xyz").mkdir()  # not hex: not ours
    done = ck.clean_partial_saves(run)
    assert done == ["removed the unfinished .model.safetensors.saving-Ab_9", "removed the unfinished .publish.tmp-00ff",
                    "removed the unfinished step-000002.tmp-abc1", "restored step-000004",
                    "removed the unfinished step-000006.old-abc3", "removed the unfinished stray.tmp-9"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "model.safetensors", "notes.old-12"]
    assert sorted(p.name for p in cks.iterdir()) == ["step-000002", "step-000004", "step-000006", "step-000008.tmp-xyz"]
    assert ck.clean_partial_saves(tmp_path / "missing") == []


def test_a_saving_file_is_removed_too(tmp_path):
    (tmp_path / ".x.saving-1").write_text("half")
    (tmp_path / "y.tmp-1").write_text("half")
    assert ck.clean_partial_saves(tmp_path) == ["removed the unfinished .x.saving-1", "removed the unfinished y.tmp-1"]
    assert list(tmp_path.iterdir()) == []


# ---- runs: identity, lineage, abandoned branches, pruning

def test_checkpoints_lists_complete_ones_by_step(tmp_path):
    assert ck.checkpoints(tmp_path) == [] and ck.latest_checkpoint(tmp_path) is None
    nine, ten = _checkpoint(tmp_path, 9), _checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / "step-7").mkdir()  # no trainer_state.json: incomplete
    (tmp_path / "checkpoints" / "step-000011.tmp-ab").mkdir()
    (tmp_path / "checkpoints" / "step-000011.tmp-ab" / ck.TRAINER_STATE).write_text("{}")
    odd = tmp_path / "checkpoints" / "step-8"  # another width still counts, by number
    odd.mkdir()
    (odd / ck.TRAINER_STATE).write_text("{}")
    assert ck.checkpoints(tmp_path) == [(8, odd), (9, nine), (10, ten)]
    assert ck.latest_checkpoint(tmp_path) == ten


def test_run_file(tmp_path):
    assert ck.read_run(tmp_path) is None
    info = ck.write_run(tmp_path, "abc", {"run_id": "p", "step": 3})
    assert ck.read_run(tmp_path) == info
    assert info["run_id"] == "abc" and info["branched_from"] == {"run_id": "p", "step": 3}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", info["created"]), info["created"]


def test_check_same_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    c = _checkpoint(run, 2)
    assert ck.check_same_run(c, {"run_id": "r1"}, run) == "r1"  # no run.json yet: the checkpoint's id
    ck.write_run(run, "r1", None)
    assert ck.check_same_run(c, {"run_id": "r1"}, run) == "r1"
    assert ck.check_same_run(c, {}, run) == "r1"  # a checkpoint of an older dsmoe
    assert ck.check_same_run(c, {"run_id": None}, tmp_path / "bare") is None
    with pytest.raises(CLIError) as e:
        ck.check_same_run(c, {"run_id": "other"}, run)
    assert str(e.value) == (f"--resume: checkpoint {c} belongs to run other, not to run r1 of {run}; "
                            "give --out NEW_DIR to continue it as a new run")

    cfg = {"hidden_size": 8, "num_hidden_layers": 2, "transformers_version": "5.0", "dtype": "float32"}
    (run / "config.json").write_text(json.dumps(cfg))
    (c / "config.json").write_text(json.dumps({**cfg, "transformers_version": "4.1", "dtype": "bfloat16",
                                               "architectures": ["X"], "auto_map": {}, "torch_dtype": "x",
                                               "_name_or_path": "y"}))
    assert ck.check_same_run(c, {"run_id": "r1"}, run) == "r1"  # what describes the file may differ
    (c / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3, "hidden_size": 16}))
    with pytest.raises(CLIError) as e:
        ck.check_same_run(c, {"run_id": "r1"}, run)
    assert str(e.value) == (f"--resume: checkpoint {c} (hidden_size 16) is another architecture than run directory "
                            f"{run} (hidden_size 8); give --out NEW_DIR to continue it as a new run")
    (c / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_hidden_layers"}))
    with pytest.raises(CLIError, match=r"\(num_hidden_layers None\) is another architecture .*\(num_hidden_layers 2\)"):
        ck.check_same_run(c, {"run_id": "r1"}, run)


def test_retire_later_moves_the_abandoned_branch(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _checkpoint(run, step)
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "log.csv", "log.jsonl", "config.json"):
        (run / name).write_text(name)
    monkeypatch.setattr(ck, "new_id", lambda: "abcdef123456")
    monkeypatch.setattr(ck.time, "strftime", lambda fmt, *a: fmt)
    assert ck.retire_later(run, 6, ("model.safetensors",)) is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    dest = ck.retire_later(run, 2, ("model.safetensors", "model-*.safetensors", "log.csv", "log.jsonl", "loss.png"))
    assert dest == run / "checkpoints" / "abandoned-%Y%m%d-%H%M%S-abcdef"
    assert sorted(p.name for p in dest.iterdir()) == ["final", "step-000004", "step-000006"]
    assert sorted(p.name for p in (dest / "final").iterdir()) == [
        "log.csv", "log.jsonl", "model-00001-of-00002.safetensors", "model.safetensors"]
    # the weights moved (they came from the abandoned branch), the logs copied (the resumed run rewrites them)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "log.csv", "log.jsonl"]
    assert (dest / "final" / "log.csv").read_text() == "log.csv"
    assert ck.checkpoints(run) == [(2, run / "checkpoints" / "step-000002")]
    _checkpoint(run, 8)
    monkeypatch.setattr(ck, "new_id", lambda: "0123456789ab")
    again = ck.retire_later(run, 2, ("model.safetensors",))  # no final files now: no final/ folder
    assert sorted(p.name for p in again.iterdir()) == ["step-000008"]


def test_prune_keeps_the_latest_of_this_run(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 1, run_id="other")
    _checkpoint(run, 2, run_id=None)  # an older dsmoe's: counted as this run's
    for step in (3, 4, 5):
        _checkpoint(run, step)
    removed = ck.prune(run, 2, "r1")
    assert removed == [ck.step_dir(run, 2), ck.step_dir(run, 3)]
    assert [s for s, _ in ck.checkpoints(run)] == [1, 4, 5]
    assert ck.prune(run, 0, "r1") == [] and [s for s, _ in ck.checkpoints(run)] == [1, 4, 5]
    assert ck.prune(run, 1, None) == [ck.step_dir(run, 1), ck.step_dir(run, 4)]  # no id: every checkpoint
    assert [s for s, _ in ck.checkpoints(run)] == [5]


# ---- --resume

def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    c2, c4 = _checkpoint(run, 2), _checkpoint(run, 4)
    assert ck.resolve_resume(str(run)) == (c4, run)
    assert ck.resolve_resume(str(c2)) == (c2, run)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / ck.TRAINER_STATE).write_text("{}")
    assert ck.resolve_resume(str(copy)) == (copy, None)  # outside a run: continued elsewhere
    lookalike = tmp_path / "checkpoints" / "latest"
    lookalike.mkdir(parents=True)
    (lookalike / ck.TRAINER_STATE).write_text("{}")
    assert ck.resolve_resume(str(lookalike)) == (lookalike, None)  # not a step-N folder
    other = tmp_path / "elsewhere" / "step-000003"
    other.mkdir(parents=True)
    (other / ck.TRAINER_STATE).write_text("{}")
    assert ck.resolve_resume(str(other)) == (other, None)  # not under checkpoints/
    for path, message in [
        (tmp_path / "nope", f"--resume: {tmp_path / 'nope'} does not exist"),
        (run / "checkpoints" / "step-000002" / ck.TRAINER_STATE,
         f"--resume: {run / 'checkpoints' / 'step-000002' / ck.TRAINER_STATE} is not a directory"),
        (tmp_path / "elsewhere", f"--resume: {tmp_path / 'elsewhere'} is neither a training checkpoint nor a run "
                                 "directory with checkpoints"),
    ]:
        with pytest.raises(CLIError) as e:
            ck.resolve_resume(str(path))
        assert str(e.value) == message


def test_load_training_state_refusals(tmp_path):
    good = {"step": 1, "args": {}, "optimizer": {"param_groups": []}, "param_names": []}
    for missing in ("step", "args", "optimizer", "param_names"):
        c = tmp_path / f"no-{missing}"
        c.mkdir()
        (c / ck.TRAINER_STATE).write_text(json.dumps({k: v for k, v in good.items() if k != missing}))
        with pytest.raises(CLIError) as e:
            ck.load_training_state(c)
        assert str(e.value) == f"checkpoint {c}: {ck.TRAINER_STATE} lacks '{missing}'"
    c = tmp_path / "c"
    c.mkdir()
    (c / ck.TRAINER_STATE).write_text(json.dumps(good))
    with pytest.raises(CLIError) as e:
        ck.load_training_state(c)
    assert str(e.value) == f"checkpoint {c}: missing {ck.OPTIMIZER_FILE}"
    save_file({}, str(c / ck.OPTIMIZER_FILE))
    with pytest.raises(CLIError) as e:
        ck.load_training_state(c)
    assert str(e.value) == f"checkpoint {c}: missing {ck.RNG_FILE}"
    (c / ck.RNG_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CLIError) as e:
        ck.load_training_state(c)
    assert str(e.value).startswith(f"checkpoint {c}: unreadable {ck.RNG_FILE} (")
    save_file({"cuda.0": torch.zeros(2, dtype=torch.uint8)}, str(c / ck.RNG_FILE))
    with pytest.raises(CLIError) as e:
        ck.load_training_state(c)
    assert str(e.value) == f"checkpoint {c}: {ck.RNG_FILE} lacks the CPU generator state"
    save_file({"cpu": torch.get_rng_state()}, str(c / ck.RNG_FILE))
    state, opt, rng = ck.load_training_state(c)
    assert state == good and opt == {"state": {}, "param_groups": []} and set(rng) == {"cpu"}
    (c / ck.OPTIMIZER_FILE).write_bytes(b"garbage")
    with pytest.raises(CLIError) as e:
        ck.load_training_state(c)
    assert str(e.value).startswith(f"checkpoint {c}: unreadable {ck.OPTIMIZER_FILE} (")


def test_cuda_generator_states_restore_in_device_order(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 11)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append([int(s[0]) for s in states]))
    cpu = torch.get_rng_state()
    states = {"cpu": cpu, **{f"cuda.{i}": torch.tensor([i], dtype=torch.uint8) for i in (10, 2, 0, 1, 11)}}
    ck.restore_rng(states)
    assert restored == [[0, 1, 2, 10, 11]]  # by device number (not as text: cuda.10 after cuda.2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ck.restore_rng(states)
    assert restored[-1] == [0, 1]  # a checkpoint of more GPUs than this machine has
    restored.clear()
    ck.restore_rng({"cpu": cpu})  # a CPU run's checkpoint on a GPU machine: nothing to restore there
    assert restored == []


def test_damaged_json_is_named_by_what_holds_it(tmp_path):
    run = tmp_path / "run"
    c = _checkpoint(run, 2)
    (run / ck.RUN_FILE).write_text("{")
    with pytest.raises(CLIError) as e:
        ck.read_run(run)
    assert str(e.value).startswith(f"run directory: {run / ck.RUN_FILE} is not valid JSON (")
    (run / ck.RUN_FILE).write_text('{"run_id": "r1"}')
    (run / "config.json").write_text("{}")
    (c / "config.json").write_text("[")
    with pytest.raises(CLIError) as e:
        ck.check_same_run(c, {"run_id": "r1"}, run)
    assert str(e.value).startswith(f"checkpoint: {c / 'config.json'} is not valid JSON (")
    (c / ck.TRAINER_STATE).write_text("{")
    with pytest.raises(CLIError) as e:
        ck.prune(run, 1, "r1")
    assert str(e.value).startswith(f"checkpoint: {c / ck.TRAINER_STATE} is not valid JSON (")


def test_optimizer_state_keys_with_dots_and_scalar_only_entries():
    opt = _optimizer()
    p, q = opt.param_groups[0]["params"][0], opt.param_groups[1]["params"][0]
    opt.state[p]["avg.of.sq"] = torch.full((3, 2), 2.0)  # a custom optimizer's key with dots
    opt.state[q] = {"count": 4}  # no tensors at all for this parameter
    tensors, meta = ck.optimizer_to_files(opt)
    assert "state.0.avg.of.sq" in tensors and not any(k.startswith("state.1.") for k in tensors)
    back = ck.optimizer_from_files(tensors, json.loads(json.dumps(meta)))
    assert torch.equal(back["state"][0]["avg.of.sq"], torch.full((3, 2), 2.0))
    assert back["state"][1] == {"count": 4}


def test_cuda_generator_states_are_saved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    states = [torch.tensor([7], dtype=torch.uint8), torch.tensor([9], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    saved = ck.rng_tensors()
    assert set(saved) == {"cpu", "cuda.0", "cuda.1"}
    assert torch.equal(saved["cuda.0"], states[0]) and torch.equal(saved["cuda.1"], states[1])


def test_save_folders_carry_a_hex_tag_the_cleanup_recognises(tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = []

    class Recording(_Model):
        def save_pretrained(self, folder):
            seen.append(Path(folder).name)
            super().save_pretrained(folder)

    opt = _optimizer()
    ck.save_checkpoint(ck.step_dir(run, 2), Recording(), opt, _Tokenizer(), {"step": 2}, [])
    assert re.fullmatch(r"step-000002\.tmp-[0-9a-f]{12}", seen[0]), seen
    moved = []
    real = os.replace
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (moved.append(Path(b).name), real(a, b)))
    ck.save_checkpoint(ck.step_dir(run, 2), Recording(), opt, _Tokenizer(), {"step": 2}, [])
    tag = seen[1].rsplit("-", 1)[1]
    assert [m for m in moved if m.startswith("step-")] == [f"step-000002.old-{tag}", "step-000002"]  # the old one aside under the same tag, then the new
    # what a kill between the two renames leaves is recognised and put back
    (run / "checkpoints" / seen[1]).mkdir()
    os.rename(ck.step_dir(run, 2), run / "checkpoints" / f"step-000002.old-{tag}")
    assert ck.clean_partial_saves(run) == ["restored step-000002", f"removed the unfinished {seen[1]}"]


def test_a_save_that_cannot_even_start_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    bad = tmp_path / "file" / "checkpoints" / "step-000001"
    with pytest.raises(CLIError) as e:
        ck.save_checkpoint(bad, _Model(), _optimizer(), _Tokenizer(), {"step": 1}, [])
    assert str(e.value).startswith(f"cannot save checkpoint {bad} (")
    with pytest.raises(CLIError) as e:
        ck.publish_files(tmp_path / "missing", lambda d: None, "the run's config")
    assert str(e.value).startswith(f"cannot save the run's config {tmp_path / 'missing'} (")
    assert str(e.value).endswith("No such file or directory); the partial files were removed")


def test_a_damaged_trainer_state_is_named(tmp_path):
    (tmp_path / ck.TRAINER_STATE).write_text("{")
    with pytest.raises(CLIError) as e:
        ck.load_training_state(tmp_path)
    assert str(e.value).startswith(f"checkpoint: {tmp_path / ck.TRAINER_STATE} is not valid JSON (")
