"""Tests of tiny_hybrid.py: ops against slow oracles, mixers, the model, decoding.

Tolerances: every reference op computes in float32. Where two float32 computations of the same
function are compared (chunked vs recurrent GDN, dense vs per-query loop), they differ only by
summation order: relative differences of a few float32 ulps times the number of summed terms,
far below 1e-5 for the sizes here, so atol = rtol = 1e-5 can only fail on a real mistake
(a wrong mask entry or a missed decay moves results by 1e-2 or more).
"""

import copy
import heapq
import math
import random

import pytest
import torch
import torch.nn.functional as F

import tiny_hybrid as th
from tiny_hybrid import (PRESETS, Config, TinyHybrid, attention, attention_decode, gated_delta_rule,
                         gated_delta_rule_recurrent, lte_visible_until, nsa_compress, nsa_compressed_attention,
                         nsa_select_blocks, nsa_selected_attention)

TOL = dict(atol=1e-5, rtol=1e-5)


def small_config(preset: str, **overrides) -> Config:
    """A model small enough for the CPU, with windows short enough that eviction really happens."""
    base = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, window=8,
                lte_sink=2, lte_buffer=3, nsa_block=4, nsa_topn=3, gdn_chunk_size=8)
    base.update(overrides)
    return Config.preset(preset, **base)


# =============================================================================================
# Gated DeltaNet
# =============================================================================================

def gdn_inputs(B=2, T=37, H=3, K=8, V=6, decay=1.0, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    gate = -torch.rand(B, T, H, generator=g) * decay
    beta = torch.rand(B, T, H, generator=g)
    s0 = torch.randn(B, H, K, V, generator=g)
    xs = [q, k, v, gate, beta, s0]
    return [x.requires_grad_(requires_grad) for x in xs]


@pytest.mark.parametrize("T", [1, 15, 16, 37, 64])
@pytest.mark.parametrize("chunk", [8, 16])
@pytest.mark.parametrize("with_state", [False, True])
def test_gdn_chunked_equals_recurrent(T, chunk, with_state):
    q, k, v, g, beta, s0 = gdn_inputs(T=T, requires_grad=True)
    init = s0 if with_state else None
    o1, S1 = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=init)
    o2, S2 = gated_delta_rule(q, k, v, g, beta, initial_state=init, chunk_size=chunk)
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(S2, S1, **TOL)
    # gradients of every input, through both the output and the final state
    w_o, w_s = torch.randn_like(o1), torch.randn_like(S1)
    inputs = [q, k, v, g, beta] + ([s0] if with_state else [])
    g1 = torch.autograd.grad((o1 * w_o).sum() + (S1 * w_s).sum(), inputs)
    g2 = torch.autograd.grad((o2 * w_o).sum() + (S2 * w_s).sum(), inputs)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)   # grads sum ~T more terms


def test_gdn_recurrent_matches_definition_in_float64():
    """The recurrent form written out once more, naively, per batch and head, in float64."""
    q, k, v, g, beta, s0 = gdn_inputs(B=1, T=9, H=2, K=4, V=3)
    o, S = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0)
    for h in range(2):
        St = s0[0, h].double()
        for t in range(9):
            St = math.exp(g[0, t, h]) * St
            kt, vt = k[0, t, h].double(), v[0, t, h].double()
            St = St + torch.outer(kt, beta[0, t, h].double() * (vt - St.T @ kt))
            expected = St.T @ q[0, t, h].double() / math.sqrt(4)
            torch.testing.assert_close(o[0, t, h].double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(S[0, h].double(), St, atol=1e-5, rtol=1e-5)


def test_gdn_strong_decay_is_stable():
    q, k, v, g, beta, _ = gdn_inputs(T=64, decay=30.0)     # exp(-30 * 64) underflows: masked, not inf
    o, S = gated_delta_rule(q, k, v, g, beta, chunk_size=64)
    o_ref, S_ref = gated_delta_rule_recurrent(q, k, v, g, beta)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, **TOL)


# =============================================================================================
# attention: one op for full, SWA and LTE's band plus columns
# =============================================================================================

