"""The recall-memory frontier: how much recall each mixer buys with a byte of decoding state.

The protocol of Zoology (Arora et al. 2023) and Based (Arora et al. 2024), on the recall task of
train_shakespeare.py. Every model is a point (decoding-state bytes per sequence, held-out recall at
the hardest setting), every family a curve through the values of its knob, and the Pareto frontier
says which mixers give the most recall for their memory:

  gdn             pure GDN at several state sizes (heads x key dim);
  gdn+swa         the sliding window w, one of them as many slots as LTE's s + w + 1 + b;
  gdn+lte         the buffer b, and the window w at the command's b;
  gdn+nsa         n, the blocks each query selects (its cache holds all T tokens whatever n);
  attn+StreamingLLM, attn+TOVA, attn+H2O
                  heuristic eviction: the trained gdn+attn decoded within LTE's memory (s, w and
                  each b of gdn+lte's knob), with no training of its own;
  gdn+attn        full attention, the reference: its state grows with T.

Two phases. "tune": each trained family, at its default knob (the command's model settings), once per
learning rate of --frontier-lrs and seed of --frontier-tune-seeds; the rate of LR_RULE wins. "points":
every knob value of every family at its family's rate, once per seed of --seeds, seeds never used for
tuning. Each point is the median (min-max) over its seeds, with "k of n learned" (report.py's
LEARNED_AT rule); a point whose runs mostly did not learn stays on the chart, hollow. Recall and state
bytes at 1x and 4x the training length. Outputs in --out: frontier.json, frontier.png, and the table
printed at the end.

    python train_shakespeare.py --frontier --quick --out /tmp/fq   # the machinery: 1 min 48 s on 2 idle CPU
                                                                   # cores (2 min 17 s with another job running)
    python train_shakespeare.py --frontier --use-triton            # the whole frontier: 90 runs

The whole frontier is 90 runs of the default recipe: 30 to tune (5 families x 3 rates x 2 seeds) and
60 points (20 knob values x 3 seeds), then 36 heuristic decodes (3 policies x 4 budgets x 3 seeds). It
splits into commands that each fit a time limit: --frontier-tune-only trains only the tuning runs,
--models picks the families a command trains, and --resume reads every finished run back, so a last
command with every family reads and plots. On one GPU with 16 cores (15 runs at a time, a run 80-170 s)
each part should take under 10 minutes (an estimate: two waves of runs at most; not yet timed):

    python train_shakespeare.py --frontier --use-triton --out frontier --frontier-tune-only  # 30 runs
    python train_shakespeare.py --frontier --use-triton --out frontier --resume --models gdn,gdn+attn  # 21 + heuristics
    python train_shakespeare.py --frontier --use-triton --out frontier --resume --models gdn+lte  # 18 runs
    python train_shakespeare.py --frontier --use-triton --out frontier --resume --models gdn+swa,gdn+nsa  # 21 runs
    python train_shakespeare.py --frontier --use-triton --out frontier --resume  # reads back, heuristics, plots

The flags (--frontier, --frontier-tune-seeds, --frontier-lrs, --frontier-tune-only) are cli.py's;
what one run does is the training script's run_one, which it hands over to `main`: this module never
imports the training script (no two files import each other).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

from cli import (MODELS, check_checkpoint, checkpoint_path, fail, model_config, prepare_run, read_checkpoint,
                 run_settings, write_json_atomic)
from corpus import N_VALUES, VOCAB_SIZE
from eviction import with_eviction
from eviction_report import recall_by_distance
from recall_task import recall_batches
from report import LEARNED_AT, duration, print_table, pyplot, save_figure
from runs import OneTorchThread, Run, cpu_cores, report_failures, run_all
from tiny_hybrid import TinyHybrid

FAMILIES = MODELS     # the trained ones, in the table's order: gdn, gdn+swa, gdn+lte, gdn+nsa, gdn+attn
HEURISTICS = {"attn+StreamingLLM": "streaming", "attn+TOVA": "tova", "attn+H2O": "h2o"}   # name: with_eviction's policy
GDN_STATES = ((1, 8), (2, 8), (1, 16), (2, 16), (2, 24), (4, 32))    # heads x key dim; 4 x 32 holds more than gdn+lte


LR_RULE = ("each trained family's learning rate is the one of the grid whose tuning runs (the tuning seeds, the "
           "family's default knob) have the highest median held-out recall at the hardest setting ({setting}); "
           "a tie goes to the smaller rate")
PARETO_RULE = ("a point is on the frontier when no other point has state bytes <= and median recall >= with one "
               "of them strict (at each length on its own)")
HOLLOW_RULE = "hollow: at most half of the point's seeds learned the task, so its median is a run that did not"
STATE_NOTE = ("state bytes: every tensor of one sequence's decoding state after T tokens, as TinyHybrid.init_state "
              "makes it with max_len = T (caches, ring buffers, scores, masks, positions, conv tails), all layers")


# ----------------------------------------------------------------------------------------------
# The plan: knob values, points, runs
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Knob:
    """One value of a family's knob: its label in tables, its tag in run names, the Config fields it sets."""
    label: str
    tag: str = ""
    overrides: tuple = ()


