"""tiny-hybrid: hybrid linear / sparse attention language models, small and readable.

Implements, in plain PyTorch, the models of
    He & Garner, "Alleviating Forgetfulness of Linear Attention by Hybrid Sparse Attention and
    Contextualized Learnable Token Eviction", arXiv 2510.20787 (2025),
whose linear-attention layer is Gated DeltaNet:
    Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule", ICLR 2025.

A linear-attention layer (Gated DeltaNet) keeps a fixed K x V state per head and forgets old facts
once that state is full. Interleaving it with a mixer that can look directly at past tokens gives
recall back; the paper's proposal, learnable token eviction (LTE), does so with a state of constant
size: a sliding window plus a few tokens that a tiny CNN decided to keep.

The file reads top to bottom:
    1. ops      pure functions on [B, T, H, D] tensors: Gated DeltaNet (chunked and recurrent), one
                causal softmax attention for full / sliding-window / LTE patterns, the NSA pieces
    2. mixers   nn.Modules (B, T, C) -> (B, T, C): GatedDeltaNet, Attention, NativeSparseAttention
    3. LTE      the paper's proposal in the paper's order: the score (LTERouter), the training rule
                (mask, straight-through gradient, L1 penalty, lambda), then the inference cap and the
                constant-size decoding state (LTEAttention); then the heuristic baselines at
                LTE's memory, StreamingLLM, TOVA and H2O (EvictingAttention, with_eviction)
    4. model    Config (its defaults are the recipe that trained here; Config.paper gives the
                paper's models), presets, TinyHybrid, optimizer_groups, and Decoder: decoding
                with a static state and one captured CUDA graph per token
    5. checks   the input guards that every public entry point runs first

Dimensions
    B     batch size                     T     sequence length (time)
    C     model width (d_model)          H     query heads (GDN heads for GDN)
    Hkv   key/value heads (GQA: H % Hkv == 0; G = H // Hkv query heads share one KV head)
    D     attention head dim             K, V  key / value head dims of Gated DeltaNet
    L     chunk length of the chunked Gated DeltaNet form

The papers' symbols
    S_t      GDN state of one head: K x V here (the GDN paper's S_t is its transpose, V x K)
    alpha_t  GDN decay in (0, 1]; the code holds its log, g_t = log alpha_t <= 0
    beta_t   GDN writing strength in (0, 1)
    w        window: query i sees key j when 0 <= i - j <= w, that is w + 1 keys, itself included.
             The paper counts the keys for SWA and NSA: its SWA window 1024 is w = 1023 here and
             NSA's 512 is w = 511; its LTE window 768 already means w = 768 (769 keys).
    s        LTE sink tokens, always kept           b    LTE buffer: retained tokens per KV head
    r_j      LTE retention score of token j (per KV head), in (-1/2, 1/2): kept when r_j > 0
    R        the router's receptive field, R = 2 reach + 1 = 13 positions (reach = 6 each side)
    lambda   LTE's L1 penalty weight, one per (layer, KV head)
    phi      NSA's block compression: mean pooling here, as in the official code
    l, n     NSA block length, selected blocks per query
Settings of the paper (0.4B and 1.4B models, 24 layers, attention-type mixers on the odd ones):
s = 4, LTE w = 768, b = 512, R = 13 (three convolutions of kernel 3, dilation 2); SWA 1024 keys;
NSA l = 64, n = 16, 512 keys; GDN K = V = 128 (0.4B) or 256 (1.4B). `Config.paper(name, size)`
builds them; `Config()` is a laptop-sized model with the recipe that trained here.

The method in equations; each tag marks the lines that compute it
  Gated DeltaNet (Yang et al. 2025, the gated delta rule), per head:
    [G1] alpha_t = exp(-exp(A) softplus(W_a x_t + dt_bias)),   beta_t = sigmoid(W_b x_t)
    [G2] S_t = alpha_t S_{t-1} + k_t (beta_t (v_t - alpha_t S_{t-1}^T k_t))^T
         (the paper's S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, transposed)
    [G3] o_t = S_t^T q_t / sqrt(K)
  LTE (He & Garner 2025), per KV head:
    [L1] r_j = sigmoid(CNN([k_j; v_j] for the tokens j - reach .. j + reach)) - 1/2, k before RoPE
    [L2] training: query i sees key j iff j <= i and (i - j <= w, or j < s, or r_j > 0)
    [L3] straight-through: forward v'_j = v_j, backward dL/dr_j = <v_j, dL/dv'_j>
    [L4] loss = LM loss + an L1 penalty lambda_h relu(r_j) on the scores
    [L5] every N steps: lambda_h *= 1.5 where head h kept more than b tokens per sequence, /= 2
         where it kept fewer than 0.95 b, clamped
    [L6] inference: a token leaving the window is dropped if r_j <= 0; otherwise it enters the
         buffer of b slots, where it replaces the lowest-scored token if the buffer is full
  NSA (as the paper uses it), per query i and KV group:
    [N1] compressed keys and values: phi over blocks of l tokens, complete blocks only
    [N2] block importance: the compressed attention probabilities summed over the group's heads;
         the top n blocks (block 0 and the most recent ones forced) are attended token by token
    [N3] o_i = g_cmp o_cmp + g_slc o_slc + g_swa o_swa, gates sigmoid(W_g x_i)

Where the code differs from the paper or the authors' code, the line says so ("Differs from the
paper: ..."); README.md tables every such difference.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# "visible forever" in an LTE visibility list (see `attention`); any value >= T would do.
KEEP_FOREVER = torch.iinfo(torch.int32).max


# =============================================================================================
# 1. OPS
# =============================================================================================

# --- 1a. Gated DeltaNet ----------------------------------------------------------------------

def gated_delta_rule_recurrent(q, k, v, g, beta, scale=None, initial_state=None):
    """Gated DeltaNet, token by token (the definition; used for decoding and as the test oracle).

    q, k: [B, T, H, K] (already L2-normalised), v: [B, T, H, V], g: [B, T, H] log decay
    (g_t = log alpha_t <= 0), beta: [B, T, H] in (0, 1), initial_state: [B, H, K, V] or None (zeros).
    For every head, with state S (K x V):
        S_t = exp(g_t) S_{t-1}                                                            [G2]
        S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T        (delta rule: overwrite what k_t points at)
        o_t = scale * S_t^T q_t,   scale = K ** -0.5 by default                           [G3]
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32).
    """
    _check_gdn(q, k, v, g, beta, initial_state)
    B, T, H, K = k.shape
    scale = K ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, v.shape[3]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]                                   # [G2] decay
        k_t = k[:, t]                                                   # [B, H, K]
        u_t = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., None] * u_t[..., None, :]                      # [G2] rank-1 update
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))        # [G3]
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, v.shape[3])
    return o.to(out_dtype), S


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, chunk_size=64):
    """Gated DeltaNet, chunked (WY / UT-transform) form: the same function as the recurrent form.

    Shapes and arguments as `gated_delta_rule_recurrent`, plus chunk_size L. Inside a chunk, with
    gamma_i = g_1 + ... + g_i (decay from the chunk's start) and S_0 the state entering the chunk,
    the delta-rule updates u_i = beta_i (v_i - exp(gamma_i) S_0^T k_i - sum_{j<i} exp(gamma_i - gamma_j)
    (k_i . k_j) u_j) form a unit lower-triangular system (I + A) U = beta V - diag(beta e^gamma) K S_0.
    Solving it once per chunk (the UT transform) gives U = U' - W S_0 with
        W  = (I + A)^-1 diag(beta e^gamma) K,     U' = (I + A)^-1 diag(beta) V
    and then, with Gamma_ij = exp(gamma_i - gamma_j) for j <= i,
        O   = scale (diag(e^gamma) Q S_0 + (Q K^T * Gamma) U)                                [G3]
        S_L = e^{gamma_L} S_0 + (K * e^{gamma_L - gamma})^T U.                               [G2]
    Only step 5 runs sequentially over chunks; everything else is batched matrix algebra.
    """
    _check_gdn(q, k, v, g, beta, initial_state)
    _check_int("chunk_size", chunk_size, low=1)
    B, T, H, K = k.shape
    if T == 0:                                             # nothing to do: the state passes through
        S = k.new_zeros(B, H, K, v.shape[3], dtype=torch.float32) if initial_state is None else initial_state.float()
        return v.new_zeros(B, 0, H, v.shape[3]), S
    Vd = v.shape[3]
    L = chunk_size
    scale = K ** -0.5 if scale is None else scale
    out_dtype = v.dtype

    # Step 1: pad T up to a multiple of L. Padded tokens have k = 0 and g = 0: they neither
    # write to the state nor decay it, so the final state is untouched.
    pad = (-T) % L
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    N = (T + pad) // L

    # Step 2: split into chunks, heads first.  [B, T', H, D] -> [B, H, N, L, D]
    def chunks(x):
        return x.reshape(B, N, L, H, -1).permute(0, 3, 1, 2, 4)
    q, k, v = chunks(q) * scale, chunks(k), chunks(v)
    g, beta = chunks(g[..., None])[..., 0], chunks(beta[..., None])[..., 0]     # [B, H, N, L]

    # Step 3: decay from the chunk's start to token i, and pairwise decays Gamma_ij (j <= i).
    gamma = g.cumsum(dim=-1)                                                      # [B, H, N, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    diff = gamma[..., :, None] - gamma[..., None, :]                              # [B, H, N, L, L]
    Gamma = torch.where(causal, diff, float("-inf")).exp()       # mask before exp: no overflow

    # Step 4: the UT transform. A_ij = beta_i Gamma_ij (k_i . k_j) for j < i; solve (I + A) X = RHS.
    A = (beta[..., None] * Gamma * (k @ k.transpose(-1, -2))).tril(-1)
    I_plus_A = A + torch.eye(L, device=q.device)
    W = torch.linalg.solve_triangular(I_plus_A, (beta * gamma.exp())[..., None] * k,
                                      upper=False, unitriangular=True)           # [B, H, N, L, K]
    U_prime = torch.linalg.solve_triangular(I_plus_A, beta[..., None] * v,
                                            upper=False, unitriangular=True)     # [B, H, N, L, V]
    QK = (q @ k.transpose(-1, -2)) * Gamma                                        # [B, H, N, L, L]
    decay_to_end = (gamma[..., -1:] - gamma).exp()                                # [B, H, N, L]

    # Step 5: walk the chunks, carrying the state.
    S = q.new_zeros(B, H, K, Vd) if initial_state is None else initial_state.float()
    outputs = []
    for n in range(N):
        U = U_prime[:, :, n] - W[:, :, n] @ S                                     # [B, H, L, V]
        o = (gamma[:, :, n, :, None].exp() * q[:, :, n]) @ S + QK[:, :, n] @ U    # [G3]
        outputs.append(o)
        S = gamma[:, :, n, -1, None, None].exp() * S \
            + (k[:, :, n] * decay_to_end[:, :, n, :, None]).transpose(-1, -2) @ U  # [G2]

    # Step 6: back to [B, T, H, V], padding removed.
    o = torch.stack(outputs, dim=2)                                               # [B, H, N, L, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, Vd)[:, :T]
    return o.to(out_dtype), S


# --- 1b. One causal softmax attention: full, sliding window, LTE band-plus-columns ------------

def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hkv * groups, D]: query head h reads KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _visible_until(keep, T: int, Hkv: int, B: int, device) -> torch.Tensor | None:
    """Normalise `keep` to int64 [B, T, Hkv]: the last query index that may see key j
    (outside the window). None stays None."""
    if keep is None:
        return None
    _check_keep(keep, B, T, Hkv)
    if keep.dtype == torch.bool:
        return torch.where(keep, KEEP_FOREVER, -1).to(device=device, dtype=torch.int64)
    return keep.to(device=device, dtype=torch.int64)


def attention_mask(T: int, window=None, keep=None, B: int = 1, Hkv: int = 1, device=None,
                   T_k: int | None = None, offset: int = 0) -> torch.Tensor:
    """Which keys each query sees: bool [B, Hkv, T, T_k].

    Query i (absolute position offset + i) sees key j when j <= i and (window is None, or
    i - j <= window, or i <= visible_until[j]). `keep` is bool [B, T_k, Hkv] (True: kept forever)
    or integer [B, T_k, Hkv] (the last query position that sees key j beyond the window; -1: never).
    With LTE's training keep (r_j > 0 or a sink) this is the paper's boolean rule [L2].
    """
    T_k = T if T_k is None else T_k
    i = torch.arange(offset, offset + T, device=device)[:, None]
    j = torch.arange(T_k, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        in_band = (i - j) <= window
        until = _visible_until(keep, T_k, Hkv, B, device)
        if until is not None:
            kept = i[None, None] <= until.permute(0, 2, 1)[:, :, None, :]          # [B, Hkv, T, T_k]
            in_band = in_band | kept
        allowed = allowed & in_band
    return allowed.expand(B, Hkv, T, T_k)


def attention(q, k, v, window=None, keep=None, scale=None):
    """Causal softmax attention for full attention, SWA and LTE's A-plus-column pattern.

    q: [B, T, H, D], k, v: [B, T, Hkv, D] (GQA: query head h reads KV head h // (H / Hkv)).
    window: None (full causal) or w >= 0: query i sees key j when 0 <= i - j <= w.
    keep (only with a window): per key and KV head, which keys stay visible beyond the window,
        bool [B, T, Hkv]      True: kept forever (LTE in training, the paper's rule [L2]),
        int  [B, T, Hkv]      the last query index that sees key j (LTE with its capped buffer [L6]:
                              visible until a higher-scored token pushes it out); -1 or any value
                              below j + w + 1 means "the window only".
        o_i = sum_j softmax_j(scale q_i . k_j | j visible to i) v_j,  scale = D ** -0.5 by default.
    Returns o [B, T, H, D] in q's dtype; the math is float32 on a dense mask (a reference, O(T^2)).
    """
    _check_attention(q, k, v, window, keep)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    allowed = attention_mask(T, window, keep, B, Hkv, q.device)                   # [B, Hkv, T, T]
    allowed = allowed.repeat_interleave(H // Hkv, dim=1)                          # [B, H, T, T]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, _repeat_kv(k, H // Hkv), _repeat_kv(v, H // Hkv)))
    scores = (qf @ kf.transpose(-1, -2)) * scale                                  # [B, H, T, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = scores.softmax(dim=-1) @ vf                                               # [B, H, T, D]
    return o.transpose(1, 2).to(q.dtype)


def attention_decode(q, k_cache, v_cache, valid=None, scale=None):
    """One new query per sequence against a cache of key/value slots (the decoding step).

    q: [B, H, D]; k_cache, v_cache: [B, S, Hkv, D]; valid: bool [B, S, Hkv] (which slots hold a
    token this query may see; None: all). Slot order does not matter: the cache of SWA / LTE is a
    ring buffer plus sinks plus retained tokens, the one of full attention grows.
        o = sum_s softmax_s(scale q . k_s | valid_s) v_s
    Returns o [B, H, D] in q's dtype.
    """
    return attention_decode_weights(q, k_cache, v_cache, valid, scale)[0]


def attention_decode_weights(q, k_cache, v_cache, valid=None, scale=None):
    """`attention_decode` with its attention weights: (o [B, H, D], p [B, H, S]), p =
    softmax_s(scale q . k_s | valid_s), zero on invalid slots (the heuristic eviction policies of
    section 3e score the held tokens by them)."""
    _check_decode(q, k_cache, v_cache, valid)
    B, H, D = q.shape
    G = H // k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kf, vf = _repeat_kv(k_cache, G).float(), _repeat_kv(v_cache, G).float()    # [B, S, H, D]
    scores = torch.einsum("bhd,bshd->bhs", q.float(), kf) * scale              # [B, H, S]
    if valid is not None:
        scores = scores.masked_fill(~_repeat_kv(valid[..., None], G)[..., 0].transpose(1, 2), float("-inf"))
    p = scores.softmax(dim=-1)                                                  # [B, H, S]
    return torch.einsum("bhs,bshd->bhd", p, vf).to(q.dtype), p


# --- 1c. Native Sparse Attention pieces -------------------------------------------------------

def nsa_compress(x, block: int):
    """phi [N1]: mean-pool complete blocks of l tokens: [B, T, Hkv, D] -> [B, T // l, Hkv, D].

    The trailing incomplete block is left out: no query may read a summary of tokens it has not
    seen, and a block is complete only once its last token exists."""
    _check_tensor("x", x, 4)
    _check_int("block", block, low=1)
    B, T, Hkv, D = x.shape
    n = T // block
    # Differs from the original NSA (not from the paper's code): NSA compresses a block with a
    # learned MLP over its tokens and their positions in the block, keys and values apart; the
    # paper's code, like this one, mean-pools keys and values alike.
    return x[:, : n * block].reshape(B, n, block, Hkv, D).mean(dim=2)          # [B, n, Hkv, D]


def _complete_blocks_mask(q_pos: torch.Tensor, n_blocks: int, block: int) -> torch.Tensor:
    """bool [Tq, Nc]: block n is complete for the query at position p when (n + 1) l - 1 <= p."""
    last_token = (torch.arange(n_blocks, device=q_pos.device) + 1) * block - 1
    return last_token[None, :] <= q_pos[:, None]


def nsa_compressed_attention(q, k_cmp, v_cmp, block: int, scale=None, offset=0):
    """Compressed branch [N1]: attention over mean-pooled blocks, complete blocks only.

    q: [B, T, H, D] at positions offset .. offset + T - 1 (offset: an int or a 0-d integer tensor);
    k_cmp, v_cmp: [B, Nc, Hkv, D]; blocks that are not complete for a query are never read.
    Returns (o [B, T, H, D], lse [B, T, H] float32). A query with no complete block yet gets
    o = 0 and lse = -inf (there is nothing to attend to).
    """
    B, T, H, D = q.shape
    Hkv = k_cmp.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q_pos = offset + torch.arange(T, device=q.device)                           # offset: int or 0-d tensor
    visible = _complete_blocks_mask(q_pos, k_cmp.shape[1], block)               # [T, Nc]
    kf = _repeat_kv(k_cmp, H // Hkv).float()                                    # [B, Nc, H, D]
    vf = _repeat_kv(v_cmp, H // Hkv).float()
    scores = torch.einsum("bthd,bnhd->bhtn", q.float(), kf) * scale             # [B, H, T, Nc]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)                                              # [B, H, T]
    p = (scores - lse[..., None]).exp().nan_to_num(0.0)                         # rows with no block: 0
    o = torch.einsum("bhtn,bnhd->bthd", p, vf)
    return o.to(q.dtype), lse.transpose(1, 2)


def nsa_block_scores(q, k_cmp, lse, block: int, scale=None, offset=0):
    """Importance of each compressed block for each query [N2]: the compressed attention
    probabilities p_{i,n} = exp(scale q_i . kc_n - lse_i), summed over the query heads of a KV group.

    q: [B, T, H, D], k_cmp: [B, Nc, Hkv, D], lse: [B, T, H]. Returns [B, T, Hkv, Nc] float32
    (0 for blocks that are not complete yet). No gradient: selection is a hard choice."""
    B, T, H, D = q.shape
    Hkv = k_cmp.shape[2]
    scale = D ** -0.5 if scale is None else scale
    with torch.no_grad():
        q_pos = offset + torch.arange(T, device=q.device)                       # offset: int or 0-d tensor
        visible = _complete_blocks_mask(q_pos, k_cmp.shape[1], block)           # [T, Nc]
        kf = _repeat_kv(k_cmp, H // Hkv).float()
        logits = torch.einsum("bthd,bnhd->bthn", q.float(), kf) * scale         # [B, T, H, Nc]
        p = (logits - lse.float()[..., None]).exp().masked_fill(~visible[:, None], 0.0)
        return p.reshape(B, T, Hkv, H // Hkv, -1).sum(dim=3)                    # [B, T, Hkv, G, Nc] -> [B, T, Hkv, Nc]


def nsa_select_blocks(scores, block: int, top_n: int, n_recent: int = 2, n_blocks: int | None = None,
                      offset=0):
    """Top-n block selection per query and KV head, with forced blocks [N2].

    scores: [B, T, Hkv, Nc] from `nsa_block_scores`. Candidates for the query at position p are the
    blocks that have started (n l <= p). Forced, whatever their score: block 0 and the n_recent most
    recent blocks (the one holding p and those just before it). Ranking: score descending, ties to
    the lower block index (a stable sort), so the choice is reproducible.
    n_blocks: blocks that can exist (default ceil((offset + T) / l); give it when offset is a
    0-d device tensor, as a decoding step does, so that the shapes do not depend on its value).
    Returns int64 [B, T, Hkv, top_n]: block indices, -1 where fewer than top_n candidates exist.
    """
    _check_nsa_selection(top_n, n_recent)
    B, T, Hkv, Nc = scores.shape
    q_pos = offset + torch.arange(T, device=scores.device)
    n_blocks = -(-(offset + T) // block) if n_blocks is None else n_blocks
    rank = F.pad(scores.float(), (0, n_blocks - Nc))                            # [B, T, Hkv, Ns]
    blk = torch.arange(n_blocks, device=scores.device)
    current = (q_pos // block)[:, None]                                         # [T, 1]
    started = blk[None, :] * block <= q_pos[:, None]                            # [T, Ns]
    forced = (blk[None, :] == 0) | ((current - blk[None, :] >= 0) & (current - blk[None, :] < n_recent))
    # Differs from the paper's code in form only: forced blocks rank at +inf here; there each head
    # gives them probability 1.0 (G after the sum over the group), which no other block can beat.
    rank = rank.masked_fill(forced[:, None], float("inf")).masked_fill(~started[:, None], float("-inf"))
    order = rank.sort(dim=-1, descending=True, stable=True)
    idx = order.indices[..., :top_n]
    idx = idx.masked_fill(order.values[..., :top_n] == float("-inf"), -1)
    return F.pad(idx, (0, top_n - idx.shape[-1]), value=-1)


def nsa_selected_attention(q, k, v, block_idx, block: int, scale=None):
    """Selected branch [N2]: token-level causal attention over the selected blocks.

    q: [B, T, H, D], k, v: [B, T, Hkv, D], block_idx: int [B, T, Hkv, n] (-1: no block). Query i
    sees key j when block j // l is selected for (i, its KV head) and j <= i (so the block holding
    i is read causally). Returns o [B, T, H, D]."""
    _check_gqa(q, k, v)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    key_block = torch.arange(T, device=q.device) // block                      # [T]
    chosen = (block_idx[..., None] == key_block).any(dim=-2)                    # [B, T, Hkv, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    allowed = (chosen & causal[None, :, None, :]).permute(0, 2, 1, 3)           # [B, Hkv, T, T]
    allowed = allowed.repeat_interleave(H // Hkv, dim=1)                        # [B, H, T, T]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, _repeat_kv(k, H // Hkv), _repeat_kv(v, H // Hkv)))
    scores = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ vf).transpose(1, 2).to(q.dtype)


def nsa_combine(gates, o_cmp, o_slc, o_swa):
    """The gated sum of the three branches [N3]: o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa.

    gates: [B, T, H, 3] in (0, 1) (sigmoid of a linear map of x); branch outputs [B, T, H, D]."""
    g = gates.to(o_cmp.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_swa


# =============================================================================================
# 2. MIXERS: (B, T, C) -> (B, T, C), each built from a Config
# =============================================================================================

class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rotary(x, offset=0, base: float = 10000.0):
    """RoPE on [B, T, H, D] at positions offset .. offset + T - 1 (rotate-half form, float32 math).
    offset: an int, or a 0-d integer tensor on x's device (a decoding step reads its position there)."""
    B, T, H, D = x.shape
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)   # [D/2]
    positions = offset + torch.arange(T, device=x.device)                       # [T], exact in float32 below 2^24
    angle = positions.float()[:, None] * inv_freq
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]                       # [T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


_warned_missing_kernels: set[str] = set()


def _op(config, reference):
    """The op a mixer calls: `reference` itself, or its Triton twin of the same name in kernels.py
    when config.use_triton. Mixers write `_op(self.config, attention)(q, k, v, ...)`, naming the
    reference function, so an editor's "go to definition" leads to the maths.

    kernels.py is imported only when asked for, so this file needs nothing but torch."""
    if not config.use_triton:
        return reference
    try:
        import kernels
    except ImportError as e:
        raise ImportError(f"Config.use_triton=True needs kernels.py and Triton (Linux only): {e}") from e
    name = reference.__name__
    if not hasattr(kernels, name):
        if name not in _warned_missing_kernels:
            _warned_missing_kernels.add(name)
            print(f"tiny_hybrid: kernels.py has no {name} yet, using the PyTorch reference")
        return reference
    return getattr(kernels, name)


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over time (kernel 4 in GDN): y_t = sum_i w_i x_{t-i}."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x, cache=None):
        """x: [B, T, C]; cache: [B, kernel - 1, C] inputs before x (None: zeros).
        Returns (y [B, T, C], new cache [B, kernel - 1, C])."""
        B, T, C = x.shape
        past = x.new_zeros(B, self.kernel_size - 1, C) if cache is None else cache.to(x.dtype)
        xp = torch.cat([past, x], dim=1)                                        # [B, k - 1 + T, C]
        if T == 1:  # a decoding step: the sum written out, which torch.compile fuses (no conv launch)
            y = (xp * self.weight[:, 0].t().to(x.dtype)).sum(dim=1, keepdim=True)   # [B, k, C] * [k, C] -> [B, 1, C]
        else:
            y = F.conv1d(xp.transpose(1, 2), self.weight.to(x.dtype), groups=C).transpose(1, 2)  # [B, C, T] -> [B, T, C]
        return y, xp[:, xp.shape[1] - (self.kernel_size - 1):]


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (Yang et al., ICLR 2025): the linear-attention layer of the hybrids.

    x -> q, k, v (each: linear, short causal conv, SiLU); q, k L2-normalised per head;
    beta = sigmoid(W_b x); g = log alpha = -exp(A_log) softplus(W_a x + dt_bias) <= 0       [G1]
    o = gated_delta_rule(q, k, v, g, beta); o = RMSNorm(o) * SiLU(W_gate x) per head; out = W_o o.
    W_q, W_k, W_v, W_b, W_a and W_gate live stacked in one Linear, `in_proj`; W_o is `o_proj`.
    State per sequence: H x K x V numbers plus the conv tails, whatever the length.
    Reads from the config: d_model, gdn_heads, gdn_head_dim, gdn_value_dim, gdn_conv_size,
    gdn_chunk_size, use_triton.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        C, H, K, V = config.d_model, config.gdn_heads, config.gdn_head_dim, config.gdn_value_dim
        self.n_head, self.head_dim, self.value_dim = H, K, V
        # W_q, W_k, W_v, W_b (beta), W_a (alpha) and W_gate stacked by rows into one matrix: the
        # same maths as six separate projections, one launch instead of six. _mix splits the output.
        self.in_split = (H * K, H * K, H * V, H, H, H * V)                     # q, k, v, beta, alpha, gate
        self.in_proj = nn.Linear(C, sum(self.in_split), bias=False)
        self.q_conv, self.k_conv = (ShortConv(H * K, config.gdn_conv_size) for _ in range(2))
        self.v_conv = ShortConv(H * V, config.gdn_conv_size)
        self.o_norm = RMSNorm(V)
        self.o_proj = nn.Linear(H * V, C, bias=False)
        # Decay rates spread over heads (as in Mamba-2 / GDN): A in [1, 16], dt in [1e-3, 1e-1].
        # Differs from the paper's code: it draws A from U(0, 16) (A near 0: heads that barely decay).
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))   # GDN's Delta t
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))          # softplus^-1(dt)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """Empty decoding state: S [B, H, K, V] (float32) and the three conv tails, of one size for
        any length (max_len is accepted like every mixer's, and needs nothing here), plus the
        counters every mixer's state holds: pos, the next token's position as a 0-d tensor on the
        device (a captured step advances it there), and length, the same count on the host."""
        H, K, V = self.n_head, self.head_dim, self.value_dim
        tail = lambda C: torch.zeros(batch_size, self.config.gdn_conv_size - 1, C, device=device, dtype=dtype)
        return {"S": torch.zeros(batch_size, H, K, V, device=device),
                "q_conv": tail(H * K), "k_conv": tail(H * K), "v_conv": tail(H * V),
                "pos": torch.zeros((), dtype=torch.long, device=device), "length": 0}

    def reset_state(self, state: dict) -> None:
        """Back to the empty state, in place: a captured step keeps reading these very tensors."""
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
        state["length"] = 0

    def forward(self, x, state: dict | None = None):
        _check_mixer_input(x, self.config.d_model)
        out = self._mix(x, state)
        if state is not None:
            state["length"] += x.shape[1]                  # host bookkeeping, outside what a graph captures
        return out

    def step(self, x, state: dict):
        """One token, x [B, 1, C], through the state, device work only (what a CUDA graph
        captures): forward's maths, without the host-side length, which the caller counts."""
        _check_mixer_input(x, self.config.d_model)
        return self._mix(x, state)

    def _mix(self, x, state):
        B, T, _ = x.shape
        H, V = self.n_head, self.value_dim
        # [B, T, C] -> q, k [B, T, H K], v [B, T, H V], beta, alpha [B, T, H], gate [B, T, H V]
        q, k, v, b, a, gate = self.in_proj(x).split(self.in_split, dim=-1)
        heads, tails = {}, {}
        for name, y, conv in (("q", q, self.q_conv), ("k", k, self.k_conv), ("v", v, self.v_conv)):
            y, tails[name] = conv(y, None if state is None else state[f"{name}_conv"])
            heads[name] = F.silu(y).view(B, T, H, -1)                           # [B, T, C'] -> [B, T, H, K or V]
        q = F.normalize(heads["q"].float(), dim=-1).to(x.dtype)
        k = F.normalize(heads["k"].float(), dim=-1).to(x.dtype)
        v = heads["v"]
        beta = torch.sigmoid(b.float())                                         # [G1] [B, T, H]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)    # [G1] log alpha
        if state is None:
            o, _ = _op(self.config, gated_delta_rule)(q, k, v, g, beta, chunk_size=self.config.gdn_chunk_size)
        else:
            o = self._decode(q, k, v, g, beta, state)
            for name in ("q", "k", "v"):                   # in place, as every write to a state
                state[f"{name}_conv"].copy_(tails[name])
            state["pos"].add_(T)
        o = self.o_norm(o) * F.silu(gate.view(B, T, H, V))                     # [B, T, H V] -> [B, T, H, V]
        return self.o_proj(o.reshape(B, T, H * V))                              # [B, T, H, V] -> [B, T, C']

    def _decode(self, q, k, v, g, beta, state):
        """Continue from state["S"]: the recurrent form for one token, the chunked form for a prompt."""
        if q.shape[1] == 1:
            o, S = _op(self.config, gated_delta_rule_recurrent)(q, k, v, g, beta, initial_state=state["S"])
        else:
            o, S = _op(self.config, gated_delta_rule)(q, k, v, g, beta, initial_state=state["S"],
                                                      chunk_size=self.config.gdn_chunk_size)
        state["S"].copy_(S)
        return o

    def state_size(self, T: int) -> int:
        """Numbers held per sequence while decoding, for any T."""
        H, K, V = self.n_head, self.head_dim, self.value_dim
        return H * K * V + (self.config.gdn_conv_size - 1) * H * (2 * K + V)


class _AttentionBase(nn.Module):
    """Projections, RoPE and decoding plumbing shared by the attention-type mixers.

    Optional key shift (`Config.key_conv = c > 0`, not in the paper): k = W_k x + ShortConv_c(W_k x),
    so a key can carry the tokens just before it. Associative recall needs "the token after key K":
    with the shift one attention layer finds it; without it, the model first has to grow a
    previous-token head in another layer, which a tiny model on a CPU budget does not manage
    (the README's training section has the numbers). GDN's own short convs play the same role.

    Decoding (`forward(x, state)`): a prompt into an empty state runs the parallel form and then
    fills the state; anything after that goes one token at a time through `_step`, which reads the
    position from the device and writes the state in place, with shapes that never depend on the
    position: the very step that `step` offers a CUDA graph to capture (see `Decoder`).
    Reads from the config: d_model, n_head, n_kv_head, head_dim, key_conv, rope_base, use_triton."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C, H, Hkv, D = config.d_model, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, D
        # W_q, W_k and W_v stacked by rows into one matrix: the same maths as three projections,
        # one launch instead of three. _qkv splits the output (k: Hkv heads only, GQA).
        self.qkv_split = (H * D, Hkv * D, Hkv * D)                             # q, k, v
        self.qkv_proj = nn.Linear(C, sum(self.qkv_split), bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        # Differs from the paper (an addition, off by default): the key shift described above.
        self.k_conv = ShortConv(Hkv * D, config.key_conv) if config.key_conv else None

    def _key_conv_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        """The key shift's decoding state: the last key_conv - 1 key projections (none without it)."""
        if self.k_conv is None:
            return {}
        return {"k_conv": torch.zeros(batch_size, self.config.key_conv - 1, self.n_kv_head * self.head_dim,
                                      device=device, dtype=dtype)}

    def _key_conv_size(self) -> int:
        return 0 if self.k_conv is None else (self.config.key_conv - 1) * self.n_kv_head * self.head_dim

    @staticmethod
    def _counters(device=None) -> dict:
        """pos: the next token's position as a 0-d tensor on the device, which a step reads and
        advances there (so that a captured step can be replayed); length: the same count on the
        host, which forward reads to choose between prefill and steps, and to check for room."""
        return {"pos": torch.zeros((), dtype=torch.long, device=device), "length": 0}

    def reset_state(self, state: dict) -> None:
        """Back to the empty state, in place: a captured step keeps reading these very tensors."""
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
        state["length"] = 0

    def _qkv(self, x, offset=0, state: dict | None = None):
        """x [B, T, C] -> q [B, T, H, D], k and v [B, T, Hkv, D], and k before RoPE, at positions
        offset .. offset + T - 1 (an int, or a 0-d tensor on the device while decoding). With a
        decoding state, the key shift continues from (and updates, in place) its conv tail."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)               # [B, T, H D], 2 x [B, T, Hkv D]
        if self.k_conv is not None:
            shifted, tail = self.k_conv(k, None if state is None else state["k_conv"])
            k = k + shifted
            if state is not None:
                state["k_conv"].copy_(tail)
        q = q.view(B, T, self.n_head, self.head_dim)                            # [B, T, H * D] -> [B, T, H, D]
        k = k.view(B, T, self.n_kv_head, self.head_dim)                         # [B, T, Hkv * D] -> [B, T, Hkv, D]
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        base = self.config.rope_base
        return rotary(q, offset, base), rotary(k, offset, base), v, k

    def forward(self, x, state: dict | None = None):
        _check_mixer_input(x, self.config.d_model)
        B, T, _ = x.shape
        if state is None:
            o = self._parallel(x)
        else:
            self._check_room(state, T)
            self._make_room(state, T)
            if state["length"] == 0:                       # a prompt into an empty state: in parallel
                o = self._parallel(x, state)
                state["pos"].fill_(T)
            else:
                o = torch.cat([self._step(x[:, t: t + 1], state) for t in range(T)], dim=1)
            state["length"] += T                           # host bookkeeping, outside what a graph captures
        return self.o_proj(o.reshape(B, T, -1))                                 # [B, T, H, D] -> [B, T, H * D]

    def step(self, x, state: dict):
        """One token, x [B, 1, C], through the state: `_step`, device work only, which is what a
        CUDA graph captures. The caller counts the host-side length (forward does it for itself)."""
        _check_mixer_input(x, self.config.d_model)
        if x.shape[1] != 1:
            raise ValueError(f"step takes one token: x must be [B, 1, C], got shape {tuple(x.shape)}")
        return self.o_proj(self._step(x, state).flatten(2))                     # [B, 1, H, D] -> [B, 1, H * D]

    @staticmethod
    def _check_room(state: dict, T: int) -> None:
        """A cache preallocated to max_len (full attention, NSA) refuses what would not fit."""
        max_len = state.get("max_len")
        if max_len is not None and state["length"] + T > max_len:
            raise ValueError(f"the decoding state holds at most max_len = {max_len} tokens (set by init_state); "
                             f"it holds {state['length']} and x brings {T} more")

    def _make_room(self, state: dict, T: int) -> None:
        """Grow a cache made without max_len so that T more tokens fit (the mixers that have one)."""

    @staticmethod
    def _grown(cache: torch.Tensor, slots: int) -> torch.Tensor:
        """cache [B, S, ...] copied into a zeroed [B, slots, ...] (eager decoding without max_len)."""
        bigger = cache.new_zeros(cache.shape[0], slots, *cache.shape[2:])
        bigger[:, :cache.shape[1]] = cache
        return bigger

    @staticmethod
    def _check_max_len(max_len) -> None:
        if max_len is not None and (not _is_int(max_len) or max_len < 1):
            raise ValueError(f"max_len must be None (a cache that grows) or an int >= 1, got {max_len!r}")


class Attention(_AttentionBase):
    """Softmax attention with RoPE and GQA: full (window=None) or sliding window (the last w + 1 tokens).

    Decoding state: a ring buffer of w + 1 slots (SWA), or a cache of max_len slots (full; without
    max_len it grows as needed, which only eager decoding can do). Token t goes to slot t % (w + 1)
    or slot t, and `valid` marks the slots that hold a token."""

    def __init__(self, config, window: int | None = None):
        super().__init__(config)
        _check_window(window)
        # Differs from the paper in counting only: its SWA window of 1024 keys is window = 1023 here.
        self.window = window

    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """An empty state. max_len: the most tokens it will take; full attention preallocates that
        many slots (None: it starts empty and grows). A window needs w + 1 slots whatever the length."""
        self._check_max_len(max_len)
        full = self.window is None
        slots = (max_len or 0) if full else self.window + 1
        shape = (batch_size, slots, self.n_kv_head, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype),
                "valid": torch.zeros(shape[:3], dtype=torch.bool, device=device),
                **self._key_conv_state(batch_size, device, dtype), **self._counters(device),
                **({"max_len": max_len} if full else {})}

    def _make_room(self, state, T: int):
        if self.window is not None or state["max_len"] is not None:
            return
        need, slots = state["length"] + T, state["k"].shape[1]
        if need > slots:                                   # double, so that growing costs O(1) a token
            for name in ("k", "v", "valid"):
                state[name] = self._grown(state[name], max(need, 2 * slots))

    def _parallel(self, x, state=None):
        q, k, v, _ = self._qkv(x, state=state)
        o = _op(self.config, attention)(q, k, v, window=self.window)
        if state is not None:
            self._store(state, k, v)
        return o

    def _store(self, state, k, v):
        """After a parallel prefill: keys/values of positions 0 .. T - 1 into the cache."""
        T = k.shape[1]
        if self.window is None:
            state["k"][:, :T], state["v"][:, :T] = k.to(state["k"].dtype), v.to(state["v"].dtype)
            state["valid"][:, :T] = True
            return
        slots = self.window + 1
        keep_from = max(0, T - slots)                      # older tokens would be overwritten anyway
        ring = torch.arange(keep_from, T, device=k.device) % slots
        state["k"][:, ring] = k[:, keep_from:].to(state["k"].dtype)
        state["v"][:, ring] = v[:, keep_from:].to(state["v"].dtype)
        state["valid"][:, ring] = True

    def _step(self, x, state):
        t = state["pos"]                                   # 0-d, on the device
        q, k, v, _ = self._qkv(x, t, state)
        slot = (t if self.window is None else t % (self.window + 1)).view(1)   # [1]
        state["k"].index_copy_(1, slot, k.to(state["k"].dtype))
        state["v"].index_copy_(1, slot, v.to(state["v"].dtype))
        state["valid"].index_fill_(1, slot, True)
        o = _op(self.config, attention_decode)(q[:, 0], state["k"].to(q.dtype), state["v"].to(q.dtype),
                                               state["valid"])
        t.add_(1)                                          # last: t is the state's own tensor
        return o[:, None]

    def state_size(self, T: int) -> int:
        held = T if self.window is None else min(T, self.window + 1)
        return 2 * held * self.n_kv_head * self.head_dim + self._key_conv_size()


class NativeSparseAttention(_AttentionBase):
    """NSA as the paper uses it: three branches on the same roped q, k, v, mixed per query head by
    sigmoid gates, o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa                                [N3]
      1. compressed: attention over mean-pooled blocks of l tokens (complete blocks only);     [N1]
      2. selected: the compressed probabilities summed over a KV group rank the blocks; the top n
         (block 0 and the most recent ones forced) are attended token by token, causally;      [N2]
      3. sliding window: the last w + 1 tokens (w = nsa_window, or the shared `window` when None;
         the paper's NSA window of 512 keys is w = 511 here).
    Decoding state: the KV cache, max_len slots rounded up to whole blocks (without max_len it grows
    as needed, eager decoding only), and one compressed slot per block. A step writes token t into
    slot t and pools its block again into slot t // l; a query reads only complete blocks, so a
    block counts once its last token has arrived.
    Reads from the config, besides _AttentionBase's: nsa_block, nsa_topn, nsa_recent, nsa_window,
    window.
    """

    def __init__(self, config):
        super().__init__(config)
        self.block, self.top_n, self.n_recent = config.nsa_block, config.nsa_topn, config.nsa_recent
        # Differs from the paper in counting only: its NSA window of 512 keys is nsa_window = 511 here.
        self.window = config.nsa_window if config.nsa_window is not None else config.window
        # Differs from the paper's code: the gate projection has a bias (initialised to 0).
        self.gate_proj = nn.Linear(config.d_model, 3 * config.n_head)

    def _gates(self, x):
        B, T, _ = x.shape
        return torch.sigmoid(self.gate_proj(x).float()).view(B, T, self.n_head, 3)   # [B, T, H * 3] -> [B, T, H, 3]

    def _parallel(self, x, state=None):
        q, k, v, _ = self._qkv(x, state=state)
        l, config = self.block, self.config
        k_cmp, v_cmp = nsa_compress(k, l), nsa_compress(v, l)                          # [N1]
        o_cmp, lse = _op(config, nsa_compressed_attention)(q, k_cmp, v_cmp, l)         # [N1]
        scores = _op(config, nsa_block_scores)(q, k_cmp, lse, l)                       # [N2]
        block_idx = nsa_select_blocks(scores, l, self.top_n, self.n_recent)            # [N2]
        o_slc = _op(config, nsa_selected_attention)(q, k, v, block_idx, l)             # [N2]
        o_swa = _op(config, attention)(q, k, v, window=self.window)
        if state is not None:
            T, n = k.shape[1], k_cmp.shape[1]
            for name, new, filled in (("k", k, T), ("v", v, T), ("k_cmp", k_cmp, n), ("v_cmp", v_cmp, n)):
                state[name][:, :filled] = new.to(state[name].dtype)
        return nsa_combine(self._gates(x), o_cmp, o_slc, o_swa)                        # [N3]

    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """An empty state: max_len slots rounded up to whole blocks (None: none yet, they grow)."""
        self._check_max_len(max_len)
        l = self.block
        slots = -(-(max_len or 0) // l) * l
        zeros = lambda n: torch.zeros(batch_size, n, self.n_kv_head, self.head_dim, device=device, dtype=dtype)
        return {"k": zeros(slots), "v": zeros(slots), "k_cmp": zeros(slots // l), "v_cmp": zeros(slots // l),
                **self._key_conv_state(batch_size, device, dtype), **self._counters(device), "max_len": max_len}

    def _make_room(self, state, T: int):
        if state["max_len"] is not None:
            return
        l, need, slots = self.block, state["length"] + T, state["k"].shape[1]
        if need > slots:                                   # double, in whole blocks
            slots = -(-max(need, 2 * slots) // l) * l
            for name in ("k", "v"):
                state[name] = self._grown(state[name], slots)
            for name in ("k_cmp", "v_cmp"):
                state[name] = self._grown(state[name], slots // l)

    def _step(self, x, state):
        t, l = state["pos"], self.block                    # t: 0-d, on the device
        q, k, v, _ = self._qkv(x, t, state)
        self._append(state, k, v, t)
        K, V, Kc, Vc = (state[n].to(q.dtype) for n in ("k", "v", "k_cmp", "v_cmp"))
        o_cmp, lse = _op(self.config, nsa_compressed_attention)(q, Kc, Vc, l, offset=t)  # [N1]
        scores = _op(self.config, nsa_block_scores)(q, Kc, lse, l, offset=t)             # [N2]
        block_idx = nsa_select_blocks(scores, l, self.top_n, self.n_recent, n_blocks=Kc.shape[1],
                                      offset=t)[:, 0]                                   # [B, Hkv, n]
        o_slc = self._selected_step(q[:, 0], K, V, block_idx, t)
        o_swa = self._window_step(q[:, 0], K, V, t)
        t.add_(1)                                          # last: t is the state's own tensor
        return nsa_combine(self._gates(x), o_cmp, o_slc[:, None], o_swa[:, None])       # [N3]

    def _append(self, state, k, v, t):
        """Token t into slot t, and the mean of its block (t // l) into that block's compressed slot,
        every step: the block's slot is only read once the block is complete, and by then it holds
        the mean of its l tokens [N1]."""
        l = self.block
        block = t // l
        tokens = block * l + torch.arange(l, device=k.device)                   # [l] the block's slots
        for name, new in (("k", k), ("v", v)):
            cache = state[name]
            cache.index_copy_(1, t.view(1), new.to(cache.dtype))
            pooled = cache.index_select(1, tokens).mean(dim=1, keepdim=True)    # [B, 1, Hkv, D]
            state[name + "_cmp"].index_copy_(1, block.view(1), pooled)

    def _selected_step(self, q, k, v, block_idx, t):
        """One query at position t over its selected blocks: gather n l tokens, never the whole cache.
        With use_triton this runs as kernels.attention_decode (split-K over the gathered slots)."""
        B, P, Hkv, D = k.shape
        l = self.block
        tok = (block_idx[..., None] * l + torch.arange(l, device=q.device)).flatten(2)   # [B, Hkv, n * l]
        valid = (block_idx[..., None] >= 0).expand(-1, -1, -1, l).flatten(2) & (tok <= t)
        idx = tok.clamp(0, P - 1).transpose(1, 2)[..., None].expand(-1, -1, -1, D)      # [B, n * l, Hkv, D]
        return _op(self.config, attention_decode)(q, k.gather(1, idx), v.gather(1, idx), valid.transpose(1, 2))

    def _window_step(self, q, k, v, t):
        """The window branch for one query at position t: the w + 1 slots t - w .. t, those before
        position 0 masked, gathered from the cache."""
        B, _, Hkv, _ = k.shape
        positions = t - self.window + torch.arange(self.window + 1, device=q.device)   # [w + 1]
        valid = (positions >= 0)[None, :, None].expand(B, -1, Hkv)                    # [B, w + 1, Hkv]
        recent = positions.clamp(min=0)
        return _op(self.config, attention_decode)(q, k.index_select(1, recent), v.index_select(1, recent), valid)

    def state_size(self, T: int) -> int:
        return 2 * (T + T // self.block) * self.n_kv_head * self.head_dim + self._key_conv_size()


# =============================================================================================
# 3. LTE: LEARNABLE TOKEN EVICTION, in the paper's order
# =============================================================================================
#
# Sliding-window attention (window w) plus s sink tokens plus the older tokens that a small CNN
# chose to keep, per KV head:
#   3a. the score r_j of every token, from a CNN over its neighbourhood, past and future      [L1]
#   3b. training: the paper's boolean rule, keep every token with r_j > 0 [L2]; a
#       straight-through gradient for that hard choice [L3]; an L1 penalty on the scores [L4];
#       the controller of the penalty's weight lambda [L5]
#   3c. inference: at most b retained tokens per head, by a streaming rule [L6], and the same
#       rule computed in parallel over a whole sequence (eval forward and prefill)
#   3d. the mixer LTEAttention, with its decoding state of constant size

# --- 3a. The score ----------------------------------------------------------------------------

def lte_reach(kernel_sizes, dilations) -> int:
    """How far a score reads on each side: the sum of d (k - 1) / 2 over the router's convolutions,
    6 for the paper's three layers of kernel 3 and dilation 2. The receptive field spans
    R = 2 reach + 1 = 13 positions, but with dilation 2 in every layer a score reads only the even
    offsets -6, -4, ..., 6 (7 tokens). Decoding can score token j once token j + reach exists."""
    return sum(d * (k - 1) // 2 for k, d in zip(kernel_sizes, dilations))


class LTERouter(nn.Module):
    """The retention scorer [L1]: one small CNN per KV head over (k before RoPE, v).

    Grouped 1-D convolutions (groups = Hkv, so heads never mix), 'same' padding, channels halving
    each layer, SiLU and dropout, then a 1x1 projection to one number per token and head:
        r_j = sigmoid(cnn([k; v] at j - reach .. j + reach)) - 0.5       (kept when r_j > 0)
    The projection's bias starts at +0.5 so that at first every token is kept (r ~ 0.12).
    `reach` (see `lte_reach`): how far a score reads on each side, 6 by default.
    `forward` scores a whole sequence; `score_one` scores one token from its 2 reach + 1 inputs,
    the same maths written out as multiply-sums (a batched matmul for many sequences), for a
    decoding step.
    """

    # The most products (taps times output channels) for which a decoding step scores with a fused
    # multiply-sum rather than a batched matmul (_unpadded): the bench model's first router layer
    # at batch 1 is 0.44M, at batch 64 28M.
    PRODUCT_LIMIT = 1 << 20

    def __init__(self, n_kv_head: int, head_dim: int, kernel_sizes=(3, 3, 3), dilations=(2, 2, 2),
                 dropout: float = 0.1, bias_init: float = 0.5):
        super().__init__()
        _check_router_convs(kernel_sizes, dilations)
        self.n_kv_head = n_kv_head
        self.reach = lte_reach(kernel_sizes, dilations)
        channels = 2 * head_dim
        self.convs = nn.ModuleList()
        for k, d in zip(kernel_sizes, dilations):
            out = max(1, channels // 2)
            self.convs.append(nn.Conv1d(n_kv_head * channels, n_kv_head * out, k, dilation=d,
                                        padding=d * (k - 1) // 2, groups=n_kv_head))
            channels = out
        self.proj = nn.Conv1d(n_kv_head * channels, n_kv_head, 1, groups=n_kv_head)
        self.dropout = nn.Dropout(dropout)
        self.bias_init = bias_init
        self.reset_parameters()

    def reset_parameters(self):
        # Differs from the paper's code: PyTorch's default init, weights and biases from
        # U(+-1 / sqrt(fan_in)). The official code draws the conv and projection weights from
        # kaiming_normal for ReLU (std sqrt(2 / fan_in), 2.4 times wider), so its first scores
        # spread further around sigmoid(0.5) - 0.5. The recipe in the README was trained with this init.
        for conv in self.convs:
            conv.reset_parameters()
        self.proj.reset_parameters()
        nn.init.constant_(self.proj.bias, self.bias_init)

    def forward(self, k, v):
        """k (before RoPE), v: [B, T, Hkv, D] -> r [B, T, Hkv] float32 in (-0.5, 0.5)."""
        B, T, Hkv, D = k.shape
        x = torch.cat([k, v], dim=-1)                                           # [B, T, Hkv, 2D]
        x = x.reshape(B, T, Hkv * 2 * D).transpose(1, 2)                        # [B, Hkv * 2D, T], head-major
        for conv in self.convs:
            # Differs from the paper's code: dropout after each SiLU (so also just before the
            # projection) and none on the input [k; v]; the official code drops before each conv.
            x = self.dropout(F.silu(conv(x)))
        x = self.proj(x)                                                        # [B, Hkv, T]
        return torch.sigmoid(x.float()).transpose(1, 2) - 0.5                   # [L1]

    def score_one(self, x, j):
        """[L1] forward's score of the one token j, from its 2 reach + 1 inputs, with written-out
        multiply-sums: what a decoding step runs (no convolution kernels, which cost more than the
        maths here).

        x: [B, 2 reach + 1, Hkv, 2D], [k before RoPE; v] at positions j - reach .. j + reach;
        j: an int or a 0-d tensor. Returns r_j [B, Hkv] float32, equal to forward(k, v)[:, j] once
        token j + reach exists. Each layer is the same convolution without padding (`_unpadded`),
        so the inputs shrink to the one output at j. 'Same' padding over the whole sequence means
        that every layer's input is zero before position 0, so it is zeroed there before each layer
        (zeroing only the router's input would not do: the next layer would see conv(0) + bias)."""
        _check_router_window(x, self.reach, self.n_kv_head, self.convs[0].in_channels // self.n_kv_head)
        positions = j - self.reach + torch.arange(x.shape[1], device=x.device)  # [2 reach + 1]
        for conv in self.convs:
            x, positions = self._unpadded(conv, x, positions)
            x = self.dropout(F.silu(x))
        x, _ = self._unpadded(self.proj, x, positions)                          # [B, 1, Hkv, 1]
        return torch.sigmoid(x[:, 0, :, 0].float()) - 0.5                       # [L1]

    @staticmethod
    def _unpadded(conv, x, positions):
        """One of the router's grouped convolutions without padding: output i is
        sum_m W[:, :, m] x_{i + d m} + bias, for the P - d (k - 1) outputs that have all their taps.
        x: [B, P, Hkv, C_in] at `positions` [P]; inputs before position 0 count as zero. Returns
        (y [B, P - d (k - 1), Hkv, C_out], the outputs' positions).
        A few sequences: a broadcast product summed over (input channel, tap), which torch.compile
        fuses into one small reduction kernel, where an einsum would be a matrix-multiply launch of
        its own (~9 us each on an H200, 4 per LTE layer and step). Many sequences: the product
        would hold C_out times the taps, so a batched matmul (the einsum) is cheaper."""
        (k,), (d,) = conv.kernel_size, conv.dilation
        Hkv = conv.groups
        x = torch.where((positions >= 0)[:, None, None], x, 0)                  # the sequence start's padding
        taps = x.unfold(1, d * (k - 1) + 1, 1)[..., ::d]                       # [B, P', Hkv, C_in, k]
        w = conv.weight.view(Hkv, -1, *conv.weight.shape[1:])                  # [Hkv C_out, C_in, k] -> [Hkv, C_out, C_in, k]
        if taps.numel() * w.shape[1] <= LTERouter.PRODUCT_LIMIT:
            y = (taps[:, :, :, None] * w).sum(dim=(-2, -1))                     # [B, P', Hkv, C_out]
        else:
            y = torch.einsum("bphck,hock->bpho", taps, w)                       # [B, P', Hkv, C_out]
        y = y + conv.bias.view(Hkv, -1)
        half = d * (k - 1) // 2
        return y, positions[half: positions.shape[0] - half]


# --- 3b. Training: the boolean rule, its gradient, the L1 penalty and its weight ---------------

def lte_training_keep(r, sink: int):
    """The paper's training rule [L2] as `attention`'s keep: bool [B, T, Hkv], True where token j
    stays visible beyond the window for every later query, because r_j > 0 or it is a sink (j < s).
    Every positive score counts, however many there are: the paper applies the cap b only at
    inference (Config.lte_train_cap applies it in training too).
    As a dense mask: attention_mask(T, window, keep) = [j <= i] & ([i - j <= w] | keep_j)."""
    keep = r > 0
    keep[:, :sink] = True
    return keep


def straight_through(v, r):
    """[L3] The keep/drop choice has no gradient, so the score gets one through the values:
        v'_j = v_j + v_j (r_j - stopgrad(r_j))   =>   forward v' = v exactly,  dL/dr_j = <v_j, dL/dv'_j>.
    v: [B, T, Hkv, D], r: [B, T, Hkv]."""
    return v + v * (r - r.detach()).to(v.dtype)[..., None]


def lte_l1_penalty(r, l1_lambda):
    """[L4] The L1 penalty that pushes the scores down: sum_h lambda_h mean_{batch, j} relu(r_j).
    r: [B, T, Hkv], l1_lambda: [Hkv]. Returns a scalar with a gradient."""
    # Differs from the paper's code, which averages lambda_h relu(r_j) over the batch, the positions
    # (all but the last reach), the LTE layers and the heads: here the heads' terms add up, and so
    # do the layers' (TinyHybrid.lte_penalty), so one lambda weighs n_lte_layers * Hkv times more.
    return (l1_lambda * F.relu(r).mean(dim=(0, 1))).sum()


def lte_kept_per_sequence(r, window: int, sink: int):
    """What the lambda controller [L5] compares with b: per sequence and KV head, the tokens with
    r_j > 0 among those that leave the window within the sequence (s <= j < T - w - 1), the ones
    the buffer would have to hold. r: [B, T, Hkv] -> float [B, Hkv]."""
    T = r.shape[1]
    # Differs from the paper's code, which counts r_j > 0 over the whole sequence but its last
    # reach tokens, sinks and tokens that never leave the window included.
    leaving = r[:, sink: max(sink, T - window - 1)]
    return (leaving > 0).float().sum(dim=1)


# --- 3c. Inference: the cap of b retained tokens, streamed and in parallel --------------------

def lte_buffer_push(buf_score, buf_pos, score, pos, offered=None):
    """[L6] Offer one token that leaves the window to the retained-token buffer (in place).

    buf_score, buf_pos: [..., b] (empty slots: score -inf, pos -1); score: [...] float, pos: an int
    or a 0-d integer tensor (a decoding step's position lives on the device).
    offered: which tokens may enter at all, bool [...] or 0-d; by default LTE's r > 0 (the
    heuristic policies of section 3e offer every token that leaves the window instead).
    The token enters when offered and it fits or is at least as good as the lowest-scored buffered
    token, which then leaves (an empty slot counts as lowest). Ties go to the newer token: among
    equal scores the oldest leaves first, and a newcomer equal to the lowest enters. So the buffer
    always holds the top b of the tokens offered so far, ranked by (r, position), which is what
    lets `lte_visible_until` compute the same rule in parallel.
    Returns (entered bool [...], evicted_pos int64 [...] (-1 where nothing real was evicted),
    slot int64 [...]: the buffer slot the token went to where it entered).
    Pure tensor ops, no host sync: the same code runs per decoded token.
    """
    low = buf_score.min(dim=-1, keepdim=True).values                           # [..., 1]
    oldest_low = torch.where(buf_score == low, buf_pos, torch.iinfo(torch.int64).max)
    slot = oldest_low.argmin(dim=-1, keepdim=True)                              # [..., 1]
    # Differs from the paper on ties only: there a newcomer enters when its score is higher.
    entered = (score > 0 if offered is None else offered) & (score >= low[..., 0])
    evicted = torch.where(entered, buf_pos.gather(-1, slot)[..., 0], -1)
    buf_score.scatter_(-1, slot, torch.where(entered, score, low[..., 0])[..., None])
    buf_pos.scatter_(-1, slot, torch.where(entered, pos, buf_pos.gather(-1, slot)[..., 0])[..., None])
    return entered, evicted, slot[..., 0]


def lte_offered(scores, window: int, sink: int):
    """bool [B, Hkv, T]: the tokens the streaming rule offers to the buffer within these T queries:
    not a sink, r > 0, and leaving the window (token j leaves when query j + w + 1 arrives)."""
    B, T, Hkv = scores.shape
    pos = torch.arange(T, device=scores.device)
    leaves = (pos >= sink) & (pos < T - window - 1)                             # [T]
    return leaves & (scores.transpose(1, 2) > 0)                                # [B, Hkv, T]


def _lte_ranks(r, offered):
    """int64 [B, Hkv, T]: each offered token's rank by (r, position), 0 = best (the higher score;
    on equal scores the newer token); T for tokens not offered (worse than any offered one)."""
    T = r.shape[-1]
    newest_first = torch.where(offered, r, float("-inf")).flip(-1)             # [B, Hkv, T], time reversed
    order = newest_first.sort(dim=-1, descending=True, stable=True).indices     # stable: newer first on ties
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=r.device).expand_as(order))
    return torch.where(offered, rank.flip(-1), T).contiguous()


def _running_kth_smallest(x, k: int, fill: int, chunk: int = 256):
    """out[..., t] = the k-th smallest of x[..., :t + 1] together with k copies of `fill`
    (>= every x: it stands for "nothing yet", so out is `fill` while fewer than k have arrived).

    One chunk of positions at a time: what came before the chunk only matters through its k
    smallest values, so row t of a chunk looks at those k plus the chunk's values up to t.
    Memory O(chunk (k + chunk)) per row of x, never T x T.
    """
    *lead, T = x.shape
    k_smallest = x.new_full((*lead, k), fill)                                   # [..., k]
    out = torch.empty_like(x)
    for c0 in range(0, T, chunk):
        xc = x[..., c0:c0 + chunk]                                              # [..., n]
        n = xc.shape[-1]
        not_yet = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)   # [t, i]: i arrives after t
        before = k_smallest[..., None, :].expand(*lead, n, k)                   # [..., n, k]
        so_far = xc[..., None, :].expand(*lead, n, n).masked_fill(not_yet, fill)
        out[..., c0:c0 + n] = torch.cat([before, so_far], dim=-1).kthvalue(k, dim=-1).values
        k_smallest = torch.cat([k_smallest, xc], dim=-1).topk(k, dim=-1, largest=False).values
    return out


def lte_visible_until(scores, window: int, sink: int, buffer: int):
    """[L6] The capped-inference visibility of every key, from the streaming rule (eval-mode LTE).

    scores: [B, T, Hkv] retention scores r. Token j leaves the window when query j + w + 1 arrives;
    then sinks (j < s) stay forever, r <= 0 is dropped, otherwise it is offered to the buffer of b
    slots (`lte_buffer_push`). Returns int64 [B, T, Hkv]: the last query index that sees key j
    beyond the window (KEEP_FOREVER while still retained, -1 if never retained). Feeding this to
    `attention` gives each query exactly the keys that token-by-token decoding holds for it.
    Also returns the final buffer (buf_score, buf_pos: [B, Hkv, b], by position, empty slots
    -inf / -1), from which prefill builds the decoding state.

    The rule in parallel, without replaying it token by token: scores are fixed before a token
    leaves, one token leaves per query, and the buffer always holds the top b offered tokens by
    (r, position) (`lte_buffer_push`). Rank the offered tokens once (rank 0 = best). After token t
    has left, the buffer holds the ranks <= R_t, the b-th smallest rank offered up to t; R_t never
    grows with t. So token j enters iff rank_j <= R_j, and it stays until the first t with
    R_t < rank_j, when the b-th token that beats it leaves the window: its last query is t + w.
    """
    _check_lte_rule(scores, window, sink, buffer)
    # Differs from the paper's code, whose prefill keeps one static top b of the whole prompt for
    # every query: here each query sees what the streaming rule holds at its own step.
    B, T, Hkv = scores.shape
    device = scores.device
    until = torch.full((B, Hkv, T), -1, dtype=torch.int64, device=device)     # [B, Hkv, T] until the end
    until[..., :sink] = KEEP_FOREVER
    if buffer > 0:
        offered = lte_offered(scores, window, sink)                             # [B, Hkv, T]
        rank = _lte_ranks(scores.detach().float().transpose(1, 2), offered)    # [B, Hkv, T]
        # a chunk costs O(chunk (b + chunk)) work on a CPU, but only a few launches on a GPU
        chunk = 64 if scores.device.type == "cpu" else 512
        worst_kept = _running_kth_smallest(rank, buffer, fill=T, chunk=chunk)   # R_t: [B, Hkv, T]
        # first t with R_t < rank_j; R never grows, so -R is sorted
        leaves_at = torch.searchsorted(-worst_kept, -rank, right=True)          # [B, Hkv, T]
        last_query = torch.where(leaves_at < T, leaves_at + window, KEEP_FOREVER)
        until = torch.where(offered & (rank <= worst_kept), last_query, until)
    buf_score, buf_pos = lte_final_buffer(scores, until, window, sink, buffer)
    return until.transpose(1, 2).contiguous(), buf_score, buf_pos             # [B, Hkv, T] -> [B, T, Hkv]


def lte_final_buffer(scores, until, window: int, sink: int, buffer: int):
    """The buffer the streaming rule holds after the last query: the offered tokens still retained
    (until == KEEP_FOREVER), by position. until: [B, Hkv, T]. Returns buf_score float32 and buf_pos
    int64, both [B, Hkv, b], empty slots -inf / -1."""
    B, T, Hkv = scores.shape
    held = lte_offered(scores, window, sink) & (until == KEEP_FOREVER)          # [B, Hkv, T], <= b each
    pos = torch.where(held, torch.arange(T, device=scores.device), T)
    pos = F.pad(pos, (0, max(0, buffer - T)), value=T)                          # [B, Hkv, max(T, b)]
    buf_pos = pos.topk(buffer, dim=-1, largest=False).values                    # [B, Hkv, b], ascending
    empty = buf_pos == T
    r = scores.detach().float().transpose(1, 2)                                 # [B, Hkv, T]
    buf_score = r.gather(-1, buf_pos.clamp(max=T - 1)).masked_fill(empty, float("-inf"))
    return buf_score, buf_pos.masked_fill(empty, -1)


# --- 3d. The mixer ------------------------------------------------------------------------------

def _leave_to_sinks(state, t, window: int, sink: int):
    """The first half of a decoding step's eviction, shared by LTE and the heuristic policies:
    token j = t - w - 1 leaves the window's ring as token t arrives; a sink (j < s) moves to its
    sink slot. Pure tensor ops on the device position t (0-d), no branch on its value.
    Returns (j, its ring slot [1], its key and value {"k", "v": [B, 1, Hkv, D]})."""
    j = t - window - 1
    ring_slot = (t % (window + 1)).view(1)                 # j's ring slot, which token t takes next
    leaving = {name: state[name].index_select(1, ring_slot) for name in ("k", "v")}
    if sink:
        to_sink = (j >= 0) & (j < sink)
        sink_slot = j.clamp(0, sink - 1).view(1)
        for name in ("k", "v"):
            sinks = state["sink_" + name]
            sinks.index_copy_(1, sink_slot, torch.where(to_sink, leaving[name], sinks.index_select(1, sink_slot)))
        state["sink_valid"].index_copy_(1, sink_slot, state["sink_valid"].index_select(1, sink_slot) | to_sink)
    return j, ring_slot, leaving


def _enter_window(state, t, window: int, k, v):
    """Token t (k, v [B, 1, Hkv, D]) takes ring slot t % (w + 1), the one token t - w - 1 has just
    left. Returns that slot [1]."""
    slot = (t % (window + 1)).view(1)
    state["k"].index_copy_(1, slot, k.to(state["k"].dtype))
    state["v"].index_copy_(1, slot, v.to(state["v"].dtype))
    state["valid"].index_fill_(1, slot, True)
    return slot


def _held_slots(state):
    """Every slot a query reads, side by side: sinks, the window's ring, the buffer. Returns k, v
    [B, s + w + 1 + b, Hkv, D] and valid [B, s + w + 1 + b, Hkv]."""
    slots = [(state["sink_k"], state["sink_v"], state["sink_valid"]), (state["k"], state["v"], state["valid"]),
             (state["buf_k"], state["buf_v"], (state["buf_pos"] >= 0).transpose(1, 2))]
    return tuple(torch.cat(parts, dim=1) for parts in zip(*slots))


def _write_buffer_slot(state, leaving, entered, slot) -> None:
    """Copy the leaving key and value into buffer slot `slot` [B, Hkv] where it entered."""
    for name in ("k", "v"):
        buf = state["buf_" + name]                                              # [B, b, Hkv, D]
        idx = slot[:, None, :, None].expand(-1, 1, -1, buf.shape[-1])           # [B, 1, Hkv, D]
        buf.scatter_(1, idx, torch.where(entered[:, None, :, None], leaving[name], buf.gather(1, idx)))


class LTEAttention(_AttentionBase):
    """Learnable token eviction: sliding-window attention plus sink tokens plus the tokens the
    router retains (the paper's "A-plus-column" pattern), with RoPE and GQA.

    Query i sees key j when j <= i and (i - j <= w, or j < s, or j is retained for i).
      training  every token with r_j > 0 stays visible [L2] (with `lte_train_cap`, the inference
                cap instead), through the straight-through gradient [L3]; the L1 penalty [L4]
                waits in `take_penalty()`, and `update_lambda()` runs the controller [L5].
      eval      at most b retained tokens per head, by the streaming rule [L6], so that the
                parallel forward sees exactly what decoding holds.

    Decoding state per sequence and KV head, of the same size for any T:

      sinks (s slots)       window ring (w + 1 slots)             buffer (b slots)
      +-----+-----+--       +-----+-----+-----+-- .. --+-----+    +-----+-----+-- .. --+-----+
      |  0  |  1  | ..      |     |  t  |     |        |     |    |     |     |        |     |
      +-----+-----+--       +-----+-----+-----+-- .. --+-----+    +-----+-----+-- .. --+-----+
      k, v of the first     k, v; token t in slot t % (w + 1);    k, v of the retained tokens
      s tokens              the score r_j of every token but      in any order, their scores
                            the newest `reach` (not known yet)    (buf_score), positions (buf_pos)

      router ring (2 reach + 1 slots): [k before RoPE; v] of the newest tokens, the router's input

    Token t arrives (`_step`): token t - w - 1 leaves the window first, to the sinks (j < s), to
    the buffer (r > 0 and good enough) or nowhere (`_leave_window`), and token t takes its ring
    slot. A score needs the `reach` tokens after its own, so token j is scored when token j + reach
    arrives, `reach` steps late, and its score goes into j's ring slot; since reach <= w, every
    token has its score long before it leaves the window. The step does the same work at every
    position (the position is a tensor on the device; what does not apply yet is masked), so that
    a CUDA graph can capture it once.
    Reads from the config, besides _AttentionBase's: window, lte_sink, lte_buffer, lte_kernel_sizes,
    lte_dilations, lte_dropout, lte_train_cap, lte_lambda_init, lte_lambda_every, lte_lambda_up,
    lte_lambda_down, lte_lambda_min, lte_lambda_max.
    """

    def __init__(self, config):
        super().__init__(config)
        # Differs from the paper's code: the s sinks are held apart from the b buffer slots (s + b
        # tokens beyond the window); there the sinks take s of the b slots.
        self.window, self.sink, self.buffer = config.window, config.lte_sink, config.lte_buffer
        self.router = LTERouter(config.n_kv_head, config.head_dim, config.lte_kernel_sizes,
                                config.lte_dilations, config.lte_dropout)
        Hkv = config.n_kv_head
        # lambda per KV head [L4], and the controller's count since its last update [L5] (saved)
        self.register_buffer("l1_lambda", torch.full((Hkv,), config.lte_lambda_init))
        self.register_buffer("kept_sum", torch.zeros(Hkv))
        self.register_buffer("kept_steps", torch.zeros((), dtype=torch.long))
        # kept tokens of the current optimizer step's training forwards (one per micro-batch), and
        # per sequence in the last forward (for progress lines): moved with the module, not saved
        self.register_buffer("step_kept", torch.zeros(Hkv), persistent=False)
        self.register_buffer("last_kept", torch.zeros(Hkv), persistent=False)
        self.step_sequences = 0
        self._penalty = None                       # [L4] of the last training forward, until taken

    # --- the parallel form: training, eval and prefill ---
    def _parallel(self, x, state=None):
        q, k, v, k_raw = self._qkv(x, state=state)
        r = self.router(k_raw, v)                                               # [L1] [B, T, Hkv]
        if self.training and not self.config.lte_train_cap and state is None:
            keep = lte_training_keep(r, self.sink)                              # [L2] bool
        else:
            keep, buf_score, buf_pos = _op(self.config, lte_visible_until)(r.detach(), self.window, self.sink,
                                                                            self.buffer)   # [L6] int
        if self.training:
            self._record_training_forward(r)                                   # [L4], [L5]
            v = straight_through(v, r)                                          # [L3]
        o = _op(self.config, attention)(q, k, v, window=self.window, keep=keep)
        if state is not None:
            self._fill_state(state, k, v, k_raw, r, buf_score, buf_pos)
        return o

    # --- training: the penalty and lambda ---
    def _record_training_forward(self, r):
        """What the training step needs from this forward: its L1 penalty [L4], until taken, and
        its kept tokens per sequence, for the controller [L5]."""
        self._penalty = lte_l1_penalty(r, self.l1_lambda)
        kept = lte_kept_per_sequence(r, self.window, self.sink)                 # [B, Hkv]
        self.last_kept = kept.mean(dim=0)
        self.step_kept = self.step_kept + kept.sum(dim=0)
        self.step_sequences += kept.shape[0]

    def take_penalty(self) -> torch.Tensor:
        """[L4] The L1 penalty of the last training forward, to add to the loss. It is handed over
        once, so that the module does not keep its autograd graph alive; 0 when there is none
        (after an eval forward, or once taken)."""
        penalty, self._penalty = self._penalty, None
        return self.l1_lambda.new_zeros(()) if penalty is None else penalty

    @property
    def last_penalty(self) -> torch.Tensor:
        """The penalty waiting in `take_penalty`, left in place (0 when there is none)."""
        return self.l1_lambda.new_zeros(()) if self._penalty is None else self._penalty

    @property
    def lam(self) -> torch.Tensor:
        """lambda, per KV head: the former name of `l1_lambda`."""
        return self.l1_lambda

    def train(self, mode: bool = True):
        if not mode:
            self._penalty = None                   # eval never adds it: let go of its graph
        return super().train(mode)

    @torch.no_grad()
    def update_lambda(self, count_step: bool = True):
        """[L5] The lambda controller: call once per optimizer step, after the step's forwards.

        The step's kept tokens per sequence, over all its training forwards (every micro-batch of
        a gradient accumulation), join the period's count. Every N = lte_lambda_every counted
        steps: lambda *= up for the heads that kept more than b tokens per sequence on average,
        /= down for those below 0.95 b, clamped to [lambda_min, lambda_max]. count_step=False
        drops the step's forwards instead (e.g. batches of another length). N = 0 keeps lambda
        fixed, which the defaults do."""
        c = self.config
        step_kept, sequences = self.step_kept / max(self.step_sequences, 1), self.step_sequences
        self.step_kept = torch.zeros_like(self.step_kept)
        self.step_sequences = 0
        if c.lte_lambda_every == 0 or not count_step or sequences == 0:
            return
        self.kept_sum += step_kept
        self.kept_steps += 1
        if int(self.kept_steps) < c.lte_lambda_every:
            return
        # Differs from the paper's code: a plain mean over the period (there: a moving average
        # updated every step, alpha = 2 / (1 + N / 2)), and lambda starts at lte_lambda_init
        # (there: at 0, and at lambda_min once a head keeps too many).
        kept = self.kept_sum / self.kept_steps
        self.l1_lambda.mul_(torch.where(kept > self.buffer, c.lte_lambda_up, 1.0))
        self.l1_lambda.div_(torch.where(kept < 0.95 * self.buffer, c.lte_lambda_down, 1.0))
        self.l1_lambda.clamp_(c.lte_lambda_min, c.lte_lambda_max)
        self.kept_sum.zero_()
        self.kept_steps.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "lam"                       # checkpoints from before lambda's rename
        if old in state_dict:
            state_dict[prefix + "l1_lambda"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- decoding: the state of constant size ---
    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """An empty decoding state (the picture is in the class docstring), of one size for any
        length (max_len is accepted like every mixer's, and needs nothing here)."""
        B, Hkv, D = batch_size, self.n_kv_head, self.head_dim
        s, b = self.sink, self.buffer
        window_slots, router_slots = self.window + 1, 2 * self.router.reach + 1
        zeros = lambda n: torch.zeros(B, n, Hkv, D, device=device, dtype=dtype)
        off = lambda n: torch.zeros(B, n, Hkv, dtype=torch.bool, device=device)
        state = {"sink_k": zeros(s), "sink_v": zeros(s), "sink_valid": off(s),
                 "k": zeros(window_slots), "v": zeros(window_slots), "valid": off(window_slots),
                 "score": torch.zeros(B, window_slots, Hkv, device=device),
                 "buf_k": zeros(b), "buf_v": zeros(b),
                 "buf_score": torch.zeros(B, Hkv, b, device=device),
                 "buf_pos": torch.zeros(B, Hkv, b, dtype=torch.long, device=device),
                 "router_in": torch.zeros(B, router_slots, Hkv, 2 * D, device=device, dtype=dtype),
                 **self._key_conv_state(batch_size, device, dtype), **self._counters(device)}
        self.reset_state(state)
        return state

    def reset_state(self, state: dict) -> None:
        """Back to the empty state, in place; empty buffer slots hold score -inf and position -1."""
        super().reset_state(state)
        state["buf_score"].fill_(float("-inf"))
        state["buf_pos"].fill_(-1)

    def _fill_state(self, state, k, v, k_raw, r, buf_score, buf_pos):
        """After a parallel prefill of T tokens: the state that stepping them one by one leaves."""
        B, T, Hkv, D = k.shape
        window_slots, router_slots = self.window + 1, 2 * self.router.reach + 1
        cache_dtype = state["k"].dtype
        n_sink = min(self.sink, max(0, T - window_slots))         # sinks that have left the window by now
        state["sink_k"][:, :n_sink] = k[:, :n_sink].to(cache_dtype)
        state["sink_v"][:, :n_sink] = v[:, :n_sink].to(cache_dtype)
        state["sink_valid"][:, :n_sink] = True
        recent = torch.arange(max(0, T - window_slots), T, device=k.device)
        ring = recent % window_slots
        state["k"][:, ring], state["v"][:, ring] = k[:, recent].to(cache_dtype), v[:, recent].to(cache_dtype)
        state["valid"][:, ring] = True
        scored = recent[recent <= T - 1 - self.router.reach]   # later ones wait for their right context
        state["score"][:, scored % window_slots] = r[:, scored].detach().float()
        state["buf_score"].copy_(buf_score)
        state["buf_pos"].copy_(buf_pos)
        pos = buf_pos.clamp(min=0).transpose(1, 2)                              # [B, Hkv, b] -> [B, b, Hkv]
        state["buf_k"].copy_(k.gather(1, pos[..., None].expand(-1, -1, -1, D)))
        state["buf_v"].copy_(v.gather(1, pos[..., None].expand(-1, -1, -1, D)))
        tail = torch.arange(max(0, T - router_slots), T, device=k.device)
        state["router_in"][:, tail % router_slots] = torch.cat([k_raw, v], dim=-1)[:, tail].to(cache_dtype)

    def _step(self, x, state):
        t = state["pos"]                                   # 0-d, on the device
        q, k, v, k_raw = self._qkv(x, t, state)
        self._leave_window(state, t)
        _enter_window(state, t, self.window, k, v)
        cache_dtype = state["k"].dtype
        router_slot = (t % (2 * self.router.reach + 1)).view(1)
        state["router_in"].index_copy_(1, router_slot, torch.cat([k_raw, v], dim=-1).to(cache_dtype))
        self._score_ready_token(state, t, q.dtype)
        k_all, v_all, valid = _held_slots(state)
        o = _op(self.config, attention_decode)(q[:, 0], k_all.to(q.dtype), v_all.to(q.dtype), valid)
        t.add_(1)                                          # last: t is the state's own tensor
        return o[:, None]

    def _score_ready_token(self, state, t, dtype):
        """[L1] Token j = t - reach has its right context now: score it into its ring slot.

        The router ring holds the inputs j - reach .. j + reach = t, read in that order; the
        router's one-token form (`LTERouter.score_one`) counts those before position 0 as its
        padding over the whole sequence, in every layer. While j < 0 nothing is written."""
        n = 2 * self.router.reach + 1
        j = t - self.router.reach
        ctx = state["router_in"].index_select(1, (j - self.router.reach + torch.arange(n, device=t.device)) % n)
        r_j = self.router.score_one(ctx.to(dtype), j)                          # [B, Hkv]; ctx: [B, n, Hkv, 2D]
        slot = (j % (self.window + 1)).view(1)
        old = state["score"].index_select(1, slot)
        state["score"].index_copy_(1, slot, torch.where(j >= 0, r_j[:, None], old))

    def _leave_window(self, state, t):
        """Token j = t - w - 1 leaves the window as token t arrives: to the sinks, the buffer [L6],
        or gone. Every step runs it; before any token has left (j < 0) it changes nothing."""
        j, ring_slot, leaving = _leave_to_sinks(state, t, self.window, self.sink)
        if self.buffer == 0:
            return
        # a token that is not leaving to the buffer is offered with r = 0, which never enters [L6]
        offered = j >= self.sink
        score = torch.where(offered, state["score"].index_select(1, ring_slot)[:, 0], 0.0)   # [B, Hkv]
        entered, _, slot = lte_buffer_push(state["buf_score"], state["buf_pos"], score, j)   # [B, Hkv] each
        _write_buffer_slot(state, leaving, entered, slot)


    def state_size(self, T: int) -> int:
        """Numbers held per sequence after T tokens: keys and values of the tokens held (sinks,
        window, buffer: at most s + w + 1 + b), a score per window / buffer token, and the last
        2 reach + 1 router inputs."""
        held = min(T, self.sink + self.window + 1 + self.buffer)
        scored = min(T, self.window + 1 + self.buffer)
        router = min(T, 2 * self.router.reach + 1) * 2 * self.head_dim
        return self.n_kv_head * (held * 2 * self.head_dim + scored + router) + self._key_conv_size()


# --- 3e. Heuristic eviction at equal memory: the baselines LTE is measured against ---------------
#
# LTE learns which tokens to keep. The obvious alternative keeps tokens by a rule on the attention
# itself, applied at inference to a model trained with full attention. `EvictingAttention` decodes
# an `Attention` layer (the same weights: load its state_dict) inside exactly LTE's memory:
#
#     s sinks (always kept)  +  a window ring of w + 1 slots  +  b more slots (the buffer)
#
# and a policy decides, as each token leaves the window, whether it takes a buffer slot and whom it
# pushes out (the same moment as LTE's rule [L6]; the sinks and the window are protected alike):
#   "streaming"  StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
#                Sinks"): sinks + window only, a leaving token is dropped; the buffer must be 0
#                (at equal memory give its slots to the window instead: window = w + b).
#   "tova"       TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): when the cache is full,
#                drop the token with the lowest attention weight of the current query, averaged over
#                the query heads of a KV group. Here the candidates are the buffer and the leaving
#                token, by the weights of the latest query (the last that saw them all).
#   "h2o"        H2O (Zhang et al. 2023, "Heavy-Hitter Oracle"): keep the tokens with the highest
#                accumulated attention, plus the recent window. A token's score is the attention it
#                received (averaged over the group's heads) summed over every query since it entered
#                the cache, window included, so it reaches the buffer with its history.
# Both scored policies share one state layout: a score per window and buffer slot, which TOVA
# overwrites with the latest weights and H2O adds them to; the leaving token takes a buffer slot
# when one is free or its score is at least the lowest buffered score, whose token then leaves
# (ties: the oldest leaves, as in `lte_buffer_push`). Memory: the same k, v slots as LTE, b + w + 1
# scores and b positions, for any T.

EVICTION_POLICIES = ("streaming", "tova", "h2o")


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


class EvictingAttention(_AttentionBase):
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
        _check_eviction(policy, sink, window, buffer)
        self.policy, self.sink, self.window, self.buffer = policy, sink, window, buffer
        self.update_score = {"streaming": None, "tova": tova_score, "h2o": h2o_score}[policy]

    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """An empty state, of one size for any length (max_len is accepted and needs nothing)."""
        self._check_max_len(max_len)
        B, Hkv, D, s, b = batch_size, self.n_kv_head, self.head_dim, self.sink, self.buffer
        zeros = lambda n: torch.zeros(B, n, Hkv, D, device=device, dtype=dtype)
        off = lambda n: torch.zeros(B, n, Hkv, dtype=torch.bool, device=device)
        # StreamingLLM never reads a score: it keeps none (the frontier counts every tensor of a state)
        scored = self.window + 1 if self.update_score is not None else 0
        state = {"sink_k": zeros(s), "sink_v": zeros(s), "sink_valid": off(s),
                 "k": zeros(self.window + 1), "v": zeros(self.window + 1), "valid": off(self.window + 1),
                 "score": torch.zeros(B, scored, Hkv, device=device),
                 "buf_k": zeros(b), "buf_v": zeros(b),
                 "buf_score": torch.zeros(B, Hkv, b, device=device),
                 "buf_pos": torch.zeros(B, Hkv, b, dtype=torch.long, device=device),
                 **self._key_conv_state(batch_size, device, dtype), **self._counters(device)}
        self.reset_state(state)
        return state

    def reset_state(self, state: dict) -> None:
        """Back to the empty state, in place; empty buffer slots hold score -inf and position -1."""
        super().reset_state(state)
        state["buf_score"].fill_(float("-inf"))
        state["buf_pos"].fill_(-1)

    def _parallel(self, x, state=None):
        """No parallel form: decode x [B, T, C] token by token, from `state` if given (it must be
        empty: forward routes later calls to `_step` itself) or from a fresh one."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        return torch.cat([self._step(x[:, t: t + 1], state) for t in range(x.shape[1])], dim=1)

    def _step(self, x, state):
        t = state["pos"]                                   # 0-d, on the device
        q, k, v, _ = self._qkv(x, t, state)
        self._leave_window(state, t)
        slot = _enter_window(state, t, self.window, k, v)
        if self.update_score is not None:
            state["score"].index_fill_(1, slot, 0.0)       # a newcomer has received no attention yet
        k_all, v_all, valid = _held_slots(state)
        o, p = attention_decode_weights(q[:, 0], k_all.to(q.dtype), v_all.to(q.dtype), valid)
        if self.update_score is not None:
            self._score_held(state, group_mean(p, self.n_kv_head))
        t.add_(1)                                          # last: t is the state's own tensor
        return o[:, None]

    def _score_held(self, state, p):
        """The policy's score of every window and buffer token after this query; p: [B, S, Hkv]
        over sinks, window ring and buffer, in that order."""
        s, w1 = self.sink, self.window + 1
        p_window, p_buf = p[:, s:s + w1], p[:, s + w1:].transpose(1, 2)         # [B, w+1, Hkv], [B, Hkv, b]
        state["score"].copy_(self.update_score(state["score"], p_window))
        held = state["buf_pos"] >= 0
        state["buf_score"].copy_(torch.where(held, self.update_score(state["buf_score"], p_buf), float("-inf")))

    def _leave_window(self, state, t):
        """Token j = t - w - 1 leaves the window as token t arrives: to the sinks (j < s), to the
        buffer (the policy's rule), or gone. Before any token has left (j < 0) nothing changes."""
        j, ring_slot, leaving = _leave_to_sinks(state, t, self.window, self.sink)
        if self.buffer == 0:                               # StreamingLLM, or a policy given no buffer
            return
        score = state["score"].index_select(1, ring_slot)[:, 0]                 # [B, Hkv]
        entered, slot = evict_lowest_push(state["buf_score"], state["buf_pos"], score, j, j >= self.sink)
        _write_buffer_slot(state, leaving, entered, slot)

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
    _check_eviction(policy, sink, window, buffer)
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


# =============================================================================================
# 4. MODEL
# =============================================================================================

# The names Config accepts in `layers`, and the mixer each one builds.
MIXER_NAMES = ("gdn", "swa", "attn", "nsa", "lte")
MIXERS = {
    "gdn": GatedDeltaNet,
    "swa": lambda config: Attention(config, window=config.window),
    "attn": Attention,
    "nsa": NativeSparseAttention,
    "lte": LTEAttention,
}

# Layer patterns: attention-type mixers on the odd layers, GDN on the even ones (as in the paper).
PRESETS = {
    "gdn": ("gdn",),
    "gdn+swa": ("gdn", "swa"),
    "gdn+attn": ("gdn", "attn"),
    "gdn+nsa": ("gdn", "nsa"),
    "gdn+lte": ("gdn", "lte"),
    "transformer": ("attn",),
}

# The paper's models, from the official configs: 24 layers, GDN with 8 heads (K = V), SwiGLU of
# 2/3 * 4 d rounded up to a multiple of 256, a 32000-token vocabulary, attention head dim 64.
PAPER_SIZES = {
    "0.4B": dict(d_model=1024, gdn_head_dim=128, mlp_hidden=2816, n_head=16, n_kv_head=16),
    "1.4B": dict(d_model=2048, gdn_head_dim=256, mlp_hidden=5632, n_head=32, n_kv_head=8),
}
# ... and what differs per mixer, at both sizes (windows as counted here: see the glossary).
PAPER_MIXERS = {
    "swa": dict(window=1023),
    "lte": dict(window=768, lte_sink=4, lte_buffer=512, lte_kernel_sizes=(3, 3, 3), lte_dilations=(2, 2, 2),
                lte_dropout=0.1, lte_train_cap=False, lte_router_lr_scale=1.0, lte_lambda_every=32,
                lte_lambda_init=1e-9, lte_lambda_up=1.5, lte_lambda_down=2.0, lte_lambda_min=1e-9,
                lte_lambda_max=1.0),
    "nsa": dict(n_head=32, n_kv_head=2, nsa_block=64, nsa_topn=16, nsa_window=511),
}


@dataclass
class Config:
    """Sizes and per-mixer settings; `Config.preset(name)` picks the layer pattern.

    The defaults make a model that trains on a laptop CPU, and their LTE and NSA settings are the
    recipe the README's results were trained with (train_shakespeare.py): b = 64 retained tokens,
    the inference cap applied in training too, lambda fixed at 1e-3 (the controller off), the
    router at a tenth of the learning rate without weight decay (`optimizer_groups`), and NSA's
    n = 16 selected blocks, the paper's n. `Config.paper(name, size)` gives the paper's models
    and its training rule instead.

    Every field is checked when the Config is made: a wrong type, a value out of range, NaN or inf
    raises ValueError naming the field, the value and what is allowed."""

    vocab_size: int = 2048
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4                   # query heads of the attention-type mixers
    n_kv_head: int = 2                # key/value heads (GQA)
    head_dim: int = 32
    mlp_hidden: int = 0               # SwiGLU hidden size; 0 means 8/3 d_model rounded up to 32
    layers: tuple = ()                # one mixer name per layer (see MIXER_NAMES); () means all "gdn"
    rope_base: float = 10000.0
    key_conv: int = 0                 # attention-type mixers: key shift kernel (0: none, as in the paper)
    # Gated DeltaNet
    gdn_heads: int = 0                # 0 means n_head
    gdn_head_dim: int = 0             # K (key dim: how many facts a head can hold); 0 means head_dim
    gdn_value_dim: int = 0            # V (what a read returns); 0 means K (fla's expand_v = V / K)
    gdn_conv_size: int = 4
    gdn_chunk_size: int = 64
    # sliding window w (SWA, LTE, and NSA's third branch unless nsa_window is set): w + 1 keys
    window: int = 64
    # LTE. Differs from the paper (the recipe that trained here, see above): the cap in training,
    # the router's slower learning rate, lambda fixed; Config.paper has the paper's settings.
    lte_sink: int = 4
    lte_buffer: int = 64              # b; the paper's is 512 at its window of 768
    lte_kernel_sizes: tuple = (3, 3, 3)
    lte_dilations: tuple = (2, 2, 2)
    lte_dropout: float = 0.1
    lte_train_cap: bool = True        # training sees the inference cap b, as decoding does (the paper: no cap)
    lte_router_lr_scale: float = 0.1  # the router's learning rate / the model's (the paper: 1)
    lte_lambda_init: float = 1e-3
    lte_lambda_every: int = 0         # controller period in steps; 0: lambda stays at lte_lambda_init
    lte_lambda_up: float = 1.5
    lte_lambda_down: float = 2.0
    lte_lambda_min: float = 1e-9
    lte_lambda_max: float = 1.0
    # NSA
    nsa_block: int = 16               # l
    nsa_topn: int = 16                # n, as in the paper
    nsa_recent: int = 2
    nsa_window: int | None = None
    # kernels
    use_triton: bool = False

    def __post_init__(self):
        self._check_fields()
        self.layers = tuple(self.layers) or ("gdn",) * self.n_layer
        self.gdn_heads = self.gdn_heads or self.n_head
        self.gdn_head_dim = self.gdn_head_dim or self.head_dim
        self.gdn_value_dim = self.gdn_value_dim or self.gdn_head_dim
        self.mlp_hidden = self.mlp_hidden or 32 * math.ceil(8 * self.d_model / 3 / 32)
        self.lte_kernel_sizes, self.lte_dilations = tuple(self.lte_kernel_sizes), tuple(self.lte_dilations)
        self._check_relations()

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        """A named model: 'gdn', 'gdn+swa', 'gdn+attn', 'gdn+nsa', 'gdn+lte' or 'transformer'."""
        _check_preset(name, overrides)
        n_layer = overrides.get("n_layer", cls.n_layer)
        pattern = PRESETS[name]
        return cls(layers=tuple(pattern[i % len(pattern)] for i in range(n_layer)), **overrides)

    @classmethod
    def paper(cls, name: str, size: str = "0.4B", **overrides) -> "Config":
        """One of the paper's models: preset `name` at size '0.4B' or '1.4B' with the official
        configs' settings: 24 layers, their heads and windows, LTE's s = 4, b = 512 and its training
        rule (no cap in training, the lambda controller from 1e-9, the router at the full learning
        rate), NSA's l = 64, n = 16. For reading, and for large machines: the '0.4B' models have
        0.34-0.37e9 parameters (`with torch.device("meta"): TinyHybrid(config)` builds one without
        memory)."""
        _check_preset(name, overrides)
        if size not in PAPER_SIZES:
            raise ValueError(f"size must be one of {sorted(PAPER_SIZES)}, got {size!r}")
        settings = dict(vocab_size=32000, n_layer=24, head_dim=64, gdn_heads=8, **PAPER_SIZES[size])
        for mixer in PRESETS[name]:
            settings.update(PAPER_MIXERS.get(mixer, {}))
        return cls.preset(name, **(settings | overrides))

    def _check_fields(self):
        """Every field on its own: type, range, finite. Runs before the 0-means-default sizes are
        filled in, so that a negative one is reported as itself. Errors name field, value, range."""
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "gdn_conv_size",
                     "gdn_chunk_size", "nsa_block", "nsa_topn"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("mlp_hidden", "gdn_heads", "gdn_head_dim", "gdn_value_dim"):
            _check_int(name, getattr(self, name), low=0, note=" (0: the default)")
        for name in ("window", "lte_sink", "lte_buffer", "lte_lambda_every", "nsa_recent", "key_conv"):
            _check_int(name, getattr(self, name), low=0)
        if self.nsa_window is not None and (not _is_int(self.nsa_window) or self.nsa_window < 0):
            raise ValueError(f"nsa_window must be None or an int >= 0, got {self.nsa_window!r}")
        for name in ("lte_train_cap", "use_triton"):
            _check_bool(name, getattr(self, name))
        # base <= 1 has no slow frequencies (base -> 0 even overflows the angles to inf: NaN losses)
        _check_real("rope_base", self.rope_base, lambda x: x > 1, "> 1")
        _check_real("lte_dropout", self.lte_dropout, lambda x: 0 <= x < 1, "in [0, 1)")
        _check_real("lte_router_lr_scale", self.lte_router_lr_scale, lambda x: x >= 0,
                    ">= 0 (0 freezes the router)")
        _check_real("lte_lambda_init", self.lte_lambda_init, lambda x: x >= 0,
                    ">= 0 (a negative penalty would reward keeping)")
        _check_real("lte_lambda_min", self.lte_lambda_min, lambda x: x > 0,
                    "> 0 (from 0 the controller could never grow lambda again)")
        _check_real("lte_lambda_max", self.lte_lambda_max, lambda x: x > 0, "> 0")
        # update_lambda multiplies by up when a head keeps too many tokens and divides by down when
        # it keeps too few: a factor below 1 would push lambda the wrong way
        _check_real("lte_lambda_up", self.lte_lambda_up, lambda x: x >= 1,
                    ">= 1 (lambda *= up when a head keeps more than lte_buffer tokens)")
        _check_real("lte_lambda_down", self.lte_lambda_down, lambda x: x >= 1,
                    ">= 1 (lambda /= down when a head keeps fewer than 0.95 lte_buffer)")
        self._check_tuples()

    def _check_tuples(self):
        """layers: mixer names; the router's kernel sizes (odd, for 'same' padding) and dilations."""
        if not isinstance(self.layers, (tuple, list)) or not all(isinstance(m, str) for m in self.layers):
            raise ValueError(f"layers must be a tuple of mixer names (from {sorted(MIXER_NAMES)}) or () for all "
                             f"'gdn', got {self.layers!r}")
        for name in ("lte_kernel_sizes", "lte_dilations"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not value or not all(_is_int(v) and v >= 1 for v in value):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
        if any(k % 2 == 0 for k in self.lte_kernel_sizes):
            raise ValueError(f"lte_kernel_sizes must be odd ('same' padding centres the router on its token), "
                             f"got {self.lte_kernel_sizes!r}")
        if len(self.lte_kernel_sizes) != len(self.lte_dilations):
            raise ValueError(f"lte_kernel_sizes {self.lte_kernel_sizes!r} and lte_dilations {self.lte_dilations!r} "
                             f"must have the same length (one dilation per conv layer)")

    def _check_relations(self):
        """Rules between fields, once the defaults are filled in."""
        low, high = self.lte_lambda_min, self.lte_lambda_max
        if low > high:
            raise ValueError(f"need lte_lambda_min <= lte_lambda_max, got lte_lambda_min={low!r}, "
                             f"lte_lambda_max={high!r}")
        if self.lte_lambda_every and not low <= self.lte_lambda_init <= high:
            raise ValueError(f"lte_lambda_init must lie in [lte_lambda_min, lte_lambda_max] = [{low!r}, {high!r}] "
                             f"while the controller runs (lte_lambda_every > 0: it clamps lambda there), got "
                             f"{self.lte_lambda_init!r}; for a fixed lambda (0: no penalty) set lte_lambda_every=0")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if len(self.layers) != self.n_layer:
            raise ValueError(f"layers has {len(self.layers)} entries but n_layer is {self.n_layer}")
        unknown = [m for m in self.layers if m not in MIXER_NAMES]
        if unknown:
            raise ValueError(f"unknown mixer name(s) {unknown} in layers; allowed: {sorted(MIXER_NAMES)}")
        if self.nsa_topn < self.nsa_recent + 1:
            raise ValueError(f"nsa_topn ({self.nsa_topn}) must be >= nsa_recent + 1 = {self.nsa_recent + 1}")
        reach = lte_reach(self.lte_kernel_sizes, self.lte_dilations)
        if "lte" in self.layers and reach > self.window:
            raise ValueError(f"window ({self.window}) must be >= the LTE router's reach ({reach} tokens each side): "
                             f"a token's score must be known before it leaves the window, or the mask would "
                             f"depend on the future")


class SwiGLU(nn.Module):
    """The MLP: W_2 (SiLU(W_1 x) * W_3 x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        # W_1 (the gate) and W_3 (up) stacked by rows: the same maths, one launch instead of two
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)                                 # [B, T, 2 hidden] -> 2 x [B, T, hidden]
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config, mixer: str):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model)
        self.mixer = MIXERS[mixer](config)
        self.norm2 = RMSNorm(config.d_model)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x, state=None):
        x = x + self.mixer(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))

    def step(self, x, state):
        """One decoded token, x [B, 1, C], through the mixer's `step`: device work only."""
        x = x + self.mixer.step(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))


def optimizer_groups(model: nn.Module, lr: float, weight_decay: float = 0.1,
                     router_lr_scale: float = 0.1) -> list[dict]:
    """AdamW parameter groups of the recipe that trained here, for any module holding these mixers:
        0  matrices and convolution kernels (ndim >= 2): lr, weight_decay
        1  vectors (norms, biases, A_log, dt_bias): lr, no decay
        2  every LTE router's parameters: router_lr_scale * lr, no decay.
    A router learning as fast as the rest soon ranked the recall facts' values below the text and
    evicted them (EXPERIMENTS.md, "5. What LTE needed"). Each group carries its "lr_scale", so that a
    schedule can set group["lr"] = lr_now * group["lr_scale"] (torch's LR schedulers keep the
    ratio by themselves)."""
    # Differs from the paper's code: one learning rate for every parameter there.
    router = {id(p) for m in model.modules() if isinstance(m, LTERouter) for p in m.parameters()}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2 and id(p) not in router], "weight_decay": weight_decay,
               "lr_scale": 1.0},
              {"params": [p for p in params if p.ndim < 2 and id(p) not in router], "weight_decay": 0.0,
               "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in router], "weight_decay": 0.0, "lr_scale": router_lr_scale}]
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


class TinyHybrid(nn.Module):
    """The interleaved language model: token embedding, blocks, final norm, tied output head.

    forward(idx, targets=None, state=None) -> (logits [B, T, vocab], loss or None).
    In training the loss includes the LTE penalty; `last_losses` holds both parts separately.
    With `state` (from `init_state`), the call continues a sequence: a prompt into an empty state
    is prefilled in parallel, later calls step token by token; the state is updated in place.
    Train with `optimizer_groups(lr)` and, when the lambda controller is on, `update_lte_lambdas()`
    after every optimizer step.
    """

    def __init__(self, config: Config):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a tiny_hybrid.Config, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, m) for m in config.layers)
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Differs from the paper's 1.4B models, which have a separate output matrix (its 0.4B ties).
        self.lm_head.weight = self.wte.weight                                   # tied
        self.last_losses: dict = {}
        self._init_weights()

    def _init_weights(self):
        """GPT-2 style: Linear and Embedding weights from N(0, 0.02), residual output projections
        scaled by 1 / sqrt(2 n_layer), Linear biases 0. Convolutions (ShortConv, the LTE router)
        keep their own init."""
        # Differs from the paper's code: std 0.006 there, and the residual output projections drawn
        # like PyTorch's default, divided by sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None, state: list | None = None):
        # one decoded token on the GPU: skip the range check, it would wait for the device
        one_token_on_gpu = state is not None and idx.shape[1] == 1 and idx.is_cuda
        _check_idx(idx, self.config.vocab_size, check_range=not one_token_on_gpu)
        if targets is not None:
            _check_targets(targets, idx, self.config.vocab_size)
        if state is not None:
            _check_state(state, len(self.blocks), idx.shape[0])
            for layer in state:                            # before any layer writes to its state
                _AttentionBase._check_room(layer, idx.shape[1])
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, None if state is None else state[i])
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        penalty = self.lte_penalty()
        self.last_losses = {"lm": lm_loss.detach(), "lte_penalty": penalty.detach()}
        return logits, lm_loss + penalty

    def optimizer_groups(self, lr: float, weight_decay: float = 0.1) -> list[dict]:
        """AdamW parameter groups of the recipe, the routers at config.lte_router_lr_scale * lr:
        `torch.optim.AdamW(model.optimizer_groups(1e-3), betas=(0.9, 0.95))` (see `optimizer_groups`)."""
        return optimizer_groups(self, lr, weight_decay, self.config.lte_router_lr_scale)

    # --- LTE training hooks ---
    def _lte_layers(self):
        return [(i, b.mixer) for i, b in enumerate(self.blocks) if isinstance(b.mixer, LTEAttention)]

    def lte_penalty(self):
        """The L1 penalty [L4] of the last training forward, summed over the LTE layers (0 in eval).
        forward(idx, targets) adds it to the loss itself; after forward(idx), add it to yours. It is
        handed over once (a second call gives 0), so no layer keeps the autograd graph alive."""
        total = torch.zeros((), device=self.wte.weight.device)
        for _, m in self._lte_layers():
            total = total + m.take_penalty()
        return total

    def update_lte_lambdas(self, count_step: bool = True):
        """Run the lambda controller [L5] of every LTE layer; call once per optimizer step.
        count_step=False: this step's forwards do not count (see LTEAttention.update_lambda)."""
        for _, m in self._lte_layers():
            m.update_lambda(count_step)

    def lte_stats(self) -> list[dict]:
        """Per LTE layer: retained tokens per sequence (last training forward) and lambda, per KV head."""
        return [{"layer": i, "kept": m.last_kept.tolist(), "lambda": m.l1_lambda.tolist()}
                for i, m in self._lte_layers()]

    # --- decoding ---
    def init_state(self, batch_size: int, device=None, dtype=None, max_len=None) -> list[dict]:
        """An empty decoding state: one dict of tensors per layer (plus its host-side `length`).
        max_len: the most tokens it will take; full attention and NSA preallocate their caches to
        it (None: the caches grow as needed, which eager decoding can do but a captured step
        cannot). The other mixers' states have one size for any length."""
        _AttentionBase._check_max_len(max_len)
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        return [b.mixer.init_state(batch_size, device, dtype, max_len=max_len) for b in self.blocks]

    def reset_state(self, state: list[dict]) -> None:
        """Empty a decoding state in place, for the next sequence (its tensors stay where they are)."""
        for block, layer in zip(self.blocks, state):
            block.mixer.reset_state(layer)

    @staticmethod
    def state_nbytes(state: list[dict]) -> int:
        """Bytes held per sequence by a decoding state."""
        tensors = [t for layer in state for t in layer.values() if isinstance(t, torch.Tensor)]
        batch = next((t.shape[0] for t in tensors if t.ndim > 0), 1)
        return sum(t.numel() * t.element_size() for t in tensors) // max(batch, 1)

    def state_bytes(self, T: int) -> int:
        """Bytes of one sequence's decoding state after T tokens: every tensor of an empty state made
        for that length (full attention and NSA preallocate their caches to it; the other mixers have
        one size for any length), built on the CPU, so a model on the meta device can say it too."""
        return self.state_nbytes(self.init_state(1, device="cpu", max_len=T))

    def state_size(self, T: int) -> dict:
        """Numbers each mixer holds per sequence to decode token T + 1, by layer ("0:gdn", ...)."""
        return {f"{i}:{name}": b.mixer.state_size(T) for i, (b, name) in enumerate(zip(self.blocks, self.config.layers))}

    def decoder(self, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                compile: bool = False) -> "Decoder":
        """A `Decoder` for up to batch_size sequences of up to max_len tokens (prompt included);
        on CUDA it captures its decoding step in a CUDA graph (cuda_graph=False: eager);
        compile=True fuses the step with torch.compile first."""
        return Decoder(self, batch_size, max_len, cuda_graph, compile)

    def _decode_step(self, token, state: list[dict]):
        """One token per sequence, token [B, 1], through every layer's `step`: device work only, no
        host sync, the same shapes at every position. What a Decoder captures. Returns [B, vocab]."""
        x = self.wte(token)                                                     # [B, 1, C]
        for block, layer in zip(self.blocks, state):
            x = block.step(x, layer)
        return self.lm_head(self.norm(x))[:, 0]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool | None = None):
        """Prefill idx [B, T] once, then decode max_new_tokens one at a time (no recomputation of
        the past), through a `Decoder` of max_len T + max_new_tokens: on a CUDA device each token
        replays a captured step (cuda_graph=False: the same step, eager, as on the CPU).
        temperature 0 is greedy. Returns [B, T + max_new_tokens]."""
        _check_idx(idx, self.config.vocab_size)
        _check_sampling(max_new_tokens, temperature, top_k)
        was_training = self.training
        self.eval()
        try:
            decoder = Decoder(self, idx.shape[0], idx.shape[1] + max_new_tokens, cuda_graph)
            return decoder.generate(idx, max_new_tokens, temperature, top_k, generator)
        finally:
            self.train(was_training)

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        """The next token [B, 1] from logits [B, vocab], on their device and without a host sync.
        Sampling is torch.multinomial's own method for one sample, argmax(p / q) with q ~ Exp(1),
        so the same generator draws the same token; multinomial itself first checks p on the host."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1, keepdim=True)


class Decoder:
    """Decoding at the speed of the hardware: a static state and one captured step per model.

        model.eval()
        decoder = model.decoder(batch_size=1, max_len=4096)
        logits = decoder.prefill(prompt)                   # [B, T, vocab], one parallel pass
        token = logits[:, -1:].argmax(dim=-1)              # [B, 1], stays on the device
        logits = decoder.step(token)                       # [B, vocab], one replay of the graph
        out = decoder.generate(prompt, max_new_tokens=99)  # or all of it, sampled: [B, T + 99]

    A decoded token of a small model is microseconds of GPU work but milliseconds of Python and
    kernel launches. So, the pattern of gpt-fast: the state is allocated once (`init_state` with
    max_len: full attention's and NSA's caches preallocated, positions as tensors on the device);
    one decoding step (`TinyHybrid._decode_step`, every layer's `step`: it writes the state in
    place and its shapes never depend on the position) is captured into a CUDA graph after a
    warm-up; each token is copied into a static input and the graph replayed, with no host sync.
    Without CUDA, or with cuda_graph=False, the very same step runs eagerly.
    A graph still launches every small kernel of the step (a hundred or more); compile=True first
    fuses the step with torch.compile (tens of seconds, once per Decoder; with use_triton the
    kernels run as they are between the fused pieces, see kernels._launched_as_is): on an H200 the bench
    model's compiled and captured step costs 0.21 / 0.20 / 0.29 ms per token for gdn / gdn+swa /
    gdn+lte (float32, batch 1, the PyTorch ops; EXPERIMENTS.md section 7).
    max_len bounds the prompt plus the decoded tokens: past it, a ValueError before any work.
    """

    def __init__(self, model: TinyHybrid, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                 compile: bool = False):
        _check_decoder(model, batch_size, max_len, cuda_graph)
        _check_bool("compile", compile)
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        # the step that runs (captured or eager): the model's own, or torch.compile's fusion of it
        self._step_fn = torch.compile(model._decode_step, dynamic=False) if compile else model._decode_step
        self.device = model.wte.weight.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.state = model.init_state(batch_size, max_len=max_len)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)   # the static input
        self.graph = self.logits = None                    # the captured step and its output buffer
        if self.cuda_graph:
            self._capture()

    @property
    def length(self) -> int:
        """Tokens in the state, counted on the host (each layer's state keeps the count)."""
        return self.state[0]["length"]

    @torch.no_grad()
    def _capture(self, warmup: int = 3):
        """Warm up on a side stream (kernels compile, cuBLAS and the allocator settle), as PyTorch's
        CUDA-graph notes advise, then record one step. The warm-up steps write into the state, so it
        is emptied again; the graph keeps reading and writing these same tensors."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step_fn(self.token, self.state)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.model.reset_state(self.state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_fn(self.token, self.state)

    @torch.no_grad()
    def prefill(self, idx):
        """Start a new sequence per row: empty the state, then prefill idx [batch_size, T]
        (T <= max_len) in one parallel pass. Returns logits [B, T, vocab]."""
        _check_prompt(self, idx, 0)
        self.model.reset_state(self.state)
        logits, _ = self.model(idx, state=self.state)
        return logits

    @torch.no_grad()
    def step(self, token):
        """Decode one token per sequence: token [batch_size, 1] integer ids on the model's device
        (keep sampled ids there: copying them in needs no host sync). Returns logits [B, vocab], a
        copy: the next replay overwrites the graph's own output."""
        _check_step_token(self, token)
        self.token.copy_(token)
        if self.graph is None:
            logits = self._step_fn(self.token, self.state)
        else:
            self.graph.replay()
            logits = self.logits.clone()
        for layer in self.state:                           # the host count, as forward keeps it
            layer["length"] += 1
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """prefill(idx), then max_new_tokens sampled tokens (temperature 0: greedy), each fed back
        with step; T + max_new_tokens must fit in max_len. Returns [B, T + max_new_tokens]."""
        _check_sampling(max_new_tokens, temperature, top_k)
        _check_prompt(self, idx, max_new_tokens)
        logits = self.prefill(idx)[:, -1].float()
        out = [idx]
        for i in range(max_new_tokens):
            token = TinyHybrid._sample(logits, temperature, top_k, generator)   # [B, 1]
            out.append(token)
            if i + 1 < max_new_tokens:
                logits = self.step(token).float()
        return torch.cat(out, dim=1)


# --- the Decoder's input checks (names, values and what is allowed, before any work) ---

def _check_decoder(model, batch_size, max_len, cuda_graph) -> None:
    if not isinstance(model, TinyHybrid):
        raise TypeError(f"model must be a tiny_hybrid.TinyHybrid, got {type(model).__name__}")
    _check_int("batch_size", batch_size, low=1)
    _check_int("max_len", max_len, low=1)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be None (on CUDA devices), True or False, got {cuda_graph!r}")
    device = model.wte.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() before decoding "
                         "(a captured step would keep the training behaviour, dropout included)")


