"""Checkpoints in the Hugging Face deepseek-moe layout: ``config.json`` plus safetensors, one
``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``. No pickle is ever read or written.

Tensor names are the released ones (``model.embed_tokens.weight``,
``model.layers.N.self_attn.q_proj.weight``, ``model.layers.N.mlp.gate.weight``,
``model.layers.N.mlp.experts.J.gate_proj.weight``, ``model.layers.N.mlp.shared_experts.up_proj.weight``,
``model.norm.weight``, ``lm_head.weight``, …). dsmoe keeps routed experts stacked
(``mlp.experts.w_gate_up`` [E, 2I, h], ``mlp.experts.w_down`` [E, h, I]): saving splits them,
loading stacks them. Loading checks every name and shape before reading any data and refuses a
missing, unexpected or mis-shaped tensor with a message that names it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import CONFIG_NAME, DeepSeekMoEConfig

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# Older Hugging Face exports carry the rotary tables; they are recomputed, never loaded.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
_EXPERTS = re.compile(r"^((?:.*\.)?experts)\.(w_gate_up|w_down)$")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (names the tensor or file)."""


# ---------------------------------------------------------------- name mapping


class _Target:
    """Where one checkpoint tensor goes: ``param_name`` of the model, and for a routed-expert
    tensor the expert index and row range inside the stacked parameter."""

    __slots__ = ("param_name", "shape", "expert", "rows")

    def __init__(self, param_name: str, shape: Tuple[int, ...], expert: Optional[int] = None,
                 rows: Optional[Tuple[int, int]] = None) -> None:
        self.param_name, self.shape, self.expert, self.rows = param_name, shape, expert, rows


def _model_tensors(model: nn.Module) -> Dict[str, Tensor]:
    """State dict without the tied output head (saved once, as the embedding)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def hf_layout(model: nn.Module) -> Dict[str, _Target]:
    """Checkpoint tensor name -> target in ``model`` for every tensor a checkpoint must hold."""
    layout: Dict[str, _Target] = {}
    for name, tensor in _model_tensors(model).items():
        match = _EXPERTS.match(name)
        if not match:
            layout[name] = _Target(name, tuple(tensor.shape))
            continue
        prefix, kind = match.groups()
        E = tensor.shape[0]
        if kind == "w_gate_up":
            I, h = tensor.shape[1] // 2, tensor.shape[2]
            for j in range(E):
                layout[f"{prefix}.{j}.gate_proj.weight"] = _Target(name, (I, h), j, (0, I))
                layout[f"{prefix}.{j}.up_proj.weight"] = _Target(name, (I, h), j, (I, 2 * I))
        else:
            h, I = tensor.shape[1], tensor.shape[2]
            for j in range(E):
                layout[f"{prefix}.{j}.down_proj.weight"] = _Target(name, (h, I), j, None)
    return layout


def to_hf_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The model's tensors under the Hugging Face names, routed experts split per expert
    (fresh contiguous tensors, so safetensors sees no shared storage)."""
    state = _model_tensors(model)
    out: Dict[str, Tensor] = {}
    for hf_name, target in hf_layout(model).items():
        tensor = state[target.param_name].detach()
        if target.expert is not None:
            tensor = tensor[target.expert]
            if target.rows is not None:
                tensor = tensor[target.rows[0] : target.rows[1]]
        out[hf_name] = tensor.contiguous().clone() if target.expert is not None else tensor.contiguous()
    return out


