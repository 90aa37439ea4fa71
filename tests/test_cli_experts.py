"""dsmoe/cli/experts.py in-process: the labels, the compare-run entries, the statistics over
seeds and their report (against hand-computed numbers), the plots (their data, axes and pixel
sizes), and whole `dsmoe experts` runs on two small random models whose losses are recomputed
here with plain cross entropy."""
from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsmoe import DeepSeekMoEForCausalLM, get_preset
from dsmoe.cli import experts, main
from dsmoe.cli.common import CLIError
from dsmoe.cli.data import eval_batches, load_token_data
from dsmoe.tokenizer import ByteTokenizer

from conftest import save_word_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- small pieces


@pytest.mark.parametrize("dirs, labels", [
    (["runs/deepseekmoe"], ["deepseekmoe"]),
    (["runs/deepseekmoe", "runs/gshard"], ["deepseekmoe", "gshard"]),
    (["x/a/model", "x/b/model"], ["a_model", "b_model"]),
    (["p/m", "p/m", "q/m"], ["p_m", "p_m_2", "q_m"]),
    (["p/m", "p/m", "p/m"], ["m", "m_2", "m_3"]),  # the same folder: more parts cannot tell them apart
    (["a/x/y/z", "b/x/y/z"], ["a_x_y_z", "b_x_y_z"]),
    (["w/my run (1)"], ["my_run_1"]),  # file-name-safe, no trailing separator
    (["w/.hidden."], ["hidden"]),
    (["w/..."], ["model"]),
    (["w/a+b-c.d"], ["a+b-c.d"]),
])
def test_labels(tmp_path, monkeypatch, dirs, labels):
    monkeypatch.chdir(tmp_path)
    assert experts._label(dirs) == labels


def test_label_of_the_root_folder():
    assert experts._label(["/"]) == ["root"]


def test_labels_of_absolute_folders_that_differ_first():
    # the first part below the root tells them apart; letters keep their case, an X is a letter
    assert experts._label(["/x1/run", "/x2/run"]) == ["x1_run", "x2_run"]
    assert experts._label(["/w/DeepSeek-V2", "/w/Xmodel.X"]) == ["DeepSeek-V2", "Xmodel.X"]


def test_evaluate_is_the_library_function():
    from dsmoe import analysis

    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(get_preset("tiny", vocab_size=64)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)) for _ in range(2)]
    loss, loads = experts.evaluate(model, batches)
    want_loss, want_loads = analysis.evaluate(model, batches)
    assert loss == want_loss and len(loads) == len(want_loads) >= 1
    assert all(torch.equal(a, b) for a, b in zip(loads, want_loads))


def test_disabled_counts_are_the_distinct_counts_in_order():
    # round(ratio x 16): 0, 1, 2, 3, 4; at most 16 - 4 may go
    assert experts.disabled_counts(16, 4, experts.DEFAULT_RATIOS) == [0, 1, 2, 3, 4]
    # 4 experts, top-2: 1/16 -> 0.25 -> 0, 2/16 -> 0.5 -> 1 (half up), 3/16 -> 0.75 -> 1, 4/16 -> 1
    assert experts.disabled_counts(4, 2, experts.DEFAULT_RATIOS) == [0, 1]
    assert experts.disabled_counts(4, 2, [0.75, 0.5, 0.5]) == [2]  # 3 would leave fewer than 2


def test_seed_of_a_label_and_the_number_format():
    assert experts._seed("gshard_seed-3") == "3"
    assert experts._seed("deepseekmoe_seed-1_seed-12") == "12"
    assert experts._fmt({"mean": 1.23456, "std": 0.5, "n": 2}) == "1.2346 ± 0.5000"
    assert experts._fmt({"mean": 1.23456, "std": 0.0, "n": 1}) == "1.2346"
    assert experts._fmt({"mean": 1.23456, "std": 0.5, "n": 3}, digits=2) == "1.23 ± 0.50"