def _check_prompt(decoder: Decoder, idx, max_new_tokens: int) -> None:
    """A prompt [batch_size, T] on the model's device, with room for it and max_new_tokens more."""
    _check_idx(idx, decoder.model.config.vocab_size)
    B, T = idx.shape
    if B != decoder.batch_size:
        raise ValueError(f"idx has batch size {B}, the decoder was made for batch_size = {decoder.batch_size}")
    if idx.device != decoder.device:
        raise ValueError(f"idx is on {idx.device}, the model on {decoder.device}")
    if T + max_new_tokens > decoder.max_len:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) must fit in the "
                         f"decoder's max_len = {decoder.max_len}")
    if decoder.model.training:
        raise ValueError("the model is in training mode: call model.eval() before decoding")


def _check_step_token(decoder: Decoder, token) -> None:
    """One token id per sequence, [batch_size, 1], on the model's device, after a prefill, with
    room for it. Its range is checked on the CPU only: on a GPU that would wait for the device."""
    if not isinstance(token, torch.Tensor):
        raise TypeError(f"token must be a torch.Tensor of token ids, got {type(token).__name__}")
    if token.is_floating_point() or token.dtype == torch.bool or token.is_complex():
        raise TypeError(f"token must hold integer token ids, got dtype {token.dtype}")
    if token.shape != (decoder.batch_size, 1):
        raise ValueError(f"token must be [batch_size, 1] = [{decoder.batch_size}, 1], got shape {tuple(token.shape)}")
    if token.device != decoder.device:
        raise ValueError(f"token is on {token.device}, the model on {decoder.device}")
    if decoder.length == 0:
        raise ValueError("step needs a sequence to continue: call prefill(idx) first")
    if decoder.length + 1 > decoder.max_len:
        raise ValueError(f"the decoder holds max_len = {decoder.max_len} tokens and is full")
    if not token.is_cuda:
        _check_idx(token, decoder.model.config.vocab_size)


