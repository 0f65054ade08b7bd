"""The report of the training script: each run's verdict (the convergence rule, learned or not),
summaries over seeds (mean, min, max), the tables printed at the end, and the figures in --out
(forgetting_gap.png, training_curves.png, state_sweep.png), drawn on one shared axes set-up.
"""

from __future__ import annotations

import math

import numpy as np

from corpus import N_VALUES
from recall_task import PROBE_BATCHES
from tiny_hybrid import PRESETS

DEFAULT_STEPS = 2400  # the default recipe's --steps

# ---- the convergence rule: is a run still learning? ---------------------------------------------

PROBE_READINGS = 24  # readings per run unless --eval-every says otherwise: 6 of them in the last quarter
# A run has converged when the best probe reading of the last quarter of its steps lies within
# PLATEAU of the best reading before it: it neither rose nor fell by that much in the last quarter.
PLATEAU = 0.02
CONVERGENCE_RULE = (f"a run has converged when the best held-out probe recall of the last quarter of its steps "
                    f"is within {100 * PLATEAU:.0f} points of the best before it (it neither rose nor fell by "
                    f"{100 * PLATEAU:.0f} points or more in its last quarter)")


def convergence(probe: list[dict], steps: int) -> dict:
    """The convergence rule (CONVERGENCE_RULE) on a probe curve of a run of `steps` steps.
    Returns {"converged": True / False / None (too few readings to judge), "verdict": a phrase,
    "last_quarter_gain": best of the last quarter minus best before it (None when not judged)}."""
    before = [row["recall"] for row in probe if row["step"] <= 0.75 * steps]
    last = [row["recall"] for row in probe if row["step"] > 0.75 * steps]
    if len(before) < 2 or len(last) < 2:
        return {"converged": None, "last_quarter_gain": None,
                "verdict": f"not judged: too few probe readings ({len(before)} before the last quarter, {len(last)} "
                           f"in it; the rule needs 2 of each: lower --eval-every)"}
    gain = max(last) - max(before)
    if gain >= PLATEAU:
        verdict = f"still rising: +{100 * gain:.1f} points in the last quarter"
    elif gain <= -PLATEAU:
        verdict = f"fell: the last quarter's best is {-100 * gain:.1f} points below the best before it"
    else:
        verdict = f"converged ({100 * gain:+.1f} points in the last quarter)"
    return {"converged": abs(gain) < PLATEAU, "verdict": verdict, "last_quarter_gain": gain}


# ---- one run's verdict -------------------------------------------------------------------------

def hardest(results: dict, args) -> float:
    """Recall at the hardest training-length setting: most facts, longest distance bin."""
    cells = results[str(args.seq_len)]["recall"][str(max(args.eval_facts))]
    return list(cells.values())[-1] if cells else float("nan")


def easiest(results: dict, args) -> float:
    """Recall at the easiest setting: fewest facts, shortest distance bin, training length."""
    cells = results[str(args.seq_len)]["recall"][str(min(args.eval_facts))]
    return list(cells.values())[0] if cells else float("nan")


def hardest_setting(args, eval_results: dict | None) -> str:
    """The hardest setting in words; with a run's results, the distance bin too."""
    cells = eval_results[str(args.seq_len)]["recall"][str(max(args.eval_facts))] if eval_results else {}
    far = f", {list(cells)[-1]} tokens back" if cells else ", the longest distance"
    return f"T = {args.seq_len}, {max(args.eval_facts)} facts{far}"


# Recall appears suddenly, several hundred steps into the default 2400-step recipe: a run shorter
# than this is not expected to learn it.
SHORT_RUN = 1000
# A run has learned the task when it recalls at least this at the easiest setting (2 facts, the
# shortest distances), where every model that recalls at all is near 100 %.
LEARNED_AT = 0.9


def pooled_recall(eval_results: dict, args) -> float:
    """Recall at the training length, every number of facts and distance bin averaged."""
    cells = [acc for by_bin in eval_results[str(args.seq_len)]["recall"].values() for acc in by_bin.values()]
    return float(np.mean(cells)) if cells else float("nan")


