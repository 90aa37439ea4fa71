"""dsmoe's transformers integration (needs transformers): the DeepSeekMoE model's transformers face (modeling)."""
