"""Tests of the recall-memory frontier (frontier.py, `train_shakespeare.py --frontier`): the state
bytes it reports, the report made from the runs' results, the learning-rate choice, the refusals,
and a small frontier end to end in a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.collections
import matplotlib.pyplot as plt
import pytest
import torch

import cli
import corpus
import frontier
import runs
import train_shakespeare as ts

SCRIPT = Path(ts.__file__)
# A model and task small enough for a few CPU seconds per run.
TINY = ["--seq-len", "32", "--dense-len", "16", "--dense-facts", "2", "--drill-facts", "2", "--max-facts", "4",
        "--batch-size", "2", "--window", "8", "--d-model", "16", "--lte-buffer", "8", "--nsa-topn", "4"]


def tiny_args(out, *extra):
    return cli.parse_args(["--frontier", "--out", str(out), *TINY, *extra])


def run_cli(*flags, timeout=300):
    """The script as a user runs it: a fresh process, no TRITON_INTERPRET (conftest's) in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, flags)], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# 1. The state bytes reported are the decoding state's own
# ----------------------------------------------------------------------------------------------

def decoded_state_bytes(model, T: int) -> int:
    """Decode T tokens (a prompt, then token by token) and count every tensor of the state."""
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    state = model.init_state(1, max_len=T)
    with torch.no_grad():
        model.eval()(idx[:, :T - 3], state=state)
        for t in range(T - 3, T):
            model(idx[:, t:t + 1], state=state)
    return sum(value.numel() * value.element_size() for layer in state for value in layer.values()
               if isinstance(value, torch.Tensor))


def test_reported_state_bytes_count_every_tensor_of_the_decoding_state(tmp_path):
    args = tiny_args(tmp_path)
    plan = frontier.make_plan(args)
    gdn = plan.knobs["gdn"]
    points = ([frontier.Point("gdn", gdn[0]), frontier.Point("gdn", gdn[-1])]
              + [frontier.Point(family, plan.knobs[family][-1]) for family in ("gdn+swa", "gdn+lte", "gdn+nsa")]
              + [frontier.Point("gdn+attn", frontier.FULL), frontier.heuristic_points(plan, args, 1e-3)[-1]])
    assert points[-1].family == "attn+H2O" and gdn[-1].label == "4x32"
    torch.manual_seed(0)
    for point in points:
        model = frontier.point_model(point, args)
        record = frontier.point_record(point, {10: fake_result({T: 0.5 for T in plan.lengths}, True, args)},
                                       args, plan)
        for T in plan.lengths:
            assert record["state_bytes"][str(T)] == decoded_state_bytes(model, T), (point.family, point.knob, T)


def test_at_the_default_sizes_the_largest_gdn_state_holds_more_than_gdn_lte(tmp_path):
    args = cli.parse_args(["--frontier", "--out", str(tmp_path)])
    plan = frontier.make_plan(args)
    size = lambda family, knob: frontier.point_model(frontier.Point(family, knob), args).state_bytes(128)
    assert size("gdn", plan.knobs["gdn"][-1]) > size("gdn+lte", plan.knobs["gdn+lte"][0])
    assert [k.label for k in plan.knobs["gdn+swa"]] == ["w=16", "w=8", "w=32", "w=84"]    # 84: s + w + b
    assert [k.label for k in plan.knobs["gdn+lte"]] == ["b=64", "b=8", "b=16", "b=32", "w=8", "w=32"]
    assert [k.label for k in plan.knobs["gdn+nsa"]] == ["n=16", "n=4", "n=8"] and plan.budgets == [8, 16, 32, 64]


# ----------------------------------------------------------------------------------------------
# 2. The report comes from the runs' results
# ----------------------------------------------------------------------------------------------

def fake_result(recall: dict[int, float], learned: bool, args) -> dict:
    """A run's result as run_one returns it, as far as the frontier reads it: recall at the hardest
    setting (the last distance bin of the most facts) at each length, and whether it learned."""
    facts = str(max(args.eval_facts))
    return {"eval": {str(T): {"recall": {facts: {"1-8": 1.0, "far": r}}} for T, r in recall.items()},
            "learned": learned}


def stub_frontier(args):
    """Four points with made-up results over seeds 10, 11, 12: GDN 2x8 holds more than 1x8 and
    recalls less (dominated); LTE recalls the most; full attention never learned (hollow)."""
    plan = frontier.make_plan(args)
    by_label = lambda family, label: next(k for k in plan.knobs[family] if k.label == label)
    recalls = {("gdn", "1x8"): ([0.2, 0.3, 0.25], [True] * 3), ("gdn", "2x8"): ([0.1, 0.2, 0.15], [True] * 3),
               ("gdn+lte", "b=8"): ([0.9, 0.5, 0.8], [True, False, True]),
               ("gdn+attn", "all T"): ([0.0, 0.02, 0.01], [False] * 3)}
    points = [frontier.Point(family, by_label(family, label), 7e-4) for family, label in recalls]
    results = {(family, label, seed): fake_result({T: r for T in plan.lengths}, learned, args)
               for (family, label), (rs, ls) in recalls.items() for seed, r, learned in zip((10, 11, 12), rs, ls)}
    return plan, points, results


def test_points_medians_spread_and_pareto_marks_come_from_the_runs(tmp_path):
    args = tiny_args(tmp_path)
    plan, points, results = stub_frontier(args)
    records = {(r["family"], r["knob"]): r for r in frontier.frontier_records(points, results, args, plan)}
    one = str(plan.lengths[0])
    assert records["gdn", "1x8"]["recall"][one] == {"median": 0.25, "min": 0.2, "max": 0.3,
                                                    "per_seed": {"10": 0.2, "11": 0.3, "12": 0.25}}
    assert records["gdn+lte", "b=8"]["recall"][one]["median"] == 0.8
    assert (records["gdn+lte", "b=8"]["learned"], records["gdn+lte", "b=8"]["n"]) == (2, 3)
    assert [records[k]["hollow"] for k in records] == [False, False, False, True]
    assert records["gdn", "1x8"]["frontier"][one] and records["gdn+lte", "b=8"]["frontier"][one]
    assert not records["gdn", "2x8"]["frontier"][one]            # 1x8: fewer bytes, more recall
    assert not records["gdn+attn", "all T"]["frontier"][one]     # 1x8 again


def test_pareto_rule_on_ties_and_missing_recall():
    nan = float("nan")
    assert frontier.on_frontier([(1, 0.5), (1, 0.5), (2, 0.5), (2, 0.9), (3, nan)]) == [True, True, False, True, False]


def test_table_figure_and_json_are_made_from_the_records(tmp_path, capsys, monkeypatch):
    args = tiny_args(tmp_path)
    plan, points, results = stub_frontier(args)
    records = frontier.frontier_records(points, results, args, plan)
    tuning = {"gdn": {"knob": "2x8", "rates": {}, "chosen": 7e-4}}
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)   # keep the figure to read it back
    frontier.report(records, tuning, {"a run": {"learned": True}}, [], plan, args, torch.device("cpu"), 1.0)

    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("gdn ") and " 1x8 " in line)
    assert "25.0 (20.0-30.0) *" in row and "3/3" in row
    attn = next(line for line in table.splitlines() if line.startswith("gdn+attn"))
    assert attn.rstrip().endswith("0/3 !") and "*" not in attn

    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["points"] == json.loads(json.dumps(records))
    assert saved["chosen_lrs"] == {"gdn": 7e-4} and saved["seeds"] == {"tune": [0, 1], "points": [10, 11, 12]}
    assert saved["torch"] == torch.__version__ and "triton" in saved and saved["machine"] and saved["command"]

    ax = kept[0].axes[0]                                          # T = 1x: each median where the records put it
    one = str(plan.lengths[0])
    for r in records:
        xy = (r["state_bytes"][one], r["recall"][one]["median"])
        marker = next(line for line in ax.lines if line.get_marker() in ("o", "*")
                      and tuple(line.get_xydata()[0]) == pytest.approx(xy))
        hollow = matplotlib.colors.to_rgba(marker.get_markerfacecolor()) == (1, 1, 1, 1)
        assert hollow == r["hollow"], r["knob"]
    rings = next(c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)).get_offsets()
    assert sorted(map(tuple, rings)) == sorted((r["state_bytes"][one], r["recall"][one]["median"])
                                               for r in records if r["frontier"][one])
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# 3. The learning rate is chosen on the tuning seeds only
# ----------------------------------------------------------------------------------------------