# =============================================================================================
# 5. INPUT CHECKS: every public entry point names the argument, the value and what is allowed,
#    before any work. kernels.py calls the ops' checks too, so that both reject alike.
# =============================================================================================

def _check_tensor(name: str, x, ndim: int, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, note: str = "") -> None:
    """A size or count: an int (not a bool) >= low."""
    if not _is_int(value) or value < low:
        allowed = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")


def _check_real(name: str, value, ok, allowed: str) -> None:
    """A rate or scale: a finite real number (not a bool) for which ok(value) holds."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_gdn(q, k, v, g, beta, initial_state) -> None:
    """Argument checks of the Gated DeltaNet ops."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
    _check_tensor("g", g, 3)
    _check_tensor("beta", beta, 3)
    B, T, H, K = k.shape
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(x.shape)}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if initial_state.shape != (B, H, K, v.shape[3]):
            raise ValueError(f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[3]}], "
                             f"got {tuple(initial_state.shape)}")


def _check_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, T, H, D], k/v [B, T, Hkv, D] with H % Hkv == 0."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def _check_window(window) -> None:
    if window is not None and (not _is_int(window) or window < 0):
        raise ValueError(f"window must be None or an int >= 0, got {window!r}")


def _check_attention(q, k, v, window, keep) -> None:
    """Argument checks of `attention`, shared with its Triton twin so both reject alike."""
    _check_gqa(q, k, v)
    _check_window(window)
    if keep is not None and window is None:
        raise ValueError("keep only makes sense with a window (full attention already sees every key)")
    if keep is not None:
        _check_keep(keep, q.shape[0], q.shape[1], k.shape[2])


