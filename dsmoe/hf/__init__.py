"""dsmoe as an experts backend of Hugging Face transformers' MoE models (transformers >= 5).

``import dsmoe.hf`` registers the ``"dsmoe"`` experts implementation::

    import dsmoe.hf
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="dsmoe")
    model.set_experts_implementation("dsmoe")  # or on a loaded model

See :mod:`dsmoe.hf.experts`. Needs transformers (``pip install dsmoe[hf]``); ``import dsmoe``
does not.
"""
from .experts import check_experts_module, dsmoe_experts_forward, register

register()

__all__ = ["check_experts_module", "dsmoe_experts_forward", "register"]
