"""`dsmoe train`: trains a DeepSeekMoE language model on bytes of text.

Exact resumption: the batch of step s is a pure function of (seed, s) (see data.py), the
learning rate a pure function of s, and a checkpoint holds the weights, the optimizer state and
the random generator states; so a run resumed from step s computes the same losses as one that
was never stopped.
"""
from __future__ import annotations

import argparse
import collections
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .common import (
    CLIError,
    MetricsLog,
    check_number,
    check_run_dir,
    check_seed,
    check_text,
    claim_run_dir,
    pick_device,
    stderr_is_tty,
    synchronize,
    use_agg,
    write_json,
)
from .data import BYTE_VOCAB_SIZE, BOS_ID, EOS_ID, ByteTokenizer, eval_batches, load_token_data, train_batch
from .models import make_config, parameter_counts

# Defaults of the bare `dsmoe train` (the README's main job): the "small" preset (4 layers,
# hidden 256, 1 shared + 16 routed experts of 128, top-4) on the standard library's sources.
DEFAULTS = dict(
    preset="small", config=None, data=None, steps=300, batch_size=16, seq_len=128, lr=2e-3,
    warmup=None, min_lr=None, weight_decay=0.1, grad_clip=1.0, seed=0, bf16=False, compile=False,
    impl="dsmoe", eval_every=None, eval_batches=8, save_every=None, log_every=None,
    sample_tokens=200, sample_prompt=None, device="auto", keep_last=None,
)
# What may differ between a run and its resumption (everything else would change the curve).
RESUME_MAY_CHANGE = {"steps", "eval_every", "save_every", "log_every", "sample_tokens", "sample_prompt",
                     "device", "eval_batches", "keep_last"}
# What a run writes into its directory: what --overwrite removes first, so nothing of the
# replaced run (its checkpoints above all) can be mixed with the new one.
RUN_OUTPUTS = ("config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "train_args.json", "run.json", "log.csv", "log.jsonl", "loss.png", "checkpoints")
# The run's final model and log: they belong to the branch that wrote them (see retire_later).
FINAL_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "loss.png",
               "log.csv", "log.jsonl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="model preset (default: small); see `dsmoe info --presets`")
    g.add_argument("--config", metavar="JSON", help="a config.json (file or checkpoint folder) instead of a preset")
    g.add_argument("--impl", choices=("dsmoe", "reference"), help="MoE layer execution: dsmoe ops (default) or the plain PyTorch reference")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", help="a text file or a folder of text files (default: the Python standard library's sources)")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {DEFAULTS['seq_len']})")
    g.add_argument("--batch-size", type=int, help=f"sequences per step (default {DEFAULTS['batch_size']})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"total optimizer steps (default {DEFAULTS['steps']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']})")
    g.add_argument("--warmup", type=int, help="linear warm-up steps (default: 5%% of --steps)")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default: --lr / 10)")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {DEFAULTS['weight_decay']})")
    g.add_argument("--grad-clip", type=float, help=f"clip the gradient norm to this, 0 = off (default {DEFAULTS['grad_clip']})")
    g.add_argument("--seed", type=int, help=f"random seed (default {DEFAULTS['seed']})")
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (weights and optimizer stay fp32)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: the GPU if there is one, else the CPU)")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run directory (default: a new runs/train-<date>-<time>)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing, non-empty --out: the previous run's files and checkpoints are deleted")
    g.add_argument("--resume", metavar="DIR",
                   help="continue a run: its directory (latest checkpoint) or one of its checkpoints/step-N; a "
                        "checkpoint outside a run directory continues into --out or a new run directory")
    g.add_argument("--keep-last", type=int, metavar="N", help="keep only the N latest checkpoints (default: all)")
    g.add_argument("--eval-every", type=int, help="validate every N steps (default: 5 times per run; 0 = only at the end)")
    g.add_argument("--eval-batches", type=int, help=f"batches per validation (default {DEFAULTS['eval_batches']})")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default: only at the end)")
    g.add_argument("--log-every", type=int, help="print a line every N steps when not on a terminal (default: 20 lines per run)")
    g.add_argument("--sample-tokens", type=int, help=f"tokens of the sample printed at the end, 0 = none (default {DEFAULTS['sample_tokens']})")
    g.add_argument("--sample-prompt", help="prompt of that sample (default: 'def ' on the default corpus, else a newline)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar: print lines instead")
    from dsmoe.cli.distributed.options import add_arguments as add_distributed_arguments

    add_distributed_arguments(p)  # --nproc, --ep