def gdn_state(heads: int, dim: int) -> Knob:
    return Knob(f"{heads}x{dim}", f"_state{heads}x{dim}", (("gdn_heads", heads), ("gdn_head_dim", dim)))


def window(w: int) -> Knob:
    return Knob(f"w={w}", f"_w{w}", (("window", w),))


def buffer(b: int) -> Knob:
    return Knob(f"b={b}", f"_b{b}", (("lte_buffer", b),))


def top_n(n: int) -> Knob:
    return Knob(f"n={n}", f"_n{n}", (("nsa_topn", n),))


FULL = Knob("all T")   # full attention has no knob


@dataclasses.dataclass(frozen=True)
class Point:
    """A family at one knob value: trained at lr (one run per seed), or for a heuristic, the trained
    gdn+attn decoded under its policy within budget (sink, window, buffer) of with_eviction."""
    family: str
    knob: Knob
    lr: float | None = None
    budget: tuple = ()

    def run(self, seed: int):
        return Run(self.family, seed, self.knob.tag, self.knob.overrides, self.lr)


@dataclasses.dataclass
class Plan:
    """What a frontier command covers: the families it trains with their knob values (defaults
    first: the tuning runs' knob), the heuristics' budgets, and the two lengths."""
    knobs: dict[str, list[Knob]]
    budgets: list[int]           # LTE's buffers at the command's window: the heuristics' b
    sink: int
    lengths: tuple[int, int]


