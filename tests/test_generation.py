"""Generation: the KV cache changes nothing, left-padded batches generate what each row would
alone, sampling options, eos handling."""
from __future__ import annotations

import pytest
import torch

from dsmoe import DeepSeekMoEForCausalLM, KVCache, get_preset
from dsmoe.generation import _filter_logits


def make_model(dtype=torch.float64, **changes):
    config = get_preset("tiny", num_hidden_layers=3, **changes)
    # larger weights than the default init, so that greedy picks are far from ties
    model = DeepSeekMoEForCausalLM(config.replace(initializer_range=0.2)).to(dtype).eval()
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_equals_uncached_greedy(dtype):
    model = make_model(dtype)
    ids = torch.randint(0, 64, (3, 6))
    cached = model.generate(ids, max_new_tokens=12)
    uncached = model.generate(ids, max_new_tokens=12, use_cache=False)
    assert cached.shape == (3, 18)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :6], ids)


def test_left_padded_batch_equals_one_by_one():
    model = make_model()
    pad = 0
    prompts = [torch.randint(1, 64, (n,)) for n in (7, 3, 5, 1)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    batched = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    batched_uncached = model.generate(ids, max_new_tokens=10, attention_mask=mask, use_cache=False)
    assert torch.equal(batched, batched_uncached)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10)
        assert torch.equal(batched[i, width - len(p) :], alone[0]), f"row {i}"


def test_static_and_dynamic_cache_agree_step_by_step():
    model = make_model()
    ids = torch.randint(0, 64, (2, 9))
    static = KVCache.static(model.config, 2, 12, dtype=torch.float64)
    dynamic = KVCache.dynamic(model.config)
    with torch.no_grad():
        a = model(ids[:, :5], past_key_values=static)
        b = model(ids[:, :5], past_key_values=dynamic, use_cache=True)
        torch.testing.assert_close(a["logits"], b["logits"])
        for t in range(5, 9):
            a = model(ids[:, t : t + 1], past_key_values=static)
            b = model(ids[:, t : t + 1], past_key_values=dynamic)
            torch.testing.assert_close(a["logits"], b["logits"])
        assert static.get_seq_length() == dynamic.get_seq_length() == 9
        full = model(ids)["logits"]
    torch.testing.assert_close(a["logits"][:, 0], full[:, -1])


def test_eos_stops_and_pads():
    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    free = model.generate(ids, max_new_tokens=8)
    eos = int(free[0, 5])  # row 0 emits this token at its second step
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=63)
    first = (out[0, 4:] == eos).nonzero()[0, 0].item()
    assert first <= 1
    assert (out[0, 4 + first + 1 :] == 63).all()
    # rows that have not finished continue exactly as without eos
    for row in range(2):
        hits = (free[row, 4:] == eos).nonzero()
        stop = hits[0, 0].item() if len(hits) else out.shape[1] - 4
        assert torch.equal(out[row, : 4 + stop + 1], free[row, : 4 + stop + 1])


def test_sampling_options():
    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    greedy = model.generate(ids, max_new_tokens=6)
    assert torch.equal(model.generate(ids, max_new_tokens=6, top_k=1), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0.0), greedy)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(ids, max_new_tokens=6, temperature=1.5, top_p=0.9, generator=g1)
    s2 = model.generate(ids, max_new_tokens=6, temperature=1.5, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2)
    draws = {tuple(model.generate(ids[:1], max_new_tokens=4, do_sample=True, temperature=5.0)[0].tolist()) for _ in range(8)}
    assert len(draws) > 1
    streamed = []
    model.generate(ids, max_new_tokens=3, streamer=streamed.append)
    assert len(streamed) == 3 and torch.equal(torch.stack(streamed, 1), greedy[:, 4:7])


def test_generate_keeps_training_mode_and_zero_tokens():
    model = make_model().train()
    ids = torch.randint(0, 64, (1, 3))
    assert torch.equal(model.generate(ids, max_new_tokens=0), ids)
    model.generate(ids, max_new_tokens=2)
    assert model.training


