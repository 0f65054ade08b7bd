"""--long: the paper's regime on one GPU (train_shakespeare.py --long): every preset and pure GDN at
gdn+lte's state size, trained at T = 2048 on haystacks of needles queried at their end, evaluated by
needle depth and length at 1x-8x T (long_context.py), the kernels' speed-up over the reference ops
timed, long.json and long_heatmap.png written. In parallel processes (runs.py), or one run after
another data parallel under torchrun (distributed.py). The recipe's sizes are cli.py's LONG.

What trains one run is the training script's train_model, which main receives: this module never
imports the training script.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
import time

import numpy as np
import torch

import distributed
import long_context
from cli import (LONG_QUICK_TIME, LONG_TIME, PROG, check_triton, checkpoint_path, expected_tokens, fail,
                 model_config, pick_device, prepare_run, run_settings, save_atomic, write_json_atomic)
from recall_task import BLOCK_LEN, EVAL_SEED, PROBE_BATCHES, TRAINING_KEYS, collate, key_value_ids, recall_loss
from report import convergence, duration
from runs import Run, cpu_cores, error_line, report_failures, run_all, run_here
from tiny_hybrid import TinyHybrid

# Training tokens per second of one run at the --long sizes through the PyTorch reference ops, one
# thread on a 2-core x86-64 CPU (haystacks of 8 x 2048 tokens, measured beside other jobs: gdn
# 2,400-3,900, gdn+lte 1,250-1,370, gdn+attn 1,270-1,490): what --long would cost there.
LONG_CPU_TOKENS_PER_S = 2000
SPEEDUP_MODEL, SPEEDUP_STEPS = "gdn+lte", 5  # the model and steps timed both ways (kernel_speedup)


def long_needles(args) -> tuple[int, ...]:
    """The needle counts of the evaluation grid: one needle (the classic test) and the most."""
    return tuple(sorted({1, args.max_facts}))


def config_state_bytes(config, length: int) -> int:
    """Decoding state per sequence of a model of `config` after `length` tokens, in bytes, without
    its weights (built on the meta device)."""
    with torch.device("meta"):
        model = TinyHybrid(config)
    return model.state_bytes(length)


def equal_memory_gdn(args, vocab_size: int) -> tuple[int, int, int, int]:
    """Pure GDN's (heads, key dim) whose decoding state is the smallest at least as large as
    gdn+lte's at the training length (heads 2, 4 or 8; key dim = value dim, a multiple of 16, the
    kernels' smallest tile). Returns (heads, key dim, its bytes, gdn+lte's bytes)."""
    target = config_state_bytes(model_config("gdn+lte", args, vocab_size), args.seq_len)
    sizes = []
    for heads in (2, 4, 8):
        for dim in range(16, 513, 16):
            nbytes = config_state_bytes(model_config("gdn", args, vocab_size, gdn_heads=heads, gdn_head_dim=dim,
                                                     gdn_value_dim=0), args.seq_len)
            if nbytes >= target:
                sizes.append((nbytes, heads, dim))
                break  # a larger key dim only grows it
    nbytes, heads, dim = min(sizes)
    return heads, dim, nbytes, target


def long_runs(args, vocab_size: int) -> list[Run]:
    """Every --long run: the presets, and with gdn and gdn+lte among them the equal-memory GDN."""
    runs = []
    control = {"gdn", "gdn+lte"} <= set(args.models)
    heads, dim, _, _ = equal_memory_gdn(args, vocab_size) if control else (0, 0, 0, 0)
    for seed in args.seeds:
        runs += [Run(preset, seed) for preset in args.models]
        if control:
            runs.append(Run("gdn", seed, f"_state{heads}x{dim}",
                            (("gdn_heads", heads), ("gdn_head_dim", dim), ("gdn_value_dim", 0))))
    return runs


def long_probe(val_tokens: np.ndarray, args) -> dict:
    """The held-out probe of --long: PROBE_BATCHES x --eval-batch haystacks of --max-facts needles
    at random depths, at the training length."""
    keys, values = key_value_ids(args)
    n = args.max_facts
    rng = np.random.default_rng((EVAL_SEED, args.seq_len, n))
    rows = [long_context.needle_sequence(val_tokens, args.seq_len,
                                         long_context.random_starts(n, args.seq_len + 1 - BLOCK_LEN * n, rng),
                                         rng, keys, values)
            for _ in range(PROBE_BATCHES * args.eval_batch)]
    return collate(rows)


def long_summary(result: dict, args) -> str:
    """One line for a finished --long run: time, and recall of the most needles at 1x and 8x T."""
    cells = result["grid"]["recall"][str(args.max_facts)]
    lengths = result["grid"]["lengths"]
    at = lambda length: long_context.pooled(cells[str(length)])
    return (f"trained in {result['train_seconds']:.0f}s; recall of {args.max_facts} needles {at(lengths[0]):.1%} at "
            f"T = {lengths[0]}, {at(lengths[-1]):.1%} at {lengths[-1]}; {result['convergence']['verdict']}")


def long_run_one(run: Run, args, tokens, val_tokens, vocab_size, device, log=None, stop=None, *,
                 train_model) -> dict:
    """Train one --long run with train_model (or continue it, or read a finished one back), then (rank 0
    alone in a torchrun job) evaluate it on the needle grid and keep the result in its checkpoint."""
    args = argparse.Namespace(**{**vars(args), "seed": run.seed})
    path = checkpoint_path(args.out, run.name, run.seed)
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if args.resume and path.exists() else {}
    if "result" in ckpt and ckpt["step"] == args.steps:
        print(f"{run}: finished earlier; its results are read back from {path}", flush=True)
        return ckpt["result"]
    probe = long_probe(val_tokens, args) if distributed.is_main() else None
    model, record = train_model(run.preset, args, tokens, vocab_size, device, tag=run.suffix, probe=probe,
                                log=log, stop=stop, **dict(run.overrides))
    if not distributed.is_main():
        distributed.barrier()  # while rank 0 evaluates
        return {"summary": f"trained (rank {distributed.rank()}); rank 0 evaluates"}
    keys, values = key_value_ids(args)
    grid = long_context.evaluate_grid(model, val_tokens, args.seq_len, args.window, long_needles(args),
                                      args.eval_batch, keys, values, device)
    result = {"history": record["history"], "probe": record["probe"],
              "convergence": convergence(record["probe"], args.steps), "train_seconds": record["train_seconds"],
              "overrides": dict(run.overrides), "grid": grid,
              "state_bytes": {str(length): model.state_bytes(length) for length in grid["lengths"]}}
    result["summary"] = long_summary(result, args)
    save_atomic({**torch.load(path, map_location="cpu", weights_only=True), "result": result}, path)
    distributed.barrier()
    return result


def time_training_steps(config, batch: dict, args, device, steps: int) -> float:
    """Seconds per training step of a fresh model of `config` on `batch`, after two warm-up steps
    (the kernels compile in the first)."""
    torch.manual_seed(0)
    model = TinyHybrid(config).to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.lr, weight_decay=0.1), betas=(0.9, 0.95))
    for i in range(2 + steps):
        if i == 2:
            wait_for(device)
            t0 = time.perf_counter()
        logits, penalty = model(batch["idx"])
        loss = recall_loss(logits, batch, args.answer_weight) + penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    wait_for(device)
    return (time.perf_counter() - t0) / steps


def wait_for(device) -> None:
    """Let the GPU finish what is queued (a clock must not stop before it does); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_speedup(args, tokens: np.ndarray, vocab_size: int, device) -> dict:
    """A training step of SPEEDUP_MODEL at the training length and the global batch, on this GPU,
    through the Triton kernels and through the PyTorch reference ops (same weights, same batch)."""
    if importlib.util.find_spec("triton") is None:
        return {"skipped": "Triton is not installed here (pip install triton)"}
    keys, values = key_value_ids(args)
    rng = np.random.default_rng((args.seed, 2**31))  # a batch of its own, never a training batch
    batch = collate([long_context.training_haystack(tokens, args.seq_len, args.max_facts, rng, keys, values)
                     for _ in range(args.batch_size)])
    batch = {k: v.to(device) for k, v in batch.items() if k in TRAINING_KEYS}
    timing = {"model": SPEEDUP_MODEL, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": SPEEDUP_STEPS}
    for name, use_triton in (("kernels", True), ("reference", False)):
        config = model_config(SPEEDUP_MODEL, args, vocab_size, use_triton=use_triton)
        try:
            timing[f"{name}_ms"] = 1000 * time_training_steps(config, batch, args, device, SPEEDUP_STEPS)
        except torch.cuda.OutOfMemoryError:
            timing[f"{name}_ms"] = None
        torch.cuda.empty_cache()  # the second model gets the memory back
    if timing["kernels_ms"] and timing["reference_ms"]:
        timing["speedup"] = timing["reference_ms"] / timing["kernels_ms"]
    return timing


def speedup_line(timing: dict) -> str:
    if "skipped" in timing:
        return f"kernels against reference ops: {timing['skipped']}"
    where = f"{timing['model']} at T = {timing['seq_len']}, batch {timing['batch_size']}"
    if "speedup" not in timing:
        return (f"training step of {where}: kernels {timing['kernels_ms']} ms, reference ops "
                f"{timing['reference_ms']} ms (None: out of memory)")
    return (f"training step of {where}, {timing['steps']} steps each way: Triton kernels {timing['kernels_ms']:.0f} ms, "
            f"PyTorch reference ops {timing['reference_ms']:.0f} ms: the kernels are "
            + (f"{timing['speedup']:.1f}x faster" if timing["speedup"] >= 1 else f"{1 / timing['speedup']:.1f}x slower"))


def long_cpu_cost(args, n_runs: int) -> float:
    """Seconds --long would take on this CPU (one run per core, at LONG_CPU_TOKENS_PER_S each)."""
    train, _ = expected_tokens(args)
    evaluation = (len(long_needles(args)) * len(long_context.DEPTHS) * args.eval_batch
                  * sum(f * args.seq_len for f in long_context.LENGTH_FACTORS))
    per_run = (train + evaluation / 3) / LONG_CPU_TOKENS_PER_S  # a forward is about a third of a step
    return per_run * math.ceil(n_runs / cpu_cores())


def long_device(args, n_runs: int) -> torch.device:
    """The device of --long, checked before any work: a CPU gets --long --quick only, the reference
    ops only (the kernels would run in Triton's interpreter), and a clear word on what --long costs."""
    try:
        device = pick_device(args.device, use_triton=False)
        if device.type == "cuda" and args.use_triton:
            check_triton(device)
    except ValueError as e:
        fail(str(e))
    if device.type == "cpu" and not args.quick:
        fail(f"--long on a CPU: {n_runs} runs of {args.steps} steps at T = {args.seq_len} would take about "
             f"{duration(long_cpu_cost(args, n_runs))} here ({cpu_cores()} cores, PyTorch reference ops); run it "
             f"on a GPU ({LONG_TIME}), or try --long --quick ({LONG_QUICK_TIME})")
    if device.type == "cpu" and args.use_triton:
        fail("--long --quick on a CPU runs the PyTorch reference ops (the kernels would run in Triton's CPU "
             "interpreter, hundreds of times slower): drop --use-triton")
    return device


def long_versions() -> dict:
    """python, torch, triton and CUDA as installed (triton from its metadata: no import)."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
            "cuda": torch.version.cuda}


def long_command() -> str:
    launcher = f"torchrun --nproc_per_node {distributed.world()} " if distributed.launched() else "python "
    return launcher + " ".join([PROG, *sys.argv[1:]])


def print_long_report(models: dict, args, timing: dict, control: str) -> None:
    for n in long_needles(args):
        header, rows = long_context.table_rows(models, n)
        print(f"\n{n} needle{'s' * (n > 1)} queried at the end: recall by context length (all depths pooled) and by "
              f"fact-to-query distance d (all lengths); state per sequence in KB")
        print(long_context.format_table(header, rows))
    print(f"\n{control}\n{speedup_line(timing)}")


def main(args, train_model) -> None:
    """--long: train every preset and the equal-memory GDN at the paper's lengths with train_model (in
    parallel processes, or one after another data-parallel under torchrun), evaluate the needle grid,
    and write long.json and long_heatmap.png into --out (rank 0)."""
    wall_start = time.perf_counter()
    n_runs = len(args.models) + ({"gdn", "gdn+lte"} <= set(args.models))
    device = long_device(args, len(args.seeds) * n_runs)
    if distributed.launched():
        device = distributed.start(device)
        if args.batch_size % distributed.world():
            fail(f"--batch-size {args.batch_size}: torchrun's {distributed.world()} processes share every batch "
                 f"equally; give a multiple of {distributed.world()}")
    if distributed.is_main():   # deletes with --overwrite, makes --out: before the others look at it
        _, _, enc, tokens, val_tokens = prepare_run(args)
    distributed.barrier()
    if not distributed.is_main():
        _, _, enc, tokens, val_tokens = prepare_run(argparse.Namespace(**{**vars(args), "overwrite": False}))
    if len(val_tokens) < 8 * args.seq_len + 1:
        fail(f"--seq-len {args.seq_len}: the evaluation at 8x needs {8 * args.seq_len + 1} validation tokens, "
             f"the split has {len(val_tokens)}")
    control = "no equal-memory control (it needs gdn and gdn+lte in --models)"
    if {"gdn", "gdn+lte"} <= set(args.models):
        heads, dim, gdn_bytes, lte_bytes = equal_memory_gdn(args, enc.n_vocab)
        control = (f"equal-memory control: pure GDN with {heads} heads x key dim {dim} holds {gdn_bytes / 1024:.0f} "
                   f"KB per sequence, gdn+lte {lte_bytes / 1024:.0f} KB (the smallest GDN state at least as large)")
    print(control)
    runs = long_runs(args, enc.n_vocab)
    work = functools.partial(long_run_one, train_model=train_model)   # picklable: a worker process runs it
    if distributed.active():  # one run after the other, each over every process
        results, failures = run_here(runs, args, tokens, val_tokens, enc.n_vocab, device, work)
    else:
        results, failures = run_all(runs, args, tokens, val_tokens, enc.n_vocab, device, work)
    # Timed at the end: the runs have compiled the kernels by now (in parallel, into Triton's cache),
    # and the GPU is idle again.
    timing = {"skipped": "timed on a GPU only (on a CPU the kernels run in Triton's interpreter)"}
    if device.type == "cuda" and distributed.is_main():
        try:
            timing = kernel_speedup(args, tokens, enc.n_vocab, device)
        except Exception as e:  # a timing that fails must not lose the trained runs' report
            timing = {"skipped": f"the timing failed: {error_line(e)}"}
    if distributed.is_main():
        write_long_report(runs, results, failures, args, timing, control, device, wall_start)
    distributed.barrier()
    distributed.finish()
    if failures:
        report_failures(failures)
        raise SystemExit(1)


def write_long_report(runs, results, failures, args, timing: dict, control: str, device, wall_start: float) -> None:
    """The table, the heat map of the first seed, and long.json with every run."""
    first = {run.name: results[run.key] for run in runs if run.seed == args.seeds[0] and run.key in results}
    if first:
        print_long_report(first, args, timing, control)
        title = (f"recall of {args.max_facts} needles by depth and context length, seed {args.seeds[0]} "
                 f"(trained at T = {args.seq_len}, {args.steps} steps)")
        long_context.plot_heatmaps(first, args.max_facts, args.out / "long_heatmap.png", title)
    wall = time.perf_counter() - wall_start
    machine = f"{platform.machine()} {os.cpu_count()} cores, {device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
    summary = {"command": long_command(), "machine": machine, "versions": long_versions(),
               "processes": distributed.world(), "settings": run_settings(args),
               "steps": args.steps, "seeds": args.seeds, "needles": list(long_needles(args)),
               "depths": list(long_context.DEPTHS), "length_factors": list(long_context.LENGTH_FACTORS),
               "equal_memory_control": control, "kernel_speedup": timing,
               "state_bytes_per_sequence": {run.name: results[run.key]["state_bytes"] for run in runs
                                            if run.seed == args.seeds[0] and run.key in results},
               "runs": {str(run): results[run.key] for run in runs if run.key in results},
               "failed_runs": failures, "wall_seconds": wall}
    write_json_atomic(summary, args.out / "long.json")
    print(f"\nwrote {args.out / 'long.json'} and {args.out / 'long_heatmap.png'}; wall time {wall:.0f}s")
