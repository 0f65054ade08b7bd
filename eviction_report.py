"""Learned against heuristic eviction at equal memory (train_shakespeare.py --eviction-report).

Does LTE's learned choice of tokens beat a rule on the attention itself, at the same memory? The
densely trained gdn+attn decodes under StreamingLLM, TOVA and H2O (eviction.py's EvictingAttention)
with exactly LTE's budget: s sinks, the window of w + 1 and b more slots. Four tables and two
figures, on the main table's held-out haystacks (the most facts):
  1. recall by distance at 1x, 2x and 4x the training length: gdn+lte against gdn+attn under each
     heuristic, gdn+attn uncapped and gdn+swa;
  2. what each policy keeps (LTE, TOVA, H2O), per KV head: the share of fact keys, fact values and
     text that enter its buffer, and of the facts still held when their query comes, counted the
     same way for all three from what each holds at every query; lte_keeps.png draws one haystack;
  3. the budget: recall beyond the window against b at inference (LTE, TOVA, H2O, and StreamingLLM
     with the b slots in its window), and LTE against its window w at inference;
     eviction_budget.png draws it;
  4. when the run also trained gdn+nsa: recall beyond the window against NSA's n at inference.
Every number once per seed (--seeds: each seed's models, evaluated in a process of its own on a
CPU), and the tables give mean (min-max) over the seeds.

The models are read back from --out, or trained there first by the training script's run_one,
which main receives: this module never imports the training script.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import platform
import time

import numpy as np
import torch

from cli import (EVICTION_FILES, EVICTION_PRESETS, checkpoint_path, eval_lengths, fail, flag_of, load_trained,
                 output_files, prepare_run, run_settings, write_json_atomic)
from corpus import N_BPE
from eviction import EvictingAttention, with_eviction
from recall_task import recall_batches
from report import pct, print_table, pyplot, recall_axes, save_figure, spread
from runs import OneTorchThread, cpu_cores, planned_runs, report_failures, run_all
from tiny_hybrid import LTEAttention, NativeSparseAttention, TinyHybrid, lte_visible_until

EVICTION_BUDGETS = (8, 16, 32, 64, 128)   # b at inference
EVICTION_WINDOWS = (8, 16, 32, 64)        # LTE's w at inference (at the trained b)
EVICTION_ROWS = 64  # haystacks per forward: the heuristics decode token by token, so batch the bins

def eviction_variants(models: dict, buffer: int, window: int) -> dict:
    """The rows of table 1, each a model: LTE as trained, and gdn+attn under each heuristic with
    LTE's memory (s sinks + w + 1 window + b), uncapped, and gdn+swa."""
    attn, sink = models["gdn+attn"], models["gdn+lte"].config.lte_sink
    return {"gdn+lte (learned)": with_lte_budget(models["gdn+lte"], buffer, window),
            "attn + StreamingLLM, s + w": with_eviction(attn, "streaming", sink, window, 0),
            "attn + StreamingLLM, window w + b": with_eviction(attn, "streaming", sink, window + buffer, 0),
            "attn + TOVA": with_eviction(attn, "tova", sink, window, buffer),
            "attn + H2O": with_eviction(attn, "h2o", sink, window, buffer),
            "gdn+attn (uncapped)": attn, "gdn+swa": models["gdn+swa"]}


def held_keys(row: str, sink: int, window: int, buffer: int, length: int) -> int:
    """Keys an attention layer of `row` holds per KV head at the end of `length` tokens."""
    if row == "gdn+attn (uncapped)":
        return length
    if row == "gdn+swa":
        return min(length, window + 1)
    if row == "attn + StreamingLLM, s + w":
        return min(length, sink + window + 1)
    return min(length, sink + window + 1 + buffer)


def with_lte_budget(model, buffer: int, window: int):
    """A copy of a trained gdn+lte whose LTE layers run with buffer b and window w at inference."""
    copy = TinyHybrid(model.config).to(model.wte.weight.device)
    copy.load_state_dict(model.state_dict())
    for block in copy.blocks:
        if isinstance(block.mixer, LTEAttention):
            block.mixer.buffer, block.mixer.window = buffer, window
    return copy.eval()