def _check_keep(keep, B: int, T: int, Hkv: int) -> None:
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be None or a tensor, got {type(keep).__name__}")
    if keep.shape != (B, T, Hkv):
        raise ValueError(f"keep must be [B, T, Hkv] = [{B}, {T}, {Hkv}], got {tuple(keep.shape)}")
    if keep.dtype != torch.bool and (keep.is_floating_point() or keep.is_complex()):
        raise TypeError(f"keep must be bool (kept forever) or integer (visible until), got {keep.dtype}")


def _check_decode(q, k_cache, v_cache, valid) -> None:
    """Argument checks of `attention_decode`, shared with its Triton twin."""
    _check_tensor("q", q, 3)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (B, S, Hkv, D) or v_cache.shape != k_cache.shape or Hkv == 0 or H % Hkv:
        raise ValueError(f"k_cache and v_cache must be [B, S, Hkv, D] with H % Hkv == 0; got q "
                         f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.shape != (B, S, Hkv)
                              or valid.dtype != torch.bool):
        got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be bool [B, S, Hkv] = [{B}, {S}, {Hkv}], got {got}")
    _check_decode_sees_a_slot(valid, B, S, H)


def _check_decode_sees_a_slot(valid, B: int, S: int, H: int) -> None:
    """Every query must see at least one slot: softmax over no key at all is 0 / 0 = NaN.

    Reading `valid` is data-dependent: on CUDA it becomes a device-side assert (no host wait), and
    it is skipped while a CUDA graph is being captured; the mixers' own decoding always holds the
    current token, so they never trip it."""
    if B * H == 0:                                     # no query at all: nothing to attend to
        return
    if valid is None:
        if S == 0:
            raise ValueError("k_cache has no slots (S = 0): the query would attend to nothing")
        return
    if _capturing_cuda_graph(valid):
        return
    sees = valid.any(dim=1)                                                     # [B, Hkv]
    if _assert_on_device(sees.all(), "valid has a batch row and KV head with no True slot: "
                                     "softmax over no key is NaN"):
        return
    if not bool(sees.all()):
        b, h = (int(i) for i in (~sees).nonzero()[0])
        raise ValueError(f"valid has no True slot for batch row {b}, KV head {h}: its queries would "
                         f"attend to nothing (softmax over no key is NaN); each needs at least one valid slot")


