"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) and their conversion to and from
the single-directory Hugging Face layout.

A DCP checkpoint directory holds::

    .metadata, __<rank>_0.distcp   DCP: every rank writes its own shards, in parallel
    config.json                    the model config (as in the Hugging Face layout)
    dsmoe_dcp.json                 format marker, the mesh it was written from, caller's extras

The state is ``{"model": ..., "optim": ...}`` keyed by the parameter names of the unwrapped
model (``model.layers.1.mlp.experts.w_gate_up`` [E, 2I, h] and so on: global shapes, whatever
the sharding). DCP records which slice of each tensor every shard holds, so a checkpoint loads
into any mesh (another dp x ep, another rank count) and into one process, each rank reading
only the slices it owns.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from ..config import DeepSeekMoEConfig
from ..fileio import write_bytes_atomic

DCP_META_NAME = "dsmoe_dcp.json"
DCP_FORMAT = "dsmoe-dcp"
DCP_VERSION = 1

PathLike = Union[str, os.PathLike]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _use_dist(distributed: Optional[bool]) -> bool:
    if distributed is None:
        return _initialized()
    if distributed and not _initialized():
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    return distributed


@contextlib.contextmanager
def _single_process_ok(no_dist: bool):
    """DCP warns on every single-process save/load; here that is the intent."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable")
        yield


def is_dcp_checkpoint(path: PathLike) -> bool:
    p = Path(path)
    return (p / ".metadata").is_file() and (p / DCP_META_NAME).is_file()


def read_meta(path: PathLike) -> Dict[str, Any]:
    """The ``dsmoe_dcp.json`` of a DCP checkpoint directory (ValueError if it is not one)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"DCP checkpoint directory {p} does not exist")
    if not (p / ".metadata").is_file() or not (p / DCP_META_NAME).is_file():
        raise ValueError(f"{p} is not a dsmoe DCP checkpoint (no .metadata / {DCP_META_NAME})")
    try:
        meta = json.loads((p / DCP_META_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p / DCP_META_NAME} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != DCP_FORMAT:
        raise ValueError(f"{p / DCP_META_NAME}: not a {DCP_FORMAT} file")
    return meta


def _state_dicts(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def save(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[Dict[str, Any]] = None, distributed: Optional[bool] = None) -> Path:
    """Writes ``model`` (and ``optimizer``) as a DCP checkpoint into ``path``. With
    ``distributed`` (default: whether torch.distributed is initialised) a collective: every
    rank calls it and writes its own shards; otherwise this process saves alone. ``extra``
    (JSON-serialisable) is stored in dsmoe_dcp.json."""
    path = Path(path)
    use_dist = _use_dist(distributed)
    main = not use_dist or dist.get_rank() == 0
    if optimizer is not None and not optimizer.state:
        optimizer = None  # nothing stepped yet: a fresh optimizer is the exact state to resume
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state: Dict[str, Any] = {"model": model_sd}
    if optim_sd is not None:
        state["optim"] = optim_sd
    if main:
        _start_writing(path)
    if use_dist:
        dist.barrier()
    with _single_process_ok(not use_dist):
        dcp.save(state, storage_writer=_writer(path), no_dist=not use_dist)
    if main:
        mesh = getattr(model, "_dsmoe_mesh", None) if use_dist else None
        meta = {
            "format": DCP_FORMAT,
            "version": DCP_VERSION,
            "world_size": dist.get_world_size() if use_dist else 1,
            "mesh": {"dp": mesh.size(0), "ep": mesh.size(1)} if mesh is not None else {"dp": 1, "ep": 1},
            "has_optimizer": optimizer is not None,
            "extra": extra or {},
        }
        model.config.save_pretrained(path)
        _write_meta(path, meta)
    if use_dist:
        dist.barrier()
    return path


def _start_writing(path: Path) -> None:
    """The folder made, and an earlier checkpoint in it removed, its marker first: while the
    shards are being written the folder must not claim to hold a complete checkpoint, and no
    shard of another rank count may stay behind."""
    path.mkdir(parents=True, exist_ok=True)
    (path / DCP_META_NAME).unlink(missing_ok=True)
    (path / ".metadata").unlink(missing_ok=True)
    for shard in path.glob("*.distcp"):
        shard.unlink()


def _writer(path: Path):
    # (explicit: torch announced that its default will stop saving over a checkpoint)
    return dcp.FileSystemWriter(str(path), overwrite=True)


def _write_meta(path: Path, meta: Dict[str, Any]) -> None:
    """The marker last and atomically: a directory with it holds a complete checkpoint."""
    write_bytes_atomic(path / DCP_META_NAME, (json.dumps(meta, indent=2) + "\n").encode())


def load(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         distributed: Optional[bool] = None) -> Dict[str, Any]:
    """Fills ``model`` (and ``optimizer``) from the DCP checkpoint at ``path``, whatever mesh or
    rank count wrote it; returns its dsmoe_dcp.json (a checkpoint without optimizer state
    leaves ``optimizer`` untouched: it was saved before the first step). A collective with ``distributed`` (default:
    whether torch.distributed is initialised); ``distributed=False`` loads a plain model in this
    process alone. Loading optimizer state into an optimizer that has none yet drops the
    parameters' pending gradients (they belong to the weights being replaced)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    use_dist = _use_dist(distributed)
    meta = read_meta(path)
    if optimizer is not None and not meta.get("has_optimizer"):
        optimizer = None  # saved before the first step (or model only): the optimizer stays fresh
    if optimizer is not None and not optimizer.state:
        # torch builds an empty optimizer's state with a zero-gradient step before loading into
        # it, but skips that (taking it for a stateless optimizer) when a parameter holds a
        # gradient: the saved moments would be dropped without a word
        model.zero_grad(set_to_none=True)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state: Dict[str, Any] = {"model": model_sd}
    if optim_sd is not None:
        state["optim"] = optim_sd
    try:
        with _single_process_ok(not use_dist):
            dcp.load(state, checkpoint_id=str(path), no_dist=not use_dist)
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures (missing keys, shapes)
        raise ValueError(f"DCP checkpoint {path} does not match the model: {_first_line(e)}") from None
    if optim_sd is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if not optimizer.state:
            raise ValueError(f"DCP checkpoint {path}: its optimizer state did not reach the optimizer")
    else:
        set_model_state_dict(model, state["model"])
    return meta


def _first_line(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:  # the first rank's own error, not DCP's wrapper
        e = next(iter(e.failures.values()))[0]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- conversion (one process)


def _plain_model(config: DeepSeekMoEConfig, dtype: torch.dtype):
    from ..model import DeepSeekMoEForCausalLM

    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(config)
    model.to(dtype)
    for layer in model.moe_layers():  # the selection bias stays fp32, as the gate op reads it
        if layer.gate.e_score_correction_bias is not None:
            layer.gate.e_score_correction_bias = layer.gate.e_score_correction_bias.float()
    model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(path: PathLike, dtype: torch.dtype = torch.float32):
    """A single-process :class:`dsmoe.DeepSeekMoEForCausalLM` (CPU, eval mode) from a DCP
    checkpoint written by any number of ranks."""
    read_meta(path)
    config = DeepSeekMoEConfig.from_pretrained(path)
    model = _plain_model(config, dtype)
    state = model.state_dict()
    try:
        with _single_process_ok(True):
            dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise ValueError(f"DCP checkpoint {path} does not match its config.json: {_first_line(e)}") from None
    model.eval()
    return model


def dcp_to_hf(dcp_dir: PathLike, hf_dir: PathLike, dtype: torch.dtype = torch.float32,
              max_shard_size: Optional[Union[int, str]] = None) -> Path:
    """Converts a DCP checkpoint into the Hugging Face layout (config.json + safetensors, routed
    experts split per expert). Runs in one process."""
    model = load_model(dcp_dir, dtype)
    model.save_pretrained(hf_dir, max_shard_size=max_shard_size)
    return Path(hf_dir)


def hf_to_dcp(hf_dir: PathLike, dcp_dir: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Converts a Hugging Face layout checkpoint (ours or a released deepseek-moe one) into a DCP
    checkpoint that any mesh can load with :func:`load`. Runs in one process."""
    from ..model import DeepSeekMoEForCausalLM

    model = DeepSeekMoEForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    dcp_dir = Path(dcp_dir)
    _start_writing(dcp_dir)
    with _single_process_ok(True):
        dcp.save({"model": model.state_dict()}, storage_writer=_writer(dcp_dir), no_dist=True)
    model.config.save_pretrained(dcp_dir)
    meta = {"format": DCP_FORMAT, "version": DCP_VERSION, "world_size": 1, "mesh": {"dp": 1, "ep": 1},
            "has_optimizer": False, "extra": {"converted_from": str(hf_dir)}}
    _write_meta(dcp_dir, meta)
    return dcp_dir


def main(argv=None) -> int:
    """``python -m dsmoe.distributed.checkpoint {to-hf,from-hf} SRC DST``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dsmoe.distributed.checkpoint",
                                description="convert between DCP and Hugging Face checkpoint layouts")
    p.add_argument("direction", choices=("to-hf", "from-hf"))
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.direction == "to-hf":
        out = dcp_to_hf(a.src, a.dst, dtype or torch.float32)
    else:
        out = hf_to_dcp(a.src, a.dst, dtype)
    print(f"wrote {out}")
    return 0


__all__ = [
    "DCP_META_NAME",
    "is_dcp_checkpoint",
    "read_meta",
    "save",
    "load",
    "load_model",
    "dcp_to_hf",
    "hf_to_dcp",
]

if __name__ == "__main__":
    raise SystemExit(main())
