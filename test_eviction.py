"""Heuristic eviction at LTE's memory: StreamingLLM, TOVA and H2O as policies of one decoding cache.

Each policy is checked against a plain Python simulation of its rule (lists and dicts, the
attention recomputed per query from the layer's own q, k, v): the same positions held after every
step and the same outputs. Also: the state has one size for any length; with a buffer large enough
that nothing is evicted every policy is full attention; StreamingLLM without a buffer is sliding-
window attention with sinks; bad arguments are refused before any work.

Tolerances as in test_decode.py: float32, the two sides differ by summation order only. Against
the plain simulation the layer's weights are drawn large (sharp attention, real choices to make), so
its outputs reach |y| ~ 40 and that test scales its tolerance with them (see `_float32_close`); its
inputs have no near ties between scores, so no eviction decision can flip on rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_hybrid as th
from eviction import EvictingAttention, attention_decode_weights, evict_lowest_push, with_eviction
from tiny_hybrid import Config, TinyHybrid

TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(d_model=32, n_head=4, n_kv_head=2, head_dim=8, vocab_size=64, n_layer=2)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(policy, sink, window, buffer, seed=0):
    torch.manual_seed(seed)
    layer = EvictingAttention(Config(**SMALL), policy, sink, window, buffer)
    for p in layer.parameters():               # larger weights: sharper attention, real choices to make
        p.data.normal_(0, 0.5)
    return layer.eval()


# --- the buffer rule on its own --------------------------------------------------------------

def test_push_rule_matches_a_python_simulation_with_ties():
    """evict_lowest_push on random integer scores (many ties): the buffer holds what a list-based
    rule holds after every offer: enter if a slot is free or score >= the lowest; the oldest lowest leaves."""
    g = torch.Generator().manual_seed(1)
    b, n, rows = 4, 60, 3
    scores = torch.randint(0, 5, (rows, n), generator=g).float()
    offered = torch.rand(rows, n, generator=g) < 0.8
    buf_score = torch.full((rows, b), float("-inf"))
    buf_pos = torch.full((rows, b), -1, dtype=torch.long)
    sim = [dict() for _ in range(rows)]                                       # pos -> score
    for j in range(n):
        evict_lowest_push(buf_score, buf_pos, scores[:, j], j, offered[:, j])
        for r in range(rows):
            if not offered[r, j]:
                continue
            held = sim[r]
            if len(held) < b:
                held[j] = scores[r, j].item()
                continue
            lowest = min(held, key=lambda p: (held[p], p))                    # oldest among the lowest
            if scores[r, j].item() >= held[lowest]:
                del held[lowest]
                held[j] = scores[r, j].item()
        for r in range(rows):
            assert sorted(p for p in buf_pos[r].tolist() if p >= 0) == sorted(sim[r])


# --- the whole layer against a plain simulation ----------------------------------------------

def _simulate(q, k, v, policy, sink, window, buffer):
    """The policy in plain Python for one sequence: q [T, H, D], k, v [T, Hkv, D]. Returns the
    outputs [T, H, D] and, per step, the set of positions held per KV head."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = torch.zeros(T, H, D)
    held_per_step = []
    buffers = [dict() for _ in range(Hkv)]                                    # pos -> score, per KV head
    scores = [dict() for _ in range(Hkv)]                                     # window tokens' scores
    margins = []                           # per decision on a full buffer: how far from a tie, relative
    for t in range(T):
        held_now = []
        for h in range(Hkv):
            j = t - window - 1
            if j >= sink and policy != "streaming" and buffer > 0:         # j leaves the window
                buf, s_j = buffers[h], scores[h].pop(j)
                if len(buf) < buffer:
                    buf[j] = s_j
                else:
                    low, *rest = sorted(buf.values())                        # enter? which one leaves?
                    margins += [abs(s_j - low) / max(s_j, low, 1e-30)] + [(r - low) / r for r in rest[:1]]
                    lowest = min(buf, key=lambda p: (buf[p], p))
                    if s_j >= buf[lowest]:
                        del buf[lowest]
                        buf[j] = s_j
            window_pos = list(range(max(0, t - window), t + 1))
            visible = sorted(set(range(min(sink, t + 1))) | set(window_pos) | set(buffers[h]))
            held_now.append(set(visible))
            logits = torch.stack([q[t, h * G + g] @ k[visible, h].T for g in range(G)]) * D ** -0.5   # [G, n]
            p = logits.softmax(dim=-1)
            out[t, h * G:(h + 1) * G] = p @ v[visible, h]
            p_mean = p.mean(dim=0)
            for n, pos in enumerate(visible):
                in_window = pos >= t - window
                table = scores[h] if in_window else buffers[h] if pos in buffers[h] else None
                if table is None:                                             # a sink outside the window
                    continue
                new = p_mean[n].item()
                table[pos] = new if policy == "tova" else table.get(pos, 0.0) + new
        held_per_step.append(held_now)
    return out, held_per_step, margins