def test_learning_rate_is_chosen_on_the_tuning_seeds_only(tmp_path):
    args = tiny_args(tmp_path, "--frontier-lrs", "4e-4,1e-3,2e-3")
    plan = frontier.make_plan(args)
    tuned = frontier.tune_points(plan, args)
    recall = {(4e-4, 0): 0.3, (4e-4, 1): 0.5, (1e-3, 0): 0.6, (1e-3, 1): 0.4, (2e-3, 0): 0.1, (2e-3, 1): 0.9}
    results = {}
    for point in tuned:
        for seed in (0, 1, 10, 11):     # the points' seeds at the same runs: better at 2e-3 if they counted
            r = recall[point.lr, seed] if seed < 10 else (1.0 if point.lr == 2e-3 else 0.0)
            results[point.run(seed).key] = fake_result({T: r for T in plan.lengths}, True, args)
    table = frontier.tuning_table(tuned, results, args)
    assert set(table) == set(frontier.FAMILIES)
    # medians over seeds 0, 1: 0.4, 0.5, 0.5: the tie between 1e-3 and 2e-3 goes to the smaller rate
    assert all(row["chosen"] == 1e-3 for row in table.values())
    assert table["gdn"]["rates"]["0.0004"] == {"per_seed": {"0": 0.3, "1": 0.5}, "median": 0.4, "learned": 2, "n": 2}
    points = frontier.trained_points(plan, {"gdn": 1e-3})
    assert {p.lr for p in points} == {1e-3} and [p.knob for p in points] == plan.knobs["gdn"]
    names = [run.name for run in frontier.runs_of(points, args.seeds)]
    assert names[0] == "gdn_state2x8_lr0.001" and len(set(names)) == len(plan.knobs["gdn"])


