"""Training checkpoints: the model in the Hugging Face layout (config.json + safetensors, written
by the model package), plus what exact resumption needs, with no pickle anywhere:

    optimizer.safetensors   every tensor of optimizer.state_dict()["state"], as ``state.<i>.<key>``
    trainer_state.json      step, tokens, elapsed time, the training arguments, the optimizer's
                            param_groups and non-tensor state, and the parameter names by index
    rng.safetensors         the CPU (and CUDA) random generator states
    tokenizer.json          the tokenizer (byte-level for models `dsmoe train` makes)

Each checkpoint is written into ``step-N.tmp-<id>``, fsynced and renamed to ``step-N``, so a
kill or a full disk never leaves a half-written ``step-N``. Its trainer_state.json records the
run it belongs to (``run_id``, also in the run directory's ``run.json``), its own
``checkpoint_id`` and its ``parent`` (the checkpoint its training continued from): resuming in
place refuses a checkpoint of another run, and a run resumed from an earlier checkpoint moves
the later ones of the abandoned branch into ``checkpoints/abandoned-<id>/``.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .common import CLIError, fsync_dir, fsync_tree, read_json, write_json

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# what a save leaves while it runs: step-N.tmp-<id> (being written), step-N.old-<id> (the
# checkpoint of the same step it replaces, until the new one is in place), and the staging
# folder of dsmoe.checkpoint.save_pretrained beside its target, .<target>.saving-<random>
_PARTIAL = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]+$")
_SAVING = re.compile(r"^\..+\.saving-[A-Za-z0-9_]+$")
# config.json keys that describe the file, not the architecture
_NOT_ARCHITECTURE = {"transformers_version", "torch_dtype", "dtype", "architectures", "auto_map", "_name_or_path"}


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def save_error(what: str, path: Path, e: BaseException, previous: Path | None = None) -> CLIError:
    """The one line for a save that failed (disk full, permissions, ...): where, why, and what
    the user still has."""
    if isinstance(e, OSError) and e.strerror:
        cause = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    kept = f"; {previous} is intact" if previous is not None else ""
    return CLIError(f"cannot save {what} {path} ({cause}); the partial files were removed{kept}")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits optimizer.state_dict() into tensors (for safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(path: Path, model, optimizer, tokenizer, state: dict, param_names: list[str]) -> Path:
    """Writes a checkpoint into ``path`` as a whole or not at all (see the module docstring).
    A failure (``OSError``, ``SafetensorError``) removes the partial files and raises a one-line
    CLIError; a checkpoint already at ``path`` stays until the new one replaces it."""
    path = Path(path)
    tag = new_id()
    tmp = path.with_name(f"{path.name}.tmp-{tag}")
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        tensors, meta = optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        save_file(rng_tensors(), str(tmp / RNG_FILE))
        write_json(tmp / TRAINER_STATE, {**state, "optimizer": meta, "param_names": param_names})
        fsync_tree(tmp)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error("checkpoint", path, e, latest_checkpoint(path.parent.parent)) from None
    _publish_dir(tmp, path, tag)
    return path


def _publish_dir(tmp: Path, path: Path, tag: str) -> None:
    """Renames the finished ``tmp`` to ``path``; an existing ``path`` is moved aside first
    (a directory cannot be replaced in one rename) and deleted once the new one is in place."""
    old = path.with_name(f"{path.name}.old-{tag}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def publish_files(dest: Path, write, what: str) -> None:
    """Writes files into ``dest`` with ``write(folder)``, each of them atomically: all are
    written into a temporary folder inside ``dest`` and fsynced, then renamed into place one by
    one (the weights before config and index). A failure removes the temporary folder and
    leaves ``dest``'s files as they were."""
    dest = Path(dest)
    tmp = dest / f".publish.tmp-{new_id()}"
    try:
        tmp.mkdir()
        write(tmp)
        fsync_tree(tmp)
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: (n.endswith(".json"), n))
        for name in names:
            os.replace(tmp / name, dest / name)
        fsync_dir(dest)
    except (OSError, SafetensorError) as e:
        raise save_error(what, dest, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_partial_saves(run_dir: Path) -> list[str]:
    """Removes what saves that were killed left in a run directory (the run holds its lock, so
    no save is running): half-written ``*.tmp-<id>`` and ``.*.saving-*`` folders; a ``step-N.old-<id>`` goes back
    to ``step-N`` if the new one never arrived. Returns what it did."""
    done = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if _SAVING.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                done.append(f"removed the unfinished {p.name}")
                continue
            m = _PARTIAL.match(p.name)
            if not m or (m.group("kind") == "old" and folder.name != CHECKPOINTS):
                continue
            target = folder / m.group("name")
            if m.group("kind") == "old" and not target.exists():
                os.replace(p, target)
                done.append(f"restored {target.name}")
            else:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                done.append(f"removed the unfinished {p.name}")
    return done


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete checkpoints, by step."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file())


def read_run(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    return read_json(path, "run directory") if path.is_file() else None


def write_run(run_dir: Path, run_id: str, branched_from: dict | None) -> dict:
    info = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "branched_from": branched_from}
    write_json(Path(run_dir) / RUN_FILE, info)
    return info


def _architecture(folder: Path) -> dict:
    cfg = read_json(Path(folder) / "config.json", "checkpoint")
    return {k: v for k, v in cfg.items() if k not in _NOT_ARCHITECTURE}


def check_same_run(ckpt: Path, state: dict, run_dir: Path) -> str | None:
    """Refuses (one line naming both) to continue ``run_dir`` from a checkpoint of another run
    or another architecture; returns the run's id (None for a run of an older dsmoe without one)."""
    run = read_run(run_dir)
    run_id = run.get("run_id") if run else None
    ckpt_run = state.get("run_id")
    if run_id and ckpt_run and run_id != ckpt_run:
        raise CLIError(f"--resume: checkpoint {ckpt} belongs to run {ckpt_run}, not to run {run_id} of {run_dir}; "
                       "give --out NEW_DIR to continue it as a new run")
    if (Path(run_dir) / "config.json").is_file():
        a, b = _architecture(ckpt), _architecture(run_dir)
        if a != b:
            key = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[0]
            raise CLIError(f"--resume: checkpoint {ckpt} ({key} {a.get(key)}) is another architecture than run "
                           f"directory {run_dir} ({key} {b.get(key)}); give --out NEW_DIR to continue it as a new run")
    return run_id or ckpt_run


def retire_later(run_dir: Path, step: int, final_files: tuple[str, ...]) -> Path | None:
    """Moves the checkpoints after ``step`` (a branch abandoned by resuming from ``step``) and
    the run's final model files, which came from that branch, into
    ``checkpoints/abandoned-<date>-<id>/``; nothing is deleted. Returns that folder, or None if
    there was nothing to move."""
    later = [p for s, p in checkpoints(run_dir) if s > step]
    if not later:
        return None
    dest = Path(run_dir) / CHECKPOINTS / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{new_id()[:6]}"
    dest.mkdir()
    for p in later:
        os.replace(p, dest / p.name)
    final = dest / "final"
    for pattern in final_files:
        for p in sorted(Path(run_dir).glob(pattern)):
            final.mkdir(exist_ok=True)
            if pattern.startswith("log."):  # the resumed run rewrites the log; keep a copy
                shutil.copy2(p, final / p.name)
            else:
                os.replace(p, final / p.name)
    fsync_dir(dest)
    fsync_dir(Path(run_dir) / CHECKPOINTS)
    fsync_dir(run_dir)
    return dest


def prune(run_dir: Path, keep_last: int, run_id: str | None) -> list[Path]:
    """``--keep-last``: deletes this run's checkpoints but the ``keep_last`` latest."""
    mine = [p for _, p in checkpoints(run_dir)
            if run_id is None or read_json(p / TRAINER_STATE, "checkpoint").get("run_id") in (run_id, None)]
    old = mine[:-keep_last] if keep_last > 0 else []
    for p in old:
        shutil.rmtree(p)
    return old


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(path: str) -> tuple[Path, Path | None]:
    """(checkpoint dir, the run directory it belongs to) from a run directory (its latest
    checkpoint) or a checkpoint; the run directory is None for a checkpoint outside one
    (e.g. a copy), which is continued into a new run directory, never written into."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"--resume: {path} does not exist")
    if not p.is_dir():
        raise CLIError(f"--resume: {path} is not a directory")
    if (p / TRAINER_STATE).is_file():
        in_run = p.parent.name == CHECKPOINTS and _STEP_DIR.match(p.name)
        return p, (p.parent.parent if in_run else None)
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise CLIError(f"--resume: {path} is neither a training checkpoint nor a run directory with checkpoints")
    return ckpt, p


def load_training_state(ckpt: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(trainer state, optimizer state_dict, rng tensors), refusing damaged files in one line."""
    state = read_json(ckpt / TRAINER_STATE, "checkpoint")
    for key in ("step", "args", "optimizer", "param_names"):
        if key not in state:
            raise CLIError(f"checkpoint {ckpt}: {TRAINER_STATE} lacks {key!r}")
    tensors = {}
    for name in (OPTIMIZER_FILE, RNG_FILE):  # one at a time: safetensors' FileNotFoundError has no filename
        try:
            tensors[name] = load_file(str(ckpt / name))
        except FileNotFoundError:
            raise CLIError(f"checkpoint {ckpt}: missing {name}") from None
        except (SafetensorError, OSError) as e:
            raise CLIError(f"checkpoint {ckpt}: unreadable {name} ({e})") from None
    opt_tensors, rng = tensors[OPTIMIZER_FILE], tensors[RNG_FILE]
    if "cpu" not in rng:
        raise CLIError(f"checkpoint {ckpt}: {RNG_FILE} lacks the CPU generator state")
    return state, optimizer_from_files(opt_tensors, state["optimizer"]), rng