@torch.no_grad()
def recall_by_distance(model, batches: dict[str, dict], device, rows: int = EVICTION_ROWS) -> dict[str, float]:
    """Recall per distance bin; the bins' haystacks go through the model together, `rows` at a time
    (a heuristic decodes token by token: one pass over T serves them all)."""
    model.eval()
    idx = torch.cat([b["idx"] for b in batches.values()])                      # [bins * eval_batch, T]
    answers = []
    for part in idx.split(rows):
        logits, _ = model(part.to(device))
        answers.append(logits.argmax(-1).cpu())                                 # [rows, T]
    answers = torch.cat(answers).split([b["idx"].shape[0] for b in batches.values()])
    return {name: (answer[b["answer_mask"]] == b["targets"][b["answer_mask"]]).float().mean().item()
            for (name, b), answer in zip(batches.items(), answers)}


def beyond(cells: dict[str, float], window: int) -> float:
    """Mean recall over the distance bins past the window (lo > w): what the window cannot give."""
    far = [acc for name, acc in cells.items() if int(name.split("-")[0]) > window]
    return float(np.mean(far)) if far else float("nan")


# --- what each eviction keeps ---

KEEP_ROWS = ("gdn+lte (learned)", "attn + TOVA", "attn + H2O")   # the rows of table 2: the policies that choose


@torch.no_grad()
def lte_visibility(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per LTE layer i: int64 [B, T, Hkv], the last query that sees each key beyond the window
    under the streaming rule [L6] (KEEP_FOREVER while retained, -1 never), as the model's eval
    forward computes it; read from the layer's input, which a hook catches."""
    inputs, hooks = {}, []
    for i, block in enumerate(model.blocks):
        if isinstance(block.mixer, LTEAttention):
            hooks.append(block.mixer.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0])))
    try:
        model.eval()(idx)
    finally:
        for hook in hooks:
            hook.remove()
    until = {}
    for i, x in inputs.items():
        mixer = model.blocks[i].mixer
        _, k, v, k_raw = mixer._qkv(x)
        r = mixer.router(k_raw, v)                                              # [B, T, Hkv]
        until[i] = lte_visible_until(r, mixer.window, mixer.sink, mixer.buffer)
    return until