def _assert_on_device(ok: torch.Tensor, message: str) -> bool:
    """A check of tensor VALUES, without making the host wait for the device.

    On the CPU this returns False and the caller raises its ValueError with the details. On a GPU,
    reading a value back would stall the host until the device has finished all queued work, in
    every training step; there the check is queued as a device-side assert instead (returns True):
    a violation stops the process at a later CUDA call with `message`, as PyTorch's own embedding
    does for an out-of-range id."""
    if not ok.is_cuda:
        return False
    torch._assert_async(ok, message)
    return True


def _capturing_cuda_graph(t: torch.Tensor) -> bool:
    """True while a CUDA graph captures work on t's device (then no host may read device data)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_nsa_selection(top_n, n_recent) -> None:
    if top_n < n_recent + 1:
        raise ValueError(f"top_n ({top_n}) must be at least n_recent + 1 = {n_recent + 1}: "
                         f"the first and the recent blocks are always selected")


def _check_router_convs(kernel_sizes, dilations) -> None:
    """The router's convolutions: one dilation per kernel; odd kernels, so that 'same' padding
    centres each score on its token."""
    if len(kernel_sizes) != len(dilations) or not kernel_sizes:
        raise ValueError(f"lte_kernel_sizes {kernel_sizes} and lte_dilations {dilations} must be "
                         f"non-empty and of the same length")
    if any(k < 1 or k % 2 == 0 for k in kernel_sizes) or any(d < 1 for d in dilations):
        raise ValueError(f"lte_kernel_sizes must be odd and >= 1 ('same' padding), dilations >= 1; "
                         f"got {kernel_sizes}, {dilations}")


def _check_router_window(x, reach: int, n_kv_head: int, channels: int) -> None:
    """LTERouter.score_one's input: [B, 2 reach + 1, Hkv, 2D], a token and its reach neighbours
    on each side (a longer window would score another token without a word)."""
    _check_tensor("x", x, 4)
    if tuple(x.shape[1:]) != (2 * reach + 1, n_kv_head, channels):
        raise ValueError(f"x must be [B, 2 reach + 1, Hkv, 2D] = [B, {2 * reach + 1}, {n_kv_head}, {channels}] "
                         f"(token j and its {reach} neighbours on each side), got shape {tuple(x.shape)}")


def _check_lte_rule(scores, window, sink, buffer) -> None:
    """Argument checks of `lte_visible_until`, shared with its Triton twin so both reject alike."""
    _check_tensor("scores", scores, 3)
    if scores.shape[0] < 1 or scores.shape[1] < 1 or scores.shape[2] < 1:
        raise ValueError(f"scores must be [B, T, Hkv] with every size >= 1, got {tuple(scores.shape)}")
    for name, value in (("window", window), ("sink", sink), ("buffer", buffer)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_eviction(policy, sink, window, buffer) -> None:
    """Arguments of `EvictingAttention` and `with_eviction`."""
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"policy must be one of {EVICTION_POLICIES}, got {policy!r}")
    for name, value in (("sink", sink), ("window", window), ("buffer", buffer)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if policy == "streaming" and buffer != 0:
        raise ValueError(f"policy 'streaming' keeps no buffer: buffer must be 0, got {buffer!r} "
                         f"(at equal memory, give its slots to the window: window = w + b)")


def _check_mixer_input(x, d_model: int) -> None:
    """What every mixer takes: a floating tensor x [B, T, C] with B >= 1, T >= 1 and C = d_model."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, T, C], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != d_model:
        raise ValueError(f"x must be [B, T, C] with B >= 1, T >= 1 and C = d_model = {d_model}, "
                         f"got shape {tuple(x.shape)}")


