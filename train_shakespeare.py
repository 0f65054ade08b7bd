"""Shakespeare with recall facts: train the hybrid models on it and report the forgetting gap.

Reads like nanoGPT's train.py, top to bottom:
  1. data       - each step's batch: MQAR-style facts [key, value] hidden in Shakespeare passages and
                  queried later by repeating the key (recall_task.py), on our own BPE of the plays
                  (corpus.py), with a curriculum (text-free recall drills first, then drills, dense
                  passages and haystacks); every model sees the same batches in the same order;
  2. model      - every preset of tiny_hybrid.py at the same width and depth (cli.model_config),
                  AdamW with warm-up and cosine decay;
  3. training   - the loop: loss, LTE's L1 penalty, progress lines, a held-out probe, atomic
                  checkpoints, exact Ctrl-C / --resume;
  4. evaluation - held-out recall by distance, number of facts and length (1x, 2x, 4x), the state
                  size; answers pure GDN got wrong, and a sample of prose from the decoding state;
  5. main       - every model once per seed (runs.py: one after the other, or in parallel
                  processes with one progress view), the report (report.py: mean (min-max) over seeds,
                  each seed's verdict, out/results.json, out/forgetting_gap.png,
                  out/training_curves.png), and the other modes: --eviction-report
                  (eviction_report.py), --frontier (frontier.py), --long (long_run.py).
The flags and every check made before any work are cli.py's.

    python train_shakespeare.py                   # train and compare the presets
    python train_shakespeare.py --quick           # a smoke run, about 40 s on 2 CPU cores (learns nothing)
    python train_shakespeare.py --resume          # continue the run in out/ (after Ctrl-C, or more --steps)
    python train_shakespeare.py --seeds 0,1,2     # every preset once per seed: mean (min-max) over seeds
    python train_shakespeare.py --overwrite       # start again in out/, deleting its earlier results
    python train_shakespeare.py --eviction-report # LTE against StreamingLLM, TOVA and H2O, for the run in out/
    python train_shakespeare.py --make-tokenizer  # regenerate the committed tokenizer file
    python train_shakespeare.py --use-triton --long  # T = 2048, needles at 1x-8x T, on a GPU: see --long
    torchrun --nproc_per_node 2 train_shakespeare.py --long --quick  # the same, data parallel, small, on a CPU

A run into an --out that holds earlier results stops unless given --resume or --overwrite.
--use-triton without a GPU runs the kernels in Triton's CPU interpreter, hundreds of times slower
than the PyTorch reference ops (the same maths); the run says how long it will take before it starts.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import distributed  # data parallel under torchrun (--long); identity functions outside a torchrun job
import eviction_report
import frontier
import long_context
import long_run
from cli import (checkpoint_path, check_checkpoint, load_trained, model_config, parse_args, prepare_run,
                 run_settings, save_atomic, write_json_atomic)
from corpus import KEY_ID0, N_BPE, TOKENIZER_PATH, VALUE_ID0, VOCAB_SIZE, make_tokenizer
from recall_task import (BLOCK_LEN, IGNORE_INDEX, PROBE_BATCHES, TRAINING_KEYS, collate, distance_bins,
                         eval_batch, key_value_ids, make_batch, make_drill_batch, make_drill_sequence,
                         make_sequence, probe_batch, recall_sums, task_for_step)
from report import (CONVERGENCE_RULE, by_model, convergence, every_run, hardest_setting,
                    more_seeds_hint, plot_report, plot_state_sweep, print_report, run_result, sweep_rows)
from runs import Interrupted, Run, StopOnInterrupt, planned_runs, report_failures, run_all
from tiny_hybrid import TinyHybrid


# ----------------------------------------------------------------------------------------------
# 1. Data: each step's batch
# ----------------------------------------------------------------------------------------------
#
# Every model sees the same batches in the same order: batch s is drawn from a generator seeded
# with (seed, s), so it does not depend on what came before (which also makes --resume exact).
# The curriculum (recall_task.task_for_step): the first --drill-frac of the steps are text-free
# drills; after that a quarter of the batches stay drills and the rest alternate between short
# fact-dense passages and full-length haystacks.

def training_batch(tokens: np.ndarray, step: int, args, schedule_steps: int | None = None) -> dict[str, torch.Tensor]:
    """The batch of training step `step`, of the kind the curriculum gives it (make_batch's tensors)."""
    if getattr(args, "long", False):
        return long_training_batch(tokens, step, args, schedule_steps)
    rng = np.random.default_rng((args.seed, step))
    kind = task_for_step(step, args, schedule_steps)
    if kind == "drill":  # 1 to drill_facts facts: easy drills start recall early, full ones fill the state
        return make_drill_batch(args.batch_size, int(rng.integers(1, args.drill_facts + 1)), rng, args.n_keys)
    if kind == "dense":
        T, n_facts = args.dense_len, (args.dense_facts, args.dense_facts)
    else:
        T, n_facts = args.seq_len, (1, args.max_facts)
    return make_batch(tokens, args.batch_size, T, n_facts, (BLOCK_LEN - 1, T - BLOCK_LEN), rng, args.n_keys)


def long_training_batch(tokens: np.ndarray, step: int, args, schedule_steps: int | None = None) -> dict[str, torch.Tensor]:
    """--long: the same curriculum, with haystacks of 1 to --max-facts needles queried at the end
    (long_context.py). Each row comes from a generator of its own, seeded (seed, step, row), so a
    process of a torchrun job draws only its rows and the global batch is the same for any number
    of processes; a drill's size is drawn once per step (a batch's rows have one length)."""
    kind = task_for_step(step, args, schedule_steps)
    drill_facts = int(np.random.default_rng((args.seed, step)).integers(1, args.drill_facts + 1))
    keys, values = key_value_ids(args)
    rows = []
    for row in distributed.my_rows(args.batch_size):
        rng = np.random.default_rng((args.seed, step, row))
        if kind == "drill":
            rows.append(make_drill_sequence(drill_facts, rng, args.n_keys))
        elif kind == "dense":  # facts and queries anywhere in a short passage, as in the default recipe
            rows.append(make_sequence(tokens, args.dense_len, args.dense_facts, (BLOCK_LEN - 1, args.dense_len - BLOCK_LEN),
                                      rng, args.n_keys))
        else:
            rows.append(long_context.training_haystack(tokens, args.seq_len, args.max_facts, rng, keys, values))
    return collate(rows)


# ----------------------------------------------------------------------------------------------
# 2. Model and optimizer (the model: cli.model_config, the same width and depth for every preset)
# ----------------------------------------------------------------------------------------------

FINAL_LR = 0.1  # the cosine decays to this fraction of --lr


def learning_rate(step: int, args, schedule_steps: int | None = None) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 %, which then stays (the steps
    of a run extended past schedule_steps, default args.steps: see --resume)."""
    steps = schedule_steps or args.steps
    warmup = max(1, steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return float(args.lr * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + np.cos(np.pi * progress))))  # a float: checkpoints load with weights_only


# ----------------------------------------------------------------------------------------------
# 3. Training
# ----------------------------------------------------------------------------------------------

def rng_states(device: torch.device) -> dict:
    """The random generators a training step draws from (dropout: the CPU's, or the GPU's on CUDA),
    for a checkpoint, so that a resumed run draws what an uninterrupted one would have."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(ckpt: dict, device: torch.device) -> None:
    """Restore `rng_states` from a checkpoint loaded on the CPU (torch.set_rng_state takes CPU
    tensors only). A checkpoint written on another kind of device restores what it has."""
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def train_model(preset: str, args, tokens: np.ndarray, vocab_size: int, device: torch.device, tag: str = "",
                probe: dict | None = None, log=None, stop=None, **overrides):
    """Train one preset with seed args.seed (or continue it with --resume). Returns (model, record):
    record = {"history": progress rows, "probe": [{"step", "recall"}] held-out recall every --eval-every
    steps, "schedule_steps", "train_seconds"} (both lists and the time run on across --resume).

    probe: a fixed held-out batch (`probe_batch`), or None for no probe curve. log: called with each
    progress row (default: print it as one line). stop: an object whose `requested` asks training to
    save and stop after the current step (default: Ctrl-C, see StopOnInterrupt); stopping raises
    Interrupted. overrides: Config fields that differ from `model_config`; tag: appended to the name."""
    torch.manual_seed(args.seed)
    model = TinyHybrid(model_config(preset, args, vocab_size, **overrides)).to(device)
    # weight decay on matrices only; the LTE routers at --lte-router-lr times the rate, undecayed
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.lr, weight_decay=0.1), betas=(0.9, 0.95))
    name = f"{preset + tag} seed {args.seed}"
    path = checkpoint_path(args.out, preset + tag, args.seed)
    start, history, probe_curve, schedule_steps, seconds_before = 0, [], [], args.steps, 0.0
    if args.resume and path.exists():
        # on the CPU first: the RNG states must stay CPU tensors; the weights and the optimizer's
        # moments are copied onto the model's device by load_state_dict
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_checkpoint(ckpt, args, path, args.seed)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # a data-parallel job saved every process's generators; each takes back its own
        set_rng_states(ckpt["rank_rngs"][distributed.rank()] if len(ckpt.get("rank_rngs", [])) == distributed.world()
                       else ckpt, device)
        start, history, schedule_steps = ckpt["step"], ckpt["history"], ckpt["schedule_steps"]
        probe_curve, seconds_before = ckpt.get("probe", []), ckpt.get("train_seconds", 0.0)
        extended = (f"; its {schedule_steps}-step schedule is extended to {args.steps} steps at the final "
                    f"learning rate" if args.steps > schedule_steps else "")
        print(f"{name}: resumed at step {start} from {path}{extended}", flush=True)
    elif args.resume:
        print(f"{name}: no checkpoint in {args.out}, training from step 0", flush=True)
    if probe is not None:
        probe = {k: v.to(device) for k, v in probe.items()}
    log = log or (lambda row: print(format_progress(row), flush=True))

    t0 = time.perf_counter()

    def save(step):
        if distributed.active():  # every process's generators (a collective: all call save together)
            rank_rngs = {"rank_rngs": distributed.gather(rng_states(device))}
            if not distributed.is_main():
                return
        else:
            rank_rngs = {}
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **rng_states(device),
                     "step": step, "history": history, "probe": probe_curve, "preset": preset,
                     "schedule_steps": schedule_steps, "train_seconds": seconds_before + time.perf_counter() - t0,
                     "settings": {**run_settings(args), "seed": args.seed}, **rank_rngs}, path)

    if distributed.active() and start == 0:
        distributed.seed_dropout(args.seed)
    net = distributed.wrap(model, device)  # what a step calls: DDP in a torchrun job, else the model
    model.train()
    tokens_seen, recent = 0, collections.deque(maxlen=max(1, args.log_every))
    with (stop or StopOnInterrupt()) as stop:
        for step in range(start, args.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args, schedule_steps) * group["lr_scale"]
            # non_blocking: a plain copy to a GPU waits for every queued kernel first (this one stages
            # the few KB and returns); nothing on the CPU
            batch = {k: v.to(device, non_blocking=True)
                     for k, v in training_batch(tokens, step, args, schedule_steps).items() if k in TRAINING_KEYS}
            logits, penalty = net(batch["idx"])             # penalty: LTE's L1 penalty [L4], 0 without LTE
            # the mean over the global batch's targets, whichever process holds them (distributed.py)
            mean, shown = distributed.global_mean(*recall_sums(logits, batch, args.answer_weight))
            loss = mean + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            # The controller compares kept tokens per sequence with b, which means something only at
            # the training length: short drills and passages would walk lambda to its floor.
            model.update_lte_lambdas(count_step=task_for_step(step, args, schedule_steps) == "haystack")
            # kept on the device, read once per progress row: no host sync per step on a GPU
            if distributed.active():  # the global batch's loss and answers, not this shard's
                recent.append((shown + distributed.mean_over_ranks(penalty),
                               distributed.total(answer_hits(logits, batch), device),
                               distributed.total(batch["answer_pos"].numel(), device)))
            else:
                recent.append((loss.detach(), answer_hits(logits, batch), batch["answer_pos"].numel()))
            tokens_seen += batch["idx"].numel() * distributed.world()
            last = step + 1 == args.steps
            if probe is not None and ((step + 1) % args.eval_every == 0 or last):
                probe_curve.append({"step": step + 1, "recall": probe_recall(model, probe)})
            if (step + 1) % args.log_every == 0 or last:
                row = progress_row(step, recent, tokens_seen, t0)
                history.append(row)
                log({**row, "model": preset + tag, "seed": args.seed, "steps": args.steps,
                     "probe": probe_curve[-1]["recall"] if probe_curve else None,
                     "eta": (args.steps - step - 1) * (time.perf_counter() - t0) / (step + 1 - start),
                     "lte": lte_note(model)})
            if distributed.any_rank(stop.requested, device):
                save(step + 1)
                print(f"\ninterrupted: {name} saved after step {step + 1} in {path}; continue with --resume",
                      flush=True)
                raise Interrupted(step + 1)
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                save(step + 1)
    save(args.steps)
    return model, {"history": history, "probe": probe_curve, "schedule_steps": schedule_steps,
                   "train_seconds": seconds_before + time.perf_counter() - t0}