def lr_at(step: int, a: dict) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``steps``."""
    lr, warmup, min_lr, total = a["lr"], a["warmup"], a["min_lr"], a["steps"]
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _resolve_args(ns: argparse.Namespace, saved: dict | None) -> dict:
    """CLI values over the saved run's arguments (on resume) over the defaults, then checks."""
    given = {k: v for k, v in vars(ns).items() if k in DEFAULTS and v is not None}
    if saved is not None:
        changed = sorted(k for k, v in given.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v)
        if changed:
            raise CLIError(
                "--resume continues the run with its own settings; these cannot change: "
                + ", ".join(f"--{k.replace('_', '-')}" for k in changed)
            )
        a = {**DEFAULTS, **saved, **given}
    else:
        a = {**DEFAULTS, **given}
        if a["config"] is not None and "preset" not in given:
            a["preset"] = None
        if a["config"] is not None and a["preset"] is not None:
            raise CLIError("--preset and --config exclude each other")
    for name in ("steps", "batch_size", "seq_len", "eval_batches"):
        if isinstance(a[name], bool) or not isinstance(a[name], int) or a[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {a[name]}")
    check_number("--lr", a["lr"], low=0.0, low_open=True)
    if a["warmup"] is None:
        a["warmup"] = max(1, a["steps"] // 20) if a["steps"] > 1 else 0
    if a["min_lr"] is None:
        a["min_lr"] = a["lr"] / 10
    for name in ("warmup", "sample_tokens"):
        if a[name] < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {a[name]}")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        check_number(f"--{name.replace('_', '-')}", a[name])
    if a["min_lr"] > a["lr"]:
        raise CLIError(f"--min-lr {a['min_lr']} must not exceed --lr {a['lr']}")
    for name in ("eval_every", "save_every", "log_every"):
        if a[name] is not None and a[name] < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {a[name]}")
    if a["keep_last"] is not None and a["keep_last"] < 1:
        raise CLIError(f"--keep-last must be a positive integer, got {a['keep_last']}")
    check_seed("--seed", a["seed"])
    check_text("--sample-prompt", a["sample_prompt"])
    return a


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    ce: float


class Trainer:
    def __init__(self, a: dict, run_dir: Path | None, resume_from: Path | None, progress: bool, saved=None, dist=None):
        from dsmoe.cli.distributed.options import is_dcp_checkpoint

        self.a = a
        self.run_dir = run_dir  # set once claimed (after everything is checked)
        self.run_id: str | None = None
        self.parent: dict | None = None  # the checkpoint the next one descends from
        self.last_saved: int | None = None
        self.dist = dist  # a dsmoe.distributed.DistributedTraining under torchrun / --nproc, else None
        self.device = dist.device if dist is not None else pick_device(a["device"])
        self.tokenizer = ByteTokenizer()
        self.progress = progress
        if a["bf16"] and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise CLIError("--bf16: this GPU does not support bfloat16")

        if resume_from is not None:
            state, opt_state, rng = saved if saved is not None else ckpt.load_training_state(resume_from)
            self.config = make_config(config_path=str(resume_from))
        else:
            state = opt_state = rng = None
            # byte-level text: 256 bytes + <|bos|>, <|eos|>, <|pad|>
            self.config = make_config(a["preset"], a["config"], overrides=dict(
                vocab_size=BYTE_VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None))
        if a["seq_len"] > self.config.max_position_embeddings:
            raise CLIError(
                f"--seq-len {a['seq_len']} exceeds the model's max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )

        t0 = time.time()
        self.data = load_token_data(a["data"], self.tokenizer)
        self.data_load_s = time.time() - t0

        from dsmoe.model import DeepSeekMoEForCausalLM

        torch.manual_seed(a["seed"])
        # a distributed checkpoint's weights are loaded after wrapping, into the shards
        self.dcp_resume = resume_from is not None and is_dcp_checkpoint(resume_from)
        if resume_from is not None and not self.dcp_resume:
            from .models import load_model

            self.model = load_model(resume_from, self.device, dtype=torch.float32, impl=a["impl"])
        else:
            self.model = DeepSeekMoEForCausalLM(self.config, moe_impl=a["impl"]).to(self.device)
        self.model.train()
        self.param_names = [n for n, _ in self.model.named_parameters()]
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        # On CPU torch defaults to AdamW's per-parameter loop; its fused kernel made a step of
        # DESIGN.md's 42.6M model ~11% faster here (855 -> 760 ms, bf16). Not for the sharded
        # (DTensor) parameters of expert parallelism.
        fused = True if self.device.type == "cpu" and dist is None else None
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": a["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr_at(0, a), betas=(0.9, 0.95), eps=1e-8, fused=fused,
        )
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        if resume_from is not None:
            if state["param_names"] != self.param_names:
                raise CLIError(f"checkpoint {resume_from}: its optimizer state does not match the model's parameters")
            for group in (opt_state or {}).get("param_groups", []):
                if "betas" in group:
                    group["betas"] = tuple(group["betas"])
            try:
                if opt_state is not None:
                    self.optimizer.load_state_dict(opt_state)
                    for group in self.optimizer.param_groups:  # this run's choice, whatever saved it
                        group["fused"] = fused
            except (ValueError, KeyError, RuntimeError) as e:
                raise CLIError(f"checkpoint {resume_from}: bad optimizer state ({e})") from None
            self.step, self.tokens, self.elapsed = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
            self.parent = {"run_id": state.get("run_id"), "checkpoint_id": state.get("checkpoint_id"),
                           "step": self.step, "path": str(Path(resume_from).resolve())}
            ckpt.restore_rng(rng)
        if dist is not None:  # expert parallelism + FSDP2; the optimizer moves to the shards
            self.model, self.optimizer = dist.wrap(self.model, self.optimizer)
        if self.dcp_resume:
            from dsmoe.distributed.checkpoint import load as load_dcp

            load_dcp(resume_from, self.model, self.optimizer, distributed=dist is not None)
        self.forward = self.model
        if a["compile"]:
            self.forward = torch.compile(self.model)
        self.eval_data = list(eval_batches(self.data.val, a["batch_size"], a["seq_len"], a["eval_batches"]))

    # ------------------------------------------------------------------ steps
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.a["bf16"]))

    def train_step(self, step: int) -> StepResult:
        a = self.a
        lr = lr_at(step, a)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = train_batch(self.data.train, step, a["seed"], a["batch_size"], a["seq_len"])
        if self.dist is not None:  # this process's rows of the global batch
            x, y = self.dist.local_batch(x, y)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            out = self.forward(x)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        aux = out.aux_loss if out.aux_loss is not None else ce.new_zeros(())
        loss = ce + aux
        bad = not torch.isfinite(loss)
        if self.dist is not None:
            bad = self.dist.any(bad)
        if bad:
            raise CLIError(f"the loss became {loss.item()} at step {step + 1}; try a lower --lr")
        loss.backward()
        if a["grad_clip"] > 0:
            clip = self.dist.clip_grad_norm_ if self.dist is not None else torch.nn.utils.clip_grad_norm_
            clip(self.model.parameters(), a["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist is not None:  # the global batch's values
            return StepResult(*self.dist.mean(torch.stack([loss.detach(), aux.detach().float(), ce.detach()])))
        return StepResult(loss.item(), float(aux.item()), ce.item())

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = 0.0
        try:
            for x, y in self.eval_data:
                if self.dist is not None:
                    x, y = self.dist.local_batch(x, y)
                x, y = x.to(self.device), y.to(self.device)
                with self.autocast():
                    logits = self.model(x).logits
                total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
        finally:
            self.model.train()
        if self.dist is not None:
            return self.dist.mean(total / len(self.eval_data))
        return total / len(self.eval_data)

    def save(self) -> Path:
        """This step's checkpoint (once per step), recording the run and the checkpoint it
        descends from; then ``--keep-last`` prunes the older ones."""
        path = ckpt.step_dir(self.run_dir, self.step)
        if self.last_saved == self.step:
            return path
        checkpoint_id = ckpt.new_id()
        state = {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed, "args": self.a,
                 "run_id": self.run_id, "checkpoint_id": checkpoint_id, "parent": self.parent}
        if self.dist is not None:  # sharded: a DCP checkpoint, every process writes its part
            from dsmoe.cli.distributed.options import extra_files

            self.dist.save(path, self.model, self.optimizer, {**state, "param_names": self.param_names},
                           extra_files(self.tokenizer, ckpt.rng_tensors))
        else:
            ckpt.save_checkpoint(path, self.model, self.optimizer, self.tokenizer, state, self.param_names)
        self.parent = {"run_id": self.run_id, "checkpoint_id": checkpoint_id, "step": self.step}
        self.last_saved = self.step
        if self.a["keep_last"] and (self.dist is None or self.dist.is_main):
            ckpt.prune(self.run_dir, self.a["keep_last"], self.run_id)
        return path


class _Interrupt:
    """First Ctrl-C or SIGTERM (what schedulers, `timeout` and container stops send): finish
    the current step, save, stop. Second: stop at once."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.requested = None  # the name of the signal that asked to stop
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                break
        if self._old:  # a launcher may start a run with them blocked until now (dsmoe compare --jobs)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = self.SIGNALS[signum]
        print(f"\n{self.requested}: finishing this step and saving a checkpoint "
              f"({self.requested} again to stop without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _fmt_tokens(n: float) -> str:
    return f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def plot_losses(run_dir: Path, rows: list[dict], path: Path) -> None:
    plt = use_agg()
    tr = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    va = [(r["step"], r["loss"]) for r in rows if r.get("split") == "val" and r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / byte)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ns: argparse.Namespace) -> int:
    from dsmoe.cli.distributed import options as dist_cli

    launched = dist_cli.maybe_launch(ns, add_arguments)  # --nproc N: torchrun runs N copies of us
    if launched is not None:
        return launched
    dist = dist_cli.join(ns, device=ns.device)  # None unless started by torchrun
    try:
        with dist_cli.quiet_unless_main(dist):
            code = _run(ns, dist)
        # stopped by the --nproc launcher: saved; the launcher itself reports the interrupt (130)
        return 0 if code == 130 and dist is not None and dist_cli.stop_requested() else code
    finally:
        if dist is not None:
            dist.close()


def _run(ns: argparse.Namespace, dist=None) -> int:
    from dsmoe.cli.distributed import options as dist_cli

    main = dist is None or dist.is_main
    resume_ckpt = resume_run = None
    saved = None
    if ns.resume:
        resume_ckpt, resume_run = ckpt.resolve_resume(ns.resume)
        if dist_cli.is_dcp_checkpoint(resume_ckpt):  # written by a distributed run
            saved = dist_cli.read_training_state(resume_ckpt)
        else:
            saved = ckpt.load_training_state(resume_ckpt)
    a = _resolve_args(ns, saved[0]["args"] if saved else None)

    # where the run writes: decided and checked before any work, claimed after the model is built
    out = Path(ns.out).expanduser() if ns.out else None
    in_place = False
    if resume_ckpt is not None:
        start_step = int(saved[0]["step"])
        if start_step >= a["steps"]:
            raise CLIError(f"--resume: the checkpoint is at step {start_step}; nothing left to do for --steps {a['steps']}")
        if out is not None and _inside(out, resume_ckpt):
            raise CLIError(f"--out {ns.out} is inside the checkpoint {resume_ckpt} being resumed; "
                           "a checkpoint is never written into: choose another --out")
        in_place = resume_run is not None and (out is None or out.resolve() == resume_run.resolve())
        if not in_place and out is not None and ns.overwrite and _inside(resume_ckpt, out):
            raise CLIError(f"--overwrite of --out {ns.out} could delete the checkpoint {resume_ckpt} being resumed; "
                           "choose another --out")
        if in_place:
            run_id = ckpt.check_same_run(resume_ckpt, saved[0], resume_run)
    if not in_place and out is not None:
        check_run_dir(out, ns.overwrite)

    # config, data and model are checked before anything is written
    trainer = Trainer(a, None, resume_ckpt, progress=not ns.no_progress and stderr_is_tty() and main,
                      saved=saved, dist=dist)
    model, cfg = trainer.model, trainer.config
    claimed = None
    try:
        if main:
            if in_place:
                claimed = claim_run_dir(resume_run, "train", existing=True)
                run_dir = resume_run
                for line in ckpt.clean_partial_saves(run_dir):
                    print(f"{run_dir}: {line} (left by a save that was stopped)")
                if ckpt.read_run(run_dir) is None:  # a run of a dsmoe without run ids: it gets one now
                    run_id = run_id or ckpt.new_id()
                    ckpt.write_run(run_dir, run_id, branched_from=None)
                retired = ckpt.retire_later(run_dir, start_step, FINAL_FILES)
                if retired is not None:
                    print(f"resuming from step {start_step}: the later checkpoints of the abandoned branch "
                          f"(and its final model and log) were moved to {retired}")
            else:
                claimed = claim_run_dir(out, "train", overwrite=ns.overwrite, outputs=RUN_OUTPUTS)
                run_dir = claimed.path
                run_id = ckpt.new_id()
                ckpt.write_run(run_dir, run_id, branched_from=trainer.parent)
                ckpt.publish_files(run_dir, lambda d: (cfg.save_pretrained(d), trainer.tokenizer.save(d)),
                                   "the run's config")
            write_json(run_dir / "train_args.json", a)  # on resume, with the new --steps etc.
        if dist is not None:  # every process writes into rank 0's directory
            where, run_id = dist.broadcast((str(run_dir), run_id) if main else None)
            run_dir = Path(where)
        trainer.run_dir, trainer.run_id = run_dir, run_id
        return _train(ns, a, trainer, run_dir, resume_ckpt, in_place, main, dist)
    finally:
        if claimed is not None:
            claimed.release()


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _train(ns, a: dict, trainer: Trainer, run_dir: Path, resume_ckpt: Path | None, in_place: bool, main: bool,
           dist) -> int:
    from dsmoe.cli.distributed import options as dist_cli

    model, cfg = trainer.model, trainer.config
    total, active = parameter_counts(cfg)
    moe = f"{cfg.n_shared_experts or 0} shared + {cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok})" \
        if cfg.n_routed_experts else "dense"
    print(f"dsmoe train -> {run_dir}")
    print(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {moe}; "
          f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M activated per token; impl {a['impl']}")
    print(f"data: {trainer.data.summary()} (read in {trainer.data_load_s:.1f}s)")
    print(f"device: {trainer.device}{' bf16' if a['bf16'] else ''}, {torch.get_num_threads()} threads; "
          f"{a['steps']} steps x {a['batch_size']} x {a['seq_len']} tokens, lr {a['lr']:g} "
          f"(warm-up {a['warmup']}, cosine to {a['min_lr']:g})")
    if dist is not None:
        print(f"distributed: {dist.describe()}; --batch-size {a['batch_size']} is the global batch")
    if resume_ckpt is not None:
        into = "" if in_place else " into this new run directory (the checkpoint is left as it is)"
        print(f"resuming from {resume_ckpt} at step {trainer.step}{into}")
    sys.stdout.flush()

    log = MetricsLog(run_dir, keep_until=trainer.step if in_place else None) if main else dist_cli.NullLog()
    steps = a["steps"]
    eval_every = a["eval_every"] if a["eval_every"] is not None else max(1, steps // 5)
    save_every = a["save_every"] or 0
    log_every = a["log_every"] or max(1, steps // 20)
    tokens_per_step = a["batch_size"] * a["seq_len"]

    bar = None
    if trainer.progress:
        import shutil

        from tqdm import tqdm

        # a terminal that reports a 0 x 0 size would make tqdm print nothing; shutil falls back to 80 x 24
        size = shutil.get_terminal_size()
        bar = tqdm(total=steps, initial=trainer.step, unit="step", ncols=size.columns, nrows=size.lines, file=sys.stderr)

    def say(msg: str) -> None:
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    interrupted = False
    first_loss = None
    recent = collections.deque(maxlen=20)  # durations of the last steps, for tokens/s
    run_t0 = time.perf_counter()
    elapsed0 = trainer.elapsed
    with _Interrupt() as stop:
        while trainer.step < steps:
            t = time.perf_counter()
            r = trainer.train_step(trainer.step)
            synchronize(trainer.device)
            dt = time.perf_counter() - t
            trainer.step += 1
            trainer.tokens += tokens_per_step
            trainer.elapsed = elapsed0 + (time.perf_counter() - run_t0)
            recent.append(dt)
            tps = tokens_per_step * len(recent) / max(sum(recent), 1e-9)
            first_loss = r.ce if first_loss is None else first_loss
            log.add(step=trainer.step, split="train", loss=r.ce, aux_loss=r.aux_loss, lr=lr_at(trainer.step - 1, a),
                    tokens=trainer.tokens, tokens_per_s=round(tokens_per_step / dt, 1), elapsed_s=round(trainer.elapsed, 3))
            if bar is not None:
                bar.set_postfix_str(f"loss {r.ce:.3f} aux {r.aux_loss:.4f} {_fmt_tokens(tps)} tok/s", refresh=False)
                bar.update(1)
            elif trainer.step % log_every == 0 or trainer.step == steps:
                say(f"step {trainer.step:>5}/{steps} | loss {r.ce:.4f} | aux {r.aux_loss:.4f} | "
                    f"lr {lr_at(trainer.step - 1, a):.2e} | {_fmt_tokens(tps)} tok/s | {trainer.elapsed:.0f}s")
            if eval_every and trainer.step % eval_every == 0 and trainer.step < steps:
                val = trainer.evaluate()
                log.add(step=trainer.step, split="val", loss=val, tokens=trainer.tokens, elapsed_s=round(trainer.elapsed, 3))
                say(f"step {trainer.step:>5}/{steps} | val loss {val:.4f}")
            if save_every and trainer.step % save_every == 0 and trainer.step < steps:
                say(f"checkpoint: {trainer.save()}")
            if dist.should_stop(stop.requested) if dist is not None else stop.requested:
                interrupted = True
                break
        if bar is not None:
            bar.close()

        if interrupted:
            path = trainer.save()
            # under --nproc the signal may have reached another process (or the launcher) only
            reason = stop.requested or "stop requested by another process"
            print(f"interrupted at step {trainer.step}/{steps} ({reason}); checkpoint saved to {path}")
            print(f"continue with: dsmoe train --resume {run_dir}")
            return 143 if stop.requested == "SIGTERM" else 130

        val = trainer.evaluate()
        log.add(step=trainer.step, split="val", loss=val, tokens=trainer.tokens, elapsed_s=round(trainer.elapsed, 3))
        final = trainer.save()
        if dist is not None:  # gathered; rank 0 writes it and keeps a one-process copy for the sample
            model = dist.export_hf(model, run_dir)
        else:  # the run directory itself is a loadable checkpoint
            ckpt.publish_files(run_dir, model.save_pretrained, "the final model into")
    if stop.requested:  # it came during the final evaluation or save, which were finished first
        print(f"stopped ({stop.requested}) after the final save")
        return 143 if stop.requested == "SIGTERM" else 130
    if not main:
        return 0
    plot_losses(run_dir, log.rows, run_dir / "loss.png")
    train_rows = [r for r in log.rows if r.get("split") == "train"]
    start_loss = train_rows[0]["loss"] if train_rows else first_loss
    end_loss = sum(r["loss"] for r in train_rows[-10:]) / max(1, len(train_rows[-10:]))
    timed = train_rows[1:] or train_rows  # the first step includes one-off set-up
    mean_tps = len(timed) * tokens_per_step / max(1e-9, sum(tokens_per_step / r["tokens_per_s"] for r in timed))
    print(f"done: {trainer.step} steps, {trainer.tokens:,} tokens in {trainer.elapsed:.0f}s "
          f"(~{_fmt_tokens(mean_tps)} tokens/s); train loss {start_loss:.3f} -> {end_loss:.3f} "
          f"(mean of last {len(train_rows[-10:])}), val loss {val:.4f}")
    print(f"saved: {run_dir} (model), {final} (checkpoint), {run_dir / 'log.csv'}, {run_dir / 'loss.png'}")
    if a["sample_tokens"] > 0:
        prompt = a["sample_prompt"] if a["sample_prompt"] is not None else ("def " if a["data"] is None else "\n")
        print(f"sample (temperature 0.8, top-k 40, seed {a['seed']}):")
        from .generate import stream

        stream(model, trainer.tokenizer, prompt, a["sample_tokens"], temperature=0.8, top_k=40, top_p=None,
               seed=a["seed"], out=sys.stdout)
    return 0