def brute_force_attention(q, k, v, visible):
    """A loop over queries: softmax over the keys visible(b, h_kv, i, j) says, float64."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(T):
                js = [j for j in range(T) if visible(b, hk, i, j)]
                s = torch.stack([q[b, i, h].double() @ k[b, j, hk].double() for j in js]) / math.sqrt(D)
                out[b, i, h] = s.softmax(0) @ v[b, js, hk].double()
    return out


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("pattern", ["full", "swa", "kept_forever", "kept_until"])
def test_attention_equals_brute_force(groups, pattern):
    torch.manual_seed(groups)
    B, T, Hkv, D, w = 2, 21, 2, 8, 4
    q = torch.randn(B, T, Hkv * groups, D)
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    window, keep = (None, None) if pattern == "full" else (w, None)
    if pattern == "kept_forever":
        keep = torch.rand(B, T, Hkv) < 0.3
        rule = lambda b, h, i, j: j <= i and (i - j <= w or bool(keep[b, j, h]))
    elif pattern == "kept_until":
        keep = torch.randint(-1, T + 2, (B, T, Hkv))
        rule = lambda b, h, i, j: j <= i and (i - j <= w or i <= int(keep[b, j, h]))
    elif pattern == "swa":
        rule = lambda b, h, i, j: 0 <= i - j <= w
    else:
        rule = lambda b, h, i, j: j <= i
    o = attention(q, k, v, window=window, keep=keep)
    torch.testing.assert_close(o.double(), brute_force_attention(q, k, v, rule), **TOL)


def test_window_edge_is_inclusive():
    """With window w, key i - w is visible to query i and key i - w - 1 is not."""
    T, w, D = 12, 3, 4
    q = torch.zeros(1, T, 1, D)                       # uniform attention over what is visible
    k = torch.zeros(1, T, 1, D)
    for far in (w, w + 1):
        v = torch.zeros(1, T, 1, D)
        v[0, T - 1 - far] = 1.0                       # only the key at distance `far` carries signal
        o = attention(q, k, v, window=w)[0, T - 1, 0, 0]
        assert (o > 0) == (far == w), f"distance {far}: output {o}"


def test_attention_keeps_dtype_and_decode_matches_last_row():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    o = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert o.dtype == torch.bfloat16
    full = attention(q, k, v)
    torch.testing.assert_close(attention_decode(q[:, -1], k, v), full[:, -1], **TOL)
    valid = torch.zeros(2, 9, 2, dtype=torch.bool)
    valid[:, -4:] = True                              # the window w = 3 as a slot mask
    torch.testing.assert_close(attention_decode(q[:, -1], k, v, valid), attention(q, k, v, window=3)[:, -1], **TOL)


# =============================================================================================
# NSA
# =============================================================================================

def test_compressed_attention_never_reads_incomplete_blocks():
    torch.manual_seed(0)
    B, T, H, Hkv, D, l = 1, 23, 4, 2, 8, 4
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    o, lse = nsa_compressed_attention(q, nsa_compress(k, l), nsa_compress(v, l), l)
    assert nsa_compress(k, l).shape[1] == T // l
    assert (o[:, : l - 1] == 0).all() and torch.isinf(lse[:, : l - 1]).all()   # nothing complete yet
    for i in range(T):
        # changing every key/value from position i + 1 on must not change query i's output
        k2, v2 = k.clone(), v.clone()
        k2[:, i + 1:] += torch.randn_like(k2[:, i + 1:])
        v2[:, i + 1:] += torch.randn_like(v2[:, i + 1:])
        o2, _ = nsa_compressed_attention(q, nsa_compress(k2, l), nsa_compress(v2, l), l)
        torch.testing.assert_close(o2[:, i], o[:, i], atol=0, rtol=0)


def brute_force_selection(scores, block, top_n, n_recent, T):
    """Rank blocks one query at a time in plain Python."""
    B, _, Hkv, Nc = scores.shape
    out = torch.full((B, T, Hkv, top_n), -1, dtype=torch.long)
    for b in range(B):
        for i in range(T):
            for h in range(Hkv):
                cur = i // block
                cands = list(range(cur + 1))
                forced = [n for n in cands if n == 0 or cur - n < n_recent]
                rest = sorted((n for n in cands if n not in forced),
                              key=lambda n: (-(float(scores[b, i, h, n]) if n < Nc else 0.0), n))
                chosen = sorted(forced) + rest
                out[b, i, h, : min(top_n, len(chosen))] = torch.tensor(chosen[:top_n])
    return out


def test_block_selection_equals_brute_force_with_forced_blocks_and_ties():
    torch.manual_seed(0)
    B, T, Hkv, l, n = 2, 30, 2, 4, 4
    Nc = T // l
    scores = torch.randint(0, 3, (B, T, Hkv, Nc)).float()      # few values: many ties
    idx = nsa_select_blocks(scores, l, n, n_recent=2)
    expected = brute_force_selection(scores, l, n, 2, T)
    assert torch.equal(idx.sort(-1).values, expected.sort(-1).values)
    for i in range(T):
        sel = idx[:, i]
        assert (sel == 0).any(-1).all()                         # the first block
        assert (sel == i // l).any(-1).all()                    # the block holding i
        if i // l >= 1:
            assert (sel == i // l - 1).any(-1).all()            # and the one before it


def nsa_slow(mixer, x):
    """NSA written per query: the three branches from their definitions, one query at a time."""
    B, T, _ = x.shape
    q, k, v, _ = mixer._qkv(x)
    H, Hkv, D, l = mixer.n_head, mixer.n_kv_head, mixer.head_dim, mixer.block
    G = H // Hkv
    gates = torch.sigmoid(mixer.gate_proj(x)).view(B, T, H, 3)
    out = torch.zeros(B, T, H, D)
    for b in range(B):
        for i in range(T):
            n_done = (i + 1) // l                               # complete blocks at query i
            probs = torch.zeros(H, max(n_done, 0))
            for h in range(H):
                hk = h // G
                o_cmp = torch.zeros(D)
                if n_done:
                    kc = k[b, : n_done * l, hk].reshape(n_done, l, D).mean(1)
                    vc = v[b, : n_done * l, hk].reshape(n_done, l, D).mean(1)
                    p = (kc @ q[b, i, h] / math.sqrt(D)).softmax(0)
                    probs[h] = p
                    o_cmp = p @ vc
                out[b, i, h] += gates[b, i, h, 0] * o_cmp
                # sliding window
                js = list(range(max(0, i - mixer.window), i + 1))
                p = (k[b, js, hk] @ q[b, i, h] / math.sqrt(D)).softmax(0)
                out[b, i, h] += gates[b, i, h, 2] * (p @ v[b, js, hk])
            for hk in range(Hkv):
                group = probs[hk * G: (hk + 1) * G].sum(0)
                cur = i // l
                forced = {0} | {n for n in range(cur + 1) if cur - n < mixer.n_recent}
                rest = sorted((n for n in range(cur + 1) if n not in forced),
                              key=lambda n: (-(float(group[n]) if n < n_done else 0.0), n))
                chosen = (sorted(forced) + rest)[: mixer.top_n]
                js = [j for j in range(i + 1) if j // l in chosen]
                for h in range(hk * G, (hk + 1) * G):
                    p = (k[b, js, hk] @ q[b, i, h] / math.sqrt(D)).softmax(0)
                    out[b, i, h] += gates[b, i, h, 1] * (p @ v[b, js, hk])
    return mixer.o_proj(out.reshape(B, T, H * D))


def test_nsa_mixer_equals_per_query_loop():
    torch.manual_seed(0)
    cfg = small_config("gdn+nsa", window=5)
    mixer = th.NativeSparseAttention(cfg)
    x = torch.randn(2, 27, cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), nsa_slow(mixer, x), atol=1e-5, rtol=1e-4)


def test_nsa_selected_attention_is_causal_inside_the_current_block():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4)
    only_block_1 = torch.full((1, 8, 1, 1), 1)
    o = nsa_selected_attention(q, k, v, only_block_1, block=4)
    v2 = v.clone()
    v2[:, 6:] += 10.0                                   # future tokens of the same block
    o2 = nsa_selected_attention(q, k, v2, only_block_1, block=4)
    torch.testing.assert_close(o2[:, 4:6], o[:, 4:6], atol=0, rtol=0)


# =============================================================================================
# LTE
# =============================================================================================

def lte_mixer(**overrides):
    cfg = small_config("gdn+lte", **overrides)
    torch.manual_seed(0)
    return th.LTEAttention(cfg)


def test_router_score_depends_exactly_on_its_receptive_field():
    m = lte_mixer(lte_dropout=0.0).eval()
    reach = m.router.reach
    assert reach == 6                                   # 3 layers, kernel 3, dilation 2
    B, T, Hkv, D = 1, 40, 2, 8
    k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    r = m.router(k, v)
    # offsets a stack of dilated convolutions can reach: sums of one tap offset per layer. With
    # kernel 3 and dilation 2 everywhere these are the EVEN offsets -6..6 (span 13, 7 tokens).
    reachable = {0}
    for kernel, dilation in zip(m.config.lte_kernel_sizes, m.config.lte_dilations):
        taps = range(-(kernel // 2) * dilation, (kernel // 2) * dilation + 1, dilation)
        reachable = {a + b for a in reachable for b in taps}
    assert reachable == {-6, -4, -2, 0, 2, 4, 6}
    j = 20
    for t in range(T):
        k2 = k.clone()
        k2[:, t, 0] += 1.0                              # perturb one token of KV head 0
        r2 = m.router(k2, v)
        changed = not torch.allclose(r2[0, j, 0], r[0, j, 0], atol=0, rtol=0)
        assert changed == ((t - j) in reachable), f"neighbour at distance {t - j}"
        assert torch.equal(r2[..., 1], r[..., 1])       # heads never mix


@pytest.mark.parametrize("train_cap", [False, True])
def test_straight_through_gradient_is_v_dot_grad_v(train_cap):
    m = lte_mixer(lte_dropout=0.0, lte_lambda_init=0.0, lte_lambda_every=0, lte_train_cap=train_cap).train()
    x = torch.randn(2, 30, m.config.d_model)
    captured = {}
    orig = m.router.forward

    def spy(k, v):
        r = orig(k, v)
        r.retain_grad()
        captured["r"], captured["v"] = r, v
        return r
    m.router.forward = spy
    # capture dL/dv' by hooking the attention op's value input
    real_attention = th.attention

    def attention_spy(q, k, v, **kw):
        v.retain_grad()
        captured["v_prime"] = v
        return real_attention(q, k, v, **kw)
    th.attention = attention_spy
    try:
        m(x)[0].pow(2).sum().backward()
    finally:
        th.attention = real_attention
    r, v, vp = captured["r"], captured["v"], captured["v_prime"]
    expected = (v.detach() * vp.grad).sum(-1)           # <v_j, dL/dv'_j>, [B, T, Hkv]
    torch.testing.assert_close(r.grad, expected, **TOL)
    torch.testing.assert_close(vp.detach(), v.detach(), atol=0, rtol=0)   # forward unchanged


def test_sinks_are_always_visible_and_eval_cap_is_respected():
    torch.manual_seed(0)
    B, T, Hkv, w, s, b = 2, 60, 2, 5, 3, 4
    scores = torch.rand(B, T, Hkv) - 0.3                # some negative: dropped
    until = lte_visible_until(scores, w, s, b)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    kept = i <= until.permute(0, 2, 1)[:, :, None, :]   # [B, Hkv, T, T]: attention's rule for an int keep
    mask = (j <= i) & ((i - j <= w) | kept)
    beyond = (i - j > w) & (j >= s)
    assert mask[..., :s].logical_or(j[:, :s] > i).all()  # every sink, for every later query
    assert (mask & beyond).sum(-1).max() <= b            # never more than b retained tokens


def simulate_lte(scores, window, sink, buffer):
    """The streaming rule in plain Python for one head: what each query sees beyond the window."""
    T = len(scores)
    buf, visible = [], []                               # buf: list of (score, position)
    for i in range(T):
        j = i - window - 1
        if j >= sink and scores[j] > 0:
            if len(buf) < buffer:
                buf.append((scores[j], j))
            elif buffer and scores[j] >= min(buf)[0]:   # ties go to the newer token
                buf.remove(min(buf))                    # lowest score, oldest on ties
                buf.append((scores[j], j))
        visible.append({p for _, p in buf})
    return visible, {p for _, p in buf}


@pytest.mark.parametrize("sink", [0, 2])
@pytest.mark.parametrize("buffer", [0, 1, 4])
def test_visible_until_equals_python_simulation_with_ties(buffer, sink):
    torch.manual_seed(buffer)
    B, T, Hkv, w, s = 2, 70, 2, 6, sink
    scores = torch.randint(-2, 4, (B, T, Hkv)).float() / 8       # many exact ties, some <= 0
    until = lte_visible_until(scores, w, s, buffer)
    buf_score, buf_pos = th.lte_final_buffer(scores, until, w, s, buffer)
    for b in range(B):
        for h in range(Hkv):
            visible, final = simulate_lte(scores[b, :, h].tolist(), w, s, buffer)
            for i in range(T):
                got = {j for j in range(s, max(s, i - w)) if i <= int(until[b, j, h])}
                assert got == visible[i], f"query {i}"
            assert {int(p) for p in buf_pos[b, h] if p >= 0} == final


def stream_lte_until(scores, window, sink, buffer):
    """The streaming rule token by token for one head, as decoding runs it, written as plainly as
    possible (a min-heap of (score, position): the lowest score leaves first, the oldest on ties).
    Returns what `lte_visible_until` returns for that head: the last query that sees each key beyond
    the window, and the final buffer as {position: score}."""
    T, forever = len(scores), th.KEEP_FOREVER
    until = [forever if j < sink else -1 for j in range(T)]
    heap = []
    for j in range(sink, max(sink, T - window - 1)):     # token j leaves when query j + w + 1 arrives
        if scores[j] <= 0 or buffer == 0:
            continue
        if len(heap) < buffer:
            heapq.heappush(heap, (scores[j], j))
            until[j] = forever
        elif scores[j] >= heap[0][0]:                   # ties go to the newer token
            _, evicted = heapq.heapreplace(heap, (scores[j], j))
            until[j], until[evicted] = forever, j + window   # the evicted one's last query: j + w
    return until, {p: s for s, p in heap}


def assert_lte_rule_matches_stream(scores, window, sink, buffer, rule=lte_visible_until):
    until = rule(scores, window, sink, buffer)
    buf_score, buf_pos = th.lte_final_buffer(scores, until, window, sink, buffer)   # what prefill keeps
    B, T, Hkv = scores.shape
    assert until.shape == (B, T, Hkv) and until.dtype == torch.int64
    assert buf_score.shape == buf_pos.shape == (B, Hkv, buffer)
    for b in range(B):
        for h in range(Hkv):
            want_until, want_buffer = stream_lte_until(scores[b, :, h].tolist(), window, sink, buffer)
            assert until[b, :, h].tolist() == want_until, f"batch {b}, head {h}"
            held = buf_pos[b, h] >= 0
            got = dict(zip(buf_pos[b, h][held].tolist(), buf_score[b, h][held].tolist()))
            assert got == want_buffer
            assert (buf_score[b, h][~held] == float("-inf")).all()


LTE_RULE_CASES = {
    # name: (B, T, Hkv, window, sink, buffer, scores from a generator)
    "random": (2, 300, 3, 7, 4, 16, lambda g, s: torch.randn(s, generator=g)),
    "tied": (2, 200, 2, 5, 2, 8, lambda g, s: torch.randint(-2, 5, s, generator=g).float() / 8),
    "all tied": (1, 90, 2, 3, 1, 4, lambda g, s: torch.full(s, 0.25)),
    "all negative": (2, 120, 2, 5, 3, 8, lambda g, s: -torch.rand(s, generator=g)),
    "no buffer": (2, 80, 2, 5, 3, 0, lambda g, s: torch.randn(s, generator=g)),
    "no sinks": (2, 150, 2, 6, 0, 5, lambda g, s: torch.randint(-1, 3, s, generator=g).float()),
    "buffer > T": (1, 40, 2, 4, 2, 64, lambda g, s: torch.randn(s, generator=g)),
    "T <= w + 1": (2, 9, 2, 8, 2, 4, lambda g, s: torch.randn(s, generator=g)),
    "T = 1": (1, 1, 1, 0, 0, 2, lambda g, s: torch.ones(s)),
    "window 0": (1, 60, 2, 0, 1, 3, lambda g, s: torch.randint(0, 4, s, generator=g).float()),
}


@pytest.mark.parametrize("case", LTE_RULE_CASES)
def test_lte_visible_until_equals_the_streaming_rule(case):
    B, T, Hkv, w, s, b, make = LTE_RULE_CASES[case]
    scores = make(torch.Generator().manual_seed(0), (B, T, Hkv))
    assert_lte_rule_matches_stream(scores, w, s, b)


def test_lte_visible_until_at_64k_tokens():
    """Long enough that a T x T tensor would need 32 GB: the chunked form must stay exact."""
    scores = torch.randn(1, 65536, 1, generator=torch.Generator().manual_seed(0))
    scores[0, 1000:1400] = 0.5                          # a run of exact ties among the best
    assert_lte_rule_matches_stream(scores, 512, 4, 256)


@pytest.mark.parametrize("bad, match", [
    (dict(scores=torch.zeros(2, 5)), "scores"), (dict(scores=torch.zeros(1, 5, 1, dtype=torch.long)), "scores"),
    (dict(scores=torch.zeros(1, 0, 1)), "scores"), (dict(window=-1), "window"), (dict(sink=1.5), "sink"),
    (dict(buffer=-2), "buffer"), (dict(buffer=True), "buffer"),
])
def test_lte_visible_until_rejects_bad_input(bad, match):
    args = dict(scores=torch.zeros(1, 5, 1), window=2, sink=1, buffer=2) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        lte_visible_until(**args)


def forward_keeping(m, kept, T=40):
    """One training forward of LTE mixer m, with router scores that make head h of sequence b keep
    kept[b][h] of the tokens that leave the window (r = 0.1 for those, -0.1 for every other)."""
    r = torch.full((len(kept), T, len(kept[0])), -0.1)
    for b, row in enumerate(kept):
        for h, n in enumerate(row):
            r[b, m.sink: m.sink + n, h] = 0.1
    m.router.forward = lambda k, v: r
    try:
        m.train()(torch.randn(len(kept), T, m.config.d_model))
    finally:
        del m.router.forward
    torch.testing.assert_close(m.last_kept, torch.tensor(kept).float().mean(0))


def test_lambda_controller_moves_the_right_way():
    m = lte_mixer(lte_lambda_every=4, lte_lambda_init=1e-2, lte_buffer=10)
    # per head: 20 > b up, 5 < 0.95 b down; then 9.8 and 10, inside [0.95 b, b]: unchanged
    for kept, direction in (([[20, 5]], (1.5, 0.5)), ([[9, 10]] + [[10, 10]] * 4, (1.0, 1.0))):
        before = m.l1_lambda.clone()
        for step in range(4):
            forward_keeping(m, kept)
            m.update_lambda()
            if step < 3:
                assert torch.equal(m.l1_lambda, before)        # only every N steps
        torch.testing.assert_close(m.l1_lambda, before * torch.tensor(direction))
    m.l1_lambda.fill_(0.9)
    for _ in range(4):
        forward_keeping(m, [[29, 29]])
        m.update_lambda()
    assert torch.equal(m.l1_lambda, torch.full((2,), 1.0))    # clamped at lte_lambda_max


def test_lambda_controller_counts_every_micro_batch_of_a_step():
    """Gradient accumulation: the controller sees the mean over all forwards of a step, not the last."""
    m = lte_mixer(lte_lambda_every=1, lte_lambda_init=1e-2, lte_buffer=20)
    for kept in ([[29, 0]], [[0, 29]], [[29, 0]]):      # means 19.3 (in [19, 20]: stay) and 9.7 (down)
        forward_keeping(m, kept)
    m.update_lambda()
    torch.testing.assert_close(m.l1_lambda, torch.tensor([1e-2, 5e-3]))
    forward_keeping(m, [[29, 29]])                      # a step that must not count ...
    m.update_lambda(count_step=False)
    torch.testing.assert_close(m.l1_lambda, torch.tensor([1e-2, 5e-3]))
    forward_keeping(m, [[19, 20]])                      # ... nor leak into the next one
    m.update_lambda()
    torch.testing.assert_close(m.l1_lambda, torch.tensor([1e-2, 5e-3]))


def test_lambda_controller_off_keeps_lambda_fixed():
    m = lte_mixer(lte_lambda_every=0, lte_lambda_init=1e-3, lte_buffer=10)
    for kept in ([[29, 29]], [[0, 0]]):
        for _ in range(40):
            forward_keeping(m, kept)
            m.update_lambda()
        assert torch.equal(m.l1_lambda, torch.full((2,), 1e-3))
    with pytest.raises(ValueError, match="lte_lambda_every"):
        lte_mixer(lte_lambda_every=-1)


def test_lte_training_keeps_every_positive_token_and_counts_them():
    m = lte_mixer(lte_dropout=0.0, lte_train_cap=False).train()
    x = torch.randn(3, 40, m.config.d_model)
    out, penalty = m(x)
    with torch.no_grad():
        q, k, v, k_raw = m._qkv(x)
        r = m.router(k_raw, v)
        keep = (r > 0) | (torch.arange(40) < m.sink)[None, :, None]
        torch.testing.assert_close(out, m.o_proj(attention(q, k, v, window=m.window, keep=keep).flatten(2)))
    leaving = r[:, m.sink: 40 - m.window - 1]           # the tokens that leave the window
    torch.testing.assert_close(m.last_kept, (leaving > 0).float().sum(1).mean(0))
    assert penalty.requires_grad and penalty > 0
    torch.testing.assert_close(penalty, (m.l1_lambda * F.relu(r).mean(dim=(0, 1))).sum())   # [L4]


def test_lte_penalty_is_a_returned_value_and_the_model_holds_no_graph():
    """The penalty of a training forward is returned, for one loss; the model keeps no autograd
    graph (a model that holds one cannot even be deep-copied), and eval returns 0."""
    torch.manual_seed(0)
    model = TinyHybrid(small_config("gdn+lte", lte_lambda_init=0.5))
    idx = torch.randint(0, 61, (2, 30))
    _, penalty = model(idx)
    assert penalty.requires_grad and penalty > 0 and penalty.shape == () and penalty.dtype == torch.float32
    copy.deepcopy(model)
    model.eval()
    _, penalty = model(idx)
    assert penalty.shape == () and penalty == 0 and not penalty.requires_grad
    _, penalty = TinyHybrid(small_config("gdn+swa")).train()(idx)
    assert penalty == 0


def test_lte_counters_are_buffers_and_checkpoints_load():
    """The controller's counters move with the module (.to), its lambda and period counts are
    saved, and a checkpoint loads them."""
    torch.manual_seed(0)
    model = TinyHybrid(small_config("gdn+lte"))
    model(torch.randint(0, 61, (2, 30)))
    lte = model.blocks[1].mixer
    saved = {k for k in model.state_dict() if k.startswith("blocks.1.mixer.") and "proj" not in k
             and "router" not in k}
    assert saved == {"blocks.1.mixer." + n for n in ("l1_lambda", "kept_sum", "kept_steps")}
    model.to(torch.float64)
    assert lte.last_kept.dtype == lte.step_kept.dtype == lte.l1_lambda.dtype == torch.float64
    old = model.state_dict()
    old["blocks.1.mixer.l1_lambda"].fill_(0.25)
    fresh = TinyHybrid(small_config("gdn+lte")).to(torch.float64)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.blocks[1].mixer.l1_lambda, torch.full((2,), 0.25, dtype=torch.float64))
    assert fresh.lte_stats()[0]["lambda"] == [0.25, 0.25]


# =============================================================================================
# every preset: causality, training, dtypes
# =============================================================================================

@pytest.mark.parametrize("preset", sorted(PRESETS) + ["gdn+lte, the paper's training rule"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("key_conv", [0, 3])
def test_causality(preset, mode, key_conv):
    torch.manual_seed(0)
    paper_rule = preset.endswith("rule")                # training without the inference cap
    config = small_config(preset.split(",")[0], lte_dropout=0.0, key_conv=key_conv, lte_train_cap=not paper_rule)
    model = TinyHybrid(config).train(mode == "train")
    idx = torch.randint(0, 61, (2, 45))
    logits, _ = model(idx)
    for t in (0, 10, 30):
        idx2 = idx.clone()
        idx2[:, t + 1:] = torch.randint(0, 61, idx2[:, t + 1:].shape)
        logits2, _ = model(idx2)
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tiny_batch_can_be_overfit(preset):
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset))
    idx = torch.randint(0, 61, (2, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits, penalty = model(idx[:, :-1])
        lm = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss = lm + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_lte_lambdas()
        losses.append(lm.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bfloat16_forward_backward(preset):
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset))
    ref_logits, _ = model(torch.arange(20)[None] % 61)
    model = model.to(torch.bfloat16)
    idx = torch.arange(20)[None] % 61
    logits, penalty = model(idx)
    loss = F.cross_entropy(logits.float().flatten(0, 1), idx.flatten()) + penalty
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    loss.backward()
    assert torch.isfinite(model.wte.weight.grad.float()).all()
    # bf16 keeps 8 bits of mantissa: logits agree with float32 to ~1e-2 of their scale
    assert (logits.float() - ref_logits).abs().max() < 0.05 * ref_logits.abs().max() + 0.05


def test_lte_penalty_is_the_layers_sum_in_training_only():
    """The model's penalty is each LTE layer's [L4] summed in layer order, from a 0-d zero: in
    training only; eval returns 0 (and counts no kept tokens)."""
    torch.manual_seed(0)
    model = TinyHybrid(small_config("gdn+lte", n_layer=4, lte_dropout=0.0, lte_lambda_init=0.5))
    idx = torch.randint(0, 61, (2, 30))
    layer_penalties = []
    for block in model.blocks[1::2]:
        block.mixer.register_forward_hook(lambda mod, args, out: layer_penalties.append(out[1]))
    _, penalty = model(idx)
    assert len(layer_penalties) == 2 and all(p > 0 for p in layer_penalties)
    assert torch.equal(penalty, torch.zeros(()) + layer_penalties[0] + layer_penalties[1])
    model.eval()
    _, penalty = model(idx)
    assert penalty == 0
    assert len(model.lte_stats()) == 2 and len(model.lte_stats()[0]["kept"]) == 2


def test_defaults_are_the_recipe_that_trained():
    """Config() carries the LTE and NSA settings of the README's working recipe, and
    optimizer_groups puts every router parameter (and only those) at a tenth of the rate, undecayed."""
    c = Config()
    assert (c.lte_buffer, c.lte_train_cap, c.lte_lambda_every, c.lte_lambda_init) == (64, True, 0, 1e-3)
    assert (c.lte_router_lr_scale, c.nsa_topn) == (0.1, 16)
    model = TinyHybrid(small_config("gdn+lte"))
    groups = model.optimizer_groups(lr=2e-3, weight_decay=0.1)
    router = {id(p) for p in model.blocks[1].mixer.router.parameters()}
    assert [id(p) for p in groups[2]["params"]] and {id(p) for p in groups[2]["params"]} == router
    assert [(g["lr"], g["weight_decay"], g["lr_scale"]) for g in groups] == [
        (2e-3, 0.1, 1.0), (2e-3, 0.0, 1.0), (pytest.approx(2e-4), 0.0, 0.1)]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())   # each exactly once
    optimizer = torch.optim.AdamW(groups)
    assert optimizer.param_groups[2]["lr"] == pytest.approx(2e-4)
    # any module holding the mixers works the same (a copied LTEAttention, say)
    wrapped = torch.nn.Sequential(th.LTEAttention(small_config("gdn+lte")))
    assert len(th.optimizer_groups(wrapped, 1e-3, router_lr_scale=0.5)[2]["params"]) == len(
        list(wrapped[0].router.parameters()))


def test_config_draws_no_random_numbers():
    """Making a Config once built a throw-away router to learn its reach, which drew random
    numbers and so changed the weights of the model built after it."""
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    Config.preset("gdn+lte")
    assert torch.equal(torch.rand(3), want)
    for kernels, dilations, reach in (((3, 3, 3), (2, 2, 2), 6), ((5,), (1,), 2), ((3, 1, 5), (1, 4, 3), 7)):
        assert th.LTERouter(2, 8, kernels, dilations).reach == reach
        # Config's check counts the same reach: the window must cover it
        Config.preset("gdn+lte", lte_kernel_sizes=kernels, lte_dilations=dilations, window=reach)
        with pytest.raises(ValueError, match=f"reach \\({reach} tokens"):
            Config.preset("gdn+lte", lte_kernel_sizes=kernels, lte_dilations=dilations, window=reach - 1)


def test_mixer_names_and_mixers_agree():
    assert tuple(th.MIXERS) == th.MIXER_NAMES
    assert {m for pattern in PRESETS.values() for m in pattern} == set(th.MIXER_NAMES)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size,low,high", [("0.4B", 0.3e9, 0.45e9), ("1.4B", 1.1e9, 1.45e9)])
def test_paper_configs(preset, size, low, high):
    """Config.paper: the official configs' sizes and settings (built on the meta device: no memory)."""
    config = Config.paper(preset, size)
    with torch.device("meta"):
        model = TinyHybrid(config)
    assert low < sum(p.numel() for p in model.parameters()) < high
    assert config.n_layer == 24 and config.layers == tuple(PRESETS[preset][i % len(PRESETS[preset])] for i in range(24))
    assert config.gdn_heads == 8 and config.gdn_head_dim == config.gdn_value_dim == {"0.4B": 128, "1.4B": 256}[size]
    if "lte" in config.layers:
        assert (config.window, config.lte_sink, config.lte_buffer, config.lte_lambda_every) == (768, 4, 512, 32)
        assert not config.lte_train_cap and config.lte_router_lr_scale == 1.0
    if "nsa" in config.layers:
        assert (config.n_head, config.n_kv_head, config.nsa_block, config.nsa_topn, config.nsa_window) == (
            32, 2, 64, 16, 511)
    if "swa" in config.layers:
        assert config.window + 1 == 1024                 # the paper counts the keys of a window
    assert Config.paper(preset, size, n_layer=2).n_layer == 2


