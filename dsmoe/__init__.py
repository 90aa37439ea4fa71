"""dsmoe: fast fine-grained Mixture-of-Experts operators and the DeepSeekMoE model.

The names in ``__all__`` are imported on first use (PEP 562): ``import dsmoe`` itself does not
import torch, so the command line starts at once (``dsmoe --help``). ``dsmoe.ops`` and what uses
it (layers, model) load the compiled extension, which registers ``torch.ops.dsmoe``."""


# public name -> the submodule that defines it (None: the name is that submodule)
_SOURCES = {
    "build_info": "_ext", "cpu_kernels": "_ext", "ops": None,
    **dict.fromkeys(("BackendSettings", "backend_settings", "set_backend", "use_backend"), "backend"),
    **dict.fromkeys(("DeepSeekMoEConfig", "count_parameters", "deepseek_moe_2b", "deepseek_moe_16b",
                     "deepseek_moe_145b", "get_preset", "preset_names"), "config"),
    "KVCache": "generation",
    **dict.fromkeys(("DeepSeekMoEBlock", "DeepSeekMoELayer", "Expert", "ExpertGroup", "NoisyTopKRouter",
                     "RoutedExperts", "SharedExpert", "TopKRouter"), "layers"),
    "DeviceBalanceLoss": "losses", "LoadBalanceLoss": "losses",
    **dict.fromkeys(("CausalLMOutput", "DeepSeekMoEBackbone", "DeepSeekMoEForCausalLM", "DeepSeekMoEModel"), "model"),
    **dict.fromkeys(("ByteTokenizer", "HFTokenizer", "load_tokenizer"), "tokenizer"),
}


def __getattr__(name: str):
    import importlib

    if name == "__version__":
        value = __getattr__("build_info")()["version"]
    elif name in _SOURCES:
        module = importlib.import_module(f".{_SOURCES[name] or name}", __name__)
        value = module if _SOURCES[name] is None else getattr(module, name)
    else:
        raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


# With transformers installed, AutoConfig / AutoModelForCausalLM / AutoTokenizer know model type
# "deepseek" (dsmoe.hf.modeling) from the moment transformers is imported (an import hook: neither
# transformers nor torch is imported here).
from ._hf_registration import install as _install_hf_registration  # noqa: E402

_install_hf_registration()


__all__ = [
    "build_info",
    "cpu_kernels",
    "ops",
    "__version__",
    # how the ops run
    "BackendSettings",
    "backend_settings",
    "set_backend",
    "use_backend",
    # model package
    "DeepSeekMoEConfig",
    "count_parameters",
    "get_preset",
    "preset_names",
    "deepseek_moe_2b",
    "deepseek_moe_16b",
    "deepseek_moe_145b",
    "DeepSeekMoEForCausalLM",
    "DeepSeekMoEModel",
    "DeepSeekMoEBackbone",
    "CausalLMOutput",
    "KVCache",
    "DeepSeekMoEBlock",
    "DeepSeekMoELayer",
    "RoutedExperts",
    "Expert",
    "SharedExpert",
    "ExpertGroup",
    "TopKRouter",
    "NoisyTopKRouter",
    "LoadBalanceLoss",
    "DeviceBalanceLoss",
    # text
    "load_tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
]