def _compare_json(root: Path, per_seed: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.json").write_text(json.dumps({"models": {v: {"per_seed": rows} for v, rows in per_seed.items()}}))
    return root


def test_compare_run_entries(tmp_path):
    elsewhere = tmp_path / "moved" / "ds1"
    elsewhere.mkdir(parents=True)
    run = _compare_json(tmp_path / "cmp", {
        "dense": [{"seed": 0, "run_dir": str(tmp_path)}],  # not analysed: no experts
        "deepseekmoe": [{"seed": 0, "run_dir": "relative/ds0"},  # relative: the compare folder's own
                        {"seed": 1, "run_dir": str(elsewhere)},  # absolute and there: as given
                        {"seed": 2, "run_dir": str(elsewhere), "complete": False}],  # stopped early
        "gshard": [{"seed": 0, "run_dir": str(tmp_path / "gone")}],  # absolute but gone
    })
    assert experts._compare_models(str(run)) == [
        ("gshard_seed-0", str(run / "gshard" / "seed-0"), "gshard"),
        ("deepseekmoe_seed-0", str(run / "deepseekmoe" / "seed-0"), "deepseekmoe"),
        ("deepseekmoe_seed-1", str(elsewhere), "deepseekmoe"),
    ]


def test_compare_run_without_finished_moe_runs(tmp_path):
    run = _compare_json(tmp_path / "cmp", {"dense": [{"seed": 0, "run_dir": "d"}],
                                           "gshard": [{"seed": 0, "run_dir": "g", "complete": False}]})
    with pytest.raises(CLIError) as e:
        experts._compare_models(str(run))
    assert str(e.value) == f"--compare-run {run}: no finished GShard or DeepSeekMoE run in its compare.json"
    (run / "compare.json").write_text("{}")
    with pytest.raises(CLIError, match="no finished GShard"):
        experts._compare_models(str(run))
    with pytest.raises(CLIError) as e:
        experts._compare_models(str(tmp_path / "nowhere"))
    assert str(e.value) == f"--compare-run: {tmp_path / 'nowhere' / 'compare.json'} does not exist"


def test_compare_run_skips_a_stopped_seed_and_goes_on(tmp_path):
    run = _compare_json(tmp_path / "cmp", {"deepseekmoe": [{"seed": 0, "run_dir": "d0", "complete": False},
                                                           {"seed": 1, "run_dir": "d1"}]})
    assert experts._compare_models(str(run)) == [
        ("deepseekmoe_seed-1", str(run / "deepseekmoe" / "seed-1"), "deepseekmoe")]


# ------------------------------------------------------------------------------- statistics over seeds


def _model(group, loss, top_k, ablation, activated):
    return {"group": group, "loss": loss, "top_k": top_k,
            "ablation": [{"ratio": r, "disabled": n, "loss": loss + inc, "increase": inc} for r, n, inc in ablation],
            "activated": [{"top_k": k, "loss": v} for k, v in activated]}


def _three_gshard_two_deepseekmoe():
    """GShard seeds 0, 1, 2 and DeepSeekMoE seeds 0, 1 (3/16 measured for seed 1 only)."""
    return {
        "gshard_seed-0": _model("gshard", 3.0, 2, [(0.0, 0, 0.0), (1 / 16, 1, 0.1), (2 / 16, 2, 0.3)], [(1, 3.5), (2, 3.0)]),
        "gshard_seed-1": _model("gshard", 3.2, 2, [(0.0, 0, 0.0), (1 / 16, 1, 0.2), (2 / 16, 2, 0.4)], [(1, 3.9), (2, 3.2)]),
        "gshard_seed-2": _model("gshard", 3.1, 2, [(0.0, 0, 0.0), (1 / 16, 1, 0.15), (2 / 16, 2, 0.35)], [(1, 3.7), (2, 3.1)]),
        "deepseekmoe_seed-0": _model("deepseekmoe", 2.8, 3, [(0.0, 0, 0.0), (1 / 16, 1, 0.5), (2 / 16, 2, 0.8)],
                                     [(1, 3.4), (2, 3.0), (3, 2.8)]),
        "deepseekmoe_seed-1": _model("deepseekmoe", 2.9, 3, [(0.0, 0, 0.0), (1 / 16, 1, 0.6), (2 / 16, 2, 1.0),
                                                             (3 / 16, 3, 1.5)], [(1, 3.6), (2, 3.1), (3, 2.9)]),
    }


def _check(summary: dict, mean: float, std: float, values: list):
    assert summary["n"] == len(values) and summary["values"] == pytest.approx(values)
    assert summary["mean"] == pytest.approx(mean) and summary["std"] == pytest.approx(std, abs=1e-12)
    assert (summary["min"], summary["max"]) == (pytest.approx(min(values)), pytest.approx(max(values)))


def test_groups_over_seeds_by_hand():
    groups = experts._group(_three_gshard_two_deepseekmoe())
    assert list(groups) == ["gshard", "deepseekmoe", "deepseekmoe_vs_gshard"]
    gs, ds, cmp = groups["gshard"], groups["deepseekmoe"], groups["deepseekmoe_vs_gshard"]
    assert gs["members"] == ["gshard_seed-0", "gshard_seed-1", "gshard_seed-2"]
    assert ds["members"] == ["deepseekmoe_seed-0", "deepseekmoe_seed-1"]
    assert (gs["top_k"], ds["top_k"]) == (2, 3)
    # sample standard deviations (n - 1): GShard's losses 3.0, 3.2, 3.1 -> 3.1 ± 0.1
    _check(gs["loss"], 3.1, 0.1, [3.0, 3.2, 3.1])
    _check(ds["loss"], 2.85, math.sqrt(0.005), [2.8, 2.9])
    assert [(r["ratio"], r["disabled"]) for r in gs["ablation"]] == [(0.0, 0), (1 / 16, 1), (2 / 16, 2)]
    _check(gs["ablation"][1]["increase"], 0.15, 0.05, [0.1, 0.2, 0.15])
    _check(gs["ablation"][2]["increase"], 0.35, 0.05, [0.3, 0.4, 0.35])
    _check(gs["ablation"][2]["loss"], 3.45, 0.15, [3.3, 3.6, 3.45])
    # 3/16 was measured for one of the two DeepSeekMoE seeds only: no mean over seeds of it
    assert [r["ratio"] for r in ds["ablation"]] == [0.0, 1 / 16, 2 / 16]
    _check(ds["ablation"][1]["increase"], 0.55, math.sqrt(0.005), [0.5, 0.6])
    _check(ds["ablation"][2]["increase"], 0.9, math.sqrt(0.02), [0.8, 1.0])
    assert [r["top_k"] for r in gs["activated"]] == [1, 2] and [r["top_k"] for r in ds["activated"]] == [1, 2, 3]
    _check(gs["activated"][0]["loss"], 3.7, 0.2, [3.5, 3.9, 3.7])
    _check(ds["activated"][2]["loss"], 2.85, math.sqrt(0.005), [2.8, 2.9])

    # paired by seed: the seeds both have (0 and 1), GShard's seed 2 has no partner
    assert cmp["seeds"] == ["0", "1"]
    t1 = 12.706  # Student's t, 95% two-sided, 1 degree of freedom
    # ratio 1/16: DeepSeekMoE's rise minus GShard's, per seed 0.5 - 0.1 and 0.6 - 0.2: always 0.4
    a1, a2 = cmp["ablation"]
    assert a1["ratio"] == 1 / 16 and a1["gap"] == pytest.approx(0.4) and a1["per_seed"] == pytest.approx([0.4, 0.4])
    assert a1["verdict"] == "separated"
    # ratio 2/16: 0.8 - 0.3 and 1.0 - 0.4 -> 0.55 ± t x 0.0707 / sqrt 2
    assert a2["ratio"] == 2 / 16 and a2["gap"] == pytest.approx(0.55) and a2["verdict"] == "within noise"
    assert a2["ci95"] == pytest.approx(t1 * math.sqrt(0.005) / math.sqrt(2), rel=1e-4)
    assert a2["seed_spread"] == pytest.approx(math.sqrt((0.02 + 0.005) / 2))
    # 3/16 lacks seed 0's row, 4/16 was never measured: not compared
    assert len(cmp["ablation"]) == 2
    # k activated DeepSeekMoE experts against GShard's full top-2 loss of the same seed (3.0, 3.2)
    assert [r["top_k"] for r in cmp["activated"]] == [1, 2, 3]
    assert [r["per_seed"] for r in cmp["activated"]] == [pytest.approx([0.4, 0.4]), pytest.approx([0.0, -0.1]),
                                                         pytest.approx([-0.2, -0.3])]
    assert [r["verdict"] for r in cmp["activated"]] == ["separated", "within noise", "within noise"]


def test_groups_of_single_models_and_of_one_architecture():
    s = _three_gshard_two_deepseekmoe()
    one = {"a": {**s["gshard_seed-0"], "group": "a"}, "b": {**s["deepseekmoe_seed-0"], "group": "b"}}
    groups = experts._group(one)
    assert list(groups) == ["a", "b"]  # no pairing without both gshard and deepseekmoe groups
    _check(groups["b"]["loss"], 2.8, 0.0, [2.8])
    only_gshard = {k: v for k, v in s.items() if k.startswith("gshard")}
    assert list(experts._group(only_gshard)) == ["gshard"]


def test_groups_without_common_seeds():
    s = _three_gshard_two_deepseekmoe()
    s = {k: v for k, v in s.items() if k in ("gshard_seed-2", "deepseekmoe_seed-0", "deepseekmoe_seed-1")}
    assert experts._group(s)["deepseekmoe_vs_gshard"] == {"seeds": [], "ablation": [], "activated": []}


REPORT = """
over seeds (mean ± std):
  GShard top-2: 3 models, loss 3.1000 ± 0.1000
    top experts disabled: 0.0625 (1): +0.1500 ± 0.0500; 0.1250 (2): +0.3500 ± 0.0500
    k activated: 1: 3.7000 ± 0.2000; 2: 3.1000 ± 0.1000
  DeepSeekMoE: 2 models, loss 2.8500 ± 0.0707
    top experts disabled: 0.0625 (1): +0.5500 ± 0.0707; 0.1250 (2): +0.9000 ± 0.1414
    k activated: 1: 3.5000 ± 0.1414; 2: 3.0500 ± 0.0707; 3: 2.8500 ± 0.0707

DeepSeekMoE vs GShard, paired by seed (mean ± 95% interval):
  loss rise at 0.0625 of routed experts disabled, DeepSeekMoE − GShard: +0.4000 ± 0.0000 (seed spread 0.0707): \
separated — DeepSeekMoE less redundant (the paper)
  loss rise at 0.1250 of routed experts disabled, DeepSeekMoE − GShard: +0.5500 ± 0.6353 (seed spread 0.1118): \
within noise
  DeepSeekMoE with k=1 − GShard full top-2: +0.4000 ± 0.0000: separated
  DeepSeekMoE with k=2 − GShard full top-2: -0.0500 ± 0.6353: within noise
  DeepSeekMoE with k=3 − GShard full top-2: -0.2500 ± 0.6353: within noise
  fewest activated DeepSeekMoE experts whose mean loss is at most GShard's with its full top-2: k = 2 of 3
"""


def test_report_over_seeds(capsys):
    experts._report(experts._group(_three_gshard_two_deepseekmoe()))
    assert capsys.readouterr().out == REPORT


def test_report_when_deepseekmoe_never_matches_and_with_one_pair(capsys):
    s = _three_gshard_two_deepseekmoe()
    for name in ("deepseekmoe_seed-0", "deepseekmoe_seed-1"):
        for r in s[name]["activated"]:
            r["loss"] += 1.0  # above GShard's full top-2 at every k
    experts._report(experts._group(s))
    out = capsys.readouterr().out
    assert "fewest activated" not in out
    assert out.endswith("  DeepSeekMoE's mean loss is above GShard's full top-2 at every k up to its trained top-k\n")
    # one common seed: no interval, and no "less redundant" claim on a gap within noise
    del s["deepseekmoe_seed-1"]
    experts._report(experts._group(s))
    out = capsys.readouterr().out
    assert "DeepSeekMoE − GShard: +0.4000  (seed spread 0.0000): within noise\n" in out
    assert "DeepSeekMoE with k=1 − GShard full top-2: +1.4000 : within noise\n" in out


def test_report_says_nothing_for_one_model_per_group(capsys):
    s = _three_gshard_two_deepseekmoe()
    experts._report(experts._group({k: s[k] for k in ("gshard_seed-0", "deepseekmoe_seed-0")}))
    assert capsys.readouterr().out == ""


def test_a_negative_separated_gap_is_not_called_less_redundant(capsys):
    s = _three_gshard_two_deepseekmoe()
    for name, inc in (("gshard_seed-0", 0.9), ("gshard_seed-1", 1.0)):
        s[name]["ablation"][1]["increase"] = inc  # GShard rises more, by 0.4 at both seeds
    experts._report(experts._group(s))
    out = capsys.readouterr().out
    assert "DeepSeekMoE − GShard: -0.4000 ± 0.0000 (seed spread 0.0707): separated\n" in out
    assert "less redundant" not in out


# ------------------------------------------------------------------------------- plots


class _Figures:
    """Stands in for pyplot: the figures stay open to be looked at."""

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        self.plt, self.figures = plt, []

    def subplots(self, *args, **kwargs):
        fig, ax = self.plt.subplots(*args, **kwargs)
        self.figures.append((fig, ax))
        return fig, ax

    def close(self, fig):
        pass

    def close_all(self):
        for fig, _ in self.figures:
            self.plt.close(fig)


@pytest.fixture
def figures(monkeypatch):
    f = _Figures()
    monkeypatch.setattr(experts, "use_agg", lambda: f)
    yield f
    f.close_all()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("E, layers", [(8, [1, 3]), (40, [2]), (64, [1]), (65, [1]), (80, [1, 2, 5])])
def test_load_heatmap(figures, tmp_path, E, layers):
    loads = torch.arange(len(layers) * E, dtype=torch.int64).reshape(len(layers), E)
    loads[0] = 0  # a layer that routed nothing: zeros, not NaN
    experts.plot_load(loads, layers, "t: expert load", tmp_path / "l.png")
    (fig, ax), = figures.figures
    width, height = min(16, 2.5 + 0.25 * E), 1.2 + 0.45 * len(layers)
    assert tuple(fig.get_size_inches()) == pytest.approx((width, height))
    pixels = _png_size(tmp_path / "l.png")
    assert abs(pixels[0] - width * 110) <= 1 and abs(pixels[1] - height * 110) <= 1  # (matplotlib's rounding)
    rel = loads.double() / loads.double().mean(dim=1, keepdim=True)
    rel[0] = 0.0
    image = ax.images[0]
    assert torch.allclose(torch.as_tensor(image.get_array().data, dtype=torch.float64), rel, atol=1e-6)
    assert (image.get_cmap().name, image.get_interpolation()) == ("viridis", "nearest")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("routed expert", "layer", "t: expert load")
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in layers]
    assert list(ax.get_yticks()) == list(range(len(layers)))
    if E <= 64:
        labels = ax.get_xticklabels()
        assert [t.get_text() for t in labels] == [str(e) for e in range(E)]
        assert labels[0].get_fontsize() == (6 if E > 32 else 8)
    else:
        assert len(ax.get_xticks()) < E  # matplotlib's own ticks
    assert fig.axes[1].get_ylabel() == "load / uniform load"  # the colour bar