def test_paper_config_refuses_unknown_names():
    with pytest.raises(ValueError, match="size"):
        Config.paper("gdn+lte", "7B")
    with pytest.raises(ValueError, match="unknown preset"):
        Config.paper("mamba")


def test_state_size_report():
    model = TinyHybrid(small_config("gdn+attn"))
    sizes = model.state_size(100)
    assert list(sizes) == ["0:gdn", "1:attn"]
    assert sizes["1:attn"] == 2 * 100 * 2 * 8 and model.state_size(200)["1:attn"] == 2 * sizes["1:attn"]
    assert model.state_size(200)["0:gdn"] == sizes["0:gdn"]


# =============================================================================================
# decoding: prefill + steps equals the parallel forward
# =============================================================================================

def _prefill_then_steps(model, idx, split):
    """Logits of idx decoded through a fresh state: idx[:, :split] prefilled, then one token a step."""
    state = model.init_state(idx.shape[0])
    parts = [model(idx[:, :split], state=state)[0]]
    parts += [model(idx[:, t: t + 1], state=state)[0] for t in range(split, idx.shape[1])]
    return torch.cat(parts, 1)


def test_gdn_value_dim_other_than_key_dim():
    """V != K (fla's expand_v): the parallel forward equals prefill + steps, and state_size counts
    exactly what the decoding state holds (S and the conv tails)."""
    torch.manual_seed(0)
    model = TinyHybrid(small_config("gdn+attn", gdn_heads=2, gdn_head_dim=8, gdn_value_dim=24)).eval()
    idx = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(_prefill_then_steps(model, idx, 11), model(idx)[0], atol=1e-5, rtol=1e-5)
    gdn = next(m for m in model.modules() if isinstance(m, th.GatedDeltaNet))
    per_sequence = [x[0] for x in gdn.init_state(1).values() if isinstance(x, torch.Tensor) and x.ndim]   # not pos
    held = sum(x.numel() for x in per_sequence)
    assert held == gdn.state_size(30) == 2 * 8 * 24 + 3 * 2 * (8 + 8 + 24)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("key_conv", [0, 3])
