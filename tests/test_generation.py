"""Generation: the KV cache changes nothing, left-padded batches generate what each row would
alone, sampling options, eos handling."""
from __future__ import annotations

import sys

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


# ---------------------------------------------------------------- found by mutation testing (docs/mutation_testing.md)
def test_kv_cache_arguments_are_checked_naming_each():
    assert KVCache(1).num_layers == 1 and KVCache(1).get_seq_length() == 0
    with pytest.raises(ValueError, match=r"^KVCache: num_layers must be >= 1, got 0$"):
        KVCache(0)
    sizes = dict(batch_size=1, num_kv_heads=2, head_dim=4)
    assert KVCache(2, 3, **sizes).keys[1].shape == (1, 2, 3, 4)
    for name in ("max_length", "batch_size", "num_kv_heads", "head_dim"):
        for bad in (0, -1) if name == "max_length" else (0, None):  # max_length None: a dynamic cache
            args = {"max_length": 3, **sizes, name: bad}
            with pytest.raises(ValueError, match=rf"^KVCache: a static cache needs {name} >= 1, got {bad!r}$"):
                KVCache(2, args.pop("max_length"), **args)


def test_static_kv_cache_buffers_take_the_device_and_dtype_asked_for():
    config = make_model().config
    cache = KVCache.static(config, 2, 5, dtype=torch.float16, device="meta")
    for buffers in (cache.keys, cache.values):
        assert len(buffers) == config.num_hidden_layers
        assert all(b.device.type == "meta" and b.dtype == torch.float16 and b.shape == (2, 2, 5, 8) for b in buffers)
    # fp64 keys written into an fp32 cache are stored rounded to fp32
    cache = KVCache(1, 4, batch_size=1, num_kv_heads=1, head_dim=2)
    key = torch.tensor([[[[1 / 3, 2 / 3]]]], dtype=torch.float64)
    keys, values = cache.update(0, key, -key, torch.tensor([2]))
    assert keys.dtype == values.dtype == torch.float32
    assert torch.equal(keys[0, 0, 2], key[0, 0, 0].float()) and torch.equal(values[0, 0, 2], -key[0, 0, 0].float())
    assert not keys[0, 0, [0, 1, 3]].any()


def test_kv_cache_batch_mismatch_names_both_sizes():
    cache = KVCache(1, 4, batch_size=3, num_kv_heads=2, head_dim=2)
    with pytest.raises(ValueError, match=r"^KVCache: batch size 1 does not match the cache's 3$"):
        cache.update(0, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2), torch.tensor([0]))


def test_dynamic_kv_cache_length_is_the_first_layers():
    # during a forward pass, layer 0 holds the new tokens before the later layers do
    cache = KVCache(2)
    cache.update(0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), torch.arange(5))
    assert cache.get_seq_length() == 5 and cache.kv_length(2) == 7


