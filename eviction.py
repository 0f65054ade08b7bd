"""Heuristic eviction at equal memory: the baselines LTE is measured against.

LTE (tiny_hybrid.py) learns which tokens to keep. The obvious alternative keeps tokens by a rule on
the attention itself, applied at inference to a model trained with full attention.
`EvictingAttention` decodes an `Attention` layer (the same weights: load its state_dict) inside
exactly LTE's memory:

    s sinks (always kept)  +  a window ring of w + 1 slots  +  b more slots (the buffer)

and a policy decides, as each token leaves the window, whether it takes a buffer slot and whom it
pushes out (the same moment as LTE's rule [L6]; the sinks and the window are protected alike):
  "streaming"  StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
               Sinks"): sinks + window only, a leaving token is dropped; the buffer must be 0
               (at equal memory give its slots to the window instead: window = w + b).
  "tova"       TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): when the cache is full,
               drop the token with the lowest attention weight of the current query, averaged over
               the query heads of a KV group. Here the candidates are the buffer and the leaving
               token, by the weights of the latest query (the last that saw them all).
  "h2o"        H2O (Zhang et al. 2023, "Heavy-Hitter Oracle"): keep the tokens with the highest
               accumulated attention, plus the recent window. A token's score is the attention it
               received (averaged over the group's heads) summed over every query since it entered
               the cache, window included, so it reaches the buffer with its history.
Both scored policies share one state layout: a score per window and buffer slot, which TOVA
overwrites with the latest weights and H2O adds them to; the leaving token takes a buffer slot
when one is free or its score is at least the lowest buffered score, whose token then leaves
(ties: the oldest leaves, as in `lte_buffer_push`). Memory: the same k, v slots as LTE, b + w + 1
scores and b positions, for any T.
"""

from __future__ import annotations

import torch

from checks import check_decode, check_eviction, check_max_len
from tiny_hybrid import Attention, AttentionBase, TinyHybrid, lte_buffer_push


EVICTION_POLICIES = ("streaming", "tova", "h2o")


def attention_decode_weights(q, k_cache, v_cache, valid=None, scale=None):
    """tiny_hybrid.attention_decode with its attention weights: (o [B, H, D], p [B, H, S]),
    p = softmax_s(scale q . k_s | valid_s), zero on invalid slots (TOVA and H2O score the held
    tokens by them)."""
    check_decode(q, k_cache, v_cache, valid)
    B, H, D = q.shape
    G = H // k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kf, vf = (x.repeat_interleave(G, dim=2).float() for x in (k_cache, v_cache))   # [B, S, H, D]
    scores = torch.einsum("bhd,bshd->bhs", q.float(), kf) * scale              # [B, H, S]
    if valid is not None:
        scores = scores.masked_fill(~valid.repeat_interleave(G, dim=2).transpose(1, 2), float("-inf"))
    p = scores.softmax(dim=-1)                                                  # [B, H, S]
    return torch.einsum("bhs,bshd->bhd", p, vf).to(q.dtype), p