def make_plan(args) -> Plan:
    config = model_config("gdn+lte", args, VOCAB_SIZE)
    sink, w, b, n = config.lte_sink, args.window, args.lte_buffer, args.nsa_topn
    own = (args.gdn_heads, args.gdn_head_dim)
    knobs = {
        "gdn": [gdn_state(*own)] + [gdn_state(*hk) for hk in sorted(set(GDN_STATES) - {own}, key=_state_numbers)],
        "gdn+swa": [window(w)] + [window(x) for x in sorted({w // 2, 2 * w, w + sink + b} - {w})],
        "gdn+lte": [buffer(b)] + [buffer(x) for x in sorted({b // 8, b // 4, b // 2} - {0, b})]
                   + [window(x) for x in (w // 2, 2 * w)],
        "gdn+nsa": [top_n(n)] + [top_n(x) for x in sorted({n // 4, n // 2} - {n}) if x > config.nsa_recent],
        "gdn+attn": [FULL],
    }
    if args.quick:   # the default and the smallest other value (each list is the default, then smallest first)
        knobs = {family: values[:2] for family, values in knobs.items()}
    budgets = sorted(int(dict(k.overrides)["lte_buffer"]) for k in knobs["gdn+lte"] if k.tag.startswith("_b"))
    return Plan({family: knobs[family] for family in FAMILIES if family in args.models}, budgets, sink,
                (args.seq_len, 4 * args.seq_len))


def _state_numbers(heads_dim: tuple[int, int]) -> int:
    heads, dim = heads_dim
    return heads * dim * dim


def tune_points(plan: Plan, args) -> list[Point]:
    """Every trained family at its default knob, once per rate of the grid."""
    return [Point(family, knobs[0], lr) for family, knobs in plan.knobs.items() for lr in args.frontier_lrs]


def trained_points(plan: Plan, lrs: dict[str, float]) -> list[Point]:
    """Every knob value of every family whose rate is chosen."""
    return [Point(family, knob, lrs[family]) for family, knobs in plan.knobs.items() if family in lrs
            for knob in knobs]


def heuristic_points(plan: Plan, args, attn_lr: float) -> list[Point]:
    """Each policy at each of LTE's budgets: the same s and w, and b buffer slots; StreamingLLM keeps no
    scores, so it spends the b slots on its window (w + b), as in the eviction report."""
    w = args.window
    return [Point(name, buffer(b), attn_lr, (plan.sink, w + b, 0) if policy == "streaming" else (plan.sink, w, b))
            for name, policy in HEURISTICS.items() for b in plan.budgets]


def runs_of(points: list[Point], seeds: list[int]) -> list:
    """The runs of the points, seed after seed (a command stopped part-way leaves whole seeds)."""
    return [point.run(seed) for seed in seeds for point in points]


# ----------------------------------------------------------------------------------------------
# Phase "tune": the learning rate of each family
# ----------------------------------------------------------------------------------------------

def recall_at(result: dict, length: int, args) -> float:
    """Held-out recall at the hardest setting at `length`: the most facts, the longest distance bin
    (train_shakespeare's `hardest`, at any length)."""
    cells = result["eval"][str(length)]["recall"][str(max(args.eval_facts))]
    return list(cells.values())[-1] if cells else float("nan")


def tuning_table(points: list[Point], results: dict, args) -> dict[str, dict]:
    """{family: {"knob", "rates": {str(lr): {"per_seed": {seed: recall}, "median", "learned"}}, "chosen"}}
    from the runs of the tuning seeds only (results may hold any seeds). A rate without results is
    left out; a family with none has chosen None."""
    table = {}
    for point in points:
        done = {seed: results[point.run(seed).key] for seed in args.frontier_tune_seeds
                if point.run(seed).key in results}
        row = table.setdefault(point.family, {"knob": point.knob.label, "rates": {}, "chosen": None})
        if done:
            recall = {str(seed): recall_at(result, args.seq_len, args) for seed, result in done.items()}
            row["rates"][repr(point.lr)] = {"per_seed": recall, "median": float(np.median(list(recall.values()))),
                                            "learned": sum(result["learned"] for result in done.values()),
                                            "n": len(done)}
    for row in table.values():
        ranked = [(cell["median"], -float(lr)) for lr, cell in row["rates"].items() if not math.isnan(cell["median"])]
        row["chosen"] = -max(ranked)[1] if ranked else None     # the best median; on a tie the smaller rate
    return table


def print_tuning(table: dict, args) -> None:
    seeds = args.frontier_tune_seeds
    print(f"\nPhase tune: {LR_RULE.format(setting=hardest_words(args))}. Recall (%) of each tuning seed:")
    rows = []
    for family, row in table.items():
        for lr, cell in row["rates"].items():
            chosen = " <- chosen" if float(lr) == row["chosen"] else ""
            rows.append([family, row["knob"], f"{float(lr):g}"] + [_pct(cell["per_seed"].get(str(s))) for s in seeds]
                        + [_pct(cell["median"]), f"{cell['learned']}/{cell['n']}" + chosen])
    print_table(["family", "knob", "lr"] + [f"seed {s}" for s in seeds] + ["median", "learned"], rows)


def hardest_words(args) -> str:
    return f"{max(args.eval_facts)} facts, the longest distance bin, at the training length T = {args.seq_len}"


def _pct(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


# ----------------------------------------------------------------------------------------------
# Phase "points": state bytes, the heuristics, one record per point, the Pareto frontier
# ----------------------------------------------------------------------------------------------

def point_model(point: Point, args):
    """An untrained model of the point's shape on the CPU, for its state bytes."""
    if point.family in HEURISTICS:
        attn = TinyHybrid(model_config("gdn+attn", args, VOCAB_SIZE))
        return with_eviction(attn, HEURISTICS[point.family], *point.budget)
    return TinyHybrid(model_config(point.family, args, VOCAB_SIZE, **dict(point.knob.overrides)))


def trained_attn(run, args, vocab_size: int, device):
    """A gdn+attn run's model read back from its checkpoint, in eval mode."""
    model = TinyHybrid(model_config("gdn+attn", args, vocab_size)).to(device)
    ckpt = torch.load(checkpoint_path(args.out, run.name, run.seed), map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def heuristic_results(points: list[Point], attn: Point, attn_results: dict, plan: Plan, args, val_tokens,
                      vocab_size: int, device) -> dict[tuple[str, str, int], dict]:
    """{(point's family, knob label, seed): result} of each heuristic point: the seed's trained gdn+attn
    decoded under the policy (the eviction report's with_eviction and recall_by_distance on the same
    held-out haystacks as evaluate's), as {"eval": {str(T): {"recall": {str(facts): by bin}}},
    "learned": the gdn+attn run's}: no training, so the run's verdict is the model's."""
    batches = {length: recall_batches(val_tokens, args, length) for length in plan.lengths}
    facts, results = str(max(args.eval_facts)), {}
    for seed in args.seeds:
        run = attn.run(seed)
        if run.key not in attn_results:
            continue                                   # its gdn+attn run failed: reported with it
        t0 = time.perf_counter()
        with OneTorchThread() if device.type == "cpu" else contextlib.nullcontext():
            model = trained_attn(run, args, vocab_size, device)
            for point in points:
                evicting = with_eviction(model, HEURISTICS[point.family], *point.budget)
                results[point.family, point.knob.label, seed] = {
                    "eval": {str(T): {"recall": {facts: recall_by_distance(evicting, batches[T], device)}}
                             for T in plan.lengths},
                    "learned": attn_results[run.key]["learned"]}
        print(f"heuristic eviction on {run}: {len(points)} points in {time.perf_counter() - t0:.0f}s", flush=True)
    return results


def point_record(point: Point, by_seed: dict[int, dict], args, plan: Plan) -> dict:
    """One point of the frontier from its runs' results ({seed: result}): state bytes and recall at the
    hardest setting per length as median, min, max and per seed, and how many seeds learned."""
    model = point_model(point, args)
    record = {"family": point.family, "knob": point.knob.label, "lr": point.lr, "seeds": sorted(by_seed),
              "learned": sum(result["learned"] for result in by_seed.values()), "n": len(by_seed),
              "state_bytes": {}, "recall": {}}
    for length in plan.lengths:
        recall = {str(seed): recall_at(result, length, args) for seed, result in sorted(by_seed.items())}
        values = list(recall.values())
        record["state_bytes"][str(length)] = model.state_bytes(length)
        record["recall"][str(length)] = {"median": float(np.median(values)), "min": float(np.min(values)),
                                         "max": float(np.max(values)), "per_seed": recall}
    record["hollow"] = 2 * record["learned"] <= record["n"]
    return record


def on_frontier(points: list[tuple[float, float]]) -> list[bool]:
    """PARETO_RULE over (state bytes, median recall) pairs; a point without a recall is never on it."""
    def dominates(q, p):
        return q[0] <= p[0] and q[1] >= p[1] and q != p

    known = [p for p in points if not math.isnan(p[1])]
    return [not math.isnan(p[1]) and not any(dominates(q, p) for q in known) for p in points]


def mark_frontier(records: list[dict], plan: Plan) -> None:
    """Each record's "frontier": {str(T): whether it is on the frontier at that length}."""
    for record in records:
        record["frontier"] = {}
    for length in map(str, plan.lengths):
        marks = on_frontier([(r["state_bytes"][length], r["recall"][length]["median"]) for r in records])
        for record, mark in zip(records, marks):
            record["frontier"][length] = mark


def frontier_records(points: list[Point], results: dict, args, plan: Plan) -> list[dict]:
    """The records of the points with at least one result, frontier marked; results: {(family, knob
    label, seed): result}."""
    records = []
    for point in points:
        by_seed = {seed: results[point.family, point.knob.label, seed] for seed in args.seeds
                   if (point.family, point.knob.label, seed) in results}
        if by_seed:
            records.append(point_record(point, by_seed, args, plan))
    mark_frontier(records, plan)
    return records


# ----------------------------------------------------------------------------------------------
# Report: the table, the figure, frontier.json
# ----------------------------------------------------------------------------------------------

def print_frontier(records: list[dict], plan: Plan, args) -> None:
    one, four = map(str, plan.lengths)
    print(f"\nThe recall-memory frontier: held-out recall (%) at the hardest setting ({max(args.eval_facts)} facts, "
          f"the longest distance bin) at T = {one} and {four} (1x, 4x the training length), median (min-max) over "
          f"seeds {', '.join(map(str, args.seeds))}; state: KB of one sequence's decoding state; * on the Pareto "
          f"frontier ({PARETO_RULE}); learned: seeds that learned the task, ! for a hollow point")
    rows = [[r["family"], r["knob"], "-" if r["lr"] is None else f"{r['lr']:g}"]
            + [cell for length in (one, four) for cell in (
                f"{r['state_bytes'][length] / 1000:.1f}", _spread(r["recall"][length]),
                "*" if r["frontier"][length] else "")]
            + [f"{r['learned']}/{r['n']}" + (" !" if r["hollow"] else "")] for r in records]
    print_table(["family", "knob", "lr", f"KB T={one}", f"recall T={one}", "", f"KB T={four}", f"recall T={four}",
                    "", "learned"], rows)


def _spread(cell: dict) -> str:
    return f"{_pct(cell['median'])} ({_pct(cell['min'])}-{_pct(cell['max'])})"


def plot_frontier(records: list[dict], plan: Plan, args) -> None:
    """frontier.png: one panel per length, recall against state bytes (log), a curve per family
    through its knob values (heuristics dashed), min-max bars, hollow markers for points that did not
    learn, the Pareto frontier as a step line with ringed points, full attention as a star."""
    families = list(dict.fromkeys(r["family"] for r in records))
    colours = {family: f"C{i}" for i, family in enumerate(f for f in families if f != "gdn+attn")}
    fig, axes = pyplot().subplots(1, 2, figsize=(13, 5.2), sharey=True)
    for ax, length in zip(axes, map(str, plan.lengths)):
        for family in families:
            _plot_family(ax, [r for r in records if r["family"] == family], length, colours.get(family, "black"))
        front = sorted((r["state_bytes"][length], r["recall"][length]["median"]) for r in records
                       if r["frontier"][length])
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="black", lw=1, alpha=0.6, label="Pareto frontier")
            ax.scatter(xs, ys, s=260, facecolors="none", edgecolors="black", lw=1, zorder=4)
        ax.axhline(1 / N_VALUES, color="grey", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("decoding-state bytes per sequence")
        ax.set_title(f"T = {length} ({int(length) // args.seq_len}x the training length)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recall at the hardest setting ({max(args.eval_facts)} facts, longest distances)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
    fig.suptitle(f"Recall against memory: median (bar: min-max) over seeds {', '.join(map(str, args.seeds))}; "
                 f"ringed: on the Pareto frontier; hollow: most seeds did not learn")
    save_figure(fig, args.out / "frontier.png", rect=(0, 0.08, 1, 1))     # room for the legend below the panels


def _plot_family(ax, records: list[dict], length: str, colour: str) -> None:
    """One family's curve through its knob values (in order of state bytes), labelled with each knob."""
    records = sorted(records, key=lambda r: (r["state_bytes"][length], r["knob"]))
    family = records[0]["family"]
    x = [r["state_bytes"][length] for r in records]
    y = [r["recall"][length]["median"] for r in records]
    marker, style = ("*", "-") if family == "gdn+attn" else ("o", "--" if family in HEURISTICS else "-")
    ax.plot(x, y, ls=style, color=colour, lw=1.2, label=family + (" (reference)" if family == "gdn+attn" else ""))
    for r, xi, yi in zip(records, x, y):
        cell = r["recall"][length]
        ax.errorbar(xi, yi, yerr=[[yi - cell["min"]], [cell["max"] - yi]], color=colour, lw=0.8, capsize=2)
        ax.plot(xi, yi, marker=marker, ms=11 if marker == "*" else 7, color=colour,
                markerfacecolor="white" if r["hollow"] else colour, zorder=5)
        ax.annotate(r["knob"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6, color=colour)


def versions() -> dict:
    """torch and triton as installed (triton read from its metadata: importing it has side effects)."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton, "python": platform.python_version()}


def machine(device) -> str:
    where = f"{platform.machine()} {os.cpu_count()} cores, {device}"
    return where + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")


def frontier_json(records: list[dict], tuning: dict, runs: dict, failures: list, plan: Plan, args, device,
                  wall: float) -> dict:
    """Everything frontier.json holds: the command and where it ran, the rules, the seeds, the tuning
    table with the chosen rates, every run's numbers and every point's aggregate."""
    return {"command": shlex.join([os.path.basename(sys.executable)] + sys.argv), **versions(),
            "machine": machine(device), "wall_seconds": wall, "settings": run_settings(args),
            "seeds": {"tune": args.frontier_tune_seeds, "points": args.seeds}, "lrs": args.frontier_lrs,
            "lengths": list(plan.lengths), "hardest_setting": hardest_words(args),
            "rules": {"lr": LR_RULE.format(setting=hardest_words(args)), "pareto": PARETO_RULE,
                      "learned": learned_rule(args), "hollow": HOLLOW_RULE, "state_bytes": STATE_NOTE},
            "knobs": {family: [k.label for k in knobs] for family, knobs in plan.knobs.items()},
            "heuristic_budget": {"sink": plan.sink, "window": args.window, "buffers": plan.budgets,
                                 "streaming": "StreamingLLM holds s sinks and a window of w + b (no buffer)"},
            "tuning": tuning, "chosen_lrs": {family: row["chosen"] for family, row in tuning.items()},
            "points": records, "runs": runs, "failed_runs": failures}


def learned_rule(args) -> str:
    return (f"a run has learned the task when its recall at the easiest setting (T = {args.seq_len}, "
            f"{min(args.eval_facts)} facts, the shortest distances) is at least {LEARNED_AT:.0%}; a heuristic "
            f"point's runs are its gdn+attn runs")


def report(records: list[dict], tuning: dict, runs: dict, failures: list, plan: Plan, args, device,
           wall: float) -> None:
    """The table, frontier.png and frontier.json, from the points' records (a command of the tuning
    phase alone writes its tuning table only)."""
    if records:
        print_frontier(records, plan, args)
        plot_frontier(records, plan, args)
    write_json_atomic(frontier_json(records, tuning, runs, failures, plan, args, device, wall),
                      args.out / "frontier.json")
    print(f"\nwrote {args.out / 'frontier.json'}" + (f" and {args.out / 'frontier.png'}" if records else ""))


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

# A rough time estimate on a CPU: seconds per training step of one run on one core of a 2-core
# x86-64 CPU at the default sizes, and of its evaluation at --eval-batch 16, measured on a busy
# machine and scaled to the default run's 702 s on an idle one; a process takes a few more to start.
CPU_SECONDS_PER_STEP = {"gdn": 0.105, "gdn+swa": 0.08, "gdn+lte": 0.135, "gdn+nsa": 0.125, "gdn+attn": 0.1}
CPU_EVAL_SECONDS = {"gdn": 7, "gdn+swa": 14, "gdn+lte": 17, "gdn+nsa": 29, "gdn+attn": 22}
CPU_START_SECONDS = 7   # a process's start, the probe readings, reading the corpus: fits --quick's 1 min 48 s


def check_configs(plan: Plan, args) -> None:
    """Every point's model can be built with these flags (ValueError naming the knob otherwise)."""
    for family, knobs in plan.knobs.items():
        for knob in knobs:
            try:
                model_config(family, args, VOCAB_SIZE, **dict(knob.overrides))
            except ValueError as e:
                raise ValueError(f"--frontier: {family} at {knob.label} cannot be built with these flags: "
                                 f"{e}") from None


def check_saved(runs: list, args) -> None:
    """--resume: every saved checkpoint of these runs can go on with these flags (ValueError otherwise);
    a checkpoint's settings hold its run's own rate."""
    if not args.resume:
        return
    for run in runs:
        path = checkpoint_path(args.out, run.name, run.seed)
        if path.exists():
            check_checkpoint(read_checkpoint(path), argparse.Namespace(**{**vars(args), "lr": run.lr}), path,
                                run.seed)


def announce(plan: Plan, args, device) -> None:
    """How many runs the command plans, and on a CPU how long they take (the tuning runs and, once the
    rates are chosen, one run per point and seed)."""
    tune = len(plan.knobs) * len(args.frontier_lrs) * len(args.frontier_tune_seeds)
    points = 0 if args.frontier_tune_only else sum(map(len, plan.knobs.values())) * len(args.seeds)
    heuristics = len(HEURISTICS) * len(plan.budgets) if "gdn+attn" in plan.knobs and not args.frontier_tune_only else 0
    print(f"frontier: {tune} tuning runs ({len(plan.knobs)} families x {len(args.frontier_lrs)} rates x tuning seeds "
          f"{', '.join(map(str, args.frontier_tune_seeds))}), then {points} point runs (knobs: "
          + "; ".join(f"{family} {', '.join(k.label for k in knobs)}" for family, knobs in plan.knobs.items())
          + f"; seeds {', '.join(map(str, args.seeds))})"
          + (f" and {heuristics} heuristic points decoded from gdn+attn's runs" if heuristics else "")
          + "; finished runs in --out are read back", flush=True)
    if device.type == "cpu":
        per_family = {f: args.steps * CPU_SECONDS_PER_STEP[f] + CPU_EVAL_SECONDS[f] * args.eval_batch / 16
                      + CPU_START_SECONDS for f in plan.knobs}
        seconds = sum(per_family[f] * (len(args.frontier_lrs) * len(args.frontier_tune_seeds)
                                       + (0 if args.frontier_tune_only else len(knobs) * len(args.seeds)))
                      for f, knobs in plan.knobs.items())
        jobs = args.jobs or cpu_cores()
        print(f"on this CPU, {jobs} run{'s' * (jobs > 1)} at a time: about {duration(seconds / jobs)} "
              f"(a rough estimate from step times measured on 2 cores)", flush=True)


def prepare(plan: Plan, args):
    """Every check before any work (one line and exit status 2 otherwise), --out made ready, the plan
    announced. Returns (device, (train tokens, validation tokens, vocabulary size))."""
    try:
        check_configs(plan, args)
    except ValueError as e:
        fail(str(e))
    device, _, enc, tokens, val_tokens = prepare_run(args)
    every_rate = [Point(f, k, lr) for f, knobs in plan.knobs.items() for k in knobs for lr in args.frontier_lrs]
    try:
        check_saved(runs_of(every_rate, args.frontier_tune_seeds + args.seeds), args)
    except ValueError as e:
        fail(str(e))
    announce(plan, args, device)
    return device, (tokens, val_tokens, enc.n_vocab)


def tune(plan: Plan, args, data, device, run_one) -> tuple[dict, dict, list]:
    """Phase "tune": the tuning runs (or theirs read back), the table and the chosen rates.
    Returns (tuning table, {run.key: result}, failures)."""
    tuned = tune_points(plan, args)
    results, failures = run_all(runs_of(tuned, args.frontier_tune_seeds), args, *data, device, run_one)
    table = tuning_table(tuned, results, args)
    print_tuning(table, args)
    for family, row in table.items():
        if row["chosen"] is None:
            print(f"{family}: no learning rate, none of its tuning runs finished (see the failures); its points wait")
    return table, results, failures


def train_points(plan: Plan, lrs: dict[str, float], args, data, device, run_one) -> tuple[list, dict, list]:
    """Phase "points": every point of the families with a rate, trained on --seeds (or read back), then
    the heuristics on the trained gdn+attn. Returns (points, {(family, knob label, seed): result},
    failures)."""
    points = trained_points(plan, lrs)
    trained, failures = run_all(runs_of(points, args.seeds), args, *data, device, run_one)
    results = {(p.family, p.knob.label, seed): trained[p.run(seed).key]
               for p in points for seed in args.seeds if p.run(seed).key in trained}
    if "gdn+attn" in lrs:
        attn = next(p for p in points if p.family == "gdn+attn")
        heuristics = heuristic_points(plan, args, lrs["gdn+attn"])
        val_tokens, vocab_size = data[1:]
        results |= heuristic_results(heuristics, attn, trained, plan, args, val_tokens, vocab_size, device)
        points = [p for p in points if p is not attn] + heuristics + [attn]     # the reference last
    return points, results, failures


def main(args, run_one) -> None:
    """--frontier: tune, train the points, decode the heuristics, report (see the module docstring)."""
    wall_start = time.perf_counter()
    plan = make_plan(args)
    device, data = prepare(plan, args)
    tuning, tune_results, failures = tune(plan, args, data, device, run_one)
    points, results = [], {}
    if not args.frontier_tune_only:
        lrs = {family: row["chosen"] for family, row in tuning.items() if row["chosen"] is not None}
        points, results, more_failures = train_points(plan, lrs, args, data, device, run_one)
        failures += more_failures
    records = frontier_records(points, results, args, plan)
    runs = {f"{family} {knob} seed {seed}": result for (family, knob, seed), result in results.items()}
    runs |= {f"{name} seed {seed} (tuning)": result for (name, seed), result in tune_results.items()}
    wall = time.perf_counter() - wall_start
    report(records, tuning, runs, failures, plan, args, device, wall)
    print(f"wall time {wall:.0f}s")
    if failures:
        report_failures(failures)
        raise SystemExit(1)
