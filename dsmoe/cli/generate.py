"""`dsmoe generate`: loads a checkpoint of the Hugging Face deepseek-moe layout (one `dsmoe
train` wrote, or a released one with its tokenizer.json) and streams a continuation. With
``--random PRESET`` it measures generation speed instead, on a preset with random weights."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

import torch

from .common import CLIError, check_number, check_seed, check_text, pick_device
from .data import load_tokenizer
from .models import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    src.add_argument("--random", metavar="PRESET", default=None,
                     help="measure speed on a preset (2b, 16b, tiny, ...) with RANDOM weights and random prompt "
                          "tokens: time to first token, decode tokens/s, KV cache per token (greedy, no text)")
    p.add_argument("--batch", type=int, default=1, help="with --random: sequences generated together (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="with --random: prompt length (default 32)")
    p.add_argument("--prompt", default=None, help="text to continue (default: the tokenizer's start token, or a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens, 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of this probability")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: the GPU if there is one)")
    p.add_argument("--bf16", action="store_true", help="run the model in bfloat16")
    p.add_argument("--impl", choices=("dsmoe", "reference"), default="dsmoe", help="MoE layer execution")
    p.add_argument("--no-stop", action="store_true", help="keep going past the end-of-text token")


def stream(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
           top_p: float | None, seed: int, out: TextIO | None = None, stop_at_eos: bool = True) -> list[int]:
    """Generates with the model's KV-cached generate(), writing text to ``out`` as tokens come;
    returns the new token ids."""
    out = out if out is not None else sys.stdout
    ids = tokenizer.encode(prompt)
    # byte-level models saw <|eos|> before each document; other tokenizers start with <|bos|>
    start = tokenizer.eos_id if tokenizer.byte_level else (tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id)
    if not tokenizer.byte_level and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    if not ids:
        if start is None:
            raise CLIError("--prompt is empty and the tokenizer has no start token; give a prompt")
        ids = [start]
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise CLIError(f"the prompt has token id {max(ids)}, beyond the model's vocab_size {vocab}")
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise CLIError(
            f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"max_position_embeddings {limit}"
        )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    decoder = tokenizer.stream_decoder(prefix=ids)
    new_ids: list[int] = []
    out.write(prompt)
    out.flush()

    def on_token(tokens: torch.Tensor) -> None:
        t = int(tokens[0])
        new_ids.append(t)
        text = decoder.push(t)
        if text:
            out.write(text)
            out.flush()

    eos = model.config.eos_token_id if stop_at_eos else None
    if eos is None and stop_at_eos:
        eos = tokenizer.eos_id
    kwargs = dict(temperature=temperature, top_k=top_k or None, top_p=top_p)
    if temperature == 0:
        kwargs = dict(do_sample=False)
    model.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos, generator=g, streamer=on_token, **kwargs)
    tail = decoder.flush()
    out.write(tail + "\n")
    out.flush()
    return new_ids


def random_model(preset: str, dtype: torch.dtype | None, impl: str, seed: int):
    """The preset with random weights (normal(0, initializer_range), as a fresh model), built
    directly in ``dtype``, in eval mode."""
    from dsmoe import get_preset
    from dsmoe.model import DeepSeekMoEForCausalLM

    try:
        config = get_preset(preset)
    except ValueError as e:
        raise CLIError(f"--random: {e}") from None
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)  # no fp32 copy of a bf16 model
    try:
        model = DeepSeekMoEForCausalLM(config, moe_impl=impl)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def measure(model, batch: int, prompt_tokens: int, new_tokens: int, seed: int) -> dict:
    """Greedy generation of ``new_tokens`` after random prompts [batch, prompt_tokens]: time to
    first token (prefill + first pick), decode tokens/s (all rows, after the first token), KV
    cache bytes per token."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_tokens), generator=g)
    stamps: list[float] = []
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                   streamer=lambda _: stamps.append(time.perf_counter()))
    elem = next(model.parameters()).element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    out = dict(batch=batch, prompt_tokens=prompt_tokens, new_tokens=len(stamps),
               time_to_first_token_s=stamps[0] - t0 if stamps else None,
               kv_cache_bytes_per_token=kv_per_token, threads=torch.get_num_threads(),
               dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    if len(stamps) > 1:
        out["decode_tokens_per_s"] = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
        out["decode_step_ms"] = 1e3 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return out


def run(ns: argparse.Namespace) -> int:
    from dsmoe import decode

    if ns.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {ns.max_new_tokens}")
    if ns.random is not None:
        if ns.batch < 1:
            raise CLIError(f"--batch must be >= 1, got {ns.batch}")
        if ns.prompt_tokens < 1:
            raise CLIError(f"--prompt-tokens must be >= 1, got {ns.prompt_tokens}")
        check_seed("--seed", ns.seed)
        device = pick_device(ns.device)
        if device.type != "cpu":
            raise CLIError("--random measures on the CPU only; use --device cpu")
        model = random_model(ns.random, torch.bfloat16 if ns.bf16 else None, ns.impl, ns.seed)
        t0 = time.perf_counter()
        packed = decode.prepack(model) if decode.enabled() and ns.impl == "dsmoe" else 0
        prepack_s = time.perf_counter() - t0
        stats = measure(model, ns.batch, ns.prompt_tokens, ns.max_new_tokens, ns.seed)
        stats.update(preset=ns.random, impl=ns.impl, weights="random", decode_path=bool(packed),
                     prepack_s=prepack_s)
        print(json.dumps(stats))
        return 0
    check_number("--temperature", ns.temperature)
    if ns.top_k is not None and ns.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {ns.top_k}")
    if ns.top_p is not None:
        check_number("--top-p", ns.top_p, low=0.0, low_open=True, high=1.0)
    check_seed("--seed", ns.seed)
    check_text("--prompt", ns.prompt)
    device = pick_device(ns.device)
    model = load_model(ns.model, device, dtype=torch.bfloat16 if ns.bf16 else None, impl=ns.impl)
    if decode.enabled() and ns.impl == "dsmoe":
        decode.prepack(model)  # the packed decode weights now, not in the first token's time
    cfg = model.config
    tokenizer = load_tokenizer(ns.model, cfg.vocab_size, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
    prompt = ns.prompt
    if prompt is None:
        prompt = "" if (tokenizer.bos_id is not None or tokenizer.eos_id is not None) else "\n"
    stream(model, tokenizer, prompt, ns.max_new_tokens, ns.temperature, ns.top_k, ns.top_p, ns.seed,
           stop_at_eos=not ns.no_stop)
    return 0
