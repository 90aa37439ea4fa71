"""The package's own glue: the lazy top-level names of ``dsmoe``, the extension loader's torch
version check, the huge-page helpers, the transformers registration hook and the
``dsmoe.distributed`` alias. Expectations are written out here, not read from the code."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dsmoe
from dsmoe import _ext, _hf_registration

REPO = str(Path(__file__).resolve().parents[1])

# the public names and the submodule each lives in, written out (not read from dsmoe._SOURCES)
PUBLIC = {
    "build_info": "dsmoe._ext", "cpu_kernels": "dsmoe._ext",
    "BackendSettings": "dsmoe.backend", "backend_settings": "dsmoe.backend", "set_backend": "dsmoe.backend",
    "use_backend": "dsmoe.backend",
    "DeepSeekMoEConfig": "dsmoe.config", "count_parameters": "dsmoe.config", "get_preset": "dsmoe.config",
    "preset_names": "dsmoe.config", "deepseek_moe_2b": "dsmoe.config", "deepseek_moe_16b": "dsmoe.config",
    "deepseek_moe_145b": "dsmoe.config",
    "DeepSeekMoEForCausalLM": "dsmoe.model", "DeepSeekMoEModel": "dsmoe.model", "DeepSeekMoEBackbone": "dsmoe.model",
    "CausalLMOutput": "dsmoe.model", "KVCache": "dsmoe.generation",
    "DeepSeekMoEBlock": "dsmoe.layers", "DeepSeekMoELayer": "dsmoe.layers", "RoutedExperts": "dsmoe.layers",
    "Expert": "dsmoe.layers", "SharedExpert": "dsmoe.layers", "ExpertGroup": "dsmoe.layers",
    "TopKRouter": "dsmoe.layers", "NoisyTopKRouter": "dsmoe.layers",
    "LoadBalanceLoss": "dsmoe.losses", "DeviceBalanceLoss": "dsmoe.losses",
    "load_tokenizer": "dsmoe.tokenizer", "ByteTokenizer": "dsmoe.tokenizer", "HFTokenizer": "dsmoe.tokenizer",
}


@pytest.fixture
def fresh_dsmoe_names(monkeypatch):
    """dsmoe's module dict with the lazily cached public names removed (restored afterwards), so
    that each access goes through dsmoe.__getattr__ again."""
    for name in [*PUBLIC, "ops", "__version__"]:
        if name in vars(dsmoe):
            monkeypatch.delitem(vars(dsmoe), name)
    return dsmoe


# ------------------------------------------------------------------ dsmoe's lazy names


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_is_its_submodules_object(fresh_dsmoe_names, name):
    value = getattr(fresh_dsmoe_names, name)
    assert value is getattr(importlib.import_module(PUBLIC[name]), name)
    assert vars(fresh_dsmoe_names)[name] is value  # cached: the next access skips __getattr__


def test_ops_is_the_submodule_and_version_the_builds(fresh_dsmoe_names):
    import dsmoe.ops

    assert fresh_dsmoe_names.ops is dsmoe.ops
    version = fresh_dsmoe_names.__version__
    assert isinstance(version, str) and version == dsmoe._ext._C.build_info()["version"]
    assert vars(fresh_dsmoe_names)["__version__"] == version


def test_all_lists_exactly_the_public_names():
    assert sorted(dsmoe.__all__) == sorted([*PUBLIC, "ops", "__version__"])
    assert len(dsmoe.__all__) == len(set(dsmoe.__all__))


def test_unknown_name_is_an_attribute_error(fresh_dsmoe_names):
    with pytest.raises(AttributeError) as err:
        fresh_dsmoe_names.DeepSeekMoE  # noqa: B018 (a near miss of a real name)
    assert str(err.value) == "module 'dsmoe' has no attribute 'DeepSeekMoE'"
    assert not hasattr(fresh_dsmoe_names, "no_such_name")
    assert "DeepSeekMoE" not in vars(fresh_dsmoe_names)


def test_dir_lists_public_and_loaded_names_sorted(fresh_dsmoe_names):
    listed = dir(fresh_dsmoe_names)
    assert listed == sorted(listed) and len(listed) == len(set(listed))
    # every public name, also those not loaded yet, and what the module already holds
    assert set(PUBLIC) | {"ops", "__version__", "__getattr__", "__all__"} <= set(listed)
    assert "DeepSeekMoEConfig" not in vars(fresh_dsmoe_names)


def test_import_dsmoe_imports_neither_torch_nor_transformers():
    code = ("import sys, dsmoe\n"
            "print(sorted(m for m in ('torch', 'transformers', 'dsmoe._ext', 'dsmoe.ops') if m in sys.modules))\n"
            "print(dsmoe.get_preset('tiny').n_routed_experts > 0, 'torch' in sys.modules)\n"
            "dsmoe.ops\n"
            "print('torch' in sys.modules, 'dsmoe._ext' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["[]", "True False", "True True"]


# ------------------------------------------------------------------ the extension loader


def _meta(tmp_path, monkeypatch, content):
    path = tmp_path / "_build_meta.json"
    if content is not None:
        path.write_text(json.dumps(content))
    monkeypatch.setattr(_ext, "_META", path)


def test_loader_refuses_a_build_for_another_torch(tmp_path, monkeypatch):
    _meta(tmp_path, monkeypatch, {"torch_version": "2.0.1", "version": "x"})
    with pytest.raises(ImportError) as err:
        _ext._load()
    assert str(err.value) == (f"dsmoe was built against torch 2.0.1 but torch {torch.__version__} is "
                              "installed; rebuild it: pip install --no-build-isolation -e .")


@pytest.mark.parametrize("content", [None, {}, {"torch_version": ""}, {"torch_version": torch.__version__}],
                         ids=["no-meta", "no-version", "empty-version", "same-version"])
def test_loader_loads_the_extension(tmp_path, monkeypatch, content):
    _meta(tmp_path, monkeypatch, content)
    assert _ext._load() is importlib.import_module("dsmoe._C")


def test_the_meta_file_is_read_beside_the_package():
    assert _ext._META == Path(dsmoe.__file__).parent / "_build_meta.json"


def test_build_info_and_cpu_kernels_are_plain_dicts():
    info, kernels = _ext.build_info(), _ext.cpu_kernels()
    assert type(info) is dict and type(kernels) is dict
    assert {"version", "torch_version"} <= info.keys()
    assert kernels.keys() == {"vec_isa", "bf16_gemm", "fp32_gemm", "cpu_avx512_bf16"}
    info["version"] = "changed"  # a copy: the next call is unchanged
    assert _ext.build_info()["version"] != "changed"


def test_huge_pages_enabled_follows_the_setting():
    for on in (True, False):
        with dsmoe.use_backend(huge_pages=on):
            assert _ext.huge_pages_enabled() is on


def test_empty_huge_pages_shape_dtype_and_advice():
    t = _ext.empty_huge_pages((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
    assert _ext.advise_huge_pages(t) is False  # no whole 2 MiB page inside: nothing to advise
    big = _ext.empty_huge_pages((1 << 20,), torch.float32)  # 4 MiB, 2 MiB-aligned: whole huge pages
    big.fill_(1.5)
    thp = Path("/sys/kernel/mm/transparent_hugepage").is_dir()  # madvise(MADV_HUGEPAGE) is refused without THP
    assert _ext.advise_huge_pages(big) is thp
    assert _ext.advise_huge_pages(big, collapse=True) in (True, False)  # MADV_COLLAPSE: Linux >= 6.1 only
    assert bool(torch.all(big == 1.5))  # the advice leaves the contents alone


def test_huge_page_helpers_pass_their_arguments(monkeypatch):
    calls = []

    class StandIn:
        def empty_huge_pages_like(self, prototype):
            calls.append(("empty", prototype.device.type, tuple(prototype.shape), prototype.dtype))
            return "tensor"

        def advise_huge_pages(self, t, collapse):
            calls.append(("advise", t, collapse))
            return 1

    monkeypatch.setattr(_ext, "_C", StandIn())
    assert _ext.empty_huge_pages((2, 3), torch.float16) == "tensor"
    assert _ext.advise_huge_pages("t") is True and _ext.advise_huge_pages("u", collapse=True) is True
    # the shape's prototype is a meta tensor (no memory); the advice is only a hint unless asked to collapse
    assert calls == [("empty", "meta", (2, 3), torch.float16), ("advise", "t", False), ("advise", "u", True)]


# ------------------------------------------------------------------ the transformers hook


@pytest.fixture
def clean_meta_path(monkeypatch):
    """sys.meta_path without dsmoe's finder (restored afterwards)."""
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, _hf_registration._Finder)])
    return sys.meta_path