def _float32_close(got, want, terms):
    """got == want up to float32 rounding, for results that are sums of n = terms products (and of
    inputs with a few roundings each): |error| <= n * eps * max |want|, the classic bound for a
    float32 sum of n terms, taken at the largest value (an element that is small because its
    terms cancel carries the rounding of those terms, not of itself). A wrong key or a wrong
    policy decision moves outputs by a good fraction of max |want|, far beyond it."""
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, want, rtol=0, atol=terms * eps * want.abs().max().item())


@pytest.mark.parametrize("policy,buffer", [("streaming", 0), ("tova", 4), ("h2o", 4), ("tova", 1), ("h2o", 0)])
def test_policy_matches_a_plain_simulation_of_its_rule(policy, buffer):
    """The positions held after every step, exactly, then the outputs up to float32 rounding.

    Scores are attention weights (or their sums) that both sides compute in float32 in another
    order: relative differences of ~D * eps * max|logit| ~ 4e-5 here (logits reach ~40).
    The inputs are chosen without near ties: every decision on a full buffer (does the newcomer
    enter, which token leaves) is won by a relative margin of 1e-3 or more, so rounding cannot flip
    one on any machine or torch version. Outputs: sums of C = d_model products in the output
    projection, after attention over at most s + w + 1 + b keys; see `_float32_close`."""
    sink, window, T, B = 2, 5, 40, 2
    layer = _layer(policy, sink, window, buffer)
    x = torch.randn(B, T, SMALL["d_model"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, v, _ = layer._qkv(x)                                            # RoPE at positions 0 .. T - 1
        state = layer.init_state(B)
        outs, held = [], []
        for t in range(T):
            outs.append(layer(x[:, t:t + 1], state))
            held.append(layer.held_positions(state))                          # [B, Hkv, t + 1]
        got = torch.cat(outs, dim=1)
        for b in range(B):
            want, want_held, margins = _simulate(q[b], k[b], v[b], policy, sink, window, buffer)
            assert min(margins, default=1.0) > 1e-3, "a near tie: rounding could flip it; choose other inputs"
            for t in range(T):
                for h in range(layer.n_kv_head):
                    assert set(held[t][b, h].nonzero()[:, 0].tolist()) == want_held[t][h], (b, t, h)
            _float32_close(got[b], layer.o_proj(want.flatten(1)), terms=SMALL["d_model"])
    if buffer:                                      # the test exercised eviction: the buffer is full
        assert (state["buf_pos"] >= 0).all()


def test_the_scored_policies_keep_different_tokens():
    """TOVA and H2O are not the same rule in disguise: on the same input their buffers differ."""
    x = torch.randn(1, 60, SMALL["d_model"], generator=torch.Generator().manual_seed(3))
    kept = {}
    for policy in ("tova", "h2o"):
        layer = _layer(policy, 2, 5, 4)
        state = layer.init_state(1)
        with torch.no_grad():
            layer(x, state)
        kept[policy] = state["buf_pos"].sort(dim=-1).values
    assert not torch.equal(kept["tova"], kept["h2o"])


# --- memory, equivalences, errors ------------------------------------------------------------

@pytest.mark.parametrize("policy,buffer", [("streaming", 0), ("tova", 3), ("h2o", 3)])
def test_memory_is_constant(policy, buffer):
    layer = _layer(policy, 2, 4, buffer)
    state = layer.init_state(1)
    shapes0 = {n: tuple(t.shape) for n, t in state.items() if isinstance(t, torch.Tensor)}
    x = torch.randn(1, 100, SMALL["d_model"])
    with torch.no_grad():
        layer(x[:, :10], state)
        shapes10 = {n: tuple(t.shape) for n, t in state.items() if isinstance(t, torch.Tensor)}
        layer(x[:, 10:], state)
    shapes100 = {n: tuple(t.shape) for n, t in state.items() if isinstance(t, torch.Tensor)}
    assert shapes0 == shapes10 == shapes100
    budget = 2 + 4 + 1 + buffer
    assert layer.state_size(budget) == layer.state_size(100) == layer.state_size(10 ** 6)
    assert layer.state_size(budget - 1) < layer.state_size(budget)


@pytest.mark.parametrize("policy,buffer,scored", [("streaming", 0, False), ("tova", 3, True), ("h2o", 0, True)])
def test_a_state_holds_scores_only_where_its_policy_reads_them(policy, buffer, scored):
    """The frontier counts every tensor of a decoding state: StreamingLLM reads no score, so it
    keeps none; TOVA and H2O one per window and buffer slot and KV head. state_size counts
    the same float numbers as the state's keys, values and scores hold (plus the key conv's tail)."""
    layer = _layer(policy, 2, 4, buffer)
    state = layer.init_state(1)
    held = state["score"].numel() + state["buf_score"].numel()
    assert held == (SMALL["n_kv_head"] * (4 + 1 + buffer) if scored else 0)
    floats = sum(t.numel() for name, t in state.items()
                 if isinstance(t, torch.Tensor) and t.is_floating_point() and "conv" not in name)
    assert layer.state_size(10 ** 6) == floats + layer._key_conv_size()


@pytest.mark.parametrize("policy", ["streaming", "tova", "h2o"])
def test_nothing_evicted_is_full_attention(policy):
    """sink + window + 1 + buffer >= T: every policy is gdn+attn's own decoding, prompt and steps."""
    torch.manual_seed(4)
    model = TinyHybrid(Config.preset("gdn+attn", **SMALL)).eval()
    idx = torch.randint(0, SMALL["vocab_size"], (2, 30))
    sink, window, buffer = (2, 27, 0) if policy == "streaming" else (2, 5, 22)
    evicting = with_eviction(model, policy, sink, window, buffer)
    assert [type(b.mixer).__name__ for b in evicting.blocks] == ["GatedDeltaNet", "EvictingAttention"]
    with torch.no_grad():
        want, _ = model(idx)
        got, _ = evicting(idx)
        torch.testing.assert_close(got, want, **TOL)
        state, want_state = evicting.init_state(2), model.init_state(2)
        got = torch.cat([evicting(idx[:, :12], state=state)[0], evicting(idx[:, 12:], state=state)[0]], dim=1)
        want = torch.cat([model(idx[:, :12], state=want_state)[0], model(idx[:, 12:], state=want_state)[0]], dim=1)
    torch.testing.assert_close(got, want, **TOL)
    assert model.blocks[1].mixer.qkv_proj.weight is not evicting.blocks[1].mixer.qkv_proj.weight   # a copy
    torch.testing.assert_close(model.blocks[1].mixer.qkv_proj.weight, evicting.blocks[1].mixer.qkv_proj.weight)


def test_streaming_without_buffer_is_sliding_window_with_sinks():
    sink, window, T = 3, 6, 40
    layer = _layer("streaming", sink, window, 0)
    x = torch.randn(2, T, SMALL["d_model"], generator=torch.Generator().manual_seed(5))
    sinks = torch.zeros(2, T, layer.n_kv_head, dtype=torch.bool)
    sinks[:, :sink] = True
    with torch.no_grad():
        q, k, v, _ = layer._qkv(x)
        want = layer.o_proj(th.attention(q, k, v, window=window, keep=sinks).flatten(2))
        got = layer(x)
    torch.testing.assert_close(got, want, **TOL)


def test_attention_weights_step_is_attention_decode():
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g)
    valid = torch.rand(2, 9, 2, generator=g) < 0.6
    valid[:, 0] = True
    o, p = attention_decode_weights(q, k, v, valid)
    torch.testing.assert_close(o, th.attention_decode(q, k, v, valid), **TOL)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4), **TOL)
    hidden = ~valid.repeat_interleave(2, dim=2).transpose(1, 2)                # [B, H, S]
    assert (p[hidden] == 0).all()


