"""Shared fixtures and helpers of the dsmoe tests.

``device`` runs a test on every device that has dsmoe kernels: "cpu" always, "cuda" when a GPU
is visible (set DSMOE_TEST_DEVICES=cpu,cuda to choose explicitly). A GPU with a dsmoe build that
has no CUDA kernels is an error, not a silent skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dsmoe


def _devices():
    if os.environ.get("DSMOE_TEST_DEVICES"):
        names = [d.strip() for d in os.environ["DSMOE_TEST_DEVICES"].split(",") if d.strip()]
    else:
        names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d for d in names]


DEVICES = _devices()
# Devices on which the argument checks run: the real ones and 'meta' (the fake kernels).
CHECK_DEVICES = DEVICES + ["meta"]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        assert dsmoe.build_info()["cuda"], (
            "a GPU is visible but dsmoe was built without CUDA kernels: rebuild with CUDA, or "
            "run the tests with DSMOE_TEST_DEVICES=cpu"
        )
    return request.param


@pytest.fixture(params=CHECK_DEVICES)
def check_device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# (rtol, atol) for results rounded once to the dtype from exact math, compared with a reference
# that is rounded the same way (sums may run in another order).
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of toy-sized CLI runs: OpenMP stalls on a shared 2-core
    machine otherwise. Modules opt in with pytestmark = pytest.mark.usefixtures(...)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small, learnable text file (a repeated pattern with some variation) for CLI runs."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n" for i in range(400)))
    return path


def save_word_level_tokenizer(directory, words, special_tokens=()):
    """A word-level tokenizer.json (``<unk> <s> </s>`` then ``words``, split on whitespace) in
    ``directory``: a non-byte tokenizer like released checkpoints have."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<unk>", "<s>", "</s>"] + list(words)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special_tokens:
        tok.add_special_tokens(list(special_tokens))
    tok.save(str(Path(directory) / "tokenizer.json"))
    return vocab


def assert_close(actual, expected, dtype=None, scale: float = 1.0, msg: str = ""):
    """assert_close with the tolerance of ``dtype`` (default: ``expected``'s), atol times
    ``scale`` (the magnitude of the values compared)."""
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol * scale, check_dtype=True, msg=msg or None
    )


def routing(T: int, k: int, E: int, device="cpu", mode: str = "uniform", generator=None):
    """Expert ids [T, k] int32, distinct within a row, drawn as the top-k of random scores.

    mode "uniform": every expert equally likely; "skewed": expert 0 in almost every row and a few
    experts take most tokens; "sparse": only max(k, E // 3) experts ever chosen, the others
    receive no token.
    """
    scores = torch.randn(T, E, generator=generator)
    if mode == "skewed":
        scores += torch.linspace(4.0, 0.0, E)
    elif mode == "sparse":
        used = max(k, E // 3)
        unused = torch.randperm(E, generator=generator)[used:]
        scores[:, unused] -= 100.0
    elif mode != "uniform":
        raise ValueError(f"unknown routing mode {mode!r}")
    return scores.topk(k, dim=1).indices.to(torch.int32).to(device)


def offsets_from_counts(counts, device="cpu"):
    """expert_offsets [E+1] int32 from a list of group sizes."""
    off = [0]
    for c in counts:
        off.append(off[-1] + c)
    return torch.tensor(off, dtype=torch.int32, device=device)


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    if t.numel() > 1 and t.shape[-1] > 0:
        assert not view.is_contiguous()
    return view.requires_grad_(t.requires_grad)


def redispatch(op, device: str, *args):
    """Calls ``op`` with the kernel of ``device`` even when some argument lives elsewhere ('meta'),
    so the device check of that kernel (C++ for cpu/cuda) is what runs."""
    key = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}[device]
    return op.redispatch(torch._C.DispatchKeySet(key), *args)


def pytest_terminal_summary(terminalreporter):
    """How much CUDA kernel code the SIMT emulator executed in this run (CI has no GPU)."""
    if not hasattr(torch.ops, "dsmoe_simt") or not hasattr(torch.ops.dsmoe_simt, "simt_stats"):
        return
    try:
        launches, blocks = torch.ops.dsmoe_simt.simt_stats()
    except (AttributeError, RuntimeError):
        return
    stats = terminalreporter.stats
    cases = sum(1 for key in ("passed", "failed") for r in stats.get(key, [])
                if r.when == "call" and "simt" in r.keywords)
    terminalreporter.write_line(
        f"SIMT emulator: {cases} CUDA-kernel test cases executed the .cu sources on the CPU "
        f"({launches} kernel launches, {blocks} blocks)")