def test_prefill_then_step_equals_parallel_forward(preset, key_conv):
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset, key_conv=key_conv)).eval()
    for mixer in model.modules():                       # scores of both signs: drops, ties, evictions
        if isinstance(mixer, th.LTERouter):
            mixer.proj.bias.data.fill_(0.0)
    T = 50                                              # window 8 + buffer 3: eviction happens
    idx = torch.randint(0, 61, (2, T))
    with torch.no_grad():
        full, _ = model(idx)
        for split in random.Random(preset).sample(range(1, T), 3) + [1, T - 1]:
            torch.testing.assert_close(_prefill_then_steps(model, idx, split), full, atol=1e-5, rtol=1e-5)


def test_lte_decode_state_holds_exactly_the_streaming_rule_tokens():
    torch.manual_seed(1)
    model = TinyHybrid(small_config("gdn+lte", lte_buffer=4)).eval()
    lte = model.blocks[1].mixer
    idx = torch.randint(0, 61, (2, 64))
    real, real_one = th.LTERouter.forward, th.LTERouter.score_one
    with torch.no_grad():
        _, _, v, k_raw = lte._qkv(model.blocks[1].norm1(_hidden_before(model, idx, 1)))
        raw = real(lte.router, k_raw, v)
    centre, spread = raw.median(), raw.std()
    # quantised scores in {-3/8 .. 3/8}: many exact ties, both signs, the same in every code path
    # (the parallel forward and the decoding step's one-token form)
    quantised = lambda r: ((r - centre) / spread * 1.5).round().clamp(-3, 3) / 8
    th.LTERouter.forward = lambda self, k, v: quantised(real(self, k, v))
    th.LTERouter.score_one = lambda self, x, j: quantised(real_one(self, x, j))
    try:
        state = model.init_state(2)
        with torch.no_grad():
            model(idx[:, :20], state=state)
            for t in range(20, 64):
                model(idx[:, t: t + 1], state=state)
            r = lte.router(k_raw, v)
    finally:
        th.LTERouter.forward, th.LTERouter.score_one = real, real_one
    assert (r > 0).any() and (r <= 0).any() and len(r.unique()) < 8
    st = state[1]
    for b in range(2):
        for h in range(2):
            _, final = simulate_lte(r[b, :, h].tolist(), lte.window, lte.sink, lte.buffer)
            assert {int(p) for p in st["buf_pos"][b, h] if p >= 0} == final
    assert st["sink_valid"].all()