def answer_hits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Recall answers predicted right, a 0-d tensor on the logits' device. The answers are picked by
    their (row, column), in answer_mask order: a boolean mask would wait for the GPU to count them."""
    rows, columns = batch["answer_batch"], batch["answer_pos"]
    return (logits.detach()[rows, columns].argmax(-1) == batch["targets"][rows, columns]).sum()


def progress_row(step: int, recent, tokens_seen: int, t0: float) -> dict:
    """The training curve's point after `step`: mean loss and recall on the recent training batches,
    `recent` holding (loss, hits) as device tensors and the number of answers, per step."""
    elapsed = time.perf_counter() - t0
    losses = torch.stack([r[0] for r in recent]).tolist()       # one host sync for the whole row
    hits = int(torch.stack([r[1] for r in recent]).sum())
    answers = int(sum(r[2] for r in recent))  # ints, or device tensors in a data-parallel job
    return {"step": step + 1, "loss": float(np.mean(losses)), "recall": hits / max(1, answers),
            "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}


def lte_note(model) -> str:
    """Per LTE layer and head: tokens per sequence leaving the window with r > 0 (kept unless the
    cap b evicts them) and the penalty weight lambda; "" for a model without LTE."""
    notes = []
    for stats in model.lte_stats():
        kept = " ".join(f"{k:.0f}" for k in stats["kept"])
        lam = " ".join(f"{x:.1e}" for x in stats["lambda"])
        notes.append(f" | layer{stats['layer']} r>0/head {kept} lambda {lam}")
    return "".join(notes)


def format_progress(row: dict) -> str:
    """One progress line: run, step, training loss and recall, held-out probe recall, speed, ETA."""
    probe = "   -  " if row["probe"] is None else f"{row['probe']:6.1%}"
    return (f"{row['model']:9s} seed {row['seed']:<2d} step {row['step']:5d}/{row['steps']} loss {row['loss']:6.3f} "
            f"recall {row['recall']:6.1%} held-out {probe} {row['tokens_per_s']:7.0f} tok/s "
            f"ETA {row['eta']:4.0f}s{row['lte']}")


@torch.no_grad()
def probe_recall(model, batch: dict) -> float:
    """Recall on the probe batch, in eval mode (no dropout, LTE's cap as in decoding)."""
    model.eval()
    logits, _ = model(batch["idx"])
    mask = batch["answer_mask"]
    model.train()
    return (logits[mask].argmax(-1) == batch["targets"][mask]).float().mean().item()


# ----------------------------------------------------------------------------------------------
# 4. Evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, val_tokens: np.ndarray, args, device) -> dict:
    """Validation LM loss and recall accuracy by length, number of facts and distance bin; state size.

    Returns {str(length): {"lm_loss", "state_bytes", "recall": {str(n_facts): {"lo-hi": acc}}}}."""
    model.eval()
    results = {}
    for length in (args.seq_len, 2 * args.seq_len, 4 * args.seq_len):
        lm_losses, recall = [], {}
        for n_facts in args.eval_facts:
            cells = {}
            for lo, hi in distance_bins(args.window, length - BLOCK_LEN):
                batch = eval_batch(val_tokens, args, length, n_facts, (lo, hi))
                if batch is None:
                    continue
                batch = {k: v.to(device) for k, v in batch.items()}
                logits, _ = model(batch["idx"])
                mask = batch["answer_mask"]
                cells[f"{lo}-{hi}"] = (logits[mask].argmax(-1) == batch["targets"][mask]).float().mean().item()
                text = (batch["targets"] != IGNORE_INDEX) & ~mask
                lm_losses.append(torch.nn.functional.cross_entropy(logits[text].float(), batch["targets"][text]).item())
            recall[str(n_facts)] = cells
        results[str(length)] = {"lm_loss": float(np.mean(lm_losses)), "recall": recall,
                                "state_bytes": model.state_bytes(length)}   # every tensor of the decoding state
    model.train()
    return results


def run_one(run: Run, args, tokens, val_tokens, vocab_size, device, log=None, stop=None) -> dict:
    """Train one run (or continue it) to --steps, then, with --until-plateau, in extensions until the
    rule says it has converged; evaluate it, and keep its results in its checkpoint too, so that
    --resume reads a finished run back instead of evaluating it again. Returns its results."""
    args = argparse.Namespace(**{**vars(args), "seed": run.seed, **({} if run.lr is None else {"lr": run.lr})})
    path = checkpoint_path(args.out, run.name, run.seed)
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if args.resume and path.exists() else {}
    step, probe = ckpt.get("step", 0), ckpt.get("probe", [])
    target = next(t for t in plateau_targets(args) if t >= step)  # where a run stopped part-way goes first
    if "result" in ckpt and step == target and next_target(probe, step, args) is None:
        print(f"{run}: finished earlier; its results are read back from {path}", flush=True)
        return ckpt["result"]
    batch = probe_batch(val_tokens, args)
    while True:
        if target > step and step >= args.steps:  # past --steps: an extension of --until-plateau
            print(f"{run}: {convergence(probe, step)['verdict']} at step {step}; extended to {target} steps at "
                  f"the final learning rate (--until-plateau {args.until_plateau})", flush=True)
        args = argparse.Namespace(**{**vars(args), "steps": target, "resume": args.resume or step > 0})
        model, record = train_model(run.preset, args, tokens, vocab_size, device, tag=run.suffix, probe=batch,
                                    log=log, stop=stop, **dict(run.overrides))
        step, probe = target, record["probe"]
        target = next_target(probe, step, args)
        if target is None:
            break
    result = run_result(record, evaluate(model, val_tokens, args, device), args)
    save_atomic({**torch.load(path, map_location="cpu", weights_only=True), "result": result}, path)
    return result


def plateau_targets(args) -> list[int]:
    """The step counts a run is judged at: --steps, then with --until-plateau every --steps / 2 more
    up to its cap."""
    targets, extension = [args.steps], max(1, args.steps // 2)
    while targets[-1] < args.until_plateau:
        targets.append(min(args.until_plateau, targets[-1] + extension))
    return targets


def next_target(probe: list[dict], step: int, args) -> int | None:
    """The step count to train on to after `step`, or None: the run is done (it converged, or it
    reached --steps without --until-plateau, or the cap with it)."""
    later = [t for t in plateau_targets(args) if t > step]
    if not later or convergence(probe, step)["converged"] is not False:
        return None
    return later[0]


@torch.no_grad()
def show_failed_recalls(models: dict, enc, val_tokens, args, device, count: int = 4) -> list[str]:
    """Answers pure GDN gets wrong at the hardest setting, next to what the hybrids answered."""
    if "gdn" not in models:
        return []
    n, length = max(args.eval_facts), args.seq_len
    # The longest distance bin that n facts can fill (with many facts the longest ones cannot).
    bins = reversed(distance_bins(args.window, length - BLOCK_LEN))
    batch = next((b for b in (eval_batch(val_tokens, args, length, n, d) for d in bins) if b is not None), None)
    if batch is None:
        return []
    mask = batch["answer_mask"]
    answers = {}
    for preset, model in models.items():
        model.eval()
        logits, _ = model(batch["idx"].to(device))
        answers[preset] = logits[mask.to(device)].argmax(-1).cpu()
        model.train()
    truth = batch["targets"][mask]
    name = lambda t: enc.decode([int(t)]) if t < N_BPE else (
        f"<key_{t - KEY_ID0:02d}>" if t < VALUE_ID0 else f"<value_{t - VALUE_ID0:02d}>")
    lines = []
    for i in (answers["gdn"] != truth).nonzero().flatten()[:count].tolist():
        b, pos = batch["answer_batch"][i].item(), batch["answer_pos"][i].item()
        context = "".join(name(t) for t in batch["idx"][b, max(0, pos - 12): pos + 1].tolist())
        others = ", ".join(f"{p}: {name(a[i])} {'ok' if a[i] == truth[i] else 'wrong'}"
                           for p, a in answers.items() if p != "gdn")
        lines.append(f"...{context!r} -> expected {name(truth[i])} (fact {batch['answer_distance'][i].item()} "
                     f"tokens back); gdn: {name(answers['gdn'][i])}" + (f"; {others}" if others else ""))
    return lines


# Token ids never sampled as prose: the recall task's keys and values (an undertrained model puts
# most of its probability on them, and they decode to nothing), and the single bytes of control
# characters other than tab and newline (a bell or an escape code would act on the terminal).
NOT_PROSE = [b for b in range(32) if chr(b) not in "\t\n"] + [127] + list(range(N_BPE, VOCAB_SIZE))


@torch.no_grad()
def sample_prose(model, prompt: torch.Tensor, new_tokens: int, generator: torch.Generator,
                 temperature: float = 0.8, top_k: int = 40) -> list[int]:
    """Prefill prompt [1, T] into the model's decoding state, then sample new_tokens token ids one at
    a time from that state, never one of NOT_PROSE."""
    was_training = model.training
    model.eval()
    try:
        state = model.init_state(1)
        logits, _ = model(prompt, state=state)                                   # [1, T, vocab]
        ids = []
        for _ in range(new_tokens):
            scores = logits[0, -1].float() / temperature                          # [vocab]
            scores[NOT_PROSE] = float("-inf")
            kth = scores.topk(top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator)  # [1]
            ids.append(int(token))
            logits, _ = model(token[None], state=state)                          # [1, 1] -> [1, 1, vocab]
    finally:
        model.train(was_training)
    return ids


def sample_text(model, enc, val_tokens, args, device, new_tokens: int = 72) -> dict[str, str]:
    """{"prompt": 32 tokens of a held-out play, "continuation": new_tokens the model writes after it}."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = max(0, min(1000, len(val_tokens) - 32))
    prompt = torch.as_tensor(val_tokens[start:start + 32], device=device)[None]  # [1, 32]
    ids = sample_prose(model, prompt, new_tokens, generator)
    return {"prompt": enc.decode(prompt[0].tolist()), "continuation": enc.decode(ids)}


def trained_models(results: dict, args, vocab_size: int, device) -> dict:
    """The first seed's models that this command trained, read back from their checkpoints: for the
    examples of failed recalls and the sample."""
    presets = [preset for preset in args.models if (preset, args.seeds[0]) in results]
    return load_trained(args, args.seeds[0], vocab_size, device, presets)


def show_examples(models: dict, enc, val_tokens, args, device) -> tuple[list[str], dict | None]:
    """Print and return answers pure GDN got wrong and a sample of prose (from gdn+lte if trained)."""
    failed = show_failed_recalls(models, enc, val_tokens, args, device)
    if failed:
        print(f"\nsome answers pure GDN got wrong (hardest setting, seed {args.seed}):")
        print("\n".join(failed))
    if not models:
        return failed, None
    sampler = "gdn+lte" if "gdn+lte" in models else next(iter(models))
    sample = {"model": sampler, "seed": args.seed, **sample_text(models[sampler], enc, val_tokens, args, device)}
    print(f"\n{sampler} (seed {args.seed}), sampled token by token through its decoding state (temperature 0.8, "
          f"top-k 40; the recall task's key and value tokens and control bytes masked out)\n--- prompt (from the "
          f"held-out text) ---\n{sample['prompt']}\n--- continuation (written by {sampler}) ---\n"
          f"{sample['continuation']}\n---")
    return failed, sample


# ----------------------------------------------------------------------------------------------
# 5. main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    if args.make_tokenizer:
        start = time.perf_counter()
        make_tokenizer()
        print(f"wrote {TOKENIZER_PATH} ({N_BPE} tokens) in {time.perf_counter() - start:.1f} s")
        return
    # the other modes get what trains a run from here: they never import this file
    if args.eviction_report:
        return eviction_report.main(args, run_one)
    if args.long:
        return long_run.main(args, train_model)
    if args.frontier:
        return frontier.main(args, run_one)
    wall_start = time.perf_counter()
    device, earlier, enc, tokens, val_tokens = prepare_run(args)
    results, failures = run_all(planned_runs(args), args, tokens, val_tokens, enc.n_vocab, device, run_one)
    models = by_model(results, earlier, args, failures)
    kept = [f"{preset} seed {seed}" for preset, model in models.items() for seed in model["runs"]
            if (preset, int(seed)) not in results]
    if kept:
        print(f"\nfrom the earlier run in {args.out}, not retrained now: {', '.join(kept)}")
    failed, sample = [], None
    if models:
        print_report(models, args, failures)
        plot_report(models, args)
        trained = trained_models(results, args, enc.n_vocab, device)
        failed, sample = show_examples(trained, enc, val_tokens, args, device)
    sweep = sweep_rows(results, args) if args.sweep_state else earlier.get("state_sweep", [])
    if args.sweep_state and sweep:
        plot_state_sweep(sweep, args)
    seeds = sorted(set(args.seeds) | set(earlier.get("seeds", [])))
    wall = time.perf_counter() - wall_start
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "settings": run_settings(args), "seeds": seeds,
               "machine": f"{platform.machine()} {os.cpu_count()} cores, {device}",
               "versions": frontier.versions(), "wall_seconds": wall,
               "convergence_rule": CONVERGENCE_RULE,
               "probe": {"sequences": PROBE_BATCHES * args.eval_batch, "every_steps": args.eval_every,
                         "setting": hardest_setting(args, next(iter(every_run(models).values()))["eval"])
                         if models else None},
               "models": models, "failed_runs": failures,
               "failed_recalls": failed if ("gdn", args.seed) in results else earlier.get("failed_recalls", []),
               "sample": sample or earlier.get("sample"),
               "state_sweep": sweep}
    write_json_atomic(summary, args.out / "results.json")
    print(f"\nwrote {args.out / 'results.json'}; wall time {wall:.0f}s")
    if len(seeds) == 1 and results:
        print(more_seeds_hint(seeds, wall))
    if failures:
        report_failures(failures)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
