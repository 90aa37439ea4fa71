"""The paper's comparison and expert-specialisation measures, as a library (no CLI needed).

* Accounting: :func:`model_size` — total and activated parameters and forward FLOPs per token,
  the quantities the paper holds equal ("iso-FLOPs": activated expert parameters; "iso-
  parameters": total expert parameters) when it compares Dense, GShard and DeepSeekMoE.
* Seeds: :func:`seed_summary` (mean ± spread of one model over seeds) and :func:`compare_seeds`
  (the gap between two models, paired by seed, against the seed-to-seed spread, with a verdict:
  ``"separated"`` or ``"within noise"``).
* Specialisation (the paper's Section 4.5 analysis), on any :class:`DeepSeekMoEForCausalLM`:
  :func:`disable_top_experts` (for each token, mask the routed experts with the highest routing
  probability; the gate picks its top-k among the rest: redundancy among routed experts), and
  :func:`limit_activated_experts` (route every token to fewer experts than it was trained with);
  :func:`top_expert_ablation` and :func:`activated_expert_sweep` evaluate the loss under each.

Example::

    from dsmoe import analysis
    batches = [(x, y)]                         # token ids [B, L] and next-token targets [B, L]
    base, loads = analysis.evaluate(model, batches)
    rows = analysis.top_expert_ablation(model, batches, ratios=(0, 1/16, 2/16))
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "model_size",
    "seed_summary",
    "compare_seeds",
    "t_critical",
    "evaluate",
    "disable_top_experts",
    "limit_activated_experts",
    "disabled_counts",
    "top_expert_ablation",
    "activated_expert_sweep",
]


# ------------------------------------------------------------------------------ accounting


def model_size(config, seq_len: int | None = None) -> dict:
    """Parameter and compute accounting of a DeepSeekMoEForCausalLM built from ``config``.

    Returns a dict with ``total`` and ``activated`` parameters (embeddings and head included, as
    in the paper's tables; :func:`dsmoe.config.count_parameters`), ``expert_total`` and
    ``expert_activated`` (FFN parameters: dense MLPs, shared and routed experts; routers
    excluded) — the two numbers the paper keeps equal across architectures — and, when
    ``seq_len`` is given, ``flops_per_token``: forward FLOPs per token, 2 x activated weight-matrix
    parameters (the embedding lookup excluded, routers and output head included) plus attention's
    2 x 2 x layers x seq_len x (heads x head_dim) (Kaplan et al. 2020's C_forward)."""
    from dsmoe.config import count_parameters

    total, activated = count_parameters(config)
    h = config.hidden_size
    expert_total = expert_activated = router = 0
    for layer in range(config.num_hidden_layers):
        if config.is_moe_layer(layer):
            E, k, inter = config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size
            shared = 3 * h * inter * config.n_shared_experts if config.n_shared_experts else 0
            expert_total += shared + E * 3 * h * inter
            expert_activated += shared + k * 3 * h * inter
            router += E * h * (2 if config.router_type == "noisy_topk" else 1)
        else:
            expert_total += 3 * h * config.intermediate_size
            expert_activated += 3 * h * config.intermediate_size
    out = {"total": total, "activated": activated, "expert_total": expert_total,
           "expert_activated": expert_activated, "router": router}
    if seq_len is not None:
        if seq_len < 1:
            raise ValueError(f"model_size: seq_len must be >= 1, got {seq_len}")
        norms = config.num_hidden_layers * 2 * h + h
        matrices = activated - config.vocab_size * h - norms  # the lookup table is not a matmul
        if config.tie_word_embeddings:
            matrices += config.vocab_size * h  # the tied head still multiplies
        d_attn = config.num_attention_heads * config.head_dim
        out["flops_per_token"] = 2 * matrices + 4 * config.num_hidden_layers * seq_len * d_attn
    return out


# ------------------------------------------------------------------------------ seeds

# two-sided 95% critical values of Student's t by degrees of freedom (1..30); normal beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t_critical(dof: int) -> float:
    """Two-sided 95% critical value of Student's t with ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"t_critical: dof must be >= 1, got {dof}")
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def _values(name: str, values: Iterable[float]) -> list[float]:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"{name}: needs at least one value")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name}: values must be finite, got {vals}")
    return vals


def seed_summary(values: Iterable[float]) -> dict:
    """Mean and spread of one quantity over seeds: ``mean``, ``std`` (sample standard deviation,
    n-1; 0 for one seed), ``min``, ``max``, ``n``, ``values``."""
    vals = _values("seed_summary", values)
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n, "values": vals}


def compare_seeds(a: Sequence[float], b: Sequence[float]) -> dict:
    """The gap a - b between two models trained on the same seeds (a[i] and b[i] share seed i's
    data order), against the noise of seeds.

    ``gap`` mean of the per-seed differences, ``gap_std`` their standard deviation, ``stderr`` =
    gap_std / sqrt(n), ``seed_spread`` the pooled seed-to-seed standard deviation of a and b
    (how much one model moves between seeds), ``ci95`` the half-width t * stderr (Student's t,
    n-1 degrees of freedom), and ``verdict``: ``"separated"`` when the 95% interval of the gap
    excludes 0, ``"within noise"`` otherwise (also with a single seed: no spread is known)."""
    a, b = _values("compare_seeds (a)", a), _values("compare_seeds (b)", b)
    if len(a) != len(b):
        raise ValueError(f"compare_seeds: a and b must have one value per seed each, got {len(a)} and {len(b)}")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    d = seed_summary(diffs)
    spread = math.sqrt((seed_summary(a)["std"] ** 2 + seed_summary(b)["std"] ** 2) / 2)
    if n < 2:
        return {"gap": d["mean"], "gap_std": 0.0, "stderr": None, "ci95": None, "seed_spread": spread, "n": n,
                "verdict": "within noise", "per_seed": diffs}
    stderr = d["std"] / math.sqrt(n)
    ci = t_critical(n - 1) * stderr
    verdict = "separated" if abs(d["mean"]) > ci else "within noise"
    return {"gap": d["mean"], "gap_std": d["std"], "stderr": stderr, "ci95": ci, "seed_spread": spread, "n": n,
            "verdict": verdict, "per_seed": diffs}


# ------------------------------------------------------------------------------ specialisation


def _routers(model) -> list:
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layers")
    return [layer.gate for layer in layers]


@torch.no_grad()
def evaluate(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
    """Mean cross entropy (nats per token, the mean of the batches' means) of ``model`` over
    ``batches`` of (input ids [B, L], targets [B, L]), and the tokens each routed expert of every
    MoE layer received, summed over the batches (int64 [E] per MoE layer, in layer order)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, loads = 0.0, 0, None
    try:
        for x, y in batches:
            out = model(x.to(device))
            logits = out.logits.float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1)).item()
            count += 1
            step = [t.to("cpu", torch.int64) for t in (out.tokens_per_expert or ())]
            loads = step if loads is None else [a + b for a, b in zip(loads, step)]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: batches is empty")
    return total / count, loads or []


@contextlib.contextmanager
def disable_top_experts(model, num_disabled: int, renormalize: bool = False) -> Iterator[None]:
    """Inside the block, every token's ``num_disabled`` routed experts of highest routing
    probability are disabled in every MoE layer, and the gate selects its top-k among the
    remaining routed experts (the paper's redundancy analysis, its Figure 4). Shared experts are
    untouched.

    The gate values of the experts it then selects are their routing probabilities s_i from the
    softmax over *all* routed experts, as the paper's gating formula defines g_i (the disabled
    experts' probability mass is lost, not handed to the others), then normalised over the chosen
    k when the model's config has norm_topk_prob. ``renormalize=True`` instead takes the softmax
    over the remaining experts only."""
    if not isinstance(num_disabled, int) or isinstance(num_disabled, bool) or num_disabled < 0:
        raise ValueError(f"disable_top_experts: num_disabled must be an integer >= 0, got {num_disabled!r}")
    routers = _routers(model)
    for gate in routers:
        if num_disabled > gate.num_experts - gate.top_k:
            raise ValueError(f"disable_top_experts: cannot disable {num_disabled} of {gate.num_experts} routed "
                             f"experts with top-{gate.top_k} routing (at most {gate.num_experts - gate.top_k})")
    if num_disabled == 0:
        yield
        return
    patched = []
    try:
        for gate in routers:
            original_logits, original_forward, lost = gate.logits, gate.forward, {}

            def masked(x, _orig=original_logits, _lost=lost):
                logits = _orig(x)
                # the highest logits = the highest probabilities; ties to the lower id, as the gate op
                top = logits.sort(dim=-1, descending=True, stable=True).indices[..., :num_disabled]
                _lost["mass"] = logits.float().softmax(-1).gather(-1, top).sum(-1, keepdim=True)
                return logits.scatter(-1, top, float("-inf"))

            def forward(*args, _orig=original_forward, _gate=gate, _lost=lost, **kwargs):
                route = _orig(*args, **kwargs)
                if renormalize or _gate.normalize:
                    return route
                # the softmax over the remaining experts divided by their mass 1 - lost: undo it
                keep = (1.0 - _lost.pop("mass")).to(route.weights.dtype)
                return route._replace(weights=route.weights * keep)

            gate.logits, gate.forward = masked, forward  # instance attributes shadow the router's methods
            patched.append(gate)
        yield
    finally:
        for gate in patched:
            del gate.logits, gate.forward


@contextlib.contextmanager
def limit_activated_experts(model, top_k: int) -> Iterator[None]:
    """Inside the block, every MoE layer routes each token to its ``top_k`` highest-probability
    routed experts instead of the number it was trained with (shared experts stay on): the
    paper's "fewer activated experts" measure."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"limit_activated_experts: top_k must be an integer >= 1, got {top_k!r}")
    routers = _routers(model)
    for gate in routers:
        if top_k > gate.num_experts:
            raise ValueError(f"limit_activated_experts: top_k {top_k} exceeds the {gate.num_experts} routed experts")
    saved = [(gate, gate.top_k, gate.normalize) for gate in routers]
    try:
        for gate in routers:
            gate.normalize = bool(gate.normalize) and top_k > 1
            gate.top_k = top_k
        yield
    finally:
        for gate, k, norm in saved:
            gate.top_k, gate.normalize = k, norm


def disabled_counts(num_experts: int, top_k: int, ratios: Iterable[float]) -> list[tuple[float, int]]:
    """(ratio, experts to disable) for each ratio of ``num_experts`` routed experts: the count is
    round(ratio x num_experts), kept only when at least ``top_k`` experts remain."""
    out = []
    for r in ratios:
        r = float(r)
        if not 0 <= r < 1:
            raise ValueError(f"disabled_counts: each ratio must be in [0, 1), got {r}")
        n = int(math.floor(r * num_experts + 0.5))
        if n <= num_experts - top_k:
            out.append((r, n))
    return out


def top_expert_ablation(model, batches, ratios: Iterable[float] = (0, 1 / 16, 2 / 16, 3 / 16, 4 / 16),
                        renormalize: bool = False) -> list[dict]:
    """Loss with each token's top routed experts disabled (:func:`disable_top_experts`), one
    row per ratio: ``ratio``, ``disabled``, ``loss`` and ``increase`` over the intact model."""
    batches = list(batches)
    gate = _routers(model)[0]
    base, _ = evaluate(model, batches)
    rows = []
    for ratio, n in disabled_counts(gate.num_experts, gate.top_k, ratios):
        if n == 0:
            loss = base
        else:
            with disable_top_experts(model, n, renormalize=renormalize):
                loss, _ = evaluate(model, batches)
        rows.append({"ratio": ratio, "disabled": n, "loss": loss, "increase": loss - base})
    return rows


def activated_expert_sweep(model, batches, top_ks: Iterable[int]) -> list[dict]:
    """Loss when every token is routed to ``k`` routed experts, for each k in ``top_ks``
    (:func:`limit_activated_experts`): rows of ``top_k`` and ``loss``."""
    batches = list(batches)
    rows = []
    for k in top_ks:
        with limit_activated_experts(model, int(k)):
            loss, _ = evaluate(model, batches)
        rows.append({"top_k": int(k), "loss": loss})
    return rows