def test_runs_at_other_rates_never_share_a_checkpoint(tmp_path):
    lr_runs = [runs.Run("gdn+lte", 10, "_b8", (("lte_buffer", 8),), lr) for lr in (4e-4, 7e-4, 1.2e-3)]
    lr_runs.append(runs.Run("gdn+lte", 10))
    paths = [cli.checkpoint_path(tmp_path, run.name, run.seed).name for run in lr_runs]
    assert paths == ["gdn_lte_b8_lr0.0004_seed10.pt", "gdn_lte_b8_lr0.0007_seed10.pt", "gdn_lte_b8_lr0.0012_seed10.pt",
                     "gdn_lte_seed10.pt"]
    assert all(cli.CHECKPOINT_NAME.fullmatch(p)["seed"] == "10" for p in paths)


# ----------------------------------------------------------------------------------------------
# 4. Bad flags: one clear line before any work
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--frontier", "--seeds", "1,10"], ["--seeds 1,10", "--frontier-tune-seeds 0,1", "share seed 1"]),
    (["--frontier", "--frontier-tune-seeds", "3", "--seed", "3"], ["share seed 3"]),
    (["--frontier", "--sweep-state"], ["--frontier and --sweep-state exclude each other"]),
    (["--frontier", "--eviction-report"], ["--frontier and --eviction-report exclude each other"]),
    (["--frontier-lrs", "1e-3"], ["--frontier-lrs goes with --frontier"]),
    (["--frontier", "--frontier-lrs", "1e-3,-1"], ["--frontier-lrs '1e-3,-1'"]),
    (["--frontier", "--frontier-tune-seeds", "0,0"], ["--frontier-tune-seeds '0,0'"]),
    (["--frontier", "--models", "gdn,transformer"], ["transformer is not among them"]),
])
def test_bad_frontier_flags_are_refused_in_one_line(flags, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        ts.main(flags + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 5. A small frontier end to end, as a user runs it
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small UTF-8 text for --data: no corpus conversion, a fast tokenization."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(corpus.load_corpus(cache_dir=tmp_path_factory.mktemp("cache"))[1][:30_000], encoding="utf-8")
    return path


def test_a_small_frontier_end_to_end_then_refused_then_read_back(tmp_path, text_file):
    out = tmp_path / "out"
    flags = ["--frontier", "--quick", "--jobs", "1", "--models", "gdn,gdn+attn", "--data", text_file, "--out", out,
             *TINY, "--steps", "4", "--eval-every", "2", "--log-every", "2", "--eval-batch", "1"]
    proc = run_cli(*flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frontier: 4 tuning runs" in proc.stdout and "3 point runs" in proc.stdout and "about" in proc.stdout
    assert "Phase tune:" in proc.stdout and "a tie goes to the smaller rate" in proc.stdout
    saved = json.loads((out / "frontier.json").read_text())
    families = [p["family"] for p in saved["points"]]
    assert families == ["gdn", "gdn", "attn+StreamingLLM", "attn+StreamingLLM", "attn+TOVA", "attn+TOVA",
                        "attn+H2O", "attn+H2O", "gdn+attn"]
    assert set(saved["chosen_lrs"]) == {"gdn", "gdn+attn"} and saved["seeds"] == {"tune": [0], "points": [10]}
    assert len(saved["runs"]) == 4 + 3 + 6 and (out / "frontier.png").stat().st_size > 10_000
    table = proc.stdout[proc.stdout.index("The recall-memory frontier"):]
    assert all(f"{p['family']} " in table for p in saved["points"])

    again = run_cli(*flags)
    assert again.returncode == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    resumed = run_cli(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("finished earlier; its results are read back") == 7
    assert json.loads((out / "frontier.json").read_text())["points"] == saved["points"]
