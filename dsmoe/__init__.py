"""dsmoe: fast fine-grained Mixture-of-Experts operators and the DeepSeekMoE model."""
from ._ext import build_info, cpu_kernels
from . import ops
from .config import (
    DeepSeekMoEConfig,
    count_parameters,
    deepseek_moe_2b,
    deepseek_moe_16b,
    deepseek_moe_145b,
    get_preset,
    preset_names,
)
from .generation import KVCache
from .layers import (
    DeepSeekMoEBlock,
    DeepSeekMoELayer,
    Expert,
    ExpertGroup,
    NoisyTopKRouter,
    RoutedExperts,
    SharedExpert,
    TopKRouter,
)
from .losses import DeviceBalanceLoss, LoadBalanceLoss
from .model import CausalLMOutput, DeepSeekMoEBackbone, DeepSeekMoEForCausalLM, DeepSeekMoEModel
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from ._hf_registration import install as _install_hf_registration

# With transformers installed, AutoConfig / AutoModelForCausalLM / AutoTokenizer know model type
# "deepseek" (dsmoe.hf.modeling) from the moment transformers is imported.
_install_hf_registration()

__version__ = build_info()["version"]

__all__ = [
    "build_info",
    "cpu_kernels",
    "ops",
    "__version__",
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
    "load_tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
]
