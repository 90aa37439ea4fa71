"""`dsmoe compare`: the paper's headline comparison at a size this machine trains in minutes —
a dense model, a GShard-style top-2 MoE without shared experts, and DeepSeekMoE (fine-grained
experts + a shared expert), with the same activated expert parameters (iso-FLOPs) and, for the
two MoEs, the same total expert parameters (iso-parameters), trained on the same data in the
same order with the same steps and hyper-parameters, over several seeds.

Each (variant, seed) is an ordinary `dsmoe train` run (a checkpoint folder) in
<out>/<variant>/seed-<s>; the report says how far apart the models are against the
seed-to-seed spread (:func:`dsmoe.analysis.compare_seeds`), where their validation curves cross,
and how balanced the routing stayed (balance loss, expert load over training)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from . import train
from .common import (CLIError, check_number, check_run_dir, check_seed, claim_run_dir, format_table, read_metrics,
                     stderr_is_tty, use_agg, write_json)
from .models import compare_configs

VARIANTS = ("dense", "gshard", "deepseekmoe")
OUTPUTS = (*VARIANTS, "configs", "logs", "compare.json", "loss_curves.png", "load_*.png")  # what --overwrite replaces
LABELS = {"dense": "Dense", "gshard": "GShard top-2", "deepseekmoe": "DeepSeekMoE"}
PAIRS = (("deepseekmoe", "gshard"), ("gshard", "dense"), ("deepseekmoe", "dense"))
# Budgets, the same for every variant and seed. "short" shows the method in minutes (far too
# few tokens for the MoEs' extra parameters to pay off); "medium" and "long" are what this
# project ran for docs/paper_results.md: the MoEs gain on the dense model at 600 steps, and the
# paper's ranking appears at 3000.
BUDGETS = {
    "short": dict(steps=200, seeds=3, eval_every=25, eval_batches=8),
    "medium": dict(steps=600, seeds=3, eval_every=50, eval_batches=16),
    "long": dict(steps=3000, seeds=3, eval_every=50, eval_batches=16),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architectures (the paper's 2B layout, scaled down)")
    g.add_argument("--hidden-size", type=int, default=128, help="hidden size of all variants (default 128)")
    g.add_argument("--num-layers", type=int, default=4, help="layers (default 4)")
    g.add_argument("--num-heads", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--ffn", type=int, default=256, help="intermediate size of a standard expert (default 256); the dense FFN is 2x this")
    g.add_argument("--experts", type=int, default=16, help="GShard experts, top-2 (default 16, as the paper's 2B models)")
    g.add_argument("--granularity", type=int, default=4, help="DeepSeekMoE splits each expert into this many (default 4)")
    g.add_argument("--shared", type=int, default=1, help="DeepSeekMoE shared experts, of the fine-grained size (default 1)")
    g.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which to train (default all)")
    g = p.add_argument_group("budget (the same for every variant and seed)")
    g.add_argument("--budget", choices=tuple(BUDGETS), default="short",
                   help="; ".join(f"{name}{' (default)' if name == 'short' else ''}: "
                                  + ", ".join(f"{k} {v}" for k, v in b.items()) for name, b in BUDGETS.items()))
    g.add_argument("--steps", type=int, default=None, help="steps per run (default: the budget's)")
    g.add_argument("--seeds", type=int, default=None, help="seeds per variant, >= 1 (default: the budget's, 3)")
    g.add_argument("--seed", type=int, default=0, help="first seed: the runs use seeds S, S+1, ... (default 0)")
    g.add_argument("--batch-size", type=int, default=16, help="default 16")
    g.add_argument("--seq-len", type=int, default=128, help="default 128")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: the budget's)")
    g.add_argument("--eval-batches", type=int, default=None, help="validation batches (default: the budget's)")
    g.add_argument("--data", metavar="PATH", help="text file or folder (default: the Python standard library's sources)")
    g = p.add_argument_group("execution")
    g.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, in separate processes (default 1); a SIGTERM or Ctrl-C stops them all, each saving a checkpoint, and starts no more")
    g.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    g.add_argument("--device", default="auto")
    g.add_argument("--impl", choices=("dsmoe", "reference"), default="dsmoe")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--out", metavar="DIR", help="output directory (default: runs/compare-<date>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out (its previous results are deleted)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--report", metavar="DIR", help="train nothing: the report, plots and compare.json again from an "
                   "existing compare directory (also a stopped one: its runs' logs as far as they got)")


def _settings(ns: argparse.Namespace) -> dict:
    """The budget with the explicit options applied, checked."""
    s = dict(BUDGETS[ns.budget])
    for name in ("steps", "seeds", "eval_every", "eval_batches"):
        if getattr(ns, name) is not None:
            s[name] = getattr(ns, name)
    for name in ("steps", "seeds", "eval_every", "eval_batches"):
        if s[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {s[name]}")
    for name in ("batch_size", "seq_len", "jobs", "threads"):
        if getattr(ns, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(ns, name)}")
    check_number("--lr", ns.lr, low_open=True)
    check_seed("--seed", ns.seed)
    last = ns.seed + s["seeds"] - 1
    if last > 2**63 - 1:
        raise CLIError(f"--seed {ns.seed} with --seeds {s['seeds']}: the last run's seed would pass 2**63 - 1")
    return s


def _train_namespace(ns: argparse.Namespace, s: dict, config_path: Path, out: Path, seed: int) -> argparse.Namespace:
    return argparse.Namespace(
        preset=None, config=str(config_path), impl=ns.impl, data=ns.data, seq_len=ns.seq_len, batch_size=ns.batch_size,
        steps=s["steps"], lr=ns.lr, warmup=None, min_lr=None, weight_decay=None, grad_clip=None, seed=seed,
        bf16=ns.bf16 or None, compile=None, device=ns.device, out=str(out), overwrite=True, resume=None,
        eval_every=s["eval_every"], eval_batches=s["eval_batches"], save_every=None, log_every=None, sample_tokens=0,
        sample_prompt=None, no_progress=True,
    )


# ------------------------------------------------------------------------------ one run


class LoadRecorder:
    """Tokens per routed expert of every MoE layer during training, summed over windows of
    ``window`` steps (a step = one training forward of the first MoE layer). A global forward
    hook, so `dsmoe train`'s loop runs unchanged; evaluation forwards (eval mode) are not counted."""

    def __init__(self, window: int):
        self.window = window
        self.windows: list[dict] = []  # {"end_step", "loads": [layer][expert]}
        self._layers: dict[int, int] = {}  # id(module) -> layer position
        self._acc: list | None = None
        self._steps = 0

    def __enter__(self):
        import torch.nn as nn

        from dsmoe.layers import DeepSeekMoELayer

        def hook(module, args, output):
            if not isinstance(module, DeepSeekMoELayer) or not module.training:
                return
            pos = self._layers.setdefault(id(module), len(self._layers))
            load = output[2].detach().to("cpu").long().tolist()
            if pos == 0:  # a new step begins: close the window the previous one ended
                if self._acc is not None and self._steps % self.window == 0:
                    self.windows.append({"end_step": self._steps, "loads": self._acc})
                    self._acc = None
                self._steps += 1
            if self._acc is None:
                self._acc = []
            while len(self._acc) <= pos:
                self._acc.append([0] * len(load))
            self._acc[pos] = [a + b for a, b in zip(self._acc[pos], load)]

        self._handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        if self._acc is not None and self._steps:
            self.windows.append({"end_step": self._steps, "loads": self._acc})
            self._acc = None


