"""`dsmoe compare`: the paper's headline comparison at a size this machine trains in minutes —
a dense model, a GShard-style top-2 MoE without shared experts, and DeepSeekMoE (fine-grained
experts + a shared expert), with the same activated FLOPs (and the same total parameters for
the two MoEs), trained on the same data with the same budget. Each variant is an ordinary
config (written to <out>/configs/) trained by `dsmoe train`'s code."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import train
from .common import (CLIError, check_number, check_run_dir, check_seed, claim_run_dir, format_table, read_metrics,
                     use_agg, write_json)
from .models import compare_configs, parameter_counts

VARIANTS = ("dense", "gshard", "deepseekmoe")
OUTPUTS = (*VARIANTS, "configs", "compare.json", "loss_curves.png")  # what --overwrite replaces
LABELS = {"dense": "Dense", "gshard": "GShard top-2", "deepseekmoe": "DeepSeekMoE"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architectures (see `dsmoe compare --help`)")
    g.add_argument("--hidden-size", type=int, default=128, help="hidden size of all variants (default 128)")
    g.add_argument("--num-layers", type=int, default=4, help="layers (default 4)")
    g.add_argument("--num-heads", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--ffn", type=int, default=256, help="intermediate size of a standard expert (default 256); the dense FFN is 2x this")
    g.add_argument("--experts", type=int, default=8, help="GShard experts, top-2 (default 8)")
    g.add_argument("--granularity", type=int, default=4, help="DeepSeekMoE splits each expert into this many (default 4)")
    g.add_argument("--shared", type=int, default=1, help="DeepSeekMoE shared experts, of the fine-grained size (default 1)")
    g.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which to train (default all)")
    g = p.add_argument_group("budget (the same for every variant)")
    g.add_argument("--steps", type=int, default=200, help="steps per variant (default 200)")
    g.add_argument("--batch-size", type=int, default=16, help="default 16")
    g.add_argument("--seq-len", type=int, default=128, help="default 128")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    g.add_argument("--seed", type=int, default=0, help="default 0")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: 5 times)")
    g.add_argument("--eval-batches", type=int, default=8, help="default 8")
    g.add_argument("--data", metavar="PATH", help="text file or folder (default: the Python standard library's sources)")
    g.add_argument("--device", default="auto")
    g.add_argument("--impl", choices=("dsmoe", "reference"), default="dsmoe")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--out", metavar="DIR", help="output directory (default: runs/compare-<date>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out (its previous results are deleted)")
    g.add_argument("--no-progress", action="store_true")


def _train_namespace(ns: argparse.Namespace, config_path: Path, out: Path) -> argparse.Namespace:
    return argparse.Namespace(
        preset=None, config=str(config_path), impl=ns.impl, data=ns.data, seq_len=ns.seq_len, batch_size=ns.batch_size,
        steps=ns.steps, lr=ns.lr, warmup=None, min_lr=None, weight_decay=None, grad_clip=None, seed=ns.seed,
        bf16=ns.bf16 or None, compile=None, device=ns.device, out=str(out), overwrite=True, resume=None,
        eval_every=ns.eval_every, eval_batches=ns.eval_batches, save_every=None, log_every=None, sample_tokens=0,
        sample_prompt=None, no_progress=ns.no_progress,
    )


def plot_curves(results: dict[str, list[dict]], path: Path, window: int) -> None:
    plt = use_agg()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rows) in enumerate(results.items()):
        color = f"C{i}"
        tr = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
        va = [(r["step"], r["loss"]) for r in rows if r.get("split") == "val"]
        if tr:
            steps, losses = zip(*tr)
            smooth = [sum(losses[max(0, j - window + 1): j + 1]) / len(losses[max(0, j - window + 1): j + 1])
                      for j in range(len(losses))]
            ax.plot(steps, smooth, color=color, lw=1.2, label=f"{LABELS[name]} (train)")
        if va:
            ax.plot(*zip(*va), "o--", color=color, ms=4, label=f"{LABELS[name]} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title("same activated FLOPs, same budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ns: argparse.Namespace) -> int:
    configs = compare_configs(ns.hidden_size, ns.num_layers, ns.num_heads, ns.ffn, ns.experts, ns.granularity, ns.shared)
    if ns.hidden_size % ns.num_heads or (ns.hidden_size // ns.num_heads) % 2:
        raise CLIError(f"--num-heads {ns.num_heads} must divide --hidden-size {ns.hidden_size} into even head sizes")
    from dsmoe.config import DeepSeekMoEConfig

    if ns.data is not None and not Path(ns.data).expanduser().exists():
        raise CLIError(f"--data: {ns.data} does not exist")

    check_number("--lr", ns.lr, low_open=True)
    check_seed("--seed", ns.seed)
    for name in ("steps", "batch_size", "seq_len", "eval_batches"):
        if getattr(ns, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(ns, name)}")
    counts = {}
    for name in ns.variants:
        try:
            counts[name] = parameter_counts(DeepSeekMoEConfig(**configs[name]))
        except (ValueError, TypeError) as e:
            raise CLIError(f"the {name} variant is not a valid config: {e}") from None
    if ns.out:
        check_run_dir(ns.out, ns.overwrite, "output directory")
    claimed = claim_run_dir(ns.out, "compare", ns.overwrite, OUTPUTS, "output directory")
    try:
        return _compare(ns, configs, counts, claimed.path)
    finally:
        claimed.release()


def _compare(ns: argparse.Namespace, configs: dict, counts: dict, out_dir: Path) -> int:
    (out_dir / "configs").mkdir(exist_ok=True)
    for name in ns.variants:
        write_json(out_dir / "configs" / f"{name}.json", configs[name])
    print(f"dsmoe compare -> {out_dir}")
    print(format_table(["variant", "params", "activated", "FFN per token"], [
        [LABELS[n], f"{counts[n][0] / 1e6:.2f}M", f"{counts[n][1] / 1e6:.2f}M", _ffn_desc(configs[n])] for n in ns.variants]))

    results, summary = {}, {}
    for name in ns.variants:
        print(f"\n=== {LABELS[name]} ===", flush=True)
        run_dir = out_dir / name
        code = train.run(_train_namespace(ns, out_dir / "configs" / f"{name}.json", run_dir))
        if code != 0:
            print(f"compare: stopped during {LABELS[name]}; finished runs are in {out_dir}")
            return code
        rows = read_metrics(run_dir)
        results[name] = rows
        val = [r for r in rows if r.get("split") == "val"]
        tr = [r for r in rows if r.get("split") == "train"]
        last = tr[-10:]
        summary[name] = {
            "params": counts[name][0], "activated": counts[name][1],
            "final_val_loss": val[-1]["loss"] if val else None,
            "final_train_loss": sum(r["loss"] for r in last) / max(1, len(last)),
            "seconds": tr[-1]["elapsed_s"] if tr else None,
            "tokens_per_s": _mean_rate(tr, ns.batch_size * ns.seq_len),
            "run_dir": str(run_dir),
        }
    plot_curves(results, out_dir / "loss_curves.png", window=max(1, ns.steps // 20))
    write_json(out_dir / "compare.json", summary)
    print("\n" + format_table(
        ["variant", "params", "activated", "final val loss", "train loss (last 10)", "tokens/s", "time (s)"],
        [[LABELS[n], f"{s['params'] / 1e6:.2f}M", f"{s['activated'] / 1e6:.2f}M", s["final_val_loss"],
          s["final_train_loss"], s["tokens_per_s"] or float("nan"), s["seconds"] or float("nan")] for n, s in summary.items()]))
    print(f"\nwrote {out_dir / 'loss_curves.png'}, {out_dir / 'compare.json'}; each model is a checkpoint in {out_dir}/<variant>")
    moe = [n for n in ("gshard", "deepseekmoe") if n in summary]
    if len(moe) == 2:
        print(f"expert analysis of both MoEs: dsmoe experts --model {out_dir / 'gshard'} {out_dir / 'deepseekmoe'}")
    return 0


def _ffn_desc(c: dict) -> str:
    if not c.get("n_routed_experts"):
        return f"dense {c['intermediate_size']}"
    shared = f"{c['n_shared_experts']} shared + " if c.get("n_shared_experts") else ""
    return f"{shared}top-{c['num_experts_per_tok']} of {c['n_routed_experts']} x {c['moe_intermediate_size']}"


def _mean_rate(rows: list[dict], tokens_per_step: int) -> float | None:
    """Tokens per second over the logged steps (the first, which includes set-up, left out)."""
    timed = rows[1:] or rows
    if not timed:
        return None
    return len(timed) * tokens_per_step / max(1e-9, sum(tokens_per_step / r["tokens_per_s"] for r in timed))
