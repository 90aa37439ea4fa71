"""`dsmoe experts`: the paper's expert-specialisation analysis of trained models (the measures
themselves live in :mod:`dsmoe.analysis`; this module parses arguments, loads, plots, writes).

* load: how the tokens of the data are routed, per MoE layer and routed expert (heatmap PNG,
  CSV), relative to a uniform load;
* redundancy (the paper's Figure 4): for every token its top routed experts (by routing
  probability) are disabled, ratios 1/16 ... 4/16 of the routed experts, and the gate picks its
  top-k among the rest; a faster rise of the loss means less redundancy among the experts;
* fewer activated experts: the loss when every token is routed to k = 1 ... top-k experts
  (the paper: DeepSeekMoE with fewer activated experts still matches GShard's full top-2).

``--model`` analyses checkpoint folders one by one; ``--compare-run`` analyses every seed of the
GShard and DeepSeekMoE runs of a `dsmoe compare` directory and reports mean ± spread over seeds.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import torch

from dsmoe.analysis import activated_expert_sweep, compare_seeds, disabled_counts as _disabled_counts, seed_summary
from dsmoe.analysis import evaluate as _evaluate
from dsmoe.analysis import top_expert_ablation

from .common import CLIError, check_run_dir, claim_run_dir, format_table, pick_device, read_json, use_agg, write_json
from .data import eval_batches, load_token_data, load_tokenizer
from .models import load_model

DEFAULT_RATIOS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)
OUTPUTS = ("load_*.png", "load_*.csv", "ablation.png", "ablation.csv", "activated.png", "activated.csv",
           "experts.json")  # what --overwrite replaces
LABELS = {"gshard": "GShard top-2", "deepseekmoe": "DeepSeekMoE"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", nargs="+", metavar="DIR", help="checkpoint director(y/ies) to analyse")
    src.add_argument("--compare-run", metavar="DIR",
                     help="a `dsmoe compare` output directory: every seed of its gshard and deepseekmoe runs")
    p.add_argument("--data", metavar="PATH", help="text file or folder (default: the Python standard library's sources)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split of --data to use (default val)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate on (default 16384)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--ratios", type=float, nargs="+", default=None, metavar="R",
                   help="fractions of the routed experts to disable per token (default 0 1/16 1/8 3/16 1/4)")
    p.add_argument("--renormalize", action="store_true",
                   help="after disabling, take the softmax over the remaining experts only (default: the chosen "
                        "experts keep their probabilities from the softmax over all routed experts)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/experts-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out (its previous results are deleted)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N")
    p.add_argument("--impl", choices=("dsmoe", "reference"), default="dsmoe", help="MoE layer execution")


# kept for callers of the CLI module; the library's functions are dsmoe.analysis.*
def evaluate(model, batches, device=None) -> tuple[float, list[torch.Tensor]]:
    """Alias of :func:`dsmoe.analysis.evaluate` (``device`` is the model's own)."""
    return _evaluate(model, batches)


def disabled_counts(num_experts: int, top_k: int, ratios) -> list[int]:
    """The distinct numbers of experts :func:`dsmoe.analysis.disabled_counts` disables for ``ratios``."""
    return sorted({n for _, n in _disabled_counts(num_experts, top_k, ratios)})


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


def _compare_models(run: str) -> list[tuple[str, str, str]]:
    """(label, folder, group) of every finished gshard / deepseekmoe seed of a compare directory."""
    d = Path(run).expanduser()
    summary = read_json(d / "compare.json", "--compare-run")
    out = []
    for variant in ("gshard", "deepseekmoe"):
        for r in summary.get("models", {}).get(variant, {}).get("per_seed", []):
            if not r.get("complete", True):
                continue  # stopped before its last step: not the model the comparison is about
            folder = Path(r["run_dir"])
            if not folder.is_absolute() or not folder.exists():
                folder = d / variant / f"seed-{r['seed']}"
            out.append((f"{variant}_seed-{r['seed']}", str(folder), variant))
    if not out:
        raise CLIError(f"--compare-run {run}: no finished GShard or DeepSeekMoE run in its compare.json")
    return out


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
    if ns.compare_run is not None:
        entries = _compare_models(ns.compare_run)
    else:
        entries = [(label, d, label) for label, d in zip(_label(ns.model), ns.model)]
    device = pick_device(ns.device)
    models = [(label, d, group, load_model(d, device, dtype=torch.float32, impl=ns.impl)) for label, d, group in entries]
    for label, d, _, m in models:
        if not m.moe_layers():
            raise CLIError(f"--model {d} has no MoE layers to analyse")
        if ns.seq_len > m.config.max_position_embeddings:
            raise CLIError(f"--seq-len {ns.seq_len} exceeds {d}'s max_position_embeddings {m.config.max_position_embeddings}")

    # tokenise once per distinct tokenizer, before anything is written
    data_cache: dict[tuple, list] = {}
    batches_of = {}
    for label, d, _, model in models:
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
        return _analyse(ns, models, batches_of, ratios, claimed.path)
    finally:
        claimed.release()


def _analyse(ns: argparse.Namespace, models: list, batches_of: dict, ratios, out_dir: Path) -> int:
    summary = {}
    for label, d, group, model in models:
        cfg = model.config
        batches = batches_of[label]
        layer_ids = [i for i, block in enumerate(model.model.layers) if block.is_moe]
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        print(f"\n== {label}: {len(layer_ids)} MoE layers, {cfg.n_shared_experts or 0} shared + {E} routed experts, top-{k}",
              flush=True)

        base_loss, loads = _evaluate(model, batches)
        load = torch.stack(loads)  # [layers, E]
        plot_load(load, layer_ids, f"{label}: expert load", out_dir / f"load_{label}.png")
        with open(out_dir / f"load_{label}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer"] + [f"expert_{e}" for e in range(E)])
            for li, row in zip(layer_ids, load.tolist()):
                w.writerow([li] + row)
        rel = load.float() / load.float().mean(dim=1, keepdim=True)
        print("routed load per layer (1.0 = uniform):")
        print(format_table(["layer", "max", "min", "cv", "unused"],
                           [[li, float(r.max()), float(r.min()), float(r.std() / r.mean()), int((r == 0).sum())]
                            for li, r in zip(layer_ids, rel)]))

        ablation = top_expert_ablation(model, batches, ratios, renormalize=ns.renormalize)
        print("loss with each token's top routed experts disabled:")
        print(format_table(["disabled", "ratio", "loss", "increase"],
                           [[r["disabled"], f"{r['ratio']:.4f}", r["loss"], f"{r['increase']:+.4f}"] for r in ablation]))
        activated = activated_expert_sweep(model, batches, range(1, k + 1))
        print("loss with k activated routed experts per token:")
        print(format_table(["k", "loss"], [[r["top_k"], r["loss"]] for r in activated]))
        summary[label] = {"model": str(d), "group": group, "moe_layers": layer_ids, "num_routed_experts": E, "top_k": k,
                          "num_shared_experts": cfg.n_shared_experts or 0, "loss": base_loss, "ablation": ablation,
                          "activated": activated,
                          "load_per_layer": {str(li): row for li, row in zip(layer_ids, load.tolist())}}

    groups = _group(summary)
    _report(groups)
    plot_ablation(groups, out_dir / "ablation.png")
    plot_activated(groups, out_dir / "activated.png")
    with open(out_dir / "ablation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "disabled", "ratio", "loss", "increase"])
        for label, s in summary.items():
            for r in s["ablation"]:
                w.writerow([label, r["disabled"], r["ratio"], r["loss"], r["increase"]])
    with open(out_dir / "activated.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "top_k", "loss"])
        for label, s in summary.items():
            for r in s["activated"]:
                w.writerow([label, r["top_k"], r["loss"]])
    result = {"renormalize": ns.renormalize, "models": summary, "groups": groups} if ns.compare_run else summary
    write_json(out_dir / "experts.json", result)
    print(f"\nwrote {out_dir}: load_<model>.png/.csv, ablation.png/.csv, activated.png/.csv, experts.json")
    return 0


def _group(summary: dict) -> dict:
    """Mean ± spread over the models of each group (the seeds of one architecture)."""
    groups: dict[str, dict] = {}
    for label, s in summary.items():
        groups.setdefault(s["group"], {"members": []})["members"].append(label)
    for name, g in groups.items():
        members = [summary[m] for m in g["members"]]
        g["loss"] = seed_summary(m["loss"] for m in members)
        g["top_k"] = members[0]["top_k"]
        ratios = sorted({r["ratio"] for m in members for r in m["ablation"]})
        g["ablation"] = []
        for ratio in ratios:
            rows = [r for m in members for r in m["ablation"] if r["ratio"] == ratio]
            if len(rows) == len(members):
                g["ablation"].append({"ratio": ratio, "disabled": rows[0]["disabled"],
                                      "loss": seed_summary(r["loss"] for r in rows),
                                      "increase": seed_summary(r["increase"] for r in rows)})
        ks = sorted({r["top_k"] for m in members for r in m["activated"]})
        g["activated"] = []
        for k in ks:
            rows = [r for m in members for r in m["activated"] if r["top_k"] == k]
            if len(rows) == len(members):
                g["activated"].append({"top_k": k, "loss": seed_summary(r["loss"] for r in rows)})
    if "gshard" in groups and "deepseekmoe" in groups:
        gs, ds = groups["gshard"], groups["deepseekmoe"]
        gs_by_seed = {_seed(m): summary[m] for m in gs["members"]}
        ds_by_seed = {_seed(m): summary[m] for m in ds["members"]}
        seeds = sorted(set(gs_by_seed) & set(ds_by_seed))
        cmp = {"seeds": seeds, "ablation": [], "activated": []}
        for ratio in DEFAULT_RATIOS[1:] if seeds else ():
            try:
                inc_d = [next(r["increase"] for r in ds_by_seed[x]["ablation"] if r["ratio"] == ratio) for x in seeds]
                inc_g = [next(r["increase"] for r in gs_by_seed[x]["ablation"] if r["ratio"] == ratio) for x in seeds]
            except StopIteration:
                continue
            cmp["ablation"].append({"ratio": ratio, **compare_seeds(inc_d, inc_g)})
        if seeds:
            full_g = [gs_by_seed[x]["loss"] for x in seeds]
            for k in range(1, ds["top_k"] + 1):
                loss_d = [next(r["loss"] for r in ds_by_seed[x]["activated"] if r["top_k"] == k) for x in seeds]
                cmp["activated"].append({"top_k": k, **compare_seeds(loss_d, full_g)})
        groups["deepseekmoe_vs_gshard"] = cmp
    return groups


def _seed(label: str) -> str:
    return label.rsplit("_seed-", 1)[-1]


def _fmt(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def _report(groups: dict) -> None:
    cmp = groups.get("deepseekmoe_vs_gshard")
    archs = {k: v for k, v in groups.items() if k != "deepseekmoe_vs_gshard"}
    if all(len(g["members"]) == 1 for g in archs.values()):
        return  # one model each: the per-model tables above say it all
    print("\nover seeds (mean ± std):")
    for name, g in archs.items():
        print(f"  {LABELS.get(name, name)}: {len(g['members'])} models, loss {_fmt(g['loss'])}")
        print("    top experts disabled: " + "; ".join(
            f"{r['ratio']:.4f} ({r['disabled']}): +{_fmt(r['increase'])}" for r in g["ablation"][1:]))
        print("    k activated: " + "; ".join(f"{r['top_k']}: {_fmt(r['loss'])}" for r in g["activated"]))
    if cmp:
        print("\nDeepSeekMoE vs GShard, paired by seed (mean ± 95% interval):")
        for r in cmp["ablation"]:
            ci = f"± {r['ci95']:.4f}" if r["ci95"] is not None else ""
            print(f"  loss rise at {r['ratio']:.4f} of routed experts disabled, DeepSeekMoE − GShard: "
                  f"{r['gap']:+.4f} {ci} (seed spread {r['seed_spread']:.4f}): {r['verdict']}"
                  f"{' — DeepSeekMoE less redundant (the paper)' if r['verdict'] == 'separated' and r['gap'] > 0 else ''}")
        matched = [r for r in cmp["activated"] if r["gap"] <= 0]
        for r in cmp["activated"]:
            ci = f"± {r['ci95']:.4f}" if r["ci95"] is not None else ""
            print(f"  DeepSeekMoE with k={r['top_k']} − GShard full top-2: {r['gap']:+.4f} {ci}: {r['verdict']}")
        if matched:
            print(f"  fewest activated DeepSeekMoE experts whose mean loss is at most GShard's with its full top-2: "
                  f"k = {matched[0]['top_k']} of {archs['deepseekmoe']['top_k']}")
        else:
            print("  DeepSeekMoE's mean loss is above GShard's full top-2 at every k up to its trained top-k")


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


def plot_ablation(groups: dict, path: Path) -> None:
    """Loss rise against the ratio of disabled top routed experts; error bars = std over seeds."""
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in groups.items():
        if name == "deepseekmoe_vs_gshard":
            continue
        rows = g["ablation"]
        ax.errorbar([r["ratio"] for r in rows], [r["increase"]["mean"] for r in rows],
                    yerr=[r["increase"]["std"] for r in rows], fmt="o-", capsize=3,
                    label=f"{LABELS.get(name, name)} ({len(g['members'])})")
    ax.set_xlabel("ratio of disabled top routed experts")
    ax.set_ylabel("loss increase (nats / token)")
    ax.set_title("redundancy among routed experts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_activated(groups: dict, path: Path) -> None:
    """Loss against the number of activated routed experts; a dashed line per model at its trained k."""
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, g) in enumerate(groups.items()):
        if name == "deepseekmoe_vs_gshard":
            continue
        rows = g["activated"]
        ax.errorbar([r["top_k"] for r in rows], [r["loss"]["mean"] for r in rows],
                    yerr=[r["loss"]["std"] for r in rows], fmt="o-", capsize=3, color=f"C{i}",
                    label=f"{LABELS.get(name, name)} (trained top-{g['top_k']})")
        ax.axhline(g["loss"]["mean"], color=f"C{i}", ls="--", lw=0.8)
    ax.set_xlabel("activated routed experts per token")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("fewer activated experts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