def _check_preset(name, overrides) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    if "layers" in overrides:
        raise ValueError("a preset sets layers itself; build Config(layers=...) directly instead")


def _check_idx(idx, vocab_size: int, check_range: bool = True) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.ndim != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"idx must be [B, T] with B >= 1 and T >= 1, got shape {tuple(idx.shape)}")
    if not check_range:
        return
    in_range = (idx >= 0) & (idx < vocab_size)
    if _assert_on_device(in_range.all(), f"token ids must be in [0, {vocab_size})"):
        return
    if not bool(in_range.all()):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


def _check_targets(targets, idx, vocab_size: int) -> None:
    """targets: integer ids shaped like idx, each in [0, vocab) or -100 (no loss there), and at
    least one that is not -100 (a mean over no target is 0 / 0 = NaN)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be None or a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must hold integer token ids (or -100), got dtype {targets.dtype}")
    if targets.shape != idx.shape:
        raise ValueError(f"targets must be shaped like idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
    ignored = targets == -100
    out_of_range = ~ignored & ((targets < 0) | (targets >= vocab_size))
    in_range_msg = f"targets must be in [0, {vocab_size}) or -100 (ignored)"
    some_msg = "targets must not be all -100 (ignored): the loss would be NaN"
    if (_assert_on_device(~out_of_range.any(), in_range_msg) and
            _assert_on_device((~ignored).any(), some_msg)):
        return
    n_bad, n_real = torch.stack([out_of_range.sum(), (~ignored).sum()]).tolist()
    if n_bad:
        bad = int(targets[out_of_range][0])
        raise ValueError(f"targets must be in [0, {vocab_size}) or -100 (ignored), got {n_bad} "
                         f"value(s) outside, e.g. {bad}")
    if n_real == 0:
        raise ValueError("targets are all -100 (ignored): there is nothing to learn from, the loss would be NaN")


def _check_state(state, n_layers: int, batch_size: int) -> None:
    """A decoding state from TinyHybrid.init_state, for this model and batch size."""
    if len(state) != n_layers:
        raise ValueError(f"state must come from init_state ({n_layers} layers), got {len(state)}")
    held = next((t.shape[0] for t in state[0].values() if isinstance(t, torch.Tensor)), batch_size)
    if held != batch_size:
        raise ValueError(f"state was made for batch size {held}, idx has batch size {batch_size}")


def _check_sampling(max_new_tokens, temperature, top_k) -> None:
    _check_int("max_new_tokens", max_new_tokens, low=0)
    _check_real("temperature", temperature, lambda x: x >= 0, ">= 0 (0: greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