def run_result(record: dict, eval_results: dict, args) -> dict:
    """What results.json keeps of one run: its curves, its schedule, the convergence verdict, whether
    it learned the task, and the evaluation."""
    return {"history": record["history"], "probe": record["probe"],
            "convergence": convergence(record["probe"], args.steps),
            "learned": bool(easiest(eval_results, args) >= LEARNED_AT),
            "train_seconds": record["train_seconds"], **schedule_record(args, record["schedule_steps"]),
            "eval": eval_results}


def schedule_record(args, planned: int) -> dict:
    """How a run's steps were scheduled (planned: the steps its schedule was laid out for), for
    results.json; an extended run says so."""
    record = {"steps": args.steps, "schedule_steps": planned,
              "text_from_step": math.ceil(args.drill_frac * planned)}
    if args.steps > planned:
        record["extended"] = (f"extended from {planned} to {args.steps} steps: the {planned}-step schedule "
                              f"(warm-up, cosine decay, curriculum), then {args.steps - planned} steps at its final "
                              f"learning rate; not the same as a fresh {args.steps}-step run")
    return record


# ---- summaries over seeds -----------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """{"mean", "min", "max", "n"} of one number over seeds."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "n": len(values)}


def summarize(runs: dict[str, dict], args) -> dict:
    """The summary of one model over its seeds ({str(seed): run result}): every evaluation cell as
    {"mean", "min", "max", "n"}, the same nesting as a run's "eval", plus the headline settings and
    the seeds that did not converge or learn."""
    evals = [run["eval"] for run in runs.values()]
    summary_eval = {}
    for length, first in evals[0].items():
        recall = {n: {cell: spread([e[length]["recall"][n][cell] for e in evals]) for cell in cells}
                  for n, cells in first["recall"].items()}
        summary_eval[length] = {"lm_loss": spread([e[length]["lm_loss"] for e in evals]),
                                "state_bytes": first["state_bytes"], "recall": recall}
    return {"seeds": [int(seed) for seed in runs], "eval": summary_eval,
            "hardest": spread([hardest(e, args) for e in evals]), "easiest": spread([easiest(e, args) for e in evals]),
            "not_converged": [int(s) for s, run in runs.items() if run["convergence"]["converged"] is False],
            "not_judged": [int(s) for s, run in runs.items() if run["convergence"]["converged"] is None],
            "not_learned": [int(s) for s, run in runs.items() if not run["learned"]]}


def by_model(results: dict[tuple[str, int], dict], earlier: dict, args, failures=()) -> dict:
    """{preset: {"runs": {str(seed): run result}, "summary": ...}} of this run's results merged with
    the earlier ones in results.json (runs not retrained now keep their results; a run that failed now
    loses its earlier ones, which no longer match its checkpoint), seeds in order."""
    failed = {(f["model"], str(f["seed"])) for f in failures}
    runs = {preset: {seed: run for seed, run in model["runs"].items() if (preset, seed) not in failed}
            for preset, model in earlier.get("models", {}).items()}
    for (name, seed), result in results.items():
        if name in PRESETS:
            runs.setdefault(name, {})[str(seed)] = result
    ordered = {preset: dict(sorted(by_seed.items(), key=lambda item: int(item[0])))
               for preset, by_seed in runs.items() if by_seed}
    return {preset: {"runs": by_seed, "summary": summarize(by_seed, args)} for preset, by_seed in ordered.items()}


def chance_note(runs: dict[str, dict], args) -> str:
    """A sentence for the runs ({label: run result}) whose recall sits at (or near) chance, saying
    whether that is expected; "" when every run recalls."""
    chance = 1 / N_VALUES
    flat = [label for label, res in runs.items() if pooled_recall(res["eval"], args) < 2 * chance]
    if not flat:
        return ""
    steps = max(runs[label].get("steps", args.steps) for label in flat)
    if steps < SHORT_RUN:
        return (f"Recall at chance ({chance:.1%}) is expected after {steps} steps: a model learns recall "
                f"suddenly, several hundred steps into the default {DEFAULT_STEPS}-step run.")
    return (f"Recall at chance ({chance:.1%}) for {', '.join(flat)}: not learned in this run (a small model "
            f"learns recall suddenly, and not with every seed).")


def every_run(models: dict) -> dict[str, dict]:
    """{"gdn seed 0": run result, ...} over every model and seed."""
    return {f"{preset} seed {seed}": run for preset, model in models.items() for seed, run in model["runs"].items()}


