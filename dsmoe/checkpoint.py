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
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import ALIASES, CONFIG_NAME, DeepSeekMoEConfig

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


# Files of a checkpoint's tokenizer (and its generation defaults), carried over when a model loaded
# from a directory is saved elsewhere.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
# config.json keys that a saved checkpoint must not carry: the remote-code pointers of a released
# checkpoint (dsmoe does not write those files; transformers gets the classes from ``import dsmoe``)
_DROPPED_CONFIG_KEYS = ("auto_map",)


class SaveError(OSError):
    """Saving failed (one line: the path and the cause); nothing of the target was changed."""


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shards(tensors: Dict[str, Tensor], limit: Optional[int]) -> List[Dict[str, Tensor]]:
    shards: List[Dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.cpu()
        size += nbytes
    return shards


def _write_checkpoint(model: nn.Module, directory: str, limit: Optional[int]) -> List[str]:
    """Writes config.json and the weights into the empty ``directory``, each file fsynced."""
    from safetensors.torch import save

    tensors = to_hf_state_dict(model)
    config_dict = model.config.to_dict()
    for key in _DROPPED_CONFIG_KEYS:
        config_dict.pop(key, None)
    config_dict["torch_dtype"] = str(model.lm_head.weight.dtype).replace("torch.", "")
    shards = _shards(tensors, limit)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: Dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        _fsync_write(os.path.join(directory, file_name), save(shard, metadata=metadata))
        weight_map.update({name: file_name for name in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _fsync_write(os.path.join(directory, SAFE_INDEX_NAME), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    _fsync_write(os.path.join(directory, CONFIG_NAME), (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode())
    return names


def _carry_tokenizer(source: Optional[str], staging: str, target: str) -> None:
    """Copies the tokenizer files of the directory the model was loaded from (those the target
    does not already have) into the staging directory."""
    if not source or not os.path.isdir(source) or os.path.realpath(source) == os.path.realpath(target):
        return
    for name in TOKENIZER_FILES:
        src = os.path.join(source, name)
        if os.path.isfile(src) and not os.path.exists(os.path.join(target, name)):
            with open(src, "rb") as f:
                _fsync_write(os.path.join(staging, name), f.read())


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike],
                    max_shard_size: Union[int, str, None] = None) -> List[str]:
    """Writes config.json and the weights; returns the weight file names. Tensors are split
    into shards of at most ``max_shard_size`` bytes (a single larger tensor gets its own). The
    tokenizer files of the directory the model was loaded from come along.

    Atomic: everything is written and fsynced into a temporary directory beside the target
    first. A new target is that directory renamed; an existing one (e.g. a run directory with
    logs) gets the new files by rename, config.json last, and then loses the weight files of the
    previous save that the new one does not have (a kill -9 inside that sequence of renames, a
    window of microseconds, can leave a sharded checkpoint with shards of both saves; a single
    file cannot mix). A failure while writing (disk full, ...)
    raises :class:`SaveError` naming the path and the cause, removes the partial files and
    leaves the target as it was."""
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise SaveError(f"cannot save to {target}: it exists and is not a directory")
    parent = os.path.dirname(target)
    staging = None
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=parent)
        names = _write_checkpoint(model, staging, limit)
        _carry_tokenizer(getattr(model, "_dsmoe_source_dir", None), staging, target)
        _fsync_path(staging)
        if not os.path.exists(target):
            os.rename(staging, target)
            staging = None
        else:
            written = os.listdir(staging)
            # weights first, config.json last: a reader that finds the new config finds its weights
            for name in sorted(written, key=lambda n: n == CONFIG_NAME):
                os.replace(os.path.join(staging, name), os.path.join(target, name))
            for old in os.listdir(target):
                if _WEIGHT_FILE.fullmatch(old) and old not in written:
                    os.remove(os.path.join(target, old))
        _fsync_path(target)
        _fsync_path(parent)
    except Exception as e:
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            path = getattr(e, "filename", None) or staging or target
            text = str(e).strip()
            cause = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
            raise SaveError(f"cannot save the model to {target}: {path}: {cause}") from None
        raise
    finally:
        if staging is not None and os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
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
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        bad = int((~torch.isfinite(tensor)).sum())
                        raise CheckpointError(
                            f"tensor {name} in {path} holds {bad} NaN/inf value(s) of {tensor.numel()}: the "
                            "checkpoint is corrupt (or was saved from a diverged run)"
                        )
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


_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "half": torch.float16, "fp16": torch.float16, "float64": torch.float64, "double": torch.float64}


def _resolve_dtype(dtype, directory: str) -> torch.dtype:
    """``dtype`` as a torch dtype: None or "auto" = the stored one; names like "bfloat16"."""
    if dtype is None or dtype == "auto":
        return checkpoint_dtype(directory)
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "").lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(f"from_pretrained: dtype {dtype!r} is not a floating dtype; use one of {sorted(_DTYPE_NAMES)} or 'auto'")
        return _DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"from_pretrained: dtype must be a floating torch.dtype, a name or 'auto', got {dtype!r}")
    return dtype


def _resolve_device(device, device_map) -> torch.device:
    """One device from ``device`` or ``device_map`` (a device, or {"": device}); a map that
    spreads the model over several devices ("auto", per-module dicts) is refused."""
    if device is not None and device_map is not None:
        raise ValueError("from_pretrained: pass device or device_map, not both")
    if device_map is not None:
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device = device_map[""]
        elif isinstance(device_map, (str, int, torch.device)) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            device = device_map
        else:
            raise ValueError(
                f"from_pretrained: device_map={device_map!r} would spread the model over devices, which dsmoe's "
                "model does not do; pass one device (device='cuda'), or load it with transformers' "
                "AutoModelForCausalLM.from_pretrained(path, device_map=...) after import dsmoe"
            )
    if device is None:
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"from_pretrained: device {device!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"from_pretrained: device {str(device)!r} asked for, but torch finds no CUDA device")
    return device


def load_pretrained(cls, path: Union[str, os.PathLike], *, dtype=None, torch_dtype=None,
                    device: Union[str, torch.device, int, None] = None, device_map=None,
                    moe_impl: str = "dsmoe", **config_overrides):
    """Builds ``cls(config)`` without initialising it (meta device), then fills it from the
    checkpoint at ``path``. ``dtype`` (or its old name ``torch_dtype``): a torch dtype, a name
    or "auto"/None for the stored one. ``device`` or ``device_map`` (one device, or {"": device}).
    Other keywords must be config fields (they override config.json); anything else is a
    TypeError."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    unknown = sorted(k for k in config_overrides if k not in DeepSeekMoEConfig._DEFAULTS and k not in ALIASES)
    if unknown:
        raise TypeError(
            f"from_pretrained: unexpected keyword argument(s) {', '.join(unknown)} (accepted: dtype, device, "
            "device_map, moe_impl and config fields to override)"
        )
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"from_pretrained: dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree")
    config = DeepSeekMoEConfig.from_pretrained(directory, **config_overrides)
    for key in ("torch_dtype", "dtype"):  # stored metadata, rewritten at every save
        config.extra.pop(key, None)
    dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, directory)
    device = _resolve_device(device, device_map)
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
    model._dsmoe_source_dir = os.path.abspath(directory)  # its tokenizer files go along on save
    model.eval()
    return model


__all__ = [
    "CheckpointError",
    "SaveError",
    "TOKENIZER_FILES",
    "SAFE_WEIGHTS_NAME",
    "SAFE_INDEX_NAME",
    "hf_layout",
    "to_hf_state_dict",
    "save_pretrained",
    "load_state_into",
    "load_pretrained",
    "checkpoint_dtype",
]
