"""dsmoe: fast fine-grained Mixture-of-Experts operators and the DeepSeekMoE model."""
from ._ext import build_info
from . import ops

__version__ = build_info()["version"]

__all__ = ["build_info", "ops", "__version__"]