@pytest.mark.parametrize("args,word", [
    (("lru", 2, 4, 4), "policy"), (("tova", -1, 4, 4), "sink"), (("h2o", 2, 1.5, 4), "window"),
    (("tova", 2, 4, True), "buffer"), (("streaming", 2, 4, 4), "buffer must be 0"),
])
def test_bad_arguments_are_refused(args, word):
    with pytest.raises(ValueError, match=word):
        EvictingAttention(Config(**SMALL), *args)
    model = TinyHybrid(Config.preset("gdn+attn", **SMALL))
    with pytest.raises(ValueError, match=word):
        with_eviction(model, *args)


def test_with_eviction_needs_full_attention_layers():
    model = TinyHybrid(Config.preset("gdn+swa", **SMALL))
    with pytest.raises(ValueError, match="full-attention layers"):
        with_eviction(model, "tova", 2, 4, 4)


# --- the report: python train_shakespeare.py --eviction-report ---------------------------------

import cli  # noqa: E402
import corpus  # noqa: E402
import eviction_report  # noqa: E402
import recall_task  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "train_shakespeare.py"
# A model and task small enough for a few CPU seconds per preset (as test_cli's).
TINY = ["--steps", "4", "--seq-len", "20", "--dense-len", "10", "--dense-facts", "2", "--drill-facts", "2",
        "--max-facts", "2", "--batch-size", "2", "--window", "8", "--d-model", "16", "--gdn-head-dim", "8",
        "--eval-batch", "1", "--log-every", "2", "--lte-buffer", "4"]