def _hidden_before(model, idx, layer):
    """Residual stream entering block `layer` (eval mode)."""
    x = model.wte(idx)
    for block in model.blocks[:layer]:
        x, _ = block(x)
    return x


def test_sinks_survive_a_one_token_prompt():
    torch.manual_seed(0)
    model = TinyHybrid(small_config("gdn+lte")).eval()
    state = model.init_state(1)
    with torch.no_grad():
        model(torch.tensor([[5]]), state=state)
        for t in range(40):
            model(torch.tensor([[t % 61]]), state=state)
    st = state[1]
    assert st["sink_valid"].all()
    first_key = model.blocks[1].mixer._qkv(model.blocks[1].norm1(_hidden_before(model, torch.tensor([[5]]), 1)))[1]
    torch.testing.assert_close(st["sink_k"][0, 0], first_key[0, 0].detach(), **TOL)


@pytest.mark.parametrize("preset,grows", [("gdn", False), ("gdn+swa", False), ("gdn+lte", False),
                                          ("gdn+attn", True), ("gdn+nsa", True)])
def test_state_bytes_constant_or_growing(preset, grows):
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset)).eval()
    T = 24                                              # > window + sink + buffer
    state = model.init_state(2)
    sizes = {}
    with torch.no_grad():
        model(torch.randint(0, 61, (2, T)), state=state)
        for t in range(T, 8 * T):
            if t in (2 * T, 8 * T - 1):
                sizes[t] = TinyHybrid.state_nbytes(state)
            model(torch.randint(0, 61, (2, 1)), state=state)
    a, b = sizes[2 * T], sizes[8 * T - 1]
    assert (b > a) if grows else (b == a), sizes


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_greedy_generate_equals_repeated_full_forward(preset):
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset)).eval()
    prompt = torch.randint(0, 61, (2, 7))
    out = model.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_with_a_seed():
    model = TinyHybrid(small_config("gdn+lte")).eval()
    prompt = torch.randint(0, 61, (1, 5))
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# =============================================================================================
# bad input: a clear error naming what is wrong
# =============================================================================================

