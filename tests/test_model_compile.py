"""torch.compile(model, fullgraph=True): a training step and cached decode steps compile with no
graph break (fullgraph raises on one), do not recompile from step to step, and equal eager."""
from __future__ import annotations

import copy

import pytest
import torch

from dsmoe import DeepSeekMoEForCausalLM, KVCache, get_preset


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model():
    # one dense and one MoE layer, GQA, shared + routed experts: every code path, few kernels
    return DeepSeekMoEForCausalLM(get_preset("tiny"))


def test_compiled_training_step_matches_eager():
    model = tiny_model().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    out = compiled(ids, labels=labels)
    out.loss.backward()
    ref = eager(ids, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # a second step with new data and updated weights reuses the graph
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(torch.randint(0, 64, (2, 12)), labels=labels).loss.backward()


def test_compiled_decode_step_matches_eager():
    model = tiny_model().eval()
    config = model.config
    B, prompt, total = 2, 6, 10
    ids = torch.randint(0, 64, (B, total))
    mask = torch.ones(B, total, dtype=torch.long)
    mask[1, :2] = 0  # row 1 is left-padded
    caches = [KVCache.static(config, B, total) for _ in range(2)]
    compiled = torch.compile(model, fullgraph=True)

    def step(pos):
        kwargs = dict(attention_mask=mask, cache_position=torch.tensor([pos]))
        out = compiled(ids[:, pos : pos + 1], past_key_values=caches[0], **kwargs)
        ref = model(ids[:, pos : pos + 1], past_key_values=caches[1], **kwargs)
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        for cache in caches:  # eager prefill for both
            model(ids[:, :prompt], attention_mask=mask, past_key_values=cache, cache_position=torch.arange(prompt))
        step(prompt)  # compiles
        with torch._dynamo.config.patch(error_on_recompile=True):  # later steps reuse the graph
            for pos in range(prompt + 1, total):
                step(pos)
    for a, b in zip(caches[0].keys, caches[1].keys):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