def group_mean(p, n_kv_head: int):
    """[B, H, S] -> [B, S, Hkv]: the weights averaged over the query heads that share a KV head."""
    B, H, S = p.shape
    return p.view(B, n_kv_head, H // n_kv_head, S).mean(dim=2).transpose(1, 2)   # [B, Hkv, G, S] -> [B, S, Hkv]


def tova_score(old, p):
    """TOVA: a held token's score is the attention weight of the latest query."""
    return p


def h2o_score(old, p):
    """H2O: a held token's score is the attention it has received, summed over the queries."""
    return old + p


def evict_lowest_push(buf_score, buf_pos, score, pos, offered):
    """Offer one token that leaves the window to the buffer (in place), for TOVA and H2O.

    buf_score, buf_pos: [..., b] (empty slots: score -inf, pos -1); score: [...]; pos: an int or a
    0-d tensor; offered: bool [...] or a 0-d bool tensor (False: nothing leaves to the buffer now).
    The token enters when it is offered and its score is at least the lowest buffered one (an
    empty slot counts as lowest); that token leaves, the oldest among equals.
    Returns (entered bool [...], slot int64 [...]: where it went). LTE's push, without its r > 0.
    """
    entered, _, slot = lte_buffer_push(buf_score, buf_pos, score, pos, offered)
    return entered, slot


class EvictingAttention(AttentionBase):
    """Full attention decoded inside a constant budget by a heuristic policy (see above).

    Built like `Attention` (same parameters, so `load_state_dict(attention.state_dict())` gives a
    trained layer its eviction), plus the policy and the budget: sink s, window w (w + 1 keys, as
    everywhere), buffer b. There is no parallel form: the policies decide token by token, so
    forward without a state decodes from an empty state, one token at a time (eager; a reference
    for evaluation, not a fast path). `with_eviction(model, ...)` swaps it into a trained model.

    Decoding state per sequence and KV head: sink_k / sink_v [s], the window ring k / v / valid /
    score [w + 1] (token t in slot t % (w + 1)), buf_k / buf_v [b] with buf_score and buf_pos.
    """

    def __init__(self, config, policy: str, sink: int, window: int, buffer: int):
        super().__init__(config)
        check_eviction(policy, EVICTION_POLICIES, sink, window, buffer)
        self.policy, self.sink, self.window, self.buffer = policy, sink, window, buffer
        self.update_score = {"streaming": None, "tova": tova_score, "h2o": h2o_score}[policy]

    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """An empty state, of one size for any length (max_len is accepted and needs nothing)."""
        check_max_len(max_len)
        # StreamingLLM never reads a score: it keeps none (the frontier counts every tensor of a state)
        scored = self.window + 1 if self.update_score is not None else 0
        cache = self._sinks_window_buffer(batch_size, device, dtype, scored)
        return self._new_state(batch_size, device, dtype, **cache)

    def _parallel(self, x, state=None):
        """No parallel form: decode x [B, T, C] token by token, from `state` if given (it must be
        empty: forward routes later calls to `_step` itself) or from a fresh one."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        return torch.cat([self._step(x[:, t: t + 1], state) for t in range(x.shape[1])], dim=1)

    # A step is AttentionBase._step: token t - w - 1 leaves the window (`_offer` decides whether it
    # takes a buffer slot), token t enters (`_entered`), the query attends the held slots and, with
    # the weights it gives them, updates their scores (`_attend_held`).
    def _offer(self, state, j, score):
        """Token j leaves the window with its policy score [B, Hkv]: offered to the buffer unless it is
        a sink. Returns (entered, slot), [B, Hkv] each."""
        return evict_lowest_push(state["buf_score"], state["buf_pos"], score, j, j >= self.sink)

    def _entered(self, state, t, slot, k_raw, v):
        if self.update_score is not None:
            state["score"].index_fill_(1, slot, 0.0)       # a newcomer has received no attention yet

    def _attend_held(self, q, state):
        k_all, v_all, valid = self._held(state)
        o, p = attention_decode_weights(q, k_all.to(q.dtype), v_all.to(q.dtype), valid)
        if self.update_score is not None:
            self._score_held(state, group_mean(p, self.n_kv_head))
        return o

    def _score_held(self, state, p):
        """The policy's score of every window and buffer token after this query; p: [B, S, Hkv]
        over sinks, window ring and buffer, in that order."""
        s, w1 = self.sink, self.window + 1
        p_window, p_buf = p[:, s:s + w1], p[:, s + w1:].transpose(1, 2)         # [B, w+1, Hkv], [B, Hkv, b]
        state["score"].copy_(self.update_score(state["score"], p_window))
        held = state["buf_pos"] >= 0
        state["buf_score"].copy_(torch.where(held, self.update_score(state["buf_score"], p_buf), float("-inf")))

    def held_positions(self, state) -> torch.Tensor:
        """bool [B, Hkv, T] with T = the tokens decoded so far: which positions the state holds
        (sinks, window, buffer), for plots and tests."""
        T = state["length"]
        B, Hkv = state["buf_pos"].shape[:2]
        held = torch.zeros(B, Hkv, T, dtype=torch.bool, device=state["buf_pos"].device)
        held[..., :min(self.sink, T)] = True
        held[..., max(0, T - self.window - 1):] = True
        buffered = state["buf_pos"][state["buf_pos"] >= 0]
        b_idx, h_idx, _ = (state["buf_pos"] >= 0).nonzero(as_tuple=True)
        held[b_idx, h_idx, buffered] = True
        return held

    def state_size(self, T: int) -> int:
        """Numbers held per sequence after T tokens: keys and values of the tokens held (at most
        s + w + 1 + b, as LTE), and a score per window / buffer token for TOVA and H2O."""
        held = min(T, self.sink + self.window + 1 + self.buffer)
        scored = 0 if self.update_score is None else min(T, self.window + 1 + self.buffer)
        return self.n_kv_head * (held * 2 * self.head_dim + scored) + self._key_conv_size()


def with_eviction(model, policy: str, sink: int, window: int, buffer: int):
    """A copy of a trained model whose full-attention layers decode under an eviction `policy` with
    LTE's budget (sink s, window w, buffer b); the same weights, the other layers untouched.
    In eval mode its forward decodes those layers token by token (the rest stays parallel)."""
    check_eviction(policy, EVICTION_POLICIES, sink, window, buffer)
    if not any(isinstance(b.mixer, Attention) and b.mixer.window is None for b in model.blocks):
        raise ValueError(f"with_eviction needs a model with full-attention layers, got layers {model.config.layers}")
    weight = model.wte.weight
    evicting = TinyHybrid(model.config).to(weight.device, weight.dtype)
    evicting.load_state_dict(model.state_dict())
    for block in evicting.blocks:
        if isinstance(block.mixer, Attention) and block.mixer.window is None:
            layer = EvictingAttention(model.config, policy, sink, window, buffer).to(model.wte.weight.device)
            layer.load_state_dict(block.mixer.state_dict())
            block.mixer = layer
    return evicting.train(model.training)