@pytest.mark.parametrize("kwargs,match", [
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(window=4), "reach"),                          # LTE router sees 6 tokens each side
    (dict(layers=("gdn", "bogus")), "unknown mixer"),
    (dict(head_dim=7), "even"),
    (dict(nsa_topn=2, nsa_recent=2), "nsa_topn"),
    (dict(window=-1), "window"),
    (dict(gdn_value_dim=-4), "gdn_value_dim"),
    (dict(key_conv=-1), "key_conv"),
])
def test_bad_config(kwargs, match):
    base = dict(n_layer=2, layers=("gdn", "lte"))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Config(**base)


def test_bad_preset_and_router():
    with pytest.raises(ValueError, match="unknown preset"):
        Config.preset("mamba")
    with pytest.raises(ValueError, match="odd"):
        th.LTERouter(2, 8, kernel_sizes=(2,), dilations=(1,))
    with pytest.raises(TypeError, match="Config"):
        TinyHybrid({"n_layer": 2})


def test_bad_token_input():
    model = TinyHybrid(small_config("gdn+swa"))
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="Tensor"):
        model([[1, 2]])


def test_bad_op_input():
    q, k, v = torch.randn(1, 5, 3, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q = torch.randn(1, 5, 4, 4)
    with pytest.raises(ValueError, match="4 dims"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=-2)
    with pytest.raises(ValueError, match="keep"):
        attention(q, k, v, window=2, keep=torch.ones(1, 4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="keep"):
        attention(q, k, v, window=2, keep=torch.ones(1, 5, 2))
    with pytest.raises(TypeError, match="floating"):
        gated_delta_rule(*(x.long() if i == 0 else x for i, x in enumerate(gdn_inputs()[:5])))
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(*gdn_inputs()[:5], chunk_size=0)
    q5, k5, v5, g5, b5, _ = gdn_inputs()
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(q5, k5, v5, g5, b5[:, :-1])


# --- regressions found in review ----------------------------------------------------------------

def test_lte_without_sinks_decodes_like_the_parallel_forward():
    """sink = 0 with 2 KV heads once let an evicted token stay visible (colliding scatter writes)."""
    torch.manual_seed(0)
    model = TinyHybrid(small_config("gdn+lte", lte_sink=0, lte_buffer=2)).eval()
    model.blocks[1].mixer.router.proj.bias.data.fill_(0.0)
    idx = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        full, _ = model(idx)
        state = model.init_state(2)
        parts = [model(idx[:, :5], state=state)[0]] + [model(idx[:, t: t + 1], state=state)[0] for t in range(5, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def test_bfloat16_model_generates():
    torch.manual_seed(0)
    model = TinyHybrid(small_config("gdn+lte")).to(torch.bfloat16).eval()
    out = model.generate(torch.randint(0, 61, (2, 5)), 4, temperature=0)
    assert out.shape == (2, 9)
    q, k, v, g, beta, _ = gdn_inputs(T=3)
    o, _ = gated_delta_rule_recurrent(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta)
    assert o.dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["gdn+swa", "gdn+lte", "gdn+nsa", "gdn+attn"])
def test_key_shift_reads_only_the_previous_tokens_and_its_tail_is_state(preset):
    """key_conv = 3: the key of token t depends on tokens t-2 .. t only (before any mixing), and
    state_size counts the 2-token tail the decoding state carries."""
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset, key_conv=3)).eval()
    mixer = model.blocks[1].mixer
    x = torch.randn(1, 12, 32, requires_grad=True)
    k_raw = mixer._qkv(x)[3]                                                    # [1, 12, Hkv, D]
    k_raw[0, 7].sum().backward()
    reads = x.grad[0].abs().sum(-1) > 0
    assert reads.tolist() == [t in (5, 6, 7) for t in range(12)]
    plain = TinyHybrid(small_config(preset)).blocks[1].mixer
    assert mixer.state_size(40) - plain.state_size(40) == 2 * 2 * 8             # (3 - 1) x Hkv x D
    assert mixer.init_state(1)["k_conv"].shape == (1, 2, 16)


def test_lte_state_size_matches_what_decoding_holds():
    model = TinyHybrid(small_config("gdn+lte", lte_sink=2, lte_buffer=3)).eval()
    lte = model.blocks[1].mixer
    held = lambda T: min(T, 2 + 8 + 1 + 3)
    attn = TinyHybrid(small_config("gdn+attn")).blocks[1].mixer
    assert lte.state_size(1) < 2 * attn.state_size(1) + 13 * 2 * 2 * 8     # one token, plus the router tail
    assert lte.state_size(100) == lte.state_size(1000)
    assert lte.state_size(100) == 2 * (held(100) * 16 + (8 + 1 + 3) + 13 * 16)   # Hkv * (kv + scores + router)


def test_empty_sequence_and_more_bad_input():
    q, k, v, g, beta, s0 = gdn_inputs(T=0)
    o, S = gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert o.shape[1] == 0 and torch.equal(S, s0)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(*gdn_inputs()[:5], chunk_size=True)
    with pytest.raises(ValueError, match="block"):
        nsa_compress(torch.randn(1, 8, 1, 4), 0)
    for bad in (dict(gdn_heads=-1), dict(gdn_head_dim=-2), dict(nsa_window=-3), dict(window=True),
                dict(lte_dropout=2.0), dict(lte_lambda_min=-1.0)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            Config(n_layer=2, layers=("gdn", "lte"), **bad)
    model = TinyHybrid(small_config("gdn+swa")).eval()
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.tensor([[1, 2]]), 2, top_k=0)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.tensor([[1, 2]]), state=model.init_state(2))
    assert not model.training
