"""transformers MoE models with "eager", "grouped_mm" (transformers' default) and "dsmoe" experts.

Random-weight models at the real layer shapes of released MoE checkpoints (vocabulary cut to
--vocab so that the layers, not the LM head, are measured), --layers decoder layers, one process,
the same weights for every implementation (one model, switched with set_experts_implementation),
interleaved rounds, medians. Per model and dtype:

- prefill: forward of --batch x --seq tokens in eval mode, no autograd; tokens/s
- train: forward + backward of the LM loss, full fine-tuning (optimizer step not included); tokens/s
- lora: the same with PEFT LoRA (r=16) on q_proj/o_proj, everything else frozen; tokens/s
- experts: the experts modules alone, forward + backward (weights trainable) on the inputs the
  model's routers gave in a training forward; ms, and their share of the train step

    PYTHONPATH=. python benchmarks/bench_hf_moe.py --models olmoe qwen3 --dtypes bf16 fp32

GPT-OSS-20B is not among the models: dsmoe refuses it (expert biases, clamped SwiGLU).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsmoe.hf  # noqa: F401  (registers "dsmoe")

IMPLS = ("eager", "grouped_mm", "dsmoe")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The layer shapes of the released checkpoints (config.json of each).
MODELS = {
    "olmoe": (
        "OLMoE-1B-7B",
        "olmoe",
        dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
             num_attention_heads=16, num_key_value_heads=16, norm_topk_prob=False),
    ),
    "qwen3": (
        "Qwen3-30B-A3B",
        "qwen3_moe",
        dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
             num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "dsv2lite": (
        "DeepSeek-V2-Lite",
        "deepseek_v2",
        dict(hidden_size=2048, moe_intermediate_size=1408, intermediate_size=10944, n_routed_experts=64,
             n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=0, num_attention_heads=16,
             num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_group=1, topk_group=1, topk_method="greedy",
             norm_topk_prob=False, routed_scaling_factor=1.0),
    ),
    "mixtral": (
        "Mixtral-8x7B",
        "mixtral",
        dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
             num_attention_heads=32, num_key_value_heads=8),
    ),
}


def build(family: str, shape: dict, layers: int, vocab: int, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, **shape, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "is_concatenated") and hasattr(m, "gate_up_proj")]


def capture_experts_inputs(model, ids):
    """(module, hidden_states, top_k_index, top_k_weights) of every experts module in a training
    forward (the routers' real outputs)."""
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.append((mod, *[a.detach() for a in args])))
        for m in experts_modules(model)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    ap.add_argument("--eager-rounds", type=int, default=1, help="rounds in which eager runs (it is slow)")
    ap.add_argument("--no-lora", action="store_true")
    args = ap.parse_args()

    import peft

    tokens = args.batch * args.seq
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} layer(s), "
          f"{args.batch}x{args.seq} tokens, vocab {args.vocab}, {args.rounds} rounds (eager {args.eager_rounds})")
    header = ("| model | dtype | experts | prefill tok/s | train tok/s | LoRA tok/s | experts fwd+bwd ms "
              "| experts share of train | experts vs grouped_mm | experts vs eager | train vs grouped_mm |")
    rows = []
    for key in args.models:
        name, family, shape = MODELS[key]
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            model = build(family, shape, args.layers, args.vocab, dtype)
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
            times = {impl: {"prefill": [], "train": [], "lora": [], "experts": []} for impl in args.impls}

            def run_round(rnd, what):
                for impl in args.impls:
                    if impl == "eager" and rnd >= args.eager_rounds:
                        continue
                    what(impl, times[impl])

            def full(impl, t):
                model.set_experts_implementation(impl)
                model.eval()
                with torch.no_grad():
                    t["prefill"].append(timed(lambda: model(ids)))
                model.train()

                def step():
                    model(ids, labels=ids).loss.backward()
                    model.zero_grad(set_to_none=True)

                t["train"].append(timed(step))
                captured = capture_experts_inputs(model, ids)

                def experts():
                    for mod, x, top_i, top_w in captured:
                        x = x.clone().requires_grad_()
                        y = mod(x, top_i, top_w.clone().requires_grad_())
                        y.backward(torch.ones_like(y))
                    model.zero_grad(set_to_none=True)

                t["experts"].append(timed(experts))

            model.set_experts_implementation("grouped_mm")
            model.train()
            model(ids, labels=ids).loss.backward()  # warm-up (allocator, oneDNN primitives)
            model.zero_grad(set_to_none=True)
            for rnd in range(args.rounds):
                run_round(rnd, full)
            if not args.no_lora:
                lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "o_proj"]))
                lora.train()

                def lora_step(impl, t):
                    model.set_experts_implementation(impl)

                    def step():
                        lora(input_ids=ids, labels=ids).loss.backward()
                        lora.zero_grad(set_to_none=True)

                    t["lora"].append(timed(step))

                for rnd in range(args.rounds):
                    run_round(rnd, lora_step)
            med = {impl: {k: (statistics.median(v) if v else float("nan")) for k, v in t.items()} for impl, t in times.items()}
            def ratio(ref_impl, impl, k):
                if ref_impl not in med or ref_impl == impl:
                    return ""
                return f"{med[ref_impl][k] / med[impl][k]:.2f}x"

            for impl in args.impls:
                m = med[impl]
                row = (f"| {name} | {dname} | {impl} | {tokens / m['prefill']:.0f} | {tokens / m['train']:.0f} | "
                       f"{tokens / m['lora']:.0f} | {1e3 * m['experts']:.0f} | {m['experts'] / m['train']:.0%} | "
                       f"{ratio('grouped_mm', impl, 'experts')} | {ratio('eager', impl, 'experts')} | "
                       f"{ratio('grouped_mm', impl, 'train')} |")
                rows.append(row)
                print(row, flush=True)
            del model
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
