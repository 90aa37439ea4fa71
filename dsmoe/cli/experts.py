"""`dsmoe experts`: the paper's expert-specialisation analysis on a trained model.

* load: how the tokens of the data are routed, per MoE layer and routed expert (heatmap PNG,
  CSV), relative to a uniform load;
* redundancy ablation (the paper's Figure 4): for every token its top-n routed experts are
  disabled and the gate picks its top-k among the rest; the rise of the loss with n says how
  irreplaceable the top experts are (DeepSeekMoE's rises faster than GShard's: less redundancy).

Several --model folders (e.g. the gshard and deepseekmoe runs of `dsmoe compare`) share one
ablation plot.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import CLIError, check_run_dir, claim_run_dir, format_table, pick_device, use_agg, write_json
from .data import eval_batches, load_token_data, load_tokenizer
from .models import disable_top_experts, load_model

DEFAULT_RATIOS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)
OUTPUTS = ("load_*.png", "load_*.csv", "ablation.png", "ablation.csv", "experts.json")  # what --overwrite replaces


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, nargs="+", metavar="DIR", help="checkpoint director(y/ies) to analyse")
    p.add_argument("--data", metavar="PATH", help="text file or folder (default: the Python standard library's sources)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split of --data to use (default val)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate on (default 16384)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--ratios", type=float, nargs="+", default=None, metavar="R",
                   help="fractions of the routed experts to disable per token (default 0 1/16 1/8 3/16 1/4)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/experts-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out (its previous results are deleted)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N")
    p.add_argument("--impl", choices=("dsmoe", "reference"), default="dsmoe", help="MoE layer execution")


@torch.no_grad()
def evaluate(model, batches, device) -> tuple[float, list[torch.Tensor]]:
    """Mean cross entropy over ``batches`` and the summed tokens per expert of each MoE layer."""
    total, loads = 0.0, None
    for x, y in batches:
        out = model(x.to(device))
        logits = out.logits
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1)).item()
        step = [t.to("cpu", torch.int64) for t in out.tokens_per_expert]
        loads = step if loads is None else [a + b for a, b in zip(loads, step)]
    return total / len(batches), loads or []


def disabled_counts(num_experts: int, top_k: int, ratios) -> list[int]:
    counts = sorted({int(round(r * num_experts)) for r in ratios})
    return [n for n in counts if 0 <= n <= num_experts - top_k]


def plot_load(loads: torch.Tensor, layer_ids: list[int], title: str, path: Path) -> None:
    plt = use_agg()
    E = loads.shape[1]
    rel = loads.float() / loads.float().mean(dim=1, keepdim=True).clamp(min=1e-9)
    fig, ax = plt.subplots(figsize=(min(16, 2.5 + 0.25 * E), 1.2 + 0.45 * len(layer_ids)))
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layer_ids)), [str(i) for i in layer_ids])
    if E <= 64:
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6 if E > 32 else 8)
    fig.colorbar(im, ax=ax, label="load / uniform load")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(results: dict[str, list[dict]], path: Path) -> None:
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        ax.plot([r["ratio"] for r in rows], [r["loss"] for r in rows], "o-", label=name)
    ax.set_xlabel("ratio of disabled top routed experts")
    ax.set_ylabel("loss")
    ax.set_title("redundancy among routed experts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(dirs: list[str]) -> list[str]:
    """A distinct, file-name-safe label per --model folder (it names load_<label>.png): the
    folder's name, or as many of its last path parts as tell the folders apart, joined by '_'
    (e.g. x/a/model and x/b/model -> a_model, b_model); a folder given twice gets '_2'."""
    parts = [Path(d).resolve().parts[1:] or ("root",) for d in dirs]
    depth = 1
    while depth < max(len(p) for p in parts) and len({p[-depth:] for p in parts}) < len({p for p in parts}):
        depth += 1
    labels, seen = [], {}
    for p in parts:
        label = re.sub(r"[^A-Za-z0-9._+-]+", "_", "_".join(p[-depth:])).strip("._") or "model"
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return labels


def run(ns: argparse.Namespace) -> int:
    for name in ("tokens", "seq_len", "batch_size"):
        if getattr(ns, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    ratios = ns.ratios if ns.ratios is not None else DEFAULT_RATIOS
    for r in ratios:
        if not 0 <= r < 1:
            raise CLIError(f"--ratios: each ratio must be in [0, 1), got {r}")
    if ns.out:
        check_run_dir(ns.out, ns.overwrite, "output directory")
    device = pick_device(ns.device)
    models = [(label, d, load_model(d, device, dtype=torch.float32, impl=ns.impl)) for label, d in zip(_label(ns.model), ns.model)]
    for label, d, m in models:
        if not m.moe_layers():
            raise CLIError(f"--model {d} has no MoE layers to analyse")
        if ns.seq_len > m.config.max_position_embeddings:
            raise CLIError(f"--seq-len {ns.seq_len} exceeds {d}'s max_position_embeddings {m.config.max_position_embeddings}")

    # tokenise once per distinct tokenizer, before anything is written
    data_cache: dict[tuple, list] = {}
    batches_of = {}
    for label, d, model in models:
        cfg = model.config
        tokenizer = load_tokenizer(d, cfg.vocab_size, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
        key = ("bytes",) if tokenizer.byte_level else ("tokenizer", Path(d, "tokenizer.json").read_bytes())
        if key not in data_cache:
            need = ns.tokens + ns.seq_len + 1
            data = load_token_data(ns.data, tokenizer, max_tokens=4 * need)
            tokens = data.val if ns.split == "val" else data.train
            n_batches = max(1, ns.tokens // (ns.batch_size * ns.seq_len))
            data_cache[key] = list(eval_batches(tokens, ns.batch_size, ns.seq_len, n_batches))
            print(f"data: {data.description}, {ns.split} split, {n_batches} batches of {ns.batch_size} x {ns.seq_len} tokens")
        batches_of[label] = data_cache[key]
    claimed = claim_run_dir(ns.out, "experts", ns.overwrite, OUTPUTS, "output directory")
    try:
        return _analyse(ns, models, batches_of, ratios, device, claimed.path)
    finally:
        claimed.release()


def _analyse(ns: argparse.Namespace, models: list, batches_of: dict, ratios, device, out_dir: Path) -> int:
    ablation: dict[str, list[dict]] = {}
    summary = {}
    for label, d, model in models:
        cfg = model.config
        batches = batches_of[label]
        layer_ids = [i for i, block in enumerate(model.model.layers) if block.is_moe]
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        print(f"\n== {label}: {len(layer_ids)} MoE layers, {cfg.n_shared_experts or 0} shared + {E} routed experts, top-{k}")

        base_loss, loads = evaluate(model, batches, device)
        load = torch.stack(loads)  # [layers, E]
        plot_load(load, layer_ids, f"{label}: expert load", out_dir / f"load_{label}.png")
        with open(out_dir / f"load_{label}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer"] + [f"expert_{e}" for e in range(E)])
            for li, row in zip(layer_ids, load.tolist()):
                w.writerow([li] + row)
        rel = load.float() / load.float().mean(dim=1, keepdim=True)
        rows = []
        for li, r in zip(layer_ids, rel):
            rows.append([li, float(r.max()), float(r.min()), float(r.std() / r.mean()), int((r == 0).sum())])
        print("routed load per layer (1.0 = uniform):")
        print(format_table(["layer", "max", "min", "cv", "unused"], rows))

        results = []
        for n in disabled_counts(E, k, ratios):
            if n == 0:
                loss = base_loss
            else:
                with disable_top_experts(model, n):
                    loss, _ = evaluate(model, batches, device)
            results.append({"disabled": n, "ratio": n / E, "loss": loss, "increase": loss - base_loss})
        ablation[label] = results
        print("loss with each token's top routed experts disabled:")
        print(format_table(["disabled", "ratio", "loss", "increase"],
                           [[r["disabled"], f"{r['ratio']:.3f}", r["loss"], f"{r['increase']:+.4f}"] for r in results]))
        summary[label] = {"model": str(d), "moe_layers": layer_ids, "num_routed_experts": E, "top_k": k,
                          "loss": base_loss, "ablation": results,
                          "load_per_layer": {str(li): row for li, row in zip(layer_ids, load.tolist())}}

    plot_ablation(ablation, out_dir / "ablation.png")
    with open(out_dir / "ablation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "disabled", "ratio", "loss", "increase"])
        for label, results in ablation.items():
            for r in results:
                w.writerow([label, r["disabled"], r["ratio"], r["loss"], r["increase"]])
    write_json(out_dir / "experts.json", summary)
    print(f"\nwrote {out_dir}: load_<model>.png/.csv, ablation.png/.csv, experts.json")
    return 0