def pct(s: dict) -> str:
    """A summary cell in %: '95.3' for one seed, '95.3 (87-97)' = mean (min-max) over several."""
    if s["n"] == 1:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.0f}-{100 * s['max']:.0f})"


def run_marks(run: dict) -> str:
    """The report's marks of one run: * not converged, ? convergence not judged, ! not learned."""
    converged = run["convergence"]["converged"]
    return ("*" if converged is False else "?" if converged is None else "") + ("" if run["learned"] else "!")


def model_marks(model: dict) -> str:
    """The marks of any of a model's seeds, e.g. "*!": the per-seed table says which seed has which."""
    marks = "".join(run_marks(run) for run in model["runs"].values())
    return "".join(mark for mark in "*?!" if mark in marks)


def recall_with_facts(run: dict, n_facts: int, args) -> float:
    """A run's held-out recall at the training length with n_facts facts per sequence, its
    distance bins pooled (each bin weighs the same)."""
    return float(np.mean(list(run["eval"][str(args.seq_len)]["recall"][str(n_facts)].values())))


# ---- tables --------------------------------------------------------------------------------------

def print_report(models: dict, args, failures: list[dict] = ()) -> None:
    """The forgetting gap as tables, mean (min-max) over seeds: recall by distance (most facts) per
    length and by number of facts; then each seed at the hardest setting with its convergence verdict,
    the runs that did not learn or failed, and why recall is at chance if it is."""
    chance = 1 / N_VALUES
    seeds = sorted({int(s) for model in models.values() for s in model["runs"]})
    several = len(seeds) > 1
    print(f"\nrecall accuracy in % on held-out text (chance {100 * chance:.1f}); window w = {args.window}, LTE buffer "
          f"b = {args.lte_buffer}; seed{'s' if several else ''} {', '.join(map(str, seeds))}"
          + ("; each cell: mean (min-max) over the model's seeds" if several else ""))
    n = str(max(args.eval_facts))
    marked = lambda preset: f"{preset} {model_marks(models[preset])}".rstrip()
    for length in (args.seq_len, 2 * args.seq_len, 4 * args.seq_len):
        at = {preset: model["summary"]["eval"][str(length)] for preset, model in models.items()}
        bins = list(next(iter(at.values()))["recall"][n])
        cell = lambda s, b: pct(s["recall"][n][b]) if b in s["recall"][n] else "-"
        rows = [[marked(preset), str(s["lm_loss"]["n"]), f"{s['lm_loss']['mean']:.3f}",
                 f"{s['state_bytes'] / 1024:.1f}", *(cell(s, b) for b in bins)] for preset, s in at.items()]
        print(f"\nT = {length} ({length // args.seq_len}x training length), {n} facts, by fact-to-query distance:")
        print_table(["model", "seeds", "val loss", "state KB", *bins], rows)
    note = state_note(models, args)
    if note:
        print(f"\n{note}")
    print(f"\nT = {args.seq_len}, by number of facts (all distances pooled):")
    rows = [[marked(preset), *(pct(spread([recall_with_facts(run, k, args) for run in model["runs"].values()]))
                               for k in args.eval_facts)] for preset, model in models.items()]
    print_table(["model", *(f"{k} facts" for k in args.eval_facts)], rows)
    print_seed_table(models, seeds, args, failures)
    runs = every_run(models)
    steps = {label: run.get("steps", args.steps) for label, run in runs.items()}
    if len(set(steps.values())) > 1:
        print("\nsteps per run: " + ", ".join(f"{label} {s}" for label, s in steps.items()))
    for label, run in runs.items():
        if "extended" in run:
            print(f"{label}: {run['extended']}")
    note = chance_note(runs, args)
    if note:
        print(f"\n{note}")


def state_note(models: dict, args) -> str:
    """How much decoding state each model carries against pure GDN's, in words: a comparison of
    recall means little until it says how much memory bought it."""
    if "gdn" not in models or len(models) < 2:
        return ""
    parts = []
    for length in (args.seq_len, 4 * args.seq_len):
        at = {preset: model["summary"]["eval"][str(length)]["state_bytes"] for preset, model in models.items()}
        ratios = ", ".join(f"{preset} {nbytes / at['gdn']:.1f}x" for preset, nbytes in at.items() if preset != "gdn")
        parts.append(f"at T = {length}: {ratios}")
    return ("decoding state per sequence against pure GDN's (" + f"{models['gdn']['summary']['eval'][str(args.seq_len)]['state_bytes'] / 1024:.1f} KB"
            + "): " + "; ".join(parts) + ". A hybrid's recall is bought with that much more memory; "
            "--frontier compares the mixers at equal memory.")