@torch.no_grad()
def evicting_visibility(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per EvictingAttention layer i: int64 [B, T, Hkv], the last query whose keys include each
    position (-1 never; a dropped token never comes back), read from the layer's own decoding state
    (`held_positions`) after every token while the model decodes idx one token at a time."""
    B, T = idx.shape
    layers = {i: block.mixer for i, block in enumerate(model.blocks) if isinstance(block.mixer, EvictingAttention)}
    until = {i: torch.full((B, T, layer.n_kv_head), -1, dtype=torch.long) for i, layer in layers.items()}
    state = model.eval().init_state(B, idx.device)
    for t in range(T):
        model(idx[:, t:t + 1], state=state)
        for i, layer in layers.items():
            held = layer.held_positions(state[i]).transpose(1, 2).cpu()        # [B, Hkv, t + 1] -> [B, t + 1, Hkv]
            until[i][:, :t + 1][held] = t
    return until


def held_until(model, idx: torch.Tensor, device) -> dict[int, torch.Tensor]:
    """Per eviction layer i of a gdn+lte or of gdn+attn under a heuristic: int64 [B, T, Hkv] on the
    CPU, the last query that holds each key; EVICTION_ROWS sequences at a time."""
    heuristic = any(isinstance(block.mixer, EvictingAttention) for block in model.blocks)
    visibility = evicting_visibility if heuristic else lte_visibility
    parts = [visibility(model, rows.to(device)) for rows in idx.split(EVICTION_ROWS)]
    return {i: torch.cat([part[i].cpu() for part in parts]) for i in parts[0]}


def fact_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per answer: (row, fact key position, fact value position, query position)."""
    value = batch["answer_pos"] - batch["answer_distance"]   # the distance runs from the fact's value
    return batch["answer_batch"], value - 1, value, batch["answer_pos"]


def count_keeps(counts, until: torch.Tensor, batch: dict, layer: int, sink: int, window: int) -> None:
    """Add one batch to counts[head][what], lists of bools, one per token: for each token that
    leaves the window (no sink) by kind (fact keys, fact values, text), did it enter the buffer;
    for each fact beyond the window, is its value held when its query comes. until: [B, T, Hkv]."""
    idx = batch["idx"]
    T = idx.shape[1]
    rows, keys, values, queries = fact_positions(batch)
    pos = torch.arange(T)[None, :, None]                                         # [1, T, 1]
    left = (pos >= sink) & (pos < T - window - 1)                               # leaves the window in time
    entered = until > pos + window                                               # still held once it left: [B, T, Hkv]
    text = (idx < N_BPE) & left[..., 0]                                         # [B, T]
    far = batch["answer_distance"] > window
    for h in range(until.shape[-1]):
        head = counts[f"layer {layer} head {h}"]
        head["text"].append(entered[..., h][text])
        head["fact keys"].append(entered[rows, keys, h][left[0, keys, 0]])
        head["fact values"].append(entered[rows, values, h][left[0, values, 0]])
        head["held at query"].append((until[rows, values, h] >= queries)[far])


def keep_shares(model, batches: dict[str, dict], device) -> dict[str, dict[str, float]]:
    """Per eviction layer and KV head of a gdn+lte, or of gdn+attn under a heuristic, over the
    haystacks (one length): the share of fact keys, fact values and text tokens that enter the
    buffer (of those that leave the window and are no sink), and the share of facts beyond the
    window whose value is still held when its query comes."""
    idx = torch.cat([batch["idx"] for batch in batches.values()])               # [bins * eval_batch, T]
    sizes = [batch["idx"].shape[0] for batch in batches.values()]
    counts = collections.defaultdict(lambda: collections.defaultdict(list))
    for i, until in held_until(model, idx, device).items():
        mixer = model.blocks[i].mixer
        for batch, rows in zip(batches.values(), until.split(sizes)):
            count_keeps(counts, rows, batch, i, mixer.sink, mixer.window)
    return {head: {what: torch.cat(parts).double().mean().item() if sum(map(len, parts)) else float("nan")
                   for what, parts in shares.items()} for head, shares in counts.items()}


# --- NSA's n at inference ---

NSA_TOPNS = (3, 4, 8, 16, 32)   # n at inference (blocks of w / 4 tokens); 3: the forced blocks alone
NSA_ROWS = 16   # haystacks per NSA forward: its reference selection builds a [rows, T, Hkv, n, T] mask


def nsa_topns(args) -> list[int]:
    """The n of the NSA table: NSA_TOPNS and the trained --nsa-topn."""
    return sorted(set(NSA_TOPNS) | {args.nsa_topn})


def with_nsa_topn(model, top_n: int):
    """A copy of a trained gdn+nsa whose NSA layers select top_n blocks per query at inference: the
    config field nsa_topn, which the layers read at every forward (no weight depends on it)."""
    check_topn(model, top_n)
    copy = TinyHybrid(dataclasses.replace(model.config, nsa_topn=top_n)).to(model.wte.weight.device)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def nsa_topn_recall(model, top_ns: list[int], batches: dict[int, dict], args, device) -> dict:
    """A trained gdn+nsa's recall beyond the window with each n in top_ns at inference, per length
    ({str(n): {str(length): recall}}); batches: {length: recall_batches}."""
    for top_n in top_ns:                                   # every n checked before any work
        check_topn(model, top_n)
    return {str(n): {str(length): beyond(recall_by_distance(with_nsa_topn(model, n), by_bin, device, NSA_ROWS),
                                         args.window)
                     for length, by_bin in batches.items()} for n in top_ns}


def check_topn(model, top_n) -> None:
    """ValueError unless top_n is an n a trained gdn+nsa can select at inference."""
    if not any(isinstance(block.mixer, NativeSparseAttention) for block in model.blocks):
        raise ValueError(f"NSA's n at inference needs a model with NSA layers, got layers {model.config.layers}")
    least = model.config.nsa_recent + 1
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < least:
        raise ValueError(f"top_n {top_n!r}: NSA always selects the first block and the {least - 1} most recent, "
                         f"so n must be an int >= {least}")


# --- the report ---

def eviction_batches(val_tokens, args) -> dict[int, dict[str, dict]]:
    """{length: recall_batches} at 1x, 2x and 4x the training length."""
    return {length: recall_batches(val_tokens, args, length) for length in eval_lengths(args)}


def seed_numbers(models: dict, batches: dict[int, dict], args, device) -> dict:
    """Every number of the report for one seed's models ({preset: model}, in eval mode): recall by
    distance, what each policy keeps, the budget and the window at inference, and with a gdn+nsa
    among the models, NSA's n at inference."""
    lengths = list(batches)
    variants = eviction_variants(models, args.lte_buffer, args.window)
    recall = {row: {str(length): recall_by_distance(model, batches[length], device) for length in lengths}
              for row, model in variants.items()}
    budget = {str(b): {row: {length: beyond(cells, args.window) for length, cells in by_length.items()}
                       for row, by_length in budget_recall(models, b, recall, batches, args, device).items()}
              for b in EVICTION_BUDGETS}
    windows = {str(w): {str(length): beyond(recall_by_distance(
                   with_lte_budget(models["gdn+lte"], args.lte_buffer, w), batches[length], device), args.window)
                   for length in lengths} for w in EVICTION_WINDOWS}
    keeps = {row: keep_shares(variants[row], batches[lengths[-1]], device) for row in KEEP_ROWS}
    numbers = {"recall": recall, "keeps": keeps, "budget": budget, "window": windows}
    if "gdn+nsa" in models:
        numbers["nsa_topn"] = nsa_topn_recall(models["gdn+nsa"], nsa_topns(args), batches, args, device)
    return numbers


BUDGET_ROWS = ("gdn+lte (learned)", "attn + TOVA", "attn + H2O", "attn + StreamingLLM, window w + b")


def budget_recall(models: dict, buffer: int, recall: dict, batches: dict, args, device) -> dict:
    """Recall by distance of the budget curve's rows with b = buffer at inference; at the trained b
    they are table 1's rows, whose numbers `recall` already holds."""
    if buffer == args.lte_buffer:
        return {row: recall[row] for row in BUDGET_ROWS}
    variants = eviction_variants(models, buffer, args.window)
    return {row: {str(length): recall_by_distance(variants[row], length_batches, device)
                  for length, length_batches in batches.items()} for row in BUDGET_ROWS}


def seed_report(seed: int, args, val_tokens, vocab_size: int, device, presets: tuple[str, ...]) -> dict:
    """One seed's numbers (`seed_numbers`), its models read back from --out; run in this process or
    in one of its own (then it prints its own line)."""
    with OneTorchThread():
        t0 = time.perf_counter()
        models = load_trained(args, seed, vocab_size, device, presets)
        numbers = seed_numbers(models, eviction_batches(val_tokens, args), args, device)
        print(f"eviction report, seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    return numbers


def eviction_jobs(args, device) -> int:
    """Seeds evaluated at a time: on a CPU one per core (each runs on one torch thread), at most
    --jobs when given; on CUDA one after the other in this process."""
    if device.type != "cpu":
        return 1
    return min(len(args.seeds), args.jobs or cpu_cores())


def eviction_report(args, val_tokens, vocab_size: int, device, presets: tuple[str, ...]) -> dict:
    """Every seed's numbers ({"per_seed": {str(seed): numbers}}) and their summary over the seeds;
    presets: the ones read back for each seed (EVICTION_PRESETS, and gdn+nsa when every seed has it)."""
    jobs = eviction_jobs(args, device)
    work = [(seed, args, val_tokens, vocab_size, device, presets) for seed in args.seeds]
    if jobs == 1:
        numbers = [seed_report(*one) for one in work]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            numbers = list(pool.map(seed_report, *zip(*work)))
    return summarize_seeds(dict(zip(map(str, args.seeds), numbers)))


def summarize_seeds(per_seed: dict[str, dict]) -> dict:
    """{"per_seed": as given, "summary": the same nesting, each number its `spread` over the seeds}."""
    return {"per_seed": per_seed, "summary": summarize_nested(list(per_seed.values()))}


def summarize_nested(runs: list[dict]):
    """The same nesting as one seed's numbers, each number replaced by its `spread` over the seeds."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: summarize_nested([run[key] for run in runs]) for key in first}
    return spread(runs)


def seeds_note(report: dict) -> str:
    """How a table's cells were made: "seed 0" or "seeds 0, 1, 2: mean (min-max)"."""
    seeds = list(report["per_seed"])
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {', '.join(seeds)}: mean (min-max)"


def print_eviction_report(report: dict, args, sink: int) -> None:
    s, w, b = sink, args.window, args.lte_buffer
    summary, seeds = report["summary"], seeds_note(report)
    lengths = list(map(str, eval_lengths(args)))
    print(f"\nLearned against heuristic eviction at equal memory ({seeds}): s = {s} sinks, window w = {w} "
          f"(w + 1 keys), buffer b = {b}; {max(args.eval_facts)} facts; recall in % by fact-to-query distance")
    for length in lengths:
        bins = list(summary["recall"]["gdn+lte (learned)"][length])
        print(f"\nT = {length} ({int(length) // args.seq_len}x training length; {seeds})")
        print_table(["model", "keys held"] + bins,
                    [[row, str(held_keys(row, s, w, b, int(length)))] + [pct(by_length[length][c]) for c in bins]
                     for row, by_length in summary["recall"].items()])
    print_keeps(report, args)
    budgets = list(summary["budget"])
    print(f"\nThe budget: recall (%) beyond the window (distance > {w}) against the buffer b at inference "
          f"(s + w + 1 + b keys held; StreamingLLM holds them all in its window)")
    for length in lengths:
        print(f"\nT = {length} ({seeds})")
        print_table(["model"] + [f"b = {bb}" for bb in budgets],
                    [[row] + [pct(summary["budget"][bb][row][length]) for bb in budgets] for row in BUDGET_ROWS])
    print(f"\ngdn+lte against its window at inference (b = {b}; {seeds}): recall (%) beyond distance {w}")
    print_table(["w"] + [f"T = {length}" for length in lengths],
                [[ww + " (trained)" * (int(ww) == w)] + [pct(by_length[length]) for length in lengths]
                 for ww, by_length in summary["window"].items()])
    print_nsa_topn(report, args)


def print_keeps(report: dict, args) -> None:
    """Table 2: what LTE and the scored heuristics keep, per policy and KV head."""
    columns = ["fact keys", "fact values", "text", "held at query"]
    print(f"\nWhat each policy keeps, T = {eval_lengths(args)[-1]} haystacks ({seeds_note(report)}): share (%) of the "
          f"tokens that leave the window (sinks aside) which enter the buffer, and of facts beyond the window "
          f"whose value is held at its query")
    print_table(["policy", "head"] + columns,
                [[row, head] + [pct(shares[c]) for c in columns]
                 for row, heads in report["summary"]["keeps"].items() for head, shares in heads.items()])


def print_nsa_topn(report: dict, args) -> None:
    """NSA's n at inference, or the line that says why it is not there."""
    summary = report["summary"]
    if "nsa_topn" not in summary:
        print(f"\nNSA's n at inference: not measured, {report['nsa_missing']}")
        return
    lengths = list(map(str, eval_lengths(args)))
    block = args.window // 4                               # NSA's block l, as model_config sets it
    print(f"\ngdn+nsa against its n at inference (blocks of l = {block} tokens; {seeds_note(report)}): recall (%) "
          f"beyond distance {args.window}; each query reads w + 1 = {args.window + 1} window keys, the complete "
          f"compressed blocks and n l selected keys, and its cache holds all T")
    print_table(["n", "n l keys"] + [f"T = {length}" for length in lengths],
                [[n + " (trained)" * (int(n) == args.nsa_topn), str(int(n) * block)]
                 + [pct(by_length[length]) for length in lengths] for n, by_length in summary["nsa_topn"].items()])


def plot_lte_keeps(model, batches: dict[str, dict], args, device, seed: int) -> None:
    """out/lte_keeps.png: for one held-out haystack (the longest distances), which keys each LTE
    head holds at each query: window and sinks in grey, the buffer in blue; each fact's value is
    a dot at (value, query): green when held then, red when not."""
    plt = pyplot()
    name, batch = list(batches.items())[-1]
    until = {i: u[0].cpu() for i, u in lte_visibility(model, batch["idx"][:1].to(device)).items()}   # [T, Hkv]
    rows, _, values, queries = fact_positions(batch)
    values, queries = values[rows == 0], queries[rows == 0]
    T = batch["idx"].shape[1]
    panels = [(i, h) for i in until for h in range(until[i].shape[-1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (i, h) in zip(axes[0], panels):
        mixer = model.blocks[i].mixer
        q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
        band = (k <= q) & ((q - k <= mixer.window) | (k < mixer.sink))
        buffered = (k <= q) & ~band & (q <= until[i][:, h][None, :])
        colours = plt.matplotlib.colors.ListedColormap(["white", "0.8", "tab:blue"])   # 0 unseen, 1 band, 2 buffer
        ax.imshow((band * 1 + buffered * 2).numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest",
                  origin="upper")
        held = until[i][values, h] >= queries
        far = queries - values > mixer.window
        ax.scatter(values[far & held], queries[far & held], s=18, c="tab:green", label="fact value held at its query")
        ax.scatter(values[far & ~held], queries[far & ~held], s=18, c="tab:red", marker="x",
                   label="fact value gone by its query")
        ax.set_xlabel("key position")
        ax.set_title(f"layer {i}, KV head {h}: {int(buffered.any(0).sum())} keys ever buffered")
    axes[0][0].set_ylabel("query position")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"What LTE holds: one held-out haystack, T = {T}, {max(args.eval_facts)} facts at distances {name} "
                 f"(seed {seed})\ngrey: sinks and window, blue: the buffer (b = {args.lte_buffer})")
    save_figure(fig, args.out / "lte_keeps.png", dpi=100)


def plot_budget(report: dict, args) -> None:
    """out/eviction_budget.png: recall beyond the window against b at inference, per length."""
    summary = report["summary"]
    lengths = list(map(str, eval_lengths(args)))
    fig, axes = pyplot().subplots(1, len(lengths), figsize=(5 * len(lengths), 4), sharey=True)
    budgets = [int(b) for b in summary["budget"]]
    for ax, length in zip(axes, lengths):
        for row in next(iter(summary["budget"].values())):
            cells = [summary["budget"][str(b)][row][length] for b in budgets]
            mean = [c["mean"] for c in cells]
            line, = ax.plot(budgets, mean, marker="o", label=row)
            ax.fill_between(budgets, [c["min"] for c in cells], [c["max"] for c in cells], color=line.get_color(), alpha=0.15)
        for row, style in (("gdn+attn (uncapped)", "--"), ("gdn+swa", ":")):
            ax.axhline(beyond({k: v["mean"] for k, v in summary["recall"][row][length].items()}, args.window),
                       color="grey", ls=style, lw=1, label=row)
        ax.axvline(args.lte_buffer, color="grey", lw=0.5)
        recall_axes(ax, "b: buffer slots at inference (per KV head)", f"T = {length}", chance=False)
    axes[0].set_ylabel(f"recall beyond the window (distance > {args.window})")
    axes[0].legend(fontsize=8)
    seeds = ", ".join(report["per_seed"])
    fig.suptitle(f"Recall against the budget b at equal memory (s + w + 1 + b keys; seeds {seeds}: mean, band min-max)")
    save_figure(fig, args.out / "eviction_budget.png", dpi=100)


# --- the models, and the command ---

def nsa_missing(args) -> str:
    """Why NSA's n at inference cannot be measured for the run's seeds ("" when it can): each seed
    needs a finished gdn+nsa run in --out with this run's settings (the main run trains gdn+nsa;
    this report does not train it for the table)."""
    for seed in args.seeds:
        path = checkpoint_path(args.out, "gdn+nsa", seed)
        if not path.exists():
            return f"no gdn+nsa checkpoint of seed {seed} in {args.out} (the main run trains it; this report does not)"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved, current = ckpt.get("settings") or {}, run_settings(args)
        differ = [flag_of(name) for name in current if saved.get(name) != current[name]]
        if differ:
            return f"{path.name} was trained with another {', '.join(differ)} than this run's"
        if "result" not in ckpt or ckpt["step"] < args.steps:
            return f"{path.name} has not finished its {args.steps} steps (--resume --models gdn+nsa continues it)"
    return ""


def main(args, run_one) -> None:
    """--eviction-report: gdn+attn, gdn+lte and gdn+swa for every seed, read back from --out (or
    trained there first, like any run), with gdn+nsa when every seed has it, then the report of
    this module into --out."""
    wall_start = time.perf_counter()
    existing = [name for name in EVICTION_FILES if (args.out / name).exists()]
    if existing and not args.overwrite:
        fail(f"--out {args.out} already holds an eviction report ({', '.join(existing)}): add --overwrite to "
             f"replace it (only the report's files; checkpoints and results.json stay), or choose another --out")
    args.models, args.overwrite = list(EVICTION_PRESETS), False
    args.resume = args.resume or bool(output_files(args.out))   # finished runs are read back, missing ones trained
    device, _, enc, tokens, val_tokens = prepare_run(args)
    results, failures = run_all(planned_runs(args), args, tokens, val_tokens, enc.n_vocab, device, run_one)
    if failures:
        report_failures(failures)
        raise SystemExit(1)
    missing = nsa_missing(args)
    presets = EVICTION_PRESETS + (() if missing else ("gdn+nsa",))
    jobs = eviction_jobs(args, device)
    if jobs > 1:
        print(f"\neviction report of seeds {', '.join(map(str, args.seeds))}: {jobs} processes at a time, one torch "
              f"thread each", flush=True)
    report = eviction_report(args, val_tokens, enc.n_vocab, device, presets)
    if missing:
        report["nsa_missing"] = missing
    lte = load_trained(args, args.seed, enc.n_vocab, device, ("gdn+lte",))["gdn+lte"]
    sink = lte.config.lte_sink
    print_eviction_report(report, args, sink)
    plot_lte_keeps(lte, recall_batches(val_tokens, args, eval_lengths(args)[-1]), args, device, args.seed)
    plot_budget(report, args)
    wall = time.perf_counter() - wall_start
    summary = {"settings": run_settings(args), "seeds": args.seeds,
               "budget": {"sink": sink, "window": args.window, "buffer": args.lte_buffer},
               "facts": max(args.eval_facts), "haystacks_per_cell": args.eval_batch,
               "machine": f"{platform.machine()} {os.cpu_count()} cores, {device}", "wall_seconds": wall,
               "tables": {"recall": "recall by distance bin, per model and length",
                          "keeps": "per policy (gdn+lte, gdn+attn under TOVA and H2O) and KV head of the attention "
                                   "layer: share of fact keys / fact values / text leaving the window that enter the "
                                   "buffer, and of facts beyond the window whose value is held at its query "
                                   f"(T = {eval_lengths(args)[-1]})",
                          "budget": "recall beyond the window against b at inference, per model and length",
                          "window": "gdn+lte's recall beyond the trained window against its window at inference",
                          "nsa_topn": "gdn+nsa's recall beyond the window against its top-n at inference, per "
                                      f"length (trained n = {args.nsa_topn}; absent without gdn+nsa checkpoints, "
                                      "see nsa_missing)"},
               "lte_keeps_png_seed": args.seed,
               **report}
    write_json_atomic(summary, args.out / "eviction.json")
    print(f"\nwrote {args.out / 'eviction.json'}, {args.out / 'lte_keeps.png'} (seed {args.seed}) and "
          f"{args.out / 'eviction_budget.png'}; wall time {wall:.0f}s")