def run_cli(*flags, timeout=600):
    """The script as a user runs it: a fresh process, no TRITON_INTERPRET in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, flags)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_eviction_report_trains_what_is_missing_then_refuses_then_replaces_only_its_files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus.load_corpus(cache_dir=tmp_path / "cache")[1][:30_000], encoding="utf-8")
    out = tmp_path / "out"
    flags = ["--eviction-report", "--data", text, "--out", out, *TINY]
    first = run_cli(*flags)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "eviction.json").read_text())
    assert report["seeds"] == [0] and list(report["per_seed"]) == ["0"]
    rows = report["summary"]["recall"]
    assert list(rows) == ["gdn+lte (learned)", "attn + StreamingLLM, s + w", "attn + StreamingLLM, window w + b",
                          "attn + TOVA", "attn + H2O", "gdn+attn (uncapped)", "gdn+swa"]
    assert list(rows["attn + H2O"]) == ["20", "40", "80"]                       # 1x, 2x, 4x the training length
    assert list(report["summary"]["budget"]) == [str(b) for b in eviction_report.EVICTION_BUDGETS]
    keeps = report["summary"]["keeps"]
    assert list(keeps) == ["gdn+lte (learned)", "attn + TOVA", "attn + H2O"]
    assert all(list(heads) == ["layer 1 head 0", "layer 1 head 1"] for heads in keeps.values())
    assert report["budget"] == {"sink": 4, "window": 8, "buffer": 4}
    assert "nsa_topn" not in report["summary"] and "gdn+nsa checkpoint of seed 0" in report["nsa_missing"]
    for name in cli.EVICTION_FILES[1:]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "attn + TOVA" in first.stdout and "What each policy keeps" in first.stdout
    assert "NSA's n at inference: not measured, no gdn+nsa checkpoint of seed 0" in first.stdout
    checkpoints = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    assert sorted(checkpoints) == ["gdn_attn_seed0.pt", "gdn_lte_seed0.pt", "gdn_swa_seed0.pt"]

    again = run_cli(*flags)                                    # the report exists: refused, nothing touched
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert "eviction.json" in again.stderr and "--overwrite" in again.stderr
    assert json.loads((out / "eviction.json").read_text()) == report

    replaced = run_cli(*flags, "--overwrite")                  # the models are read back, not trained again
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "finished earlier" in replaced.stdout and "step     4/4" not in replaced.stdout
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == checkpoints
    assert json.loads((out / "eviction.json").read_text())["summary"] == report["summary"]


@pytest.mark.parametrize("flags,words", [
    (["--models", "gdn+attn"], ["--eviction-report", "drop --models"]),
    (["--sweep-state"], ["--eviction-report and --sweep-state"]),
])
def test_eviction_report_refuses_other_runs_before_any_work(flags, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--eviction-report", *flags, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()


# --- the report's pieces: what each policy keeps, several seeds, NSA's n at inference ----------

def _report_args(tmp_path, *flags):
    return cli.parse_args([*TINY, "--out", str(tmp_path / "out"), *flags])


def _haystacks(T, rows, window, seed=0):
    """A recall batch of `rows` haystacks of T random text tokens, facts on both sides of the window."""
    import numpy as np

    rng = np.random.default_rng(seed)
    text = rng.integers(0, corpus.N_BPE, 5000)
    return recall_task.make_batch(text, rows, T, 4, (2, T - 3), rng)


def _held_sets(model, idx, layer):
    """Per step t, per row and KV head: the set of positions layer `layer`'s decoding state holds
    after token t (sinks, window, buffer positions), the model stepped one token at a time."""
    mixer = model.blocks[layer].mixer
    s, w = mixer.sink, mixer.window
    B, T = idx.shape
    state, held = model.init_state(B), []
    for t in range(T):
        model(idx[:, t:t + 1], state=state)
        buf = state[layer]["buf_pos"]                                          # [B, Hkv, b]
        held.append([[set(range(min(s, t + 1))) | set(range(max(0, t - w), t + 1))
                      | {p for p in buf[b, h].tolist() if p >= 0} for h in range(buf.shape[1])] for b in range(B)])
    return held


@pytest.mark.parametrize("policy", ["lte", "tova", "h2o"])
def test_keep_shares_are_a_plain_count_over_the_held_positions(policy):
    """keep_shares of LTE, TOVA and H2O: the share of each kind of token that is still held right
    after it leaves the window, and of far facts held at their query, counted over what the
    decoding state holds after every token."""
    sink, window, buffer, T = 2, 6, 4, 48
    small = dict(SMALL, vocab_size=corpus.VOCAB_SIZE, window=window, lte_sink=sink, lte_buffer=buffer)
    torch.manual_seed(7)
    if policy == "lte":
        model = TinyHybrid(Config.preset("gdn+lte", **small)).eval()
    else:
        model = with_eviction(TinyHybrid(Config.preset("gdn+attn", **small)), policy, sink, window, buffer).eval()
    batch = _haystacks(T, 3, window)
    with torch.no_grad():
        shares = eviction_report.keep_shares(model, {"2-45": batch}, "cpu")
        held = _held_sets(model, batch["idx"], 1)
    rows, keys, values, queries = (x.tolist() for x in eviction_report.fact_positions(batch))
    for h in range(2):
        count = {what: [] for what in ("fact keys", "fact values", "text", "held at query")}
        for b in range(batch["idx"].shape[0]):
            facts = [(k, v) for r, k, v in zip(rows, keys, values) if r == b]
            for j in range(sink, T - window - 1):                          # tokens that leave the window
                entered = j in held[j + window + 1][b][h]
                if batch["idx"][b, j] < corpus.N_BPE:
                    count["text"].append(entered)
                count["fact keys"] += [entered for k, _ in facts if k == j]
                count["fact values"] += [entered for _, v in facts if v == j]
        count["held at query"] = [v in held[q][r][h] for r, v, q in zip(rows, values, queries) if q - v > window]
        want = {what: sum(c) / len(c) for what, c in count.items()}
        assert shares[f"layer 1 head {h}"] == pytest.approx(want, abs=1e-12), h
    kept = [shares[head]["text"] for head in shares]
    assert any(0 < share < 1 for share in kept), kept                      # the buffer chose: some in, some out


def test_the_seed_summary_is_mean_min_max_and_every_table_names_its_seeds(tmp_path, capsys):
    args = _report_args(tmp_path)
    lengths = [str(t) for t in cli.eval_lengths(args)]
    rows = list(eviction_report.BUDGET_ROWS) + ["gdn+attn (uncapped)"]

    def numbers(x):                    # one seed's numbers, every leaf x (recall 1-4 at T = 20: 3 x)
        shares = {"fact keys": x, "fact values": x, "text": x, "held at query": x}
        return {"recall": {row: {t: {"1-4": 3 * x if (row, t) == ("attn + H2O", "20") else x} for t in lengths}
                           for row in rows},
                "keeps": {row: {"layer 1 head 0": shares} for row in eviction_report.KEEP_ROWS},
                "budget": {str(b): {row: {t: x for t in lengths} for row in eviction_report.BUDGET_ROWS}
                           for b in (8, 64)},
                "window": {"8": {t: x for t in lengths}},
                "nsa_topn": {"3": {t: x for t in lengths}, "16": {t: x for t in lengths}}}

    report = eviction_report.summarize_seeds({"0": numbers(0.1), "1": numbers(0.2), "2": numbers(0.3)})
    assert report["per_seed"]["1"] == numbers(0.2)
    cell = report["summary"]["recall"]["attn + H2O"]["20"]["1-4"]
    assert cell == pytest.approx({"mean": 0.6, "min": 0.3, "max": 0.9, "n": 3})
    assert report["summary"]["keeps"]["attn + TOVA"]["layer 1 head 0"]["text"] == pytest.approx(
        {"mean": 0.2, "min": 0.1, "max": 0.3, "n": 3})
    eviction_report.print_eviction_report(report, args, sink=4)
    out = capsys.readouterr().out
    # the heading, 3 recall tables, what each policy keeps, 3 budget tables, the window, NSA's n
    assert out.count("seeds 0, 1, 2: mean (min-max)") == 10, out
    assert "60.0 (30-90)" in out and "20.0 (10-30)" in out and "16 (trained)" in out


def test_the_seeds_in_parallel_processes_give_each_seed_its_own_numbers(tmp_path):
    """eviction_report over two seeds in two processes: each seed's numbers are those one process
    computes for that seed alone, and the summary is over both."""
    import numpy as np

    args = _report_args(tmp_path, "--seeds", "0,1", "--jobs", "2")
    args.out.mkdir()
    for seed in args.seeds:                       # untrained models of two seeds, in the checkpoints' format
        for preset in cli.EVICTION_PRESETS:
            torch.manual_seed(seed)
            model = TinyHybrid(cli.model_config(preset, args, corpus.VOCAB_SIZE))
            torch.save({"model": model.state_dict()}, cli.checkpoint_path(args.out, preset, seed))
    val_tokens = np.random.default_rng(0).integers(0, corpus.N_BPE, 3000)
    cpu = torch.device("cpu")
    assert eviction_report.eviction_jobs(args, cpu) == 2
    report = eviction_report.eviction_report(args, val_tokens, corpus.VOCAB_SIZE, cpu, cli.EVICTION_PRESETS)
    alone = eviction_report.seed_report(1, args, val_tokens, corpus.VOCAB_SIZE, cpu, cli.EVICTION_PRESETS)
    assert list(report["per_seed"]) == ["0", "1"] and report["per_seed"]["1"] == alone
    assert report["per_seed"]["0"] != alone
    assert report["summary"] == eviction_report.summarize_nested([report["per_seed"]["0"], alone])


def _tiny_nsa(args):
    torch.manual_seed(0)
    return TinyHybrid(cli.model_config("gdn+nsa", args, corpus.VOCAB_SIZE)).eval()


def test_nsa_topn_at_inference_is_the_config_field(tmp_path):
    """with_nsa_topn changes only n: at the trained n it is the model itself, at another n the
    outputs change; the table has a row per n and a cell per length."""
    import numpy as np

    args = _report_args(tmp_path)
    model = _tiny_nsa(args)
    idx = torch.randint(0, corpus.N_BPE, (2, 80))
    with torch.no_grad():
        same, fewer = eviction_report.with_nsa_topn(model, args.nsa_topn), eviction_report.with_nsa_topn(model, 3)
        torch.testing.assert_close(same(idx)[0], model(idx)[0], rtol=0, atol=0)
        assert not torch.allclose(fewer(idx)[0], model(idx)[0], atol=1e-4)
    assert model.config.nsa_topn == args.nsa_topn and fewer.config.nsa_topn == 3
    assert all(block.mixer.top_n == 3 for block in fewer.blocks[1::2])
    batches = eviction_report.eviction_batches(np.random.default_rng(0).integers(0, corpus.N_BPE, 3000), args)
    table = eviction_report.nsa_topn_recall(model, [3, args.nsa_topn], batches, args, "cpu")
    assert list(table) == ["3", str(args.nsa_topn)] and all(list(cells) == ["20", "40", "80"] for cells in table.values())
    for length, by_bin in batches.items():
        cells = eviction_report.recall_by_distance(model, by_bin, "cpu")
        assert table[str(args.nsa_topn)][str(length)] == eviction_report.beyond(cells, args.window)
    assert eviction_report.nsa_topns(args) == [3, 4, 8, 16, 32]


@pytest.mark.parametrize("top_n", [2, 0, -1, 2.5, True, "4"])
def test_nsa_topn_refuses_nonsense_n_before_any_work(top_n, tmp_path):
    args = _report_args(tmp_path)
    model = _tiny_nsa(args)
    with pytest.raises(ValueError, match=f"top_n {top_n!r}: .* an int >= 3"):
        eviction_report.with_nsa_topn(model, top_n)
    with pytest.raises(ValueError, match="top_n"):            # batches=None: refused before it is read
        eviction_report.nsa_topn_recall(model, [4, top_n], None, args, "cpu")
    attn = TinyHybrid(cli.model_config("gdn+attn", args, corpus.VOCAB_SIZE))
    with pytest.raises(ValueError, match="needs a model with NSA layers"):
        eviction_report.with_nsa_topn(attn, 4)


def test_nsa_table_needs_finished_gdn_nsa_runs_of_every_seed(tmp_path):
    args = _report_args(tmp_path, "--seeds", "0,1")
    args.out.mkdir()
    done = {"settings": {**cli.run_settings(args), "seed": 0}, "step": args.steps, "result": {}}
    torch.save(done, cli.checkpoint_path(args.out, "gdn+nsa", 0))
    assert "no gdn+nsa checkpoint of seed 1" in eviction_report.nsa_missing(args)
    torch.save({**done, "step": args.steps - 1}, cli.checkpoint_path(args.out, "gdn+nsa", 1))
    assert "gdn_nsa_seed1.pt has not finished its 4 steps" in eviction_report.nsa_missing(args)
    torch.save({**done, "settings": {**done["settings"], "window": 16}}, cli.checkpoint_path(args.out, "gdn+nsa", 1))
    assert "gdn_nsa_seed1.pt was trained with another --window" in eviction_report.nsa_missing(args)
    torch.save(done, cli.checkpoint_path(args.out, "gdn+nsa", 1))
    assert eviction_report.nsa_missing(args) == ""