# ---------------------------------------------------------------- saving


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '500MB' / '2GB', got {size!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    value = int(number * scale)
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike],
                    max_shard_size: Union[int, str, None] = None) -> List[str]:
    """Writes config.json and the weights; returns the weight file names. Tensors are split
    into shards of at most ``max_shard_size`` bytes (a single larger tensor gets its own)."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    tensors = to_hf_state_dict(model)
    dtype = model.lm_head.weight.dtype
    config_dict = model.config.to_dict()
    config_dict["torch_dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: List[Dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.cpu()
        size += nbytes

    for stale in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME):
        path = os.path.join(save_directory, stale)
        if os.path.exists(path):
            os.remove(path)
    for old in os.listdir(save_directory):
        if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old):
            os.remove(os.path.join(save_directory, old))

    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(save_directory, SAFE_WEIGHTS_NAME), metadata=metadata)
        return [SAFE_WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: Dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, os.path.join(save_directory, file_name), metadata=metadata)
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(save_directory, SAFE_INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names


# ---------------------------------------------------------------- loading


def _weight_files(directory: str) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """The safetensors files of a checkpoint directory and the index's weight map (if sharded)."""
    index_path = os.path.join(directory, SAFE_INDEX_NAME)
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: weight_map must be an object")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{index_path} lists shard {name}, which is not in {directory}")
        return [os.path.join(directory, name) for name in files], weight_map
    if os.path.isfile(single):
        return [single], None
    pickles = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(sorted(pickles))}); dsmoe reads safetensors "
            "only — convert them first (e.g. with safetensors' convert script)"
        )
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} in {directory}")


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _scan(files: List[str], weight_map: Optional[Dict[str, str]]) -> Dict[str, Tuple[str, Tuple[int, ...], str]]:
    """name -> (file, shape, dtype string) from the headers only."""
    found: Dict[str, Tuple[str, Tuple[int, ...], str]] = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if name in found:
                    raise CheckpointError(f"tensor {name} appears twice ({found[name][0]} and {path})")
                piece = f.get_slice(name)
                found[name] = (path, tuple(piece.get_shape()), piece.get_dtype())
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in found:
                raise CheckpointError(f"the index maps tensor {name} to {file_name}, which does not hold it")
            if os.path.basename(found[name][0]) != file_name:
                raise CheckpointError(
                    f"the index maps tensor {name} to {file_name}, but it is in {os.path.basename(found[name][0])}"
                )
    return found


def _describe(names: List[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def load_state_into(model: nn.Module, directory: str) -> None:
    """Fills every parameter and persistent buffer of ``model`` from the checkpoint in
    ``directory``, after checking all names and shapes."""
    files, weight_map = _weight_files(directory)
    found = _scan(files, weight_map)
    layout = hf_layout(model)
    unexpected = sorted(n for n in found if n not in layout and not _IGNORED.match(n))
    if unexpected:
        raise CheckpointError(f"checkpoint {directory} has unexpected tensor(s): {_describe(unexpected)}")
    missing = sorted(n for n in layout if n not in found)
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing tensor(s): {_describe(missing)}")
    for name, target in layout.items():
        path, shape, dtype = found[name]
        if shape != target.shape:
            raise CheckpointError(
                f"tensor {name} in {os.path.basename(path)} has shape {list(shape)}, the model expects {list(target.shape)}"
            )
        if dtype not in ("F64", "F32", "F16", "BF16"):
            raise CheckpointError(f"tensor {name} in {os.path.basename(path)} has dtype {dtype}, expected a float type")

    state = _model_tensors(model)
    by_file: Dict[str, List[str]] = {}
    for name in layout:
        by_file.setdefault(found[name][0], []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with _open(path) as f:
                for name in names:
                    target = layout[name]
                    dest = state[target.param_name]
                    if target.expert is not None:
                        dest = dest[target.expert]
                        if target.rows is not None:
                            dest = dest[target.rows[0] : target.rows[1]]
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as e:
                        raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None
                    dest.copy_(tensor)


def checkpoint_dtype(directory: str) -> torch.dtype:
    """The floating dtype the checkpoint's weights are stored in."""
    files, weight_map = _weight_files(directory)
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                dtype = _DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
    return torch.float32


def load_pretrained(cls, path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device, None] = None, moe_impl: str = "dsmoe", **config_overrides):
    """Builds ``cls(config)`` without initialising it (meta device), then fills it from the
    checkpoint at ``path``."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = DeepSeekMoEConfig.from_pretrained(directory, **config_overrides)
    if dtype is None:
        dtype = checkpoint_dtype(directory)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = cls(config, moe_impl=moe_impl)
    model.to(dtype)  # on meta: nothing is allocated until to_empty, and then in the final dtype
    for layer in model.moe_layers():  # the selection bias stays fp32, as the gate op reads it
        if layer.gate.e_score_correction_bias is not None:
            layer.gate.e_score_correction_bias = layer.gate.e_score_correction_bias.float()
    model.to_empty(device=device)  # expert weights land on huge pages (RoutedExperts._apply)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_into(model, directory)
    model.eval()
    return model


__all__ = [
    "CheckpointError",
    "SAFE_WEIGHTS_NAME",
    "SAFE_INDEX_NAME",
    "hf_layout",
    "to_hf_state_dict",
    "save_pretrained",
    "load_state_into",
    "load_pretrained",
    "checkpoint_dtype",
]