def test_ablation_and_activated_plots(figures, tmp_path):
    groups = experts._group(_three_gshard_two_deepseekmoe())
    experts.plot_ablation(groups, tmp_path / "a.png")
    experts.plot_activated(groups, tmp_path / "k.png")
    (fa, ax_a), (fk, ax_k) = figures.figures
    for fig, path in ((fa, "a.png"), (fk, "k.png")):
        assert tuple(fig.get_size_inches()) == (6, 4)
        assert _png_size(tmp_path / path) == (600, 400)
    assert (ax_a.get_xlabel(), ax_a.get_ylabel(), ax_a.get_title()) == (
        "ratio of disabled top routed experts", "loss increase (nats / token)", "redundancy among routed experts")
    assert [t.get_text() for t in ax_a.get_legend().get_texts()] == ["GShard top-2 (3)", "DeepSeekMoE (2)"]
    gs_bars, ds_bars = ax_a.containers
    assert gs_bars.lines[0].get_xydata().flatten().tolist() == pytest.approx([0, 0, 1 / 16, 0.15, 2 / 16, 0.35])
    assert ds_bars.lines[0].get_xydata().flatten().tolist() == pytest.approx([0, 0, 1 / 16, 0.55, 2 / 16, 0.9])
    # error bars: ± the standard deviation over seeds
    segments = ds_bars.lines[2][0].get_segments()
    assert [y for s in segments for y in (s[0][1], s[1][1])] == pytest.approx(
        [0, 0, 0.55 - math.sqrt(0.005), 0.55 + math.sqrt(0.005), 0.9 - math.sqrt(0.02), 0.9 + math.sqrt(0.02)])

    assert (ax_k.get_xlabel(), ax_k.get_ylabel(), ax_k.get_title()) == (
        "activated routed experts per token", "loss (nats / token)", "fewer activated experts")
    assert [t.get_text() for t in ax_k.get_legend().get_texts()] == ["GShard top-2 (trained top-2)",
                                                                     "DeepSeekMoE (trained top-3)"]
    gs_bars, ds_bars = ax_k.containers
    assert ds_bars.lines[0].get_xydata().flatten().tolist() == pytest.approx([1, 3.5, 2, 3.05, 3, 2.85])
    assert [s[1][1] - s[0][1] for s in gs_bars.lines[2][0].get_segments()] == pytest.approx([0.4, 0.2])
    # a dashed line at each architecture's intact loss, in its colour
    dashed = [line for line in ax_k.lines if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in dashed] == pytest.approx([3.1, 2.85])
    assert [line.get_color() for line in dashed] == ["C0", "C1"]
    assert [line.get_color() for line in (gs_bars.lines[0], ds_bars.lines[0])] == ["C0", "C1"]