def run_one(job: dict) -> int:
    """Trains one (variant, seed): `dsmoe train` with its output in ``job["log"]`` and the
    routed load over training in <run>/loads.json. Top-level, so worker processes can run it."""
    import torch

    torch.set_num_threads(job["threads"])
    Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(job["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        with LoadRecorder(job["window"]) as rec:
            try:
                code = train.run(job["ns"])
            except CLIError as e:  # the run's refusal goes to its log, as `dsmoe train` words it
                print(f"dsmoe: error: {e}", file=sys.stderr)
                code = 2
            except Exception:  # noqa: BLE001 (any failure of the run: its log says what, the comparison goes on)
                traceback.print_exc()
                code = 1
        if rec.windows and Path(job["ns"].out).is_dir():  # a stopped run's too, as far as it got
            write_json(Path(job["ns"].out) / "loads.json", {"window": rec.window, "windows": rec.windows})
    return code


def _done_steps(run_dir: Path) -> int:
    try:
        with open(run_dir / "log.jsonl", "rb") as f:
            return f.read().count(b'"split": "train"')
    except OSError:
        return 0


# ------------------------------------------------------------------------------ command


def run(ns: argparse.Namespace) -> int:
    from dsmoe.analysis import model_size
    from dsmoe.config import DeepSeekMoEConfig

    if ns.report is not None:
        return report(ns.report)
    configs = compare_configs(ns.hidden_size, ns.num_layers, ns.num_heads, ns.ffn, ns.experts, ns.granularity, ns.shared)
    if ns.hidden_size % ns.num_heads or (ns.hidden_size // ns.num_heads) % 2:
        raise CLIError(f"--num-heads {ns.num_heads} must divide --hidden-size {ns.hidden_size} into even head sizes")
    if ns.data is not None and not Path(ns.data).expanduser().exists():
        raise CLIError(f"--data: {ns.data} does not exist")
    s = _settings(ns)
    limit = min(configs[name]["max_position_embeddings"] for name in ns.variants)
    if ns.seq_len > limit:  # each run would refuse it, after the output directory was made
        raise CLIError(f"--seq-len {ns.seq_len} exceeds the compared models' max_position_embeddings {limit}")
    sizes = {}
    for name in ns.variants:
        try:
            sizes[name] = model_size(DeepSeekMoEConfig(**configs[name]), ns.seq_len)
        except (ValueError, TypeError) as e:
            raise CLIError(f"the {name} variant is not a valid config: {e}") from None
    if ns.out:
        check_run_dir(ns.out, ns.overwrite, "output directory")
    claimed = claim_run_dir(ns.out, "compare", ns.overwrite, OUTPUTS, "output directory")
    try:
        return _compare(ns, s, configs, sizes, claimed.path)
    finally:
        claimed.release()


def _compare(ns: argparse.Namespace, s: dict, configs: dict, sizes: dict, out_dir: Path) -> int:
    (out_dir / "configs").mkdir(exist_ok=True)
    for name in ns.variants:
        write_json(out_dir / "configs" / f"{name}.json", configs[name])
    seeds = list(range(ns.seed, ns.seed + s["seeds"]))
    tokens = s["steps"] * ns.batch_size * ns.seq_len
    print(f"dsmoe compare -> {out_dir}")
    print(f"budget {ns.budget}: {s['steps']} steps x {ns.batch_size} x {ns.seq_len} = {tokens:,} tokens per run, "
          f"lr {ns.lr:g}, seeds {seeds}; the same data order (per seed), steps and hyper-parameters for every variant")
    print(format_table(["variant", "FFN per token", "total params", "activated", "expert total", "expert activated",
                        "fwd FLOPs/token"],
                       [[LABELS[n], _ffn_desc(configs[n]), f"{z['total'] / 1e6:.3f}M", f"{z['activated'] / 1e6:.3f}M",
                         f"{z['expert_total'] / 1e6:.3f}M", f"{z['expert_activated'] / 1e6:.3f}M",
                         f"{z['flops_per_token'] / 1e6:.2f}M"] for n, z in sizes.items()]))
    sys.stdout.flush()

    jobs = []
    for seed in seeds:  # seed-major: the first seeds of every variant finish first
        for name in ns.variants:
            run_dir = out_dir / name / f"seed-{seed}"
            jobs.append({"variant": name, "seed": seed, "threads": ns.threads, "window": max(1, s["steps"] // 40),
                         "log": str(out_dir / "logs" / f"{name}-seed-{seed}.log"),
                         "ns": _train_namespace(ns, s, out_dir / "configs" / f"{name}.json", run_dir, seed)})
    t0 = time.time()
    codes = _run_jobs(jobs, ns, s["steps"] * len(jobs))
    failed = [j for j, c in zip(jobs, codes) if c != 0]
    for j in failed:
        print(f"compare: {LABELS[j['variant']]} seed {j['seed']} stopped (exit {codes[jobs.index(j)]}); see {j['log']}")

    settings = {"budget": ns.budget, **s, "batch_size": ns.batch_size, "seq_len": ns.seq_len, "lr": ns.lr,
                "seeds_list": seeds, "impl": ns.impl, "bf16": ns.bf16, "data": ns.data, "jobs": ns.jobs,
                "threads": ns.threads, "tokens_per_run": tokens}
    runs = [{"variant": j["variant"], "seed": j["seed"], "run_dir": j["ns"].out, "complete": c == 0}
            for j, c in zip(jobs, codes)]
    _write_results(out_dir, settings, runs, sizes, {n: configs[n] for n in ns.variants}, time.time() - t0)
    moe = [n for n in ("gshard", "deepseekmoe") if n in ns.variants]
    if len(moe) == 2 and not failed:
        print(f"specialisation of both MoEs over the seeds: dsmoe experts --compare-run {out_dir}")
    interrupted = [c for c in codes if c in (130, 143)]
    return interrupted[0] if interrupted else 1 if failed else 0  # stopped by a signal: say so, as train does


def _run_jobs(jobs: list[dict], ns: argparse.Namespace, total_steps: int) -> list[int]:
    """Runs ``jobs`` (``--jobs`` at a time) with one progress bar over all their steps."""
    bar = None
    if not ns.no_progress and stderr_is_tty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, unit="step", file=sys.stderr, desc="compare")
    stop = threading.Event()

    def poll():
        while not stop.wait(1.0):
            if bar is not None:
                done = sum(_done_steps(Path(j["ns"].out)) for j in jobs)
                bar.update(done - bar.n)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    codes: list[int] = []
    try:
        if ns.jobs == 1:
            for j in jobs:
                codes.append(run_one(j))
                _say(bar, _job_line(j, codes[-1]))
                if codes[-1] in (130, 143):  # interrupted: the rest would be stopped too
                    codes += [codes[-1]] * (len(jobs) - len(codes))
                    break
        else:
            codes = _run_parallel(jobs, ns.jobs, bar)
    finally:
        stop.set()
        watcher.join()
        if bar is not None:
            bar.update(sum(_done_steps(Path(j["ns"].out)) for j in jobs) - bar.n)
            bar.close()
    return codes


def _write_results(out_dir: Path, settings: dict, runs: list[dict], sizes: dict, configs: dict,
                   elapsed: float | None) -> None:
    results = _collect(settings, runs, sizes, configs)
    results["elapsed_s"] = round(elapsed, 1) if elapsed is not None else None
    _report(results)
    write_json(out_dir / "compare.json", results)
    plot_curves(results, out_dir / "loss_curves.png")
    for name, m in results["models"].items():
        first = next((r for r in m["per_seed"] if (Path(r["run_dir"]) / "loads.json").is_file()), None)
        if first is not None:
            plot_load_over_time(Path(first["run_dir"]) / "loads.json", f"{LABELS[name]} (seed {first['seed']})",
                                out_dir / f"load_{name}.png")
    print(f"\nwrote {out_dir}: compare.json, loss_curves.png, load_<variant>.png; checkpoints in <variant>/seed-<s>, "
          f"training logs in logs/")


def report(path: str) -> int:
    """``--report DIR``: the numbers, plots and compare.json again from the runs of an existing
    compare directory, also when it was stopped (its runs' logs are read as they are)."""
    from dsmoe.analysis import model_size
    from dsmoe.config import DeepSeekMoEConfig

    from .common import read_json

    d = Path(path).expanduser()
    if not (d / "configs").is_dir():
        raise CLIError(f"--report {path}: not a `dsmoe compare` directory (it has no configs/)")
    configs = {n: read_json(d / "configs" / f"{n}.json", "--report") for n in VARIANTS if (d / "configs" / f"{n}.json").is_file()}
    runs, args = [], None
    for name in configs:
        for run_dir in sorted((d / name).glob("seed-*"), key=_seed_order):
            if not (run_dir / "train_args.json").is_file():
                continue
            a = read_json(run_dir / "train_args.json", "--report")
            args = args or a
            done = [r for r in read_metrics(run_dir) if r.get("split") == "train"]
            complete = (run_dir / "model.safetensors").is_file() and bool(done) and done[-1]["step"] == a["steps"]
            runs.append({"variant": name, "seed": a["seed"], "run_dir": str(run_dir), "complete": complete})
    if not runs:
        raise CLIError(f"--report {path}: no run has started in it")
    old = {}
    if (d / "compare.json").is_file():
        old = read_json(d / "compare.json", "--report").get("settings", {})
    settings = {**old, "steps": args["steps"], "batch_size": args["batch_size"], "seq_len": args["seq_len"],
                "lr": args["lr"], "eval_every": args["eval_every"], "eval_batches": args["eval_batches"],
                "seeds_list": sorted({r["seed"] for r in runs}), "impl": args["impl"], "data": args["data"],
                "tokens_per_run": args["steps"] * args["batch_size"] * args["seq_len"]}
    sizes = {n: model_size(DeepSeekMoEConfig(**c), args["seq_len"]) for n, c in configs.items()}
    claimed = claim_run_dir(d, "compare", existing=True, what="--report directory")
    try:
        stopped = [r for r in runs if not r["complete"]]
        if stopped:
            print("stopped or unfinished runs (their curves are used as far as they got; no final values): "
                  + ", ".join(f"{r['variant']} seed {r['seed']}" for r in stopped))
        _write_results(d, settings, runs, sizes, configs, None)
    finally:
        claimed.release()
    return 0


def _seed_order(run_dir: Path) -> tuple:
    """seed-2 before seed-10 (the order `dsmoe compare` ran them in); other names after, by name."""
    number = run_dir.name.removeprefix("seed-")
    return (0, int(number), "") if number.isdigit() else (1, 0, run_dir.name)


def _run_parallel(jobs: list[dict], n: int, bar) -> list[int]:
    """Runs ``jobs`` in order, ``n`` processes at a time, and returns their exit codes. A SIGTERM
    or Ctrl-C here: no further run starts, and every running run is sent SIGTERM (it finishes its
    step, saves a checkpoint and stops, as `dsmoe train` does; a second signal stops them at once);
    the runs that never started count as stopped. Each run is its own process group, so a
    terminal's Ctrl-C reaches only this process, which passes it on once."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")
    stops = (signal.SIGINT, signal.SIGTERM)
    codes: list = [None] * len(jobs)
    running: dict = {}  # job index -> Process
    signals: list[int] = []

    def handler(signum, frame):
        signals.append(signum)
        for p in list(running.values()):
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, handler) for sig in stops}
    try:
        upcoming = 0
        while upcoming < len(jobs) or running:
            while not signals and upcoming < len(jobs) and len(running) < n:
                # started with the stop signals blocked (the mask survives spawn): one that comes
                # before the run has its handlers waits for them instead of killing it unsaved
                signal.pthread_sigmask(signal.SIG_BLOCK, stops)
                try:
                    p = ctx.Process(target=_run_in_worker, args=(jobs[upcoming],), daemon=False)
                    p.start()
                    running[upcoming] = p
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
                upcoming += 1
            if signals and upcoming < len(jobs):
                stopped = 143 if signals[0] == signal.SIGTERM else 130
                for i in range(upcoming, len(jobs)):
                    codes[i] = stopped
                upcoming = len(jobs)
            mp.connection.wait([p.sentinel for p in running.values()], timeout=1.0)
            for i, p in list(running.items()):
                if p.exitcode is not None:
                    p.join()
                    codes[i] = p.exitcode if p.exitcode >= 0 else 128 - p.exitcode  # killed by signal N: 128 + N
                    del running[i]
                    _say(bar, _job_line(jobs[i], codes[i]))
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        for p in running.values():  # only when this loop itself failed
            p.terminate()
            p.join()
    return codes


def _run_in_worker(job: dict) -> None:
    """A worker process's body: its own process group (stops come from the comparison), then
    the run; the exit code is the run's."""
    os.setpgrp()
    sys.exit(run_one(job))


def _say(bar, msg: str) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _job_line(job: dict, code: int) -> str:
    rows = read_metrics(Path(job["ns"].out))
    val = [r["loss"] for r in rows if r.get("split") == "val"]
    tail = f"final val loss {val[-1]:.4f}" if code == 0 and val else f"stopped (exit {code}), see {job['log']}"
    return f"{LABELS[job['variant']]:>13} seed {job['seed']}: {tail}"


# ------------------------------------------------------------------------------ results


def _collect(settings: dict, runs: list[dict], sizes: dict, configs: dict) -> dict:
    """compare.json's numbers from the runs' logs. ``runs``: variant, seed, run_dir, complete.
    Final values are over the complete runs; the curves and the gap at each evaluation use every
    seed that reached it (a stopped run still shows how far it got)."""
    from dsmoe.analysis import compare_seeds, seed_summary

    steps_total = settings["steps"]
    tokens_per_step = settings["batch_size"] * settings["seq_len"]
    models = {}
    for name in configs:
        per_seed = []
        for run in runs:
            if run["variant"] != name:
                continue
            rows = read_metrics(Path(run["run_dir"]))
            tr = [r for r in rows if r.get("split") == "train"]
            val = [r for r in rows if r.get("split") == "val"]
            if not tr or not val:
                continue
            last = tr[-max(1, steps_total // 20):]
            per_seed.append({
                "seed": run["seed"], "run_dir": str(run["run_dir"]), "complete": run["complete"],
                "steps_done": tr[-1]["step"], "final_val_loss": val[-1]["loss"] if run["complete"] else None,
                "final_train_loss": sum(r["loss"] for r in last) / len(last),
                "final_aux_loss": sum(r["aux_loss"] or 0.0 for r in last) / len(last),
                "seconds": tr[-1]["elapsed_s"], "tokens_per_s": _mean_rate(tr, tokens_per_step),
                "val_curve": [[r["step"], r["loss"]] for r in val],
                "train_curve": [[r["step"], r["loss"], r["aux_loss"]] for r in tr],
                "balance": _balance(Path(run["run_dir"])) if configs[name].get("n_routed_experts") else None,
            })
        entry = {"config": configs[name], "size": sizes[name], "per_seed": per_seed}
        done = [r for r in per_seed if r["complete"]]
        if done:
            for key in ("final_val_loss", "final_train_loss", "final_aux_loss"):
                entry[key] = seed_summary(r[key] for r in done)
        if per_seed:
            at = _by_step(per_seed)
            entry["val_curve"] = {"steps": sorted(at), "n": [len(at[st]) for st in sorted(at)],
                                  **{k: [seed_summary(at[st].values())[k] for st in sorted(at)] for k in ("mean", "std")}}
        models[name] = entry

    gaps, crossings = {}, {}
    for a, b in PAIRS:
        if not models.get(a, {}).get("per_seed") or not models.get(b, {}).get("per_seed"):
            continue
        va = {r["seed"]: r for r in models[a]["per_seed"] if r["complete"]}
        vb = {r["seed"]: r for r in models[b]["per_seed"] if r["complete"]}
        common = sorted(set(va) & set(vb))
        g = compare_seeds([va[x]["final_val_loss"] for x in common],
                          [vb[x]["final_val_loss"] for x in common]) if common else {"n": 0, "verdict": "no common seed"}
        g["seeds"] = common
        # the gap at every evaluation, over the seeds both reached: grows, shrinks, changes sign?
        at_a, at_b = _by_step(models[a]["per_seed"]), _by_step(models[b]["per_seed"])
        trend = []
        for st in sorted(set(at_a) & set(at_b)):
            both = sorted(set(at_a[st]) & set(at_b[st]))
            if both:
                t = compare_seeds([at_a[st][x] for x in both], [at_b[st][x] for x in both])
                trend.append({"step": st, "n": len(both), "gap": t["gap"], "ci95": t["ci95"], "verdict": t["verdict"]})
        g["trend"] = trend
        gaps[f"{a}-{b}"] = g
        crossings[f"{a}-{b}"] = _crossing(trend, LABELS[a], LABELS[b])
    return {"settings": settings, "models": models, "gaps": gaps, "crossings": crossings}


def _by_step(per_seed: list[dict]) -> dict:
    """{eval step: {seed: val loss}}."""
    at: dict = {}
    for r in per_seed:
        for st, v in r["val_curve"]:
            at.setdefault(st, {})[r["seed"]] = v
    return at


def _crossing(trend: list[dict], a: str, b: str) -> dict:
    """Where the mean gap a - b last changed sign (a's curve went below b's for good, or above)."""
    signs = [(t["step"], t["gap"] < 0) for t in trend]
    if not signs:
        return {"step": None, "note": "no common evaluations"}
    last = signs[-1][1]
    since = signs[-1][0]
    for st, below in reversed(signs):
        if below != last:
            break
        since = st
    if since == signs[0][0]:
        return {"step": None, "a_below_b": last,
                "note": f"{a} below {b} at every evaluation" if last else f"{a} never below {b} (no crossing yet)"}
    return {"step": since, "a_below_b": last,
            "note": f"{a} below {b} from step {since} on" if last else f"{a} above {b} from step {since} on"}


def _balance(run_dir: Path) -> dict | None:
    """Routed load in the last window of training: max / uniform and coefficient of variation per layer."""
    from .common import read_json

    p = run_dir / "loads.json"
    if not p.is_file():
        return None
    windows = read_json(p, "loads.json")["windows"]
    if not windows:
        return None
    out = {"max_over_uniform": [], "cv": [], "unused": []}
    for load in windows[-1]["loads"]:
        mean = sum(load) / len(load)
        sd = (sum((x - mean) ** 2 for x in load) / len(load)) ** 0.5
        out["max_over_uniform"].append(max(load) / mean if mean else 0.0)
        out["cv"].append(sd / mean if mean else 0.0)
        out["unused"].append(sum(1 for x in load if x == 0))
    return out


def _report(results: dict) -> None:
    models = {n: m for n, m in results["models"].items() if "final_val_loss" in m}
    if not models:
        print("\nno run finished")
    else:
        print("\nfinal validation loss (nats/token), every finished seed:")
        print(format_table(
            ["variant", "mean", "std", "per seed", "train (last 5%)", "balance loss", "max load/uniform", "tokens/s"],
            [[LABELS[n], f"{m['final_val_loss']['mean']:.4f}", f"{m['final_val_loss']['std']:.4f}",
              " ".join(f"{v:.4f}" for v in m["final_val_loss"]["values"]),
              f"{m['final_train_loss']['mean']:.4f}", f"{m['final_aux_loss']['mean']:.4f}",
              _load_desc(m), f"{_mean([r['tokens_per_s'] for r in m['per_seed']]):.0f}"] for n, m in models.items()]))
    uniform = {n: m["config"]["aux_loss_alpha"] * m["config"]["num_hidden_layers"]
               for n, m in results["models"].items() if m["config"].get("n_routed_experts")}
    if uniform:
        print("balance loss at perfectly uniform routing: " + ", ".join(f"{LABELS[n]} {u:.4f}" for n, u in uniform.items())
              + " (the sum over MoE layers of alpha x 1)")
    print("\ngaps of final validation loss, paired by seed (mean ± 95% interval; seed spread = std of one model over seeds):")
    for key, g in results["gaps"].items():
        a, b = key.split("-")
        if g["n"]:
            ci = f"± {g['ci95']:.4f}" if g["ci95"] is not None else "(one seed: no interval)"
            print(f"  {LABELS[a]} − {LABELS[b]} = {g['gap']:+.4f} {ci} (seed spread {g['seed_spread']:.4f}, "
                  f"{g['n']} seed{'s' if g['n'] != 1 else ''}): {g['verdict']}")
        else:
            print(f"  {LABELS[a]} − {LABELS[b]}: no seed finished for both")
        trend = ", ".join(f"{t['step']}: {t['gap']:+.3f} ({t['n']})" for t in _thin(g["trend"], 8))
        print(f"    over training: {results['crossings'][key]['note']}" + (f"; gap (seeds) at step {trend}" if trend else ""))
    took = f" in {results['elapsed_s']:.0f}s in all" if results.get("elapsed_s") is not None else ""
    print(f"\n{results['settings']['tokens_per_run']:,} tokens per run{took}. "
          "The paper's ranking (DeepSeekMoE < GShard < Dense at equal activated FLOPs) needs enough tokens for "
          "the MoEs' extra parameters to pay off; read the gaps' trend over steps, not only their final value.")


def _thin(rows: list, k: int) -> list:
    """At most k of ``rows``, evenly spaced, the last always included."""
    if len(rows) <= k:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (k - 1)) for i in range(k)})
    return [rows[i] for i in idx]


def _load_desc(m: dict) -> str:
    bals = [r["balance"] for r in m["per_seed"] if r.get("balance")]
    if not bals:
        return "-"
    return f"{_mean([_mean(b['max_over_uniform']) for b in bals]):.2f}"


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------ plots


def plot_curves(results: dict, path: Path) -> None:
    """Validation loss (mean over seeds, band = min..max of the seeds) and the balance loss."""
    plt = use_agg()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, m) in enumerate(results["models"].items()):
        if not m["per_seed"]:
            continue
        color = f"C{i}"
        n = len(m["per_seed"])
        at = _by_step(m["per_seed"])
        steps = sorted(at)
        ax.plot(steps, [sum(at[st].values()) / len(at[st]) for st in steps], "o-", color=color, ms=3,
                label=f"{LABELS[name]} ({n} seed{'s' if n != 1 else ''})")
        ax.fill_between(steps, [min(at[st].values()) for st in steps], [max(at[st].values()) for st in steps],
                        color=color, alpha=0.2, lw=0)
        trains = [r["train_curve"] for r in m["per_seed"]]
        if any(row[2] for row in trains[0]):
            length = min(len(t) for t in trains)
            aux = [sum(t[j][2] or 0.0 for t in trains) / n for j in range(length)]
            w = max(1, length // 40)
            smooth = [sum(aux[max(0, j - w + 1): j + 1]) / len(aux[max(0, j - w + 1): j + 1]) for j in range(length)]
            ax2.plot([trains[0][j][0] for j in range(length)], smooth, color=color, label=LABELS[name])
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross entropy (nats / token)")
    ax.set_title("validation loss: mean, band = min..max of seeds", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:  # (no run reached an evaluation: no legend to draw)
        ax.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("balance loss (sum over layers)")
    ax2.set_title("expert-level balance loss (train, mean of seeds)")
    ax2.grid(alpha=0.3)
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_load_over_time(loads_path: Path, title: str, path: Path) -> None:
    """One heatmap per MoE layer: routed experts (rows) by training window (columns), colour =
    tokens of the window / uniform share."""
    from .common import read_json

    data = read_json(loads_path, "loads.json")
    windows = data["windows"]
    if not windows:
        return
    plt = use_agg()
    import numpy as np

    n_layers = len(windows[0]["loads"])
    E = len(windows[0]["loads"][0])
    fig, axes = plt.subplots(1, n_layers, figsize=(2.2 + 2.6 * n_layers, 1.5 + 0.09 * E), squeeze=False)
    ends = [w["end_step"] for w in windows]
    for li in range(n_layers):
        grid = np.array([w["loads"][li] for w in windows], dtype=float).T  # [E, windows]
        rel = grid / np.maximum(grid.mean(axis=0, keepdims=True), 1e-9)
        ax = axes[0][li]
        im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=max(2.0, rel.max()),
                       extent=(0, ends[-1], E - 0.5, -0.5))
        ax.set_title(f"MoE layer {li}", fontsize=9)
        ax.set_xlabel("step")
        if li == 0:
            ax.set_ylabel("routed expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="load / uniform")
    fig.suptitle(f"{title}: routed load over training", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
