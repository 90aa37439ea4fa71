"""Training checkpoints: the model in the Hugging Face layout (config.json + safetensors, written
by the model package), plus what exact resumption needs, with no pickle anywhere:

    optimizer.safetensors   every tensor of optimizer.state_dict()["state"], as ``state.<i>.<key>``
    trainer_state.json      step, tokens, elapsed time, the training arguments, the optimizer's
                            param_groups and non-tensor state, and the parameter names by index
    rng.safetensors         the CPU (and CUDA) random generator states
    tokenizer.json          the tokenizer (byte-level for models `dsmoe train` makes)
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .common import CLIError, read_json, write_json

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    """Writes a checkpoint into ``path`` atomically (a temporary folder renamed at the end), so
    an interrupted save never leaves a half-written checkpoint behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save(tmp)
    tensors, meta = optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    save_file(rng_tensors(), str(tmp / RNG_FILE))
    write_json(tmp / TRAINER_STATE, {**state, "optimizer": meta, "param_names": param_names})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return max(found)[1] if found else None


def resolve_resume(path: str) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from a run directory (its latest checkpoint) or a checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"--resume: {path} does not exist")
    if not p.is_dir():
        raise CLIError(f"--resume: {path} is not a directory")
    if (p / TRAINER_STATE).is_file():
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS else p
        return p, run_dir
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
    try:
        opt_tensors = load_file(str(ckpt / OPTIMIZER_FILE))
        rng = load_file(str(ckpt / RNG_FILE))
    except FileNotFoundError as e:
        raise CLIError(f"checkpoint {ckpt}: missing {Path(e.filename).name if e.filename else 'file'}") from None
    except (SafetensorError, OSError) as e:
        raise CLIError(f"checkpoint {ckpt}: unreadable optimizer/RNG state ({e})") from None
    if "cpu" not in rng:
        raise CLIError(f"checkpoint {ckpt}: {RNG_FILE} lacks the CPU generator state")
    return state, optimizer_from_files(opt_tensors, state["optimizer"]), rng