# ------------------------------------------------------------------------------- whole runs


@pytest.fixture
def two_models(tmp_path):
    """Two small random models (byte vocabulary, one MoE layer of 8 routed experts, top-2)."""
    dirs = []
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        # (weights 10x the preset's: routing and the experts' outputs matter to the loss)
        config = get_preset("tiny", vocab_size=258, bos_token_id=256, eos_token_id=257, initializer_range=0.2)
        model = DeepSeekMoEForCausalLM(config)
        model.save_pretrained(tmp_path / name)
        dirs.append(tmp_path / name)
    return dirs


def _cross_entropy(model_dir: Path, corpus: Path, split: str, tokens: int, seq_len: int, batch_size: int) -> float:
    """The mean over the batches of each batch's mean cross entropy, written out."""
    model = DeepSeekMoEForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = load_token_data(str(corpus), ByteTokenizer(), max_tokens=4 * (tokens + seq_len + 1))
    n = max(1, tokens // (batch_size * seq_len))
    losses = []
    with torch.no_grad():
        for x, y in eval_batches(data.val if split == "val" else data.train, batch_size, seq_len, n):
            logits = model(x).logits.float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def _table(text: str, title: str) -> list[list[str]]:
    lines = text.split(title + "\n", 1)[1].splitlines()
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[2:]:
        if not line.strip() or line.endswith(":"):
            break
        rows.append(line.split())
    return [lines[0].split()] + rows


def test_experts_of_two_models(two_models, corpus, tmp_path, capsys, figures):
    out = tmp_path / "ex"
    argv = ["experts", "--model", *map(str, two_models), "--data", str(corpus), "--tokens", "130", "--seq-len", "16",
            "--batch-size", "4", "--ratios", "0", "0.125", "0.25", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    # 130 // (4 x 16) = 2 batches, tokenised once for both (the same byte tokenizer)
    assert text.count("data: ") == 1
    assert "val split, 2 batches of 4 x 16 tokens\n" in text
    assert "\n== a: 1 MoE layers, 1 shared + 8 routed experts, top-2\n" in text
    assert "\n== b: 1 MoE layers, 1 shared + 8 routed experts, top-2\n" in text
    assert text.endswith(f"\nwrote {out}: load_<model>.png/.csv, ablation.png/.csv, activated.png/.csv, experts.json\n")
    assert "over seeds" not in text  # one model per label

    summary = json.loads((out / "experts.json").read_text())
    assert list(summary) == ["a", "b"]
    loss_tables = text.split("\n== ")[1:]
    for (label, s), d, block in zip(summary.items(), two_models, loss_tables):
        assert {k: s[k] for k in ("model", "group", "moe_layers", "num_routed_experts", "top_k", "num_shared_experts")} \
            == {"model": str(d), "group": label, "moe_layers": [1], "num_routed_experts": 8, "top_k": 2,
                "num_shared_experts": 1}
        loss = _cross_entropy(d, corpus, "val", 130, 16, 4)
        assert s["loss"] == pytest.approx(loss, rel=1e-5)
        # every one of the 2 x 4 x 16 tokens goes to 2 routed experts
        load = s["load_per_layer"]["1"]
        assert len(load) == 8 and sum(load) == 2 * 4 * 16 * 2 and all(isinstance(v, int) for v in load)
        with open(out / f"load_{label}.csv", newline="") as f:
            assert list(csv.reader(f)) == [["layer"] + [f"expert_{e}" for e in range(8)], ["1"] + [str(v) for v in load]]
        # the printed load table, relative to a uniform load
        rel = torch.tensor(load, dtype=torch.float64) / (sum(load) / 8)
        header, row = _table(block, "routed load per layer (1.0 = uniform):")
        assert header == ["layer", "max", "min", "cv", "unused"]
        assert row == ["1", f"{rel.max():.4f}", f"{rel.min():.4f}", f"{rel.std() / rel.mean():.4f}", str(int((rel == 0).sum()))]
        # ratios 0, 1/8, 1/4 of 8 experts: 0, 1, 2 disabled; nothing disabled is the intact model
        rows = s["ablation"]
        assert [(r["ratio"], r["disabled"]) for r in rows] == [(0.0, 0), (0.125, 1), (0.25, 2)]
        assert rows[0]["loss"] == s["loss"] and rows[0]["increase"] == 0.0
        for r in rows:
            assert r["increase"] == pytest.approx(r["loss"] - s["loss"])
        assert rows[2]["loss"] != rows[1]["loss"] != rows[0]["loss"]
        assert _table(block, "loss with each token's top routed experts disabled:") == [["disabled", "ratio", "loss", "increase"]] + [
            [str(r["disabled"]), f"{r['ratio']:.4f}", f"{r['loss']:.4f}", f"{r['increase']:+.4f}"] for r in rows]
        # k = 1 and 2 activated; at the trained k = 2 it is the intact model
        assert [r["top_k"] for r in s["activated"]] == [1, 2]
        assert s["activated"][1]["loss"] == pytest.approx(s["loss"], rel=1e-6)
        assert s["activated"][0]["loss"] != s["activated"][1]["loss"]
        assert _table(block, "loss with k activated routed experts per token:") == [["k", "loss"]] + [
            [str(r["top_k"]), f"{r['loss']:.4f}"] for r in s["activated"]]
    with open(out / "ablation.csv", newline="") as f:
        assert list(csv.reader(f)) == [["model", "disabled", "ratio", "loss", "increase"]] + [
            [label, str(r["disabled"]), str(r["ratio"]), str(r["loss"]), str(r["increase"])]
            for label, s in summary.items() for r in s["ablation"]]
    with open(out / "activated.csv", newline="") as f:
        assert list(csv.reader(f)) == [["model", "top_k", "loss"]] + [
            [label, str(r["top_k"]), str(r["loss"])] for label, s in summary.items() for r in s["activated"]]
    # the figures: a heatmap per model, then the ablation and the activated sweep over both
    titles = [ax.get_title() for _, ax in figures.figures]
    assert titles == ["a: expert load", "b: expert load", "redundancy among routed experts", "fewer activated experts"]
    for name in ("load_a.png", "load_b.png", "ablation.png", "activated.png"):
        assert _png_size(out / name)[0] > 100
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["load_a.png", "load_a.csv", "load_b.png", "load_b.csv", "ablation.png", "ablation.csv", "activated.png",
         "activated.csv", "experts.json"])


def test_experts_of_the_training_split_with_renormalisation(two_models, corpus, tmp_path, capsys):
    from dsmoe import analysis

    out = tmp_path / "ex"
    assert main(["experts", "--model", str(two_models[0]), "--data", str(corpus), "--split", "train", "--tokens", "64",
                 "--seq-len", "8", "--batch-size", "2", "--ratios", "0.25", "--renormalize", "--out", str(out)]) == 0
    assert "train split, 4 batches of 2 x 8 tokens" in capsys.readouterr().out
    s = json.loads((out / "experts.json").read_text())["a"]
    assert s["loss"] == pytest.approx(_cross_entropy(two_models[0], corpus, "train", 64, 8, 2), rel=1e-5)
    # the renormalised ablation (the softmax over the experts left), not the plain one
    model = DeepSeekMoEForCausalLM.from_pretrained(two_models[0], dtype=torch.float32).eval()
    data = load_token_data(str(corpus), ByteTokenizer(), max_tokens=4 * (64 + 8 + 1))
    batches = list(eval_batches(data.train, 2, 8, 4))
    renormalized = analysis.top_expert_ablation(model, batches, [0.25], renormalize=True)[0]["loss"]
    plain = analysis.top_expert_ablation(model, batches, [0.25], renormalize=False)[0]["loss"]
    assert abs(renormalized - plain) > 1e-3
    assert [(r["ratio"], r["disabled"]) for r in s["ablation"]] == [(0.25, 2)]
    assert s["ablation"][0]["loss"] == pytest.approx(renormalized, rel=1e-5)


def test_experts_default_ratios_and_output_folder(two_models, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["experts", "--model", str(two_models[0]), "--data", str(corpus), "--tokens", "16", "--seq-len", "8"]) == 0
    # fewer tokens than one batch: still one batch
    assert "val split, 1 batches of 8 x 8 tokens" in capsys.readouterr().out
    out, = (tmp_path / "runs").iterdir()
    assert out.name.startswith("experts-")
    s = json.loads((out / "experts.json").read_text())["a"]
    # 0, 1/16, 1/8, 3/16, 1/4 of 8 experts: round(0.5) = 1 (half up), round(1.5) = 2
    assert [(r["ratio"], r["disabled"]) for r in s["ablation"]] == [(0.0, 0), (1 / 16, 1), (1 / 8, 1), (3 / 16, 2),
                                                                    (1 / 4, 2)]


def test_experts_of_a_compare_run(two_models, corpus, tmp_path, capsys):
    run = _compare_json(tmp_path / "cmp", {
        "gshard": [{"seed": 0, "run_dir": str(two_models[0])}, {"seed": 1, "run_dir": str(two_models[1])}],
        "deepseekmoe": [{"seed": 0, "run_dir": str(two_models[1])}, {"seed": 1, "run_dir": str(two_models[0])}],
    })
    out = tmp_path / "ex"
    assert main(["experts", "--compare-run", str(run), "--data", str(corpus), "--tokens", "64", "--seq-len", "8",
                 "--batch-size", "8", "--ratios", "0", "0.125", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "experts.json").read_text())
    assert list(result) == ["renormalize", "models", "groups"] and result["renormalize"] is False
    assert list(result["models"]) == ["gshard_seed-0", "gshard_seed-1", "deepseekmoe_seed-0", "deepseekmoe_seed-1"]
    assert [result["models"][m]["group"] for m in result["models"]] == ["gshard"] * 2 + ["deepseekmoe"] * 2
    assert result["groups"] == json.loads(json.dumps(experts._group(result["models"])))
    # the same two models in both groups, paired crosswise: the gaps per seed cancel
    cmp = result["groups"]["deepseekmoe_vs_gshard"]
    assert cmp["seeds"] == ["0", "1"]
    a, b = (result["models"][f"gshard_seed-{s}"]["loss"] for s in (0, 1))
    assert cmp["activated"][1]["per_seed"] == pytest.approx([b - a, a - b])
    assert "\nover seeds (mean ± std):\n  GShard top-2: 2 models, loss " in text
    assert "\nDeepSeekMoE vs GShard, paired by seed (mean ± 95% interval):\n" in text
    for name in ("load_gshard_seed-0.png", "load_deepseekmoe_seed-1.csv", "ablation.png", "activated.png"):
        assert (out / name).is_file()


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    (["--ratios", "0", "1"], "--ratios: each ratio must be in [0, 1), got 1.0"),
    (["--ratios", "-0.1"], "--ratios: each ratio must be in [0, 1), got -0.1"),
    (["--seq-len", "129"], "--seq-len 129 exceeds MODEL's max_position_embeddings 128"),
    (["--device", "tpu"], "--device"),
])
def test_experts_refusals(two_models, corpus, tmp_path, capsys, args, message):
    out = tmp_path / "ex"
    code = main(["experts", "--model", str(two_models[0]), "--data", str(corpus), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and f"dsmoe: error: {message.replace('MODEL', str(two_models[0]))}" in err
    assert not out.exists()  # refused before anything is written


def test_experts_refuses_a_model_without_moe_layers_and_a_used_folder(tmp_path, corpus, capsys):
    dense = tmp_path / "dense"
    DeepSeekMoEForCausalLM(get_preset("tiny", vocab_size=258, first_k_dense_replace=2)).save_pretrained(dense)
    assert main(["experts", "--model", str(dense), "--data", str(corpus)]) == 2
    assert f"dsmoe: error: --model {dense} has no MoE layers to analyse" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    assert main(["experts", "--model", str(dense), "--out", str(used)]) == 2
    assert f"dsmoe: error: output directory {used} already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["mine.txt"]


def test_experts_of_a_model_without_shared_experts_routing_to_two(tmp_path, corpus, capsys):
    """No shared experts, two MoE layers whose routers give every expert the same score: ties go
    to the lower ids, so experts 0 and 1 take every token (4x the uniform load) and 6 are unused."""
    gshard = tmp_path / "gshard"
    model = DeepSeekMoEForCausalLM(get_preset("tiny", vocab_size=258, n_shared_experts=0, num_hidden_layers=3))
    for layer in model.moe_layers():
        torch.nn.init.zeros_(layer.gate.weight)
    model.save_pretrained(gshard)
    argv = ["experts", "--model", str(gshard), "--data", str(corpus), "--tokens", "16", "--seq-len", "8",
            "--batch-size", "2", "--ratios", "0", "--device", "cpu", "--out", str(tmp_path / "ex")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "\n== gshard: 2 MoE layers, 0 shared + 8 routed experts, top-2\n" in text
    rel = torch.tensor([4.0, 4.0, 0, 0, 0, 0, 0, 0])
    cv = f"{rel.std() / rel.mean():.4f}"
    assert _table(text, "routed load per layer (1.0 = uniform):") == [
        ["layer", "max", "min", "cv", "unused"], ["1", "4.0000", "0.0000", cv, "6"], ["2", "4.0000", "0.0000", cv, "6"]]
    summary = json.loads((tmp_path / "ex" / "experts.json").read_text())["gshard"]
    assert summary["num_shared_experts"] == 0 and summary["moe_layers"] == [1, 2]
    assert summary["load_per_layer"] == {"1": [16, 16, 0, 0, 0, 0, 0, 0], "2": [16, 16, 0, 0, 0, 0, 0, 0]}  # 2 x 8 tokens


# ------------------------------------------------------------------------------- the command line


def test_experts_arguments_defaults_and_usage():
    import argparse

    p = argparse.ArgumentParser(prog="dsmoe experts")
    experts.add_arguments(p)
    ns = p.parse_args(["--model", "m"])
    assert (ns.split, ns.tokens, ns.seq_len, ns.batch_size, ns.ratios, ns.renormalize, ns.overwrite, ns.out) == \
        ("val", 16384, 128, 8, None, False, False, None)
    assert (ns.device, ns.impl) == ("auto", "dsmoe")
    for impl in ("dsmoe", "reference"):
        assert p.parse_args(["--model", "m", "--impl", impl]).impl == impl
    usage = " ".join(p.format_usage().split())
    assert usage.startswith("usage: dsmoe experts [-h] (--model DIR [DIR ...] | --compare-run DIR) [--data PATH]")
    assert "[--ratios R [R ...]]" in usage and "[--split {val,train}]" in usage and "[--out DIR]" in usage


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --model --compare-run is required"),
    (["--model", "m", "--split", "test"], "argument --split: invalid choice: 'test' (choose from"),
    (["--model", "m", "--impl", "cuda"], "argument --impl: invalid choice: 'cuda' (choose from"),
])
def test_experts_argument_errors(capsys, args, message):
    assert main(["experts", *args]) == 2
    assert message in capsys.readouterr().err


def test_experts_smallest_sizes_and_overwrite(two_models, corpus, tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / "load_gone.csv").write_text("an earlier run's model")
    argv = ["experts", "--model", str(two_models[0]), "--data", str(corpus), "--tokens", "1", "--seq-len", "1",
            "--batch-size", "1", "--ratios", "0", "--out", str(out), "--overwrite"]
    assert main(argv) == 0
    assert "val split, 1 batches of 1 x 1 tokens\n" in capsys.readouterr().out
    # --overwrite replaces what the command writes (a model of the earlier run included), nothing else
    assert sorted(p.name for p in out.iterdir() if p.name != ".dsmoe.lock") == [
        "ablation.csv", "ablation.png", "activated.csv", "activated.png", "experts.json", "load_a.csv", "load_a.png",
        "notes.txt"]


def test_experts_evaluates_a_bf16_checkpoint_in_fp32(two_models, corpus, tmp_path):
    bf16 = tmp_path / "bf16"
    DeepSeekMoEForCausalLM.from_pretrained(two_models[0]).to(torch.bfloat16).save_pretrained(bf16)
    out = tmp_path / "ex"
    argv = ["experts", "--model", str(bf16), "--data", str(corpus), "--tokens", "130", "--seq-len", "16",
            "--batch-size", "4", "--ratios", "0", "--out", str(out)]
    assert main(argv) == 0
    loss = json.loads((out / "experts.json").read_text())["bf16"]["loss"]
    assert loss == pytest.approx(_cross_entropy(bf16, corpus, "val", 130, 16, 4), rel=1e-5)


def test_report_counts_a_tie_with_gshard_as_matched(capsys):
    groups = experts._group(_three_gshard_two_deepseekmoe())
    for r, gap in zip(groups["deepseekmoe_vs_gshard"]["activated"], (0.4, 0.0, -0.25)):
        r["gap"] = gap
    experts._report(groups)
    assert "mean loss is at most GShard's with its full top-2: k = 2 of 3\n" in capsys.readouterr().out


def test_load_heatmap_of_fewer_tokens_than_experts(figures, tmp_path):
    # 1 token x top-1 over 4 experts: the uniform load is 1/4 token, the routed expert 4x it
    experts.plot_load(torch.tensor([[0, 1, 0, 0]]), [1], "t", tmp_path / "l.png")
    (fig, ax), = figures.figures
    assert ax.images[0].get_array().data.tolist() == [[0.0, 4.0, 0.0, 0.0]]


def _word_model(directory: Path, words: list[str]) -> Path:
    DeepSeekMoEForCausalLM(get_preset("tiny", bos_token_id=1, eos_token_id=2)).save_pretrained(directory)
    save_word_level_tokenizer(directory, words)
    return directory


def test_experts_tokenises_once_per_distinct_tokenizer(two_models, corpus, tmp_path, capsys):
    words = _word_model(tmp_path / "w" / "words", ["def", "return", "x"])
    same = _word_model(tmp_path / "w" / "same", ["def", "return", "x"])
    other = _word_model(tmp_path / "w" / "other", ["def"])
    argv = ["experts", "--model", str(two_models[0]), str(words), str(same), str(other), "--data", str(corpus),
            "--tokens", "16", "--seq-len", "8", "--batch-size", "2", "--ratios", "0", "--out", str(tmp_path / "ex")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    # bytes, the three-word vocabulary (twice: the same tokenizer.json), the one-word vocabulary
    assert text.count("data: ") == 3
    summary = json.loads((tmp_path / "ex" / "experts.json").read_text())
    assert list(summary) == ["a", "words", "same", "other"]


def test_experts_accepts_the_longest_sequence(two_models, corpus, tmp_path):
    argv = ["experts", "--model", str(two_models[0]), "--data", str(corpus), "--tokens", "128", "--seq-len", "128",
            "--batch-size", "1", "--ratios", "0", "--out", str(tmp_path / "ex")]
    assert main(argv) == 0  # the tiny preset's max_position_embeddings


def test_paired_ablation_goes_on_past_a_ratio_one_seed_lacks():
    s = _three_gshard_two_deepseekmoe()
    s["gshard_seed-0"]["ablation"] = [r for r in s["gshard_seed-0"]["ablation"] if r["ratio"] != 1 / 16]
    cmp = experts._group(s)["deepseekmoe_vs_gshard"]
    # seeds 0 and 1 are paired; 1/16 is missing for GShard seed 0, 2/16 is there for every one
    assert cmp["seeds"] == ["0", "1"] and [r["ratio"] for r in cmp["ablation"]] == [2 / 16]


def test_plots_of_models_given_by_folder_name_them(figures, tmp_path):
    s = _three_gshard_two_deepseekmoe()
    groups = experts._group({"run_a": {**s["gshard_seed-0"], "group": "run_a"},
                             "run_b": {**s["deepseekmoe_seed-0"], "group": "run_b"}})
    experts.plot_ablation(groups, tmp_path / "a.png")
    experts.plot_activated(groups, tmp_path / "k.png")
    (_, ax_a), (_, ax_k) = figures.figures
    assert [t.get_text() for t in ax_a.get_legend().get_texts()] == ["run_a (1)", "run_b (1)"]
    assert [t.get_text() for t in ax_k.get_legend().get_texts()] == ["run_a (trained top-2)", "run_b (trained top-3)"]