def test_filter_logits_works_on_any_leading_dims_and_its_boundaries():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10)
    for top_k, top_p in ((3, None), (None, 0.6), (4, 0.5)):
        batched = _filter_logits(logits, top_k, top_p)
        for i in range(2):
            for j in range(3):
                row = _filter_logits(logits[i, j][None], top_k, top_p)[0]
                assert torch.equal(batched[i, j], row), (top_k, top_p, i, j)
                kept = torch.isfinite(row)
                # the kept tokens are the most likely ones, and -inf marks the others
                assert bool((logits[i, j][kept].min() > logits[i, j][~kept]).all())
                assert bool((row[~kept] == float("-inf")).all())
                assert torch.equal(row[kept], logits[i, j][kept])
    # top_k 0 or >= the vocabulary and top_p 1: nothing is removed, even tokens of tiny probability
    # (the mass before them rounds to 1 in fp32)
    tiny = torch.tensor([[0.0, -30.0, -30.0, -40.0]])
    for top_k, top_p in ((0, None), (4, None), (9, None), (None, 1.0)):
        assert torch.equal(_filter_logits(tiny, top_k, top_p), tiny)
    # top_p is reached exactly by the first token: the smallest set reaching it is that token
    halves = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(_filter_logits(halves, None, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(_filter_logits(halves, None, 0.75)).tolist() == [[True, True, False]]


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_generate_defaults_and_what_the_model_is_called_with():
    from dsmoe.generation import generate

    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    calls, head_rows = [], []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[1]), with_kwargs=True)
    model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[1]))
    assert generate(model, ids, eos_token_id=None).shape == (2, 24)  # 20 new tokens by default
    # cached by default: the prompt once, then one token a step; logits of the last position only
    assert calls == [4] + [1] * 19 and head_rows == [1] * 20
    calls.clear(), head_rows.clear()
    assert generate(model, ids, 3, use_cache=False).shape == (2, 7)
    assert calls == [4, 5, 6] and head_rows == [1, 1, 1]
    calls.clear()
    one = generate(model, ids, 1)
    assert calls == [4] and torch.equal(one, model.generate(ids, max_new_tokens=3)[:, :5])


def test_generate_argument_messages_and_boundaries():
    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match=r"^generate: input_ids must hold at least one token per row$"):
        model.generate(ids[:, :0], max_new_tokens=2)
    for bad in (True, 2.5, -1):
        with pytest.raises(ValueError, match=rf"^generate: max_new_tokens must be an integer >= 0, got {bad!r}$"):
            model.generate(ids, max_new_tokens=bad)
    with pytest.raises(ValueError, match=r"^generate: top_p must be in \(0, 1\], got 0.0$"):
        model.generate(ids, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match=r"^generate: top_k must be >= 0, got -1$"):
        model.generate(ids, max_new_tokens=2, top_k=-1)
    message = r"^generate \(a prompt of 4 tokens \+ max_new_tokens=200\) needs 204 positions but the model's max_position_embeddings is 128;"
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=200)
    # the boundaries themselves are accepted: top_p 1 and top_k 0 filter nothing
    greedy = model.generate(ids, max_new_tokens=4)
    for options in (dict(top_p=1.0), dict(top_k=0)):
        a = model.generate(ids, max_new_tokens=4, temperature=0.01, generator=_seeded(1), **options)
        assert torch.equal(a, greedy), options


def test_generate_samples_when_any_sampling_option_is_given():
    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    greedy = model.generate(ids, max_new_tokens=6)

    def draws(**options):
        return {tuple(model.generate(ids, max_new_tokens=6, generator=_seeded(s), **options).flatten().tolist())
                for s in range(6)}

    assert draws(do_sample=False, temperature=1.0) == {tuple(greedy.flatten().tolist())}
    for options in (dict(do_sample=True), dict(temperature=1.0), dict(top_k=64), dict(top_p=1.0)):
        assert len(draws(**options)) > 1, options
    # do_sample alone samples at temperature 1, the same draws as asking for temperature 1
    for s in range(3):
        a = model.generate(ids, max_new_tokens=6, do_sample=True, generator=_seeded(s))
        b = model.generate(ids, max_new_tokens=6, temperature=1.0, top_k=0, generator=_seeded(s))
        assert torch.equal(a, b)
    # logits are divided by the temperature: a cold sample is the greedy one, a hot one is not
    assert all(torch.equal(model.generate(ids, max_new_tokens=6, temperature=0.01, generator=_seeded(s)), greedy)
               for s in range(3))
    # a tiny top_p keeps only the most likely token, whatever the temperature
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=100.0, top_p=1e-9, generator=_seeded(0)), greedy)