def print_seed_table(models: dict, seeds: list[int], args, failures=()) -> None:
    """Each run at the hardest setting, marked, and the footnotes: the rule, each run marked, why."""
    first = next(iter(models.values()))["runs"]
    setting = hardest_setting(args, next(iter(first.values()))["eval"])
    failed = {(f["model"], f["seed"]) for f in failures}
    seeds = sorted(set(seeds) | {seed for _, seed in failed})
    presets = list(models) + [name for name, _ in failed if name in PRESETS and name not in models]
    rows = []
    for preset in dict.fromkeys(presets):
        cells = []
        for seed in seeds:
            run = models.get(preset, {"runs": {}})["runs"].get(str(seed))
            cells.append("x" if (preset, seed) in failed else "" if run is None else
                         f"{100 * hardest(run['eval'], args):.1f} {run_marks(run)}".rstrip())
        rows.append([preset, *cells])
    print(f"\nper seed, hardest setting ({setting}), recall in %:")
    print_table(["model", *(f"seed {s}" for s in seeds)], rows)
    fewest = min(args.eval_facts)
    print(f"* not converged; ? not judged; ! did not learn the task (under {LEARNED_AT:.0%} at the easiest setting: "
          f"{fewest} fact{'s' * (fewest > 1)}, the shortest distances); x failed (the error is above and in "
          f"results.json)")
    print(f"The rule: {CONVERGENCE_RULE}. The held-out probe: {PROBE_BATCHES * args.eval_batch} sequences at "
          f"the hardest setting, every {args.eval_every} steps.")
    for label, run in every_run(models).items():
        if run_marks(run):
            learned = "" if run["learned"] else (f"; did not learn the task ({easiest(run['eval'], args):.1%} at "
                                                 f"the easiest setting)")
            print(f"  {label}: {run['convergence']['verdict']}{learned}")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" ".join(f"{cell:{'<' if i == 0 else '>'}{w}}" for i, (cell, w) in enumerate(zip(row, widths))))