def test_filter_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    kept = torch.isfinite(_filter_logits(logits, top_k=2, top_p=None))
    assert kept.tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644
    kept = torch.isfinite(_filter_logits(logits, top_k=None, top_p=0.5))
    assert kept.tolist() == [[False, False, False, True]]
    kept = torch.isfinite(_filter_logits(logits, top_k=None, top_p=float(probs[3] + 0.01)))
    assert kept.tolist() == [[False, False, True, True]]


def test_generate_argument_errors():
    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, max_new_tokens=2, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be a finite"):
        model.generate(ids, max_new_tokens=2, temperature=float("nan"))
    with pytest.raises(ValueError, match="do not fit"):
        cache = KVCache.static(model.config, 2, 6, dtype=torch.float64)
        model(ids, past_key_values=cache)
        model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="batch size"):
        cache = KVCache.static(model.config, 1, 8, dtype=torch.float64)
        model(ids, past_key_values=cache)


def test_generate_stops_at_the_config_eos_by_default():
    model = make_model()
    ids = torch.randint(0, 64, (1, 4))
    free = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, 6])  # the third new token
    first = (free[0, 4:] == eos).nonzero()[0, 0].item()
    model.config.eos_token_id = eos
    stopped = model.generate(ids, max_new_tokens=10)
    assert torch.equal(stopped, free[:, : 4 + first + 1])
    assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=None), free)  # None: never stop
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(ids, max_new_tokens=2, eos_token_id="end")


def test_rows_finishing_at_different_steps_cut_where_the_last_finished():
    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    free = model.generate(ids, max_new_tokens=20, eos_token_id=None)
    eos = int(free[0, 5])
    hits = [(free[r, 4:] == eos).nonzero() for r in range(2)]
    if not len(hits[1]):
        pytest.skip("row 1 never emits row 0's second token")
    last = max(int(h[0, 0]) for h in hits)
    out = model.generate(ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=63)
    assert out.shape[1] == 4 + last + 1


def test_eos_check_does_not_sync_every_step(monkeypatch):
    """Each bool() of a tensor waits for the device; generate asks every EOS_CHECK_INTERVAL steps."""
    from dsmoe.generation import EOS_CHECK_INTERVAL

    model = make_model()
    ids = torch.randint(0, 64, (1, 4))
    never = 64  # no such token: no row ever finishes
    calls = []
    to_bool = torch.Tensor.__bool__

    def counted(self):
        calls.append(1)
        return to_bool(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted)
    model.generate(ids, max_new_tokens=32, eos_token_id=never)
    assert 0 < len(calls) <= 32 // EOS_CHECK_INTERVAL


def test_positions_past_the_model_limit_are_refused():
    model = make_model(max_position_embeddings=16)
    ids = torch.randint(0, 64, (1, 10))
    with pytest.raises(ValueError, match="max_position_embeddings is 16"):
        model.generate(ids, max_new_tokens=7)
    assert model.generate(ids, max_new_tokens=6).shape == (1, 16)
    with pytest.raises(ValueError, match="max_position_embeddings is 16"):
        model(torch.randint(0, 64, (1, 17)))
    cache = KVCache.dynamic(model.config)
    model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="needs 17 positions"):
        model(torch.randint(0, 64, (1, 7)), past_key_values=cache, use_cache=True)
    # linear scaling stretches the limit; dynamic (NTK) scaling exists to go past it
    linear = make_model(max_position_embeddings=16, rope_scaling={"type": "linear", "factor": 2.0})
    assert linear.generate(ids, max_new_tokens=22).shape == (1, 32)
    dynamic = make_model(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert dynamic.generate(ids, max_new_tokens=30).shape == (1, 40)


def test_right_padding_warns():
    model = make_model()
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # row 1 padded on the right
    with pytest.warns(UserWarning, match="right padding"):
        model.generate(ids, max_new_tokens=2, attention_mask=mask)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, max_new_tokens=2, attention_mask=mask)