def test_generate_stops_at_any_of_several_eos_ids_and_pads_with_the_first():
    model = make_model()
    ids = torch.randint(0, 64, (1, 4))
    free = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, 5])  # the second new token
    first = (free[0, 4:] == eos).nonzero()[0, 0].item()
    out = model.generate(ids, max_new_tokens=10, eos_token_id=[63 if eos != 63 else 62, eos])
    assert torch.equal(out, free[:, : 4 + first + 1])
    # two rows: the one that finished first is padded with the first eos id, the other runs on
    # to its own eos (or the end)
    torch.manual_seed(3)
    while True:
        two = torch.cat([ids, torch.randint(0, 64, (1, 4))])
        free = model.generate(two, max_new_tokens=10, eos_token_id=None)
        stop = int(free[0, 4])
        if int(free[1, 4]) != stop:
            break
    other = next(t for t in range(64) if t != stop and t not in free[1, 4:].tolist())
    out = model.generate(two, max_new_tokens=10, eos_token_id=(other, stop))
    hits = (free[1, 4:] == stop).nonzero()
    n_new = int(hits[0, 0]) + 1 if len(hits) else 10
    assert n_new > 1 and out.shape == (2, 4 + n_new)
    assert torch.equal(out[1], free[1, : 4 + n_new])
    assert torch.equal(out[0, :5], free[0, :5]) and bool((out[0, 5:] == other).all())


def test_generate_checks_for_eos_every_interval_steps():
    # every row is done after the first step: the check at step EOS_CHECK_INTERVAL - 1 stops it,
    # so the model runs the prefill and EOS_CHECK_INTERVAL - 1 decode steps
    from dsmoe.generation import EOS_CHECK_INTERVAL

    model = make_model()
    ids = torch.randint(0, 64, (2, 4))
    free = model.generate(ids, max_new_tokens=1, eos_token_id=None)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    for use_cache in (True, False):
        calls.clear()
        out = model.generate(ids, max_new_tokens=3 * EOS_CHECK_INTERVAL, eos_token_id=free[:, 4].tolist(), use_cache=use_cache)
        assert torch.equal(out, free) and len(calls) == EOS_CHECK_INTERVAL, use_cache


def test_generate_runs_on_the_meta_device():
    # shapes only (what a memory planner asks): no values are looked at, no early stop
    model = make_model().to("meta")
    ids = torch.zeros(2, 4, dtype=torch.long, device="meta")
    for eos in (None, 5):
        out = model.generate(ids, max_new_tokens=3, eos_token_id=eos)
        assert out.device.type == "meta" and out.shape == (2, 7)


def test_right_padding_warning_its_rows_and_its_text():
    import warnings

    model = make_model()
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, -1] = 0  # only the last column of row 1 is padding
    with pytest.warns(UserWarning) as record:
        model.generate(ids, max_new_tokens=1, attention_mask=mask)
    assert str(record[0].message) == (
        "generate: right padding detected (a row's last column is padding); new tokens follow the padding "
        "and differ from that row alone. Pad on the left for batched generation."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a row whose only token is the last one is left padding; a single row has no batch to pad
        mask = torch.ones_like(ids)
        mask[1, :-1] = 0
        model.generate(ids, max_new_tokens=1, attention_mask=mask)
        model.generate(ids[:1], max_new_tokens=1, attention_mask=torch.tensor([[1, 1, 1, 1, 0]]))


def test_right_padding_warning_points_at_the_callers_line():
    # (tools/mutation_python.sh deselects this one: mutmut's trampolines add frames of its own package)
    from dsmoe.generation import generate

    model = make_model()
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    with pytest.warns(UserWarning, match="right padding") as record:
        line = sys._getframe().f_lineno + 1
        model.generate(ids, max_new_tokens=1, attention_mask=mask)
    assert (record[0].filename, record[0].lineno) == (__file__, line)
    with pytest.warns(UserWarning, match="right padding") as record:
        line = sys._getframe().f_lineno + 1
        generate(model, ids, 1, attention_mask=mask)  # called directly: one frame less
    assert (record[0].filename, record[0].lineno) == (__file__, line)