def test_install_registers_at_once_when_transformers_is_imported(monkeypatch, clean_meta_path):
    calls = []
    monkeypatch.setattr(_hf_registration, "_register", lambda: calls.append("now"))
    monkeypatch.setitem(sys.modules, "transformers", object())
    _hf_registration.install()
    assert calls == ["now"] and clean_meta_path == sys.meta_path
    assert not any(isinstance(f, _hf_registration._Finder) for f in sys.meta_path)


def test_install_does_nothing_when_transformers_is_blocked(monkeypatch, clean_meta_path):
    calls = []
    monkeypatch.setattr(_hf_registration, "_register", lambda: calls.append("now"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` would fail
    _hf_registration.install()
    assert calls == [] and not any(isinstance(f, _hf_registration._Finder) for f in sys.meta_path)


def test_install_does_nothing_when_transformers_is_absent(monkeypatch, clean_meta_path):
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    looked_up = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: looked_up.append(name))
    before = list(sys.meta_path)
    _hf_registration.install()
    assert looked_up == ["transformers"] and sys.meta_path == before


def test_install_puts_one_finder_first(monkeypatch, clean_meta_path):
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    before = list(sys.meta_path)
    _hf_registration.install()
    _hf_registration.install()
    assert isinstance(sys.meta_path[0], _hf_registration._Finder) and sys.meta_path[1:] == before


def test_finder_wraps_only_transformers_and_only_once(monkeypatch, clean_meta_path):
    finder = _hf_registration._Finder()
    sys.meta_path.insert(0, finder)
    assert finder.find_spec("torch") is None and finder in sys.meta_path
    spec = finder.find_spec("transformers")
    assert spec is not None and spec.name == "transformers" and isinstance(spec.loader, _hf_registration._Loader)
    assert finder not in sys.meta_path  # one shot
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    sys.meta_path.insert(0, finder)
    assert finder.find_spec("transformers") is None and finder not in sys.meta_path


def test_loader_runs_the_module_then_registers(monkeypatch):
    events = []

    class Inner:
        def create_module(self, spec):
            events.append(("create", spec))
            return "module"

        def exec_module(self, module):
            events.append(("exec", module))

    monkeypatch.setattr(_hf_registration, "_register", lambda: events.append(("register",)))
    loader = _hf_registration._Loader(Inner())
    assert loader.create_module("spec") == "module"
    loader.exec_module("m")
    assert events == [("create", "spec"), ("exec", "m"), ("register",)]


def test_register_imports_the_model_module(monkeypatch):
    imported = []
    monkeypatch.setattr(importlib, "import_module", lambda name: imported.append(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _hf_registration._register()
    assert imported == ["dsmoe.hf.modeling"]


def test_register_failure_is_a_warning_not_an_error(monkeypatch):
    def broken(name):
        raise RuntimeError("transformers 9.9 moved PreTrainedModel")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.warns(UserWarning) as caught:
        _hf_registration._register()
    assert [str(w.message) for w in caught] == [
        "dsmoe: could not register the DeepSeekMoE classes with transformers: transformers 9.9 moved PreTrainedModel"]


def test_import_transformers_after_dsmoe_registers_once():
    pytest.importorskip("transformers")
    code = ("import sys, dsmoe\n"
            "from dsmoe._hf_registration import _Finder\n"
            "print(sum(isinstance(f, _Finder) for f in sys.meta_path), 'transformers' in sys.modules)\n"
            "import transformers\n"
            "print(sum(isinstance(f, _Finder) for f in sys.meta_path), 'dsmoe.hf.modeling' in sys.modules)\n"
            "from transformers import AutoConfig\n"
            "print(type(AutoConfig.for_model('deepseek')).__module__)\n")
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["1 False", "0 True", "dsmoe.hf.modeling"]


# ------------------------------------------------------------------ dsmoe.distributed's alias


def test_distributed_training_alias_and_unknown_names():
    import dsmoe.distributed as dist
    from dsmoe.cli.distributed.training import DistributedTraining

    assert dist.DistributedTraining is DistributedTraining
    with pytest.raises(AttributeError) as err:
        dist.DistributedTrainer  # noqa: B018
    assert str(err.value) == "module 'dsmoe.distributed' has no attribute 'DistributedTrainer'"
    for name in dist.__all__:
        assert getattr(dist, name) is not None