def duration(seconds: float) -> str:
    """A time span in words: "40 s", "12 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 10 * 3600 else f"{seconds / 3600:.0f} h"


def more_seeds_hint(seeds: list[int], wall: float) -> str:
    """After a one-seed run: how to add seeds to it, and how long this run took."""
    s = seeds[0]
    return (f"\nOne seed ({s}): how far these numbers move between seeds is unknown. To add seeds {s + 1} and "
            f"{s + 2} to this run, repeat the command with --resume --seeds {s},{s + 1},{s + 2} (in place of any "
            f"--seed): seed {s} is read back, and each new seed trains every model again (this run took "
            f"{wall / 60:.0f} min; the runs go in parallel where there are cores for them, see --jobs).")


# ---- figures -------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no window), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_axes(ax, xlabel: str, title: str, log2: bool = True, chance: bool = True) -> None:
    """The set-up every recall panel shares: recall from 0 to 1 on y, chance (1 / N_VALUES) dotted,
    a light grid, and x (distances, budgets, state sizes) on a log2 scale."""
    if chance:
        ax.axhline(1 / N_VALUES, color="grey", ls=":", lw=1)
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def save_figure(fig, path, dpi: int = 110, rect=None) -> None:
    """Lay the figure out (within rect, when a note sits below it), write it to path, free it."""
    fig.tight_layout(**({} if rect is None else {"rect": rect}))
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_recall_by_distance(ax, models: dict, colours: dict, length: int, args) -> None:
    """One panel of forgetting_gap.png: recall against fact-to-query distance at `length` with the
    most facts; per model the mean over seeds and their min-max band."""
    n = str(max(args.eval_facts))
    several = any(len(model["runs"]) > 1 for model in models.values())
    for preset, model in models.items():
        cells = model["summary"]["eval"][str(length)]["recall"][n]
        mids = [np.sqrt(int(b.split("-")[0]) * int(b.split("-")[1])) for b in cells]
        seeds = model["summary"]["eval"][str(length)]["lm_loss"]["n"]
        ax.plot(mids, [c["mean"] for c in cells.values()], marker="o", color=colours[preset],
                label=f"{preset} ({seeds} seed{'s' if seeds > 1 else ''})" if several else preset)
        if seeds > 1:
            ax.fill_between(mids, [c["min"] for c in cells.values()], [c["max"] for c in cells.values()],
                            color=colours[preset], alpha=0.15, lw=0)
    ax.axvline(args.window, color="grey", ls="--", lw=1)
    ax.text(args.window, 0.95, " window", color="grey")
    recall_axes(ax, "fact-to-query distance (tokens)", f"T = {length}, {n} facts")


def plot_recall_with_facts(ax, models: dict, colours: dict, args) -> None:
    """The last panel of forgetting_gap.png: recall against the number of facts per sequence at the
    training length, distances pooled; per model the mean over seeds and their min-max band. A state
    of fixed size (GDN's) loses facts as more of them compete for it."""
    facts = list(args.eval_facts)
    for preset, model in models.items():
        runs = list(model["runs"].values())
        per_seed = np.array([[recall_with_facts(run, k, args) for k in facts] for run in runs])   # [seeds, facts]
        ax.plot(facts, per_seed.mean(axis=0), marker="o", color=colours[preset])
        if len(runs) > 1:
            ax.fill_between(facts, per_seed.min(axis=0), per_seed.max(axis=0), color=colours[preset], alpha=0.15, lw=0)
    ax.set_xticks(facts)
    recall_axes(ax, "facts per sequence (distances pooled)", f"T = {args.seq_len}, against the number of facts",
                log2=False)


def plot_forgetting_gap(models: dict, colours: dict, args) -> None:
    """out/forgetting_gap.png: recall against distance per length, and against the number of facts."""
    lengths = (args.seq_len, 2 * args.seq_len, 4 * args.seq_len)
    several = any(len(model["runs"]) > 1 for model in models.values())
    fig, axes = pyplot().subplots(1, len(lengths) + 1, figsize=(5 * (len(lengths) + 1), 4), sharey=True)
    for ax, length in zip(axes, lengths):
        plot_recall_by_distance(ax, models, colours, length, args)
    plot_recall_with_facts(axes[-1], models, colours, args)
    axes[0].set_ylabel("recall accuracy")
    axes[0].legend()
    fig.suptitle(f"Recall against fact-to-query distance and the number of facts (dotted: chance, 1/{N_VALUES}; "
                 f"dashed: the window)"
                 + ("; lines: the mean over seeds, bands: their min-max" if several else ""))
    note = chance_note(every_run(models), args)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", color="firebrick")
    save_figure(fig, args.out / "forgetting_gap.png", rect=(0, 0.05 if note else 0, 1, 1))


def plot_training_curves(models: dict, colours: dict, args) -> None:
    """out/training_curves.png: training loss, recall on the training batches and on the held-out
    probe against step, one thin line per seed."""
    several = any(len(model["runs"]) > 1 for model in models.values())
    fig, axes = pyplot().subplots(1, 3, figsize=(16, 4.5))
    for preset, model in models.items():
        for i, run in enumerate(model["runs"].values()):
            label = preset if i == 0 else None
            steps = [h["step"] for h in run["history"]]
            axes[0].plot(steps, [h["loss"] for h in run["history"]], color=colours[preset], lw=1, label=label)
            axes[1].plot(steps, [h["recall"] for h in run["history"]], color=colours[preset], lw=1, label=label)
            axes[2].plot([p["step"] for p in run["probe"]], [p["recall"] for p in run["probe"]],
                         color=colours[preset], lw=1, marker="." if len(run["probe"]) < 30 else None, label=label)
    for ax, name in zip(axes, ("training loss", "recall on training batches",
                               "held-out probe recall (hardest setting)")):
        ax.set_ylabel(name)
    runs = every_run(models).values()
    switches = sorted({run.get("text_from_step", math.ceil(args.drill_frac * args.steps)) for run in runs})
    for ax in axes:
        for i, step in enumerate(switches):  # one per schedule: runs extended later keep their first one
            ax.axvline(step, color="grey", ls="--", lw=1, label="text starts" if i == 0 else None)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    longest = max(run.get("steps", args.steps) for run in runs)
    axes[2].axvspan(0.75 * longest, longest, color="grey", alpha=0.1, label="last quarter (the rule)")
    axes[2].set_ylim(0, 1.02)
    axes[0].legend()
    axes[2].legend(fontsize="small")
    fig.suptitle("Training curves" + (" (one line per seed)" if several else "") + ": text-free recall drills "
                 "until the dashed line, then drills, dense passages and haystacks")
    save_figure(fig, args.out / "training_curves.png")


def plot_report(models: dict, args) -> None:
    """out/forgetting_gap.png and out/training_curves.png (per model the mean over seeds, and the
    min-max band when there are several), one colour per model in both."""
    colours = {preset: f"C{i}" for i, preset in enumerate(models)}
    plot_forgetting_gap(models, colours, args)
    plot_training_curves(models, colours, args)
    print(f"saved {args.out / 'forgetting_gap.png'} and {args.out / 'training_curves.png'}")


def plot_state_sweep(rows: list[dict], args) -> None:
    """out/state_sweep.png: pure GDN's recall at the hardest and the easiest setting against the
    numbers its state holds per layer; the mean over seeds, and their min-max band."""
    numbers = [row["state_numbers_per_layer"] for row in rows]
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for key, label, style in (("hardest_recall", f"hardest: {hardest_setting(args, None)}", "-"),
                              ("easiest_recall", f"easiest: {min(args.eval_facts)} facts, closest", "--")):
        ax.plot(numbers, [row[key]["mean"] for row in rows], style, marker="o", color="C2", label=label)
        if max(row[key]["n"] for row in rows) > 1:
            ax.fill_between(numbers, [row[key]["min"] for row in rows], [row[key]["max"] for row in rows],
                            color="C2", alpha=0.15, lw=0)
    for row, x in zip(rows, numbers):                    # heads x key dim, under each hardest point
        ax.annotate(f"{row['gdn_heads']}x{row['gdn_head_dim']}", (x, row["hardest_recall"]["mean"]),
                    textcoords="offset points", xytext=(0, -14), ha="center", color="grey")
    recall_axes(ax, "GDN state per layer (heads x key dim x value dim numbers)",
                "Pure GDN: recall against its state size")
    ax.set_ylabel("recall accuracy")
    ax.legend(fontsize="small")
    save_figure(fig, args.out / "state_sweep.png")
    print(f"saved {args.out / 'state_sweep.png'}")


def sweep_rows(results: dict[tuple[str, int], dict], args) -> list[dict]:
    """--sweep-state: pure GDN at growing state sizes (heads x key dim), recall at the hardest setting
    per seed and its spread; it rises with the state. The sweep's sizes, and the command's own size
    (its `gdn` runs, when it trained them; parse_args leaves that size out of the sweep's), ordered
    by state size."""
    default = (args.gdn_heads, args.gdn_head_dim)
    sizes = sorted({*args.state_sizes, default}, key=lambda size: size[0] * size[1] * (args.gdn_value_dim or size[1]))
    rows = []
    for heads, dim in sizes:
        name = "gdn" if (heads, dim) == default else f"gdn_state{heads}x{dim}"
        runs = {seed: results[(name, seed)] for seed in args.seeds if (name, seed) in results}
        if not runs:
            continue
        value_dim = args.gdn_value_dim or dim
        per_seed = {str(seed): {"hardest_recall": hardest(run["eval"], args),
                                "easiest_recall": easiest(run["eval"], args),
                                "converged": run["convergence"]["converged"], "learned": run["learned"]}
                    for seed, run in runs.items()}
        rows.append({"gdn_heads": heads, "gdn_head_dim": dim, "state_numbers_per_layer": heads * dim * value_dim,
                     "runs": per_seed,
                     "hardest_recall": spread([r["hardest_recall"] for r in per_seed.values()]),
                     "easiest_recall": spread([r["easiest_recall"] for r in per_seed.values()])})
        marks = "".join(run_marks(run) for run in runs.values())
        print(f"state sweep: {heads} heads x {dim} x {value_dim} = {heads * dim * value_dim:5d} numbers/layer -> "
              f"hardest recall {pct(rows[-1]['hardest_recall'])} %{' ' + marks if marks else ''}", flush=True)
    return rows
