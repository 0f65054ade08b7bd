"""tiny-hybrid: hybrid linear / sparse attention language models, small and readable.

In plain PyTorch, the models of He & Garner, "Alleviating Forgetfulness of Linear Attention by
Hybrid Sparse Attention and Contextualized Learnable Token Eviction", arXiv 2510.20787 (2025), whose
linear-attention layer is Yang, Kautz & Hatamizadeh's Gated DeltaNet (ICLR 2025).
GDN keeps a fixed K x V state per head and forgets old facts once it is full; a mixer that looks
directly at past tokens gives recall back. The paper's LTE does so with a constant-size state: a
sliding window plus the few tokens a tiny CNN decided to keep.

Sections: 1. ops, 2. mixers (GDN, attention, NSA), 3. LTE in the paper's order, 4. the model (docs/model.md).

Dimensions
    B batch size, T sequence length (time), C model width (d_model), H query heads (GDN's for GDN)
    Hkv key/value heads (GQA: H % Hkv == 0; G = H // Hkv query heads share one KV head)
    D attention head dim, K, V key / value head dims of Gated DeltaNet, L its chunk length

The papers' symbols
    S_t      GDN state of one head: K x V here (the GDN paper's S_t is its transpose, V x K)
    alpha_t  GDN decay in (0, 1], held as g_t = log alpha_t <= 0;   beta_t  GDN writing strength in (0, 1)
    w        window: query i sees key j when 0 <= i - j <= w, w + 1 keys (the paper's SWA 1024 is w = 1023)
    s, b     LTE sink tokens (always kept), LTE buffer (retained tokens per KV head)
    r_j      LTE retention score of token j (per KV head), in (-1/2, 1/2): kept when r_j > 0
    R        the router's receptive field, 2 reach + 1 = 13;   lambda  LTE's L1 penalty weight per (layer, KV head)
    l, n     NSA block length, selected blocks per query; phi its block compression (mean pooling)

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

Where the code differs from the paper or its code, the line says so; README.md tables them all.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import (check_attention, check_config, check_decode, check_gdn, check_gqa, check_idx, check_int,
                    check_lte_rule, check_max_len, check_mixer_input, check_nsa_selection, check_preset,
                    check_room, check_router_convs, check_router_window, check_sampling, check_state,
                    check_tensor, check_window)

# "visible forever" in an LTE visibility list (see `attention`); any value >= T would do.
KEEP_FOREVER = torch.iinfo(torch.int32).max


# =============================================================================================
# 1. OPS
# =============================================================================================

# --- 1a. Gated DeltaNet ----------------------------------------------------------------------

def gated_delta_rule_recurrent(q, k, v, g, beta, scale=None, initial_state=None):
    """Gated DeltaNet token by token: the definition, used for decoding and as the test oracle.

    q, k: [B, T, H, K] L2-normalised, v: [B, T, H, V], g: [B, T, H] = log alpha_t <= 0, beta: [B, T, H],
    initial_state: [B, H, K, V] or None (zeros). Per head, with state S (K x V):
        S_t = exp(g_t) S_{t-1};  S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T                  [G2]
        o_t = scale S_t^T q_t,   scale = K ** -0.5 by default                                 [G3]
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32)."""
    check_gdn(q, k, v, g, beta, initial_state)
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
    """Gated DeltaNet in chunks of L tokens (the WY / UT transform): the recurrent form's function.

    Arguments and returns as `gated_delta_rule_recurrent`. Within a chunk, with S_0 the state entering
    it, one triangular solve gives the delta-rule updates U = U' - W S_0, and
        O   = scale (diag(e^gamma) Q S_0 + (Q K^T * Gamma) U)                                [G3]
        S_L = e^{gamma_L} S_0 + (K * e^{gamma_L - gamma})^T U                                [G2]
    (the derivation: docs/model.md). Only step 5, the walk over chunks, is sequential."""
    check_gdn(q, k, v, g, beta, initial_state)
    check_int("chunk_size", chunk_size, low=1)
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
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, Vd)[:, :T]                # [B, N, L, H, V] -> [B, T, H, V]
    return o.to(out_dtype), S


# --- 1b. One causal softmax attention: full, sliding window, LTE band-plus-columns ------------

def attention(q, k, v, window=None, keep=None, scale=None):
    """Causal softmax attention: full, sliding-window, or LTE's band plus kept columns.

    q: [B, T, H, D], k, v: [B, T, Hkv, D] (GQA: query head h reads KV head h // (H / Hkv)).
    window: None (full) or w: query i sees key j when 0 <= i - j <= w. keep [B, T, Hkv], only with
    a window, the keys visible beyond it: bool, kept forever (LTE training [L2]); or int, the last
    query that sees key j (LTE's capped buffer [L6]; -1: the window only).
        o_i = sum_j softmax_j(scale q_i . k_j | j visible to i) v_j,  scale = D ** -0.5 by default
    Returns o [B, T, H, D] in q's dtype (float32 maths on a dense T x T mask)."""
    check_attention(q, k, v, window, keep)
    B, T, H, D = q.shape
    G = H // k.shape[2]                                                         # query heads per KV head
    scale = D ** -0.5 if scale is None else scale
    i = torch.arange(T, device=q.device)[:, None]                               # [T, 1] queries
    j = torch.arange(T, device=q.device)[None, :]                               # [1, T] keys
    allowed = j <= i                                                            # [T, T] causal
    if window is not None:
        visible = (i - j) <= window                                             # [T, T] the band
        if keep is not None and keep.dtype == torch.bool:                       # kept for every later query
            visible = visible | keep.to(q.device).permute(0, 2, 1)[:, :, None, :]   # [B, T, Hkv] -> [B, Hkv, 1, T]
        elif keep is not None:                                                  # kept for the queries i <= until_j
            until = keep.to(q.device, torch.int64).permute(0, 2, 1)[:, :, None, :]   # [B, T, Hkv] -> [B, Hkv, 1, T]
            visible = visible | (i <= until)                                    # [B, Hkv, T, T]
        allowed = allowed & visible
    allowed = allowed.expand(B, k.shape[2], T, T).repeat_interleave(G, dim=1)   # [B, Hkv, T, T] -> [B, H, T, T]
    qf = q.float().transpose(1, 2)                                              # [B, H, T, D]
    kf, vf = (x.repeat_interleave(G, dim=2).float().transpose(1, 2) for x in (k, v))   # [B, H, T, D]
    scores = (qf @ kf.transpose(-1, -2)) * scale                                # [B, H, T, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = scores.softmax(dim=-1) @ vf                                             # [B, H, T, D]
    return o.transpose(1, 2).to(q.dtype)


def attention_decode(q, k_cache, v_cache, valid=None, scale=None):
    """A decoding query q [B, H, D] over cache slots [B, S, Hkv, D] where valid [B, S, Hkv] (None: all)."""
    check_decode(q, k_cache, v_cache, valid)
    B, H, D = q.shape
    G = H // k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kf, vf = (x.repeat_interleave(G, dim=2).float() for x in (k_cache, v_cache))   # [B, S, H, D]
    scores = torch.einsum("bhd,bshd->bhs", q.float(), kf) * scale              # [B, H, S]
    if valid is not None:
        scores = scores.masked_fill(~valid.repeat_interleave(G, dim=2).transpose(1, 2), float("-inf"))
    p = scores.softmax(dim=-1)                                                  # [B, H, S]
    return torch.einsum("bhs,bshd->bhd", p, vf).to(q.dtype)


# --- 1c. Native Sparse Attention pieces -------------------------------------------------------

def nsa_compress(x, block: int):
    """phi [N1]: mean-pool complete blocks of l tokens: [B, T, Hkv, D] -> [B, T // l, Hkv, D]. The
    trailing incomplete block is left out: no query may read a summary of tokens it has not seen."""
    check_tensor("x", x, 4)
    check_int("block", block, low=1)
    B, T, Hkv, D = x.shape
    n = T // block
    # Differs from the original NSA, not from the paper's code: NSA compresses a block with a learned
    # MLP over its tokens and their positions, keys and values apart; both here mean-pool.
    return x[:, : n * block].reshape(B, n, block, Hkv, D).mean(dim=2)          # [B, n, Hkv, D]


def nsa_compressed_attention(q, k_cmp, v_cmp, block: int, scale=None, offset=0):
    """Compressed branch [N1]: q [B, T, H, D] at positions offset .. over the complete blocks of k_cmp,
    v_cmp [B, Nc, Hkv, D] -> (o [B, T, H, D], lse [B, T, H] float32; o = 0, lse = -inf before any)."""
    B, T, H, D = q.shape
    Hkv = k_cmp.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q_pos = offset + torch.arange(T, device=q.device)                           # offset: int or 0-d tensor
    # block n is complete for the query at position p once its last token, (n + 1) l - 1, is <= p
    visible = (torch.arange(1, k_cmp.shape[1] + 1, device=q.device) * block - 1) <= q_pos[:, None]   # [T, Nc]
    kf = k_cmp.repeat_interleave(H // Hkv, dim=2).float()                      # [B, Nc, H, D]
    vf = v_cmp.repeat_interleave(H // Hkv, dim=2).float()
    scores = torch.einsum("bthd,bnhd->bhtn", q.float(), kf) * scale             # [B, H, T, Nc]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)                                              # [B, H, T]
    p = (scores - lse[..., None]).exp().nan_to_num(0.0)                         # rows with no block: 0
    o = torch.einsum("bhtn,bnhd->bthd", p, vf)
    return o.to(q.dtype), lse.transpose(1, 2)


def nsa_block_scores(q, k_cmp, lse, block: int, scale=None, offset=0):
    """Block importance [N2]: p_{i,n} = exp(scale q_i . kc_n - lse_i) summed over a KV group's query
    heads, [B, T, Hkv, Nc] float32 (0 for incomplete blocks). No gradient: selection is a hard choice."""
    B, T, H, D = q.shape
    Hkv = k_cmp.shape[2]
    scale = D ** -0.5 if scale is None else scale
    with torch.no_grad():
        q_pos = offset + torch.arange(T, device=q.device)                       # offset: int or 0-d tensor
        visible = (torch.arange(1, k_cmp.shape[1] + 1, device=q.device) * block - 1) <= q_pos[:, None]  # [T, Nc]
        kf = k_cmp.repeat_interleave(H // Hkv, dim=2).float()
        logits = torch.einsum("bthd,bnhd->bthn", q.float(), kf) * scale         # [B, T, H, Nc]
        p = (logits - lse.float()[..., None]).exp().masked_fill(~visible[:, None], 0.0)
        return p.reshape(B, T, Hkv, H // Hkv, -1).sum(dim=3)                    # [B, T, Hkv, G, Nc] -> [B, T, Hkv, Nc]


def nsa_select_blocks(scores, block: int, top_n: int, n_recent: int = 2, n_blocks: int | None = None,
                      offset=0):
    """Top-n blocks per query and KV head [N2] from scores [B, T, Hkv, Nc]: of the blocks started by
    position p (n l <= p), block 0 and the n_recent newest first, then by score, ties to the lower index
    -> int64 [B, T, Hkv, top_n] (-1: none). n_blocks fixes the shapes of a decoding step."""
    check_nsa_selection(top_n, n_recent)
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
    """Selected branch [N2]: query i sees key j <= i when block j // l is in block_idx [B, T, Hkv, n]
    (-1: none) for i and its KV head. q: [B, T, H, D], k, v: [B, T, Hkv, D] -> o [B, T, H, D]."""
    check_gqa(q, k, v)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    key_block = torch.arange(T, device=q.device) // block                      # [T]
    chosen = (block_idx[..., None] == key_block).any(dim=-2)                    # [B, T, Hkv, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    allowed = (chosen & causal[None, :, None, :]).permute(0, 2, 1, 3)           # [B, Hkv, T, T]
    allowed = allowed.repeat_interleave(H // Hkv, dim=1)                        # [B, H, T, T]
    qf = q.float().transpose(1, 2)                                              # [B, H, T, D]
    kf, vf = (x.repeat_interleave(H // Hkv, dim=2).float().transpose(1, 2) for x in (k, v))   # [B, H, T, D]
    scores = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ vf).transpose(1, 2).to(q.dtype)


def nsa_combine(gates, o_cmp, o_slc, o_swa):
    """[N3] o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa; gates [B, T, H, 3], branches [B, T, H, D]."""
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
    """RoPE (rotate-half) on [B, T, H, D] at positions offset .. offset + T - 1, offset an int or 0-d."""
    B, T, H, D = x.shape
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)   # [D/2]
    positions = offset + torch.arange(T, device=x.device)                       # [T], exact in float32 below 2^24
    angle = positions.float()[:, None] * inv_freq
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]                       # [T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _op(config, reference):
    """`reference`, or with config.use_triton its Triton twin of the same name in kernels.py. Mixers
    name the reference, so "go to definition" leads to the maths."""
    if not config.use_triton:
        return reference
    try:
        import kernels
    except ImportError as e:
        raise ImportError(f"Config.use_triton=True needs kernels.py and Triton (Linux only): {e}") from e
    if not hasattr(kernels, reference.__name__):                # warned once per op
        warnings.warn(f"kernels.py has no {reference.__name__} yet, using the PyTorch reference")
        return reference
    return getattr(kernels, reference.__name__)


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over time (kernel 4 in GDN): y_t = sum_i w_i x_{t-i}."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x, cache=None):
        """x [B, T, C], cache [B, kernel - 1, C] inputs before x (None: zeros) -> (y, new cache)."""
        B, T, C = x.shape
        past = x.new_zeros(B, self.kernel_size - 1, C) if cache is None else cache.to(x.dtype)
        xp = torch.cat([past, x], dim=1)                                        # [B, k - 1 + T, C]
        if T == 1:  # a decoding step: the sum written out, which torch.compile fuses (no conv launch)
            y = (xp * self.weight[:, 0].t().to(x.dtype)).sum(dim=1, keepdim=True)   # [B, k, C] * [k, C] -> [B, 1, C]
        else:
            y = F.conv1d(xp.transpose(1, 2), self.weight.to(x.dtype), groups=C).transpose(1, 2)  # -> [B, T, C]
        return y, xp[:, xp.shape[1] - (self.kernel_size - 1):]


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet, the hybrids' linear-attention layer. q, k, v: linear, short causal conv, SiLU;
    q, k L2-normalised; beta = sigmoid(W_b x); g = -exp(A_log) softplus(W_a x + dt_bias)       [G1]
    o = gated_delta_rule(q, k, v, g, beta); out = W_o (RMSNorm(o) * SiLU(W_gate x)), per head.
    Decoding state: H K V numbers plus the conv tails, whatever the length."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C, H, K, V = config.d_model, config.gdn_heads, config.gdn_head_dim, config.gdn_value_dim
        self.n_head, self.head_dim, self.value_dim = H, K, V
        # W_q, W_k, W_v, W_b (beta), W_a (alpha), W_gate stacked by rows: one launch instead of six
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
        """Empty decoding state: S [B, H, K, V] float32, conv tails, pos and length; of any length."""
        H, K, V = self.n_head, self.head_dim, self.value_dim
        tail = lambda C: torch.zeros(batch_size, self.config.gdn_conv_size - 1, C, device=device, dtype=dtype)
        return {"S": torch.zeros(batch_size, H, K, V, device=device),
                "q_conv": tail(H * K), "k_conv": tail(H * K), "v_conv": tail(H * V),
                "pos": torch.zeros((), dtype=torch.long, device=device), "length": 0}

    def forward(self, x, state: dict | None = None):
        out = self.step(x, state)
        if state is not None:
            state["length"] += x.shape[1]                  # host bookkeeping, outside what a graph captures
        return out

    def step(self, x, state: dict | None):
        """forward's device work, without the host-side length (what a CUDA graph captures)."""
        check_mixer_input(x, self.config.d_model)
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
        else:   # continue from S: the recurrent form for one token, the chunked form for a prompt
            if T == 1:
                o, S = _op(self.config, gated_delta_rule_recurrent)(q, k, v, g, beta, initial_state=state["S"])
            else:
                o, S = _op(self.config, gated_delta_rule)(q, k, v, g, beta, initial_state=state["S"],
                                                          chunk_size=self.config.gdn_chunk_size)
            state["S"].copy_(S)                            # in place, as every write to a state
            for name in ("q", "k", "v"):
                state[f"{name}_conv"].copy_(tails[name])
            state["pos"].add_(T)
        o = self.o_norm(o) * F.silu(gate.view(B, T, H, V))                     # [B, T, H V] -> [B, T, H, V]
        return self.o_proj(o.reshape(B, T, H * V))                              # [B, T, H, V] -> [B, T, C']

    def state_size(self, T: int) -> int:
        """Numbers held per sequence while decoding, for any T."""
        H, K, V = self.n_head, self.head_dim, self.value_dim
        return H * K * V + (self.config.gdn_conv_size - 1) * H * (2 * K + V)


class AttentionBase(nn.Module):
    """What the attention-type mixers share: q, k, v with RoPE and GQA, decoding, and an optional key
    shift, `Config.key_conv = c`: k = W_k x + ShortConv_c(W_k x), so that a key carries the tokens just
    before it, as GDN's short convs do (why: docs/model.md)."""

    block = 1                                              # a cache grows in whole blocks (NSA: l tokens)

    def __init__(self, config):
        super().__init__()
        self.config = config
        C, H, Hkv, D = config.d_model, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, D
        # W_q, W_k and W_v stacked by rows: one launch instead of three (k, v: Hkv heads only, GQA)
        self.qkv_split = (H * D, Hkv * D, Hkv * D)                             # q, k, v
        self.qkv_proj = nn.Linear(C, sum(self.qkv_split), bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        # Differs from the paper (an addition, off by default): the key shift described above.
        self.k_conv = ShortConv(Hkv * D, config.key_conv) if config.key_conv else None

    def _qkv(self, x, offset=0, state: dict | None = None):
        """x [B, T, C] -> q [B, T, H, D], k, v and k before RoPE [B, T, Hkv, D] at positions offset ..
        offset + T - 1; with a state, the key shift continues from its conv tail (updated in place)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)               # [B, T, H D], 2 x [B, T, Hkv D]
        if self.k_conv is not None:
            shifted, tail = self.k_conv(k, None if state is None else state["k_conv"])
            k = k + shifted
            if state is not None:
                state["k_conv"].copy_(tail)
        q = q.view(B, T, self.n_head, self.head_dim)                            # [B, T, H * D] -> [B, T, H, D]
        k = k.view(B, T, self.n_kv_head, self.head_dim)                         # [B, T, Hkv * D] -> [B, T, Hkv, D]
        v = v.view(B, T, self.n_kv_head, self.head_dim)                         # [B, T, Hkv * D] -> [B, T, Hkv, D]
        base = self.config.rope_base
        return rotary(q, offset, base), rotary(k, offset, base), v, k

    def forward(self, x, state: dict | None = None):
        check_mixer_input(x, self.config.d_model)
        o = self._parallel(x) if state is None else self._decode(x, state)
        return self.o_proj(o.flatten(2))                                        # [B, T, H, D] -> [B, T, H * D]

    def step(self, x, state: dict):
        """forward for one token x [B, 1, C], device work only (the caller counts the length)."""
        check_mixer_input(x, self.config.d_model)
        if x.shape[1] != 1:
            raise ValueError(f"step takes one token: x must be [B, 1, C], got shape {tuple(x.shape)}")
        return self.o_proj(self._step(x, state).flatten(2))                     # [B, 1, H, D] -> [B, 1, H * D]

    def _decode(self, x, state: dict):
        """Continue a sequence: a prompt into an empty state in parallel, anything later step by step."""
        T = x.shape[1]
        check_room(state, T)
        self._make_room(state, T)
        if state["length"] == 0:
            o = self._parallel(x, state)
            state["pos"].fill_(T)
        else:
            o = torch.cat([self._step(x[:, t: t + 1], state) for t in range(T)], dim=1)
        state["length"] += T                               # host bookkeeping, outside what a graph captures
        return o

    def _make_room(self, state: dict, T: int) -> None:
        """Grow a cache made without max_len (full attention's, NSA's) so that T more tokens fit,
        doubling it (O(1) a token). A state of fixed size has no "max_len"."""
        slots, l = state["k"].shape[1], self.block
        if state.get("max_len", 0) is not None or state["length"] + T <= slots:
            return
        more = -(-max(state["length"] + T, 2 * slots) // l) * l - slots
        for name in ("k", "v", "valid", "k_cmp", "v_cmp"):
            if name in state:                              # the compressed caches hold a slot per block
                c, extra = state[name], more // l if name.endswith("_cmp") else more
                state[name] = torch.cat([c, c.new_zeros(c.shape[0], extra, *c.shape[2:])], 1)

    def _new_state(self, batch_size: int, device, dtype, **tensors) -> dict:
        """The mixer's tensors, the key shift's conv tail, and two counters: pos, the next position as
        a 0-d tensor on the device (a captured step advances it), and length, the same on the host."""
        if self.k_conv is not None:
            tensors["k_conv"] = torch.zeros(batch_size, self.config.key_conv - 1, self.n_kv_head * self.head_dim,
                                            device=device, dtype=dtype)
        return {**tensors, "pos": torch.zeros((), dtype=torch.long, device=device), "length": 0}

    def _step(self, x, state):
        """One token x [B, 1, C] -> o [B, 1, H, D], in place, with the same shapes at every position
        (decoder.py captures it): token t takes slot t % slots and its query attends every slot held;
        a constant-size cache first lets token t - w - 1 leave the window."""
        t = state["pos"]                                   # 0-d, on the device
        q, k, v, k_raw = self._qkv(x, t, state)
        if "buf_k" in state:
            self._leave_window(state, t)
        slot = self._enter(state, t.view(1), k, v)
        self._entered(state, t, slot, k_raw, v)
        o = self._attend_held(q[:, 0], state)
        t.add_(1)                                          # last: t is the state's own tensor
        return o[:, None]

    def _entered(self, state, t, slot, k_raw, v) -> None:
        """What a mixer does once token t holds its slot (LTE: score a token, see LTEAttention)."""

    def _attend_held(self, q, state):
        """The query q [B, H, D] over every slot the state holds -> o [B, H, D]."""
        k, v, valid = self._held(state)
        return _op(self.config, attention_decode)(q, k.to(q.dtype), v.to(q.dtype), valid)

    @staticmethod
    def _enter(state: dict, positions, k, v) -> torch.Tensor:
        """k, v [B, P, Hkv, D] of the tokens at `positions` [P] into slots position % slots, returned."""
        slots = positions % state["k"].shape[1]
        state["k"].index_copy_(1, slots, k.to(state["k"].dtype))
        state["v"].index_copy_(1, slots, v.to(state["v"].dtype))
        state["valid"].index_fill_(1, slots, True)
        return slots

    @staticmethod
    def _held(state):
        """Every slot a query reads: k, v [B, S, Hkv, D], valid [B, S, Hkv] (sinks, ring, buffer)."""
        if "buf_k" not in state:
            return state["k"], state["v"], state["valid"]
        slots = [(state["sink_k"], state["sink_v"], state["sink_valid"]), (state["k"], state["v"], state["valid"]),
                 (state["buf_k"], state["buf_v"], (state["buf_pos"] >= 0).transpose(1, 2))]
        return tuple(torch.cat(parts, dim=1) for parts in zip(*slots))

    def _key_conv_size(self) -> int:
        return 0 if self.k_conv is None else (self.config.key_conv - 1) * self.n_kv_head * self.head_dim

    # --- a constant-size cache (LTE's, eviction.py's): s sinks, a ring of w + 1, b buffer slots; `_offer` decides
    def _sinks_window_buffer(self, batch_size: int, device, dtype, scored: int) -> dict:
        """The empty cache; a score for `scored` ring slots; buffer scores -inf and positions -1."""
        B, Hkv, D, b = batch_size, self.n_kv_head, self.head_dim, self.buffer
        zeros = lambda n: torch.zeros(B, n, Hkv, D, device=device, dtype=dtype)
        off = lambda n: torch.zeros(B, n, Hkv, dtype=torch.bool, device=device)
        return {"sink_k": zeros(self.sink), "sink_v": zeros(self.sink), "sink_valid": off(self.sink),
                "k": zeros(self.window + 1), "v": zeros(self.window + 1), "valid": off(self.window + 1),
                "score": torch.zeros(B, scored, Hkv, device=device), "buf_k": zeros(b), "buf_v": zeros(b),
                "buf_score": torch.full((B, Hkv, b), float("-inf"), device=device),
                "buf_pos": torch.full((B, Hkv, b), -1, dtype=torch.long, device=device)}

    def _leave_window(self, state, t) -> None:
        """Token j = t - w - 1 leaves the ring as token t arrives: a sink (j < s) moves to its slot, a
        later token is offered to the buffer (`_offer`) and takes the slot it wins. j < 0: nothing."""
        j = t - self.window - 1
        ring_slot = (t % (self.window + 1)).view(1)        # j's ring slot, which token t takes next
        leaving = {name: state[name].index_select(1, ring_slot) for name in ("k", "v")}   # [B, 1, Hkv, D]
        if self.sink:
            to_sink = (j >= 0) & (j < self.sink)
            sink_slot = j.clamp(0, self.sink - 1).view(1)
            for name in ("k", "v"):
                sinks = state["sink_" + name]
                sinks.index_copy_(1, sink_slot, torch.where(to_sink, leaving[name], sinks.index_select(1, sink_slot)))
            state["sink_valid"].index_copy_(1, sink_slot, state["sink_valid"].index_select(1, sink_slot) | to_sink)
        if self.buffer == 0:
            return
        entered, slot = self._offer(state, j, state["score"].index_select(1, ring_slot)[:, 0])   # [B, Hkv] each
        for name in ("k", "v"):
            buf = state["buf_" + name]                                          # [B, b, Hkv, D]
            idx = slot[:, None, :, None].expand(-1, 1, -1, buf.shape[-1])       # [B, 1, Hkv, D]
            buf.scatter_(1, idx, torch.where(entered[:, None, :, None], leaving[name], buf.gather(1, idx)))


class Attention(AttentionBase):
    """Softmax attention with RoPE and GQA: full (window=None) or sliding window (the last w + 1 tokens).
    Decoding state: k, v, valid; token t in slot t % (w + 1) of a ring, or t of max_len slots (full)."""

    def __init__(self, config, window: int | None = None):
        super().__init__(config)
        check_window(window)
        # Differs from the paper in counting only: its SWA window of 1024 keys is window = 1023 here.
        self.window = window

    def _parallel(self, x, state=None):
        q, k, v, _ = self._qkv(x, state=state)
        if state is not None:                              # prefill: the tokens a ring still holds after them
            T = k.shape[1]
            recent = torch.arange(max(0, T - state["k"].shape[1]), T, device=k.device)
            self._enter(state, recent, k[:, recent], v[:, recent])
        return _op(self.config, attention)(q, k, v, window=self.window)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """An empty state: w + 1 slots for a window, max_len for full attention (None: it grows)."""
        check_max_len(max_len)
        full = self.window is None
        slots = (max_len or 0) if full else self.window + 1
        shape = (batch_size, slots, self.n_kv_head, self.head_dim)
        return self._new_state(batch_size, device, dtype, k=torch.zeros(shape, device=device, dtype=dtype),
                               v=torch.zeros(shape, device=device, dtype=dtype),
                               valid=torch.zeros(shape[:3], dtype=torch.bool, device=device),
                               **({"max_len": max_len} if full else {}))

    def state_size(self, T: int) -> int:
        held = T if self.window is None else min(T, self.window + 1)
        return 2 * held * self.n_kv_head * self.head_dim + self._key_conv_size()


class NativeSparseAttention(AttentionBase):
    """NSA as the paper uses it: three branches on the same roped q, k, v, mixed per query head by
    sigmoid gates, o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa                                [N3]
      1. compressed: attention over mean-pooled blocks of l tokens (complete blocks only);     [N1]
      2. selected: the compressed probabilities summed over a KV group rank the blocks; the top n
         (block 0 and the most recent ones forced) are attended token by token, causally;      [N2]
      3. sliding window: the last w + 1 tokens (w = nsa_window, or `window` when None).
    Decoding state: the KV cache (max_len slots, whole blocks) and one compressed slot per block."""

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
        check_max_len(max_len)
        l = self.block
        slots = -(-(max_len or 0) // l) * l
        zeros = lambda n: torch.zeros(batch_size, n, self.n_kv_head, self.head_dim, device=device, dtype=dtype)
        return self._new_state(batch_size, device, dtype, k=zeros(slots), v=zeros(slots), k_cmp=zeros(slots // l),
                               v_cmp=zeros(slots // l), max_len=max_len)

    def _step(self, x, state):
        t, l, w = state["pos"], self.block, self.window    # t: 0-d, on the device
        q, k, v, _ = self._qkv(x, t, state)
        # token t into slot t, its block's mean into slot t // l (read once the block is complete) [N1]
        block = t // l
        tokens = block * l + torch.arange(l, device=t.device)                   # [l] the block's slots
        for name, new in (("k", k), ("v", v)):
            cache = state[name]
            cache.index_copy_(1, t.view(1), new.to(cache.dtype))
            pooled = cache.index_select(1, tokens).mean(dim=1, keepdim=True)    # [B, 1, Hkv, D]
            state[name + "_cmp"].index_copy_(1, block.view(1), pooled)
        K, V, Kc, Vc = (state[n].to(q.dtype) for n in ("k", "v", "k_cmp", "v_cmp"))
        o_cmp, lse = _op(self.config, nsa_compressed_attention)(q, Kc, Vc, l, offset=t)  # [N1]
        scores = _op(self.config, nsa_block_scores)(q, Kc, lse, l, offset=t)             # [N2]
        block_idx = nsa_select_blocks(scores, l, self.top_n, self.n_recent, n_blocks=Kc.shape[1],
                                      offset=t)[:, 0]                                   # [B, Hkv, n]
        selected = (block_idx[..., None] * l + torch.arange(l, device=t.device)).flatten(2)   # [B, Hkv, n * l]
        chosen = (block_idx[..., None] >= 0).expand(-1, -1, -1, l).flatten(2) & (selected <= t)   # [B, Hkv, n * l]
        o_slc = self._attend_gathered(q[:, 0], K, V, selected, chosen)                 # [N2]
        recent = (t - w + torch.arange(w + 1, device=t.device)).expand(*selected.shape[:2], -1)   # [B, Hkv, w + 1]
        o_swa = self._attend_gathered(q[:, 0], K, V, recent, recent >= 0)              # before position 0: masked
        t.add_(1)                                          # last: t is the state's own tensor
        return nsa_combine(self._gates(x), o_cmp, o_slc[:, None], o_swa[:, None])       # [N3]

    def _attend_gathered(self, q, k, v, slots, valid):
        """One query q [B, H, D] over the gathered cache slots `slots` [B, Hkv, S] where `valid`
        [B, Hkv, S]: the selected blocks' n l tokens or the window's w + 1, never the whole cache."""
        idx = slots.clamp(0, k.shape[1] - 1).transpose(1, 2)                  # [B, Hkv, S] -> [B, S, Hkv]
        idx = idx[..., None].expand(-1, -1, -1, k.shape[-1])                   # [B, S, Hkv, D]
        return _op(self.config, attention_decode)(q, k.gather(1, idx), v.gather(1, idx), valid.transpose(1, 2))

    def state_size(self, T: int) -> int:
        return 2 * (T + T // self.block) * self.n_kv_head * self.head_dim + self._key_conv_size()


# =============================================================================================
# 3. LTE: LEARNABLE TOKEN EVICTION, in the paper's order
# =============================================================================================

# --- 3a. The score ----------------------------------------------------------------------------

class LTERouter(nn.Module):
    """The retention scorer [L1]: one small CNN per KV head (groups = Hkv) over (k before RoPE, v):
    1-D convolutions with 'same' padding, channels halving, SiLU and dropout, then a 1x1 projection,
        r_j = sigmoid(cnn([k; v] at j - reach .. j + reach)) - 0.5       (kept when r_j > 0)
    The projection's bias starts at +0.5, so that at first every token is kept. reach = sum of
    d (k - 1) / 2: 6 for the paper's three convolutions of kernel 3, dilation 2 (R = 13)."""

    # score_one's products (taps x out channels) up to which a multiply-sum beats a matmul (docs/decoding.md)
    PRODUCT_LIMIT = 1 << 20

    def __init__(self, n_kv_head: int, head_dim: int, kernel_sizes=(3, 3, 3), dilations=(2, 2, 2),
                 dropout: float = 0.1, bias_init: float = 0.5):
        super().__init__()
        check_router_convs(kernel_sizes, dilations)
        self.n_kv_head = n_kv_head
        self.reach = sum(d * (k - 1) // 2 for k, d in zip(kernel_sizes, dilations))
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
        # Differs from the paper's code: PyTorch's default init U(+-1 / sqrt(fan_in)), with which the
        # README's recipe trained; there kaiming_normal for ReLU, 2.4x wider (first scores spread more).
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
        """[L1] forward(k, v)[:, j] for one token j (a decoding step): r_j [B, Hkv] float32 from x
        [B, 2 reach + 1, Hkv, 2D], [k before RoPE; v] at j - reach .. j + reach. Each layer is its
        convolution unpadded, inputs before position 0 zeroed as 'same' padding does."""
        check_router_window(x, self.reach, self.n_kv_head, self.convs[0].in_channels // self.n_kv_head)
        positions = j - self.reach + torch.arange(x.shape[1], device=x.device)  # [2 reach + 1]
        for conv in [*self.convs, self.proj]:
            (k,), (d,) = conv.kernel_size, conv.dilation
            x = torch.where((positions >= 0)[:, None, None], x, 0)              # the sequence start's padding
            taps = x.unfold(1, d * (k - 1) + 1, 1)[..., ::d]                   # [B, P', Hkv, C_in, k]
            w = conv.weight.view(self.n_kv_head, -1, *conv.weight.shape[1:])    # -> [Hkv, C_out, C_in, k]
            if taps.numel() * w.shape[1] <= self.PRODUCT_LIMIT:
                x = (taps[:, :, :, None] * w).sum(dim=(-2, -1))                 # [B, P', Hkv, C_out]
            else:
                x = torch.einsum("bphck,hock->bpho", taps, w)                   # [B, P', Hkv, C_out]
            x = x + conv.bias.view(self.n_kv_head, -1)                          # [Hkv C_out] -> [Hkv, C_out]
            positions = positions[d * (k - 1) // 2: positions.shape[0] - d * (k - 1) // 2]
            if conv is not self.proj:
                x = self.dropout(F.silu(x))
        return torch.sigmoid(x[:, 0, :, 0].float()) - 0.5                       # [L1] x: [B, 1, Hkv, 1]


# --- 3b. The mixer: training [L2]-[L5], inference [L6] and its constant-size state ------------

class LTEAttention(AttentionBase):
    """Learnable token eviction: query i sees key j <= i when i - j <= w, or j < s (a sink), or the
    router retains j for i (the paper's "A-plus-column" pattern); RoPE and GQA.
      training  every token with r_j > 0 stays visible [L2] (`lte_train_cap`: the cap [L6]), the
                straight-through gradient [L3], the L1 penalty [L4] beside y, `update_lambda()` [L5].
      eval      at most b retained tokens per head, by the streaming rule [L6], as decoding holds.

    Decoding state per sequence and KV head, of the same size for any T:
      sinks (s slots)       window ring (w + 1 slots)             buffer (b slots)
      [ 0 | 1 | .. ]        [ .. | t - 1 | t | t - w | .. ]       [ .. | .. | .. | .. ]
      k, v of the first     k, v; token t in slot t % (w + 1);    k, v of the retained tokens
      s tokens              the score r_j of every token but      in any order, their scores
                            the newest `reach` (not known yet)    (buf_score), positions (buf_pos)
      router ring (2 reach + 1 slots): [k before RoPE; v] of the newest tokens, the router's input"""

    def __init__(self, config):
        super().__init__(config)
        # Differs from the paper's code: s sinks beside the b buffer slots (s + b beyond the window); there s of b.
        self.window, self.sink, self.buffer = config.window, config.lte_sink, config.lte_buffer
        self.router = LTERouter(config.n_kv_head, config.head_dim, config.lte_kernel_sizes,
                                config.lte_dilations, config.lte_dropout)
        Hkv = config.n_kv_head
        # lambda per KV head [L4], and the controller's count since its last update [L5] (saved)
        self.register_buffer("l1_lambda", torch.full((Hkv,), config.lte_lambda_init))
        self.register_buffer("kept_sum", torch.zeros(Hkv))
        self.register_buffer("kept_steps", torch.zeros((), dtype=torch.long))
        # kept tokens of this optimizer step's forwards, and per sequence in the last one (not saved)
        self.register_buffer("step_kept", torch.zeros(Hkv), persistent=False)
        self.register_buffer("last_kept", torch.zeros(Hkv), persistent=False)
        self.step_sequences = 0

    def forward(self, x, state: dict | None = None):
        """x [B, T, C] -> (y [B, T, C], penalty): the L1 penalty [L4] in training, else a 0-d zero."""
        check_mixer_input(x, self.config.d_model)
        zero = self.l1_lambda.new_zeros(())
        if state is not None:
            return self.o_proj(self._decode(x, state).flatten(2)), zero              # [B, T, H, D] -> [B, T, H D]
        o, r = self._attend(x)
        y = self.o_proj(o.flatten(2))                                                  # [B, T, H, D] -> [B, T, H D]
        if not self.training:
            return y, zero
        self._count_kept(r)                                                            # [L5]
        # Differs from the paper's code, which averages lambda_h relu(r_j) over batch, positions (but the
        # last reach), LTE layers, heads; here they add up: a lambda weighs n_lte_layers * Hkv times more.
        penalty = (self.l1_lambda * F.relu(r).mean(dim=(0, 1))).sum()                  # [L4]
        return y, penalty

    def _attend(self, x, state=None):
        """The parallel form (training, eval, prefill): o [B, T, H, D] and the scores r [B, T, Hkv]."""
        q, k, v, k_raw = self._qkv(x, state=state)
        r = self.router(k_raw, v)                                                      # [L1] [B, T, Hkv]
        if self.training and not self.config.lte_train_cap and state is None:
            # [L2] the paper's training rule: sinks and every r_j > 0 stay visible to all later queries
            keep = r > 0
            keep[:, :self.sink] = True
        else:
            keep = _op(self.config, lte_visible_until)(r.detach(), self.window, self.sink, self.buffer)  # [L6]
        if self.training:
            # [L3] the keep/drop choice has no gradient, so the score gets one through the values:
            # v' = v + v (r - stopgrad(r)): forward v' = v exactly, backward dL/dr_j = <v_j, dL/dv'_j>
            v = v + v * (r - r.detach()).to(v.dtype)[..., None]
        o = _op(self.config, attention)(q, k, v, window=self.window, keep=keep)
        if state is not None:
            self._fill_state(state, k, v, k_raw, r, keep)
        return o, r

    def _parallel(self, x, state=None):
        return self._attend(x, state)[0]

    # --- training: lambda's controller ---
    def _count_kept(self, r):
        """[L5] What the controller compares with b: per sequence and KV head, the tokens the buffer
        would have to hold (r_j > 0, s <= j < T - w - 1), summed over the optimizer step's forwards."""
        T = r.shape[1]
        # Differs from the paper's code, which counts r_j > 0 over the whole sequence but its last
        # reach tokens, sinks and tokens that never leave the window included.
        kept = (r[:, self.sink: max(self.sink, T - self.window - 1)] > 0).float().sum(dim=1)   # [B, Hkv]
        self.last_kept = kept.mean(dim=0)
        self.step_kept = self.step_kept + kept.sum(dim=0)
        self.step_sequences += kept.shape[0]

    @torch.no_grad()
    def update_lambda(self, count_step: bool = True):
        """[L5] Call once per optimizer step, after its forwards. Every N = lte_lambda_every counted
        steps: lambda *= up for the heads that kept more than b tokens per sequence on average, /= down
        below 0.95 b, clamped. count_step=False drops this step's forwards; N = 0 keeps lambda fixed."""
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
        # Differs from the paper's code: a plain mean over the period (there a moving average updated every
        # step, alpha = 2 / (1 + N / 2)); lambda starts at lte_lambda_init (there 0, lambda_min once too many).
        kept = self.kept_sum / self.kept_steps
        self.l1_lambda.mul_(torch.where(kept > self.buffer, c.lte_lambda_up, 1.0))
        self.l1_lambda.div_(torch.where(kept < 0.95 * self.buffer, c.lte_lambda_down, 1.0))
        self.l1_lambda.clamp_(c.lte_lambda_min, c.lte_lambda_max)
        self.kept_sum.zero_()
        self.kept_steps.zero_()

    # --- decoding: the state of constant size ---
    def init_state(self, batch_size: int, device=None, dtype=torch.float32, max_len=None) -> dict:
        """An empty decoding state (pictured in the class docstring); max_len needs nothing here."""
        check_max_len(max_len)
        router_in = torch.zeros(batch_size, 2 * self.router.reach + 1, self.n_kv_head, 2 * self.head_dim,
                                device=device, dtype=dtype)
        return self._new_state(batch_size, device, dtype, router_in=router_in,
                               **self._sinks_window_buffer(batch_size, device, dtype, scored=self.window + 1))

    def _fill_state(self, state, k, v, k_raw, r, until):
        """After a parallel prefill of T tokens: the state that stepping them one by one leaves."""
        B, T, Hkv, D = k.shape
        window_slots, router_slots = self.window + 1, 2 * self.router.reach + 1
        n_sink = min(self.sink, max(0, T - window_slots))         # sinks that have left the window by now
        buf_score, buf_pos = lte_final_buffer(r.detach(), until, self.window, self.sink, self.buffer)   # [L6]
        at = buf_pos.clamp(min=0).transpose(1, 2)[..., None].expand(-1, -1, -1, D)   # [B, Hkv, b] -> [B, b, Hkv, D]
        for name, x in (("k", k), ("v", v)):
            state["sink_" + name][:, :n_sink] = x[:, :n_sink].to(state[name].dtype)
            state["buf_" + name].copy_(x.gather(1, at))
        state["sink_valid"][:, :n_sink] = True
        state["buf_score"].copy_(buf_score)
        state["buf_pos"].copy_(buf_pos)
        recent = torch.arange(max(0, T - window_slots), T, device=k.device)
        slots = self._enter(state, recent, k[:, recent], v[:, recent])
        scored = recent <= T - 1 - self.router.reach              # later ones wait for their right context
        state["score"][:, slots[scored]] = r[:, recent[scored]].detach().float()
        tail = torch.arange(max(0, T - router_slots), T, device=k.device)
        state["router_in"][:, tail % router_slots] = torch.cat([k_raw, v], dim=-1)[:, tail].to(state["k"].dtype)

    def _entered(self, state, t, slot, k_raw, v):
        """[L1] Token t's [k_raw; v] joins the router ring; token j = t - reach is scored (if j >= 0)."""
        n = 2 * self.router.reach + 1
        router_in = torch.cat([k_raw, v], dim=-1)                               # [B, 1, Hkv, 2D]
        state["router_in"].index_copy_(1, (t % n).view(1), router_in.to(state["k"].dtype))
        j = t - self.router.reach
        ctx = state["router_in"].index_select(1, (j - self.router.reach + torch.arange(n, device=t.device)) % n)
        r_j = self.router.score_one(ctx.to(v.dtype), j)                        # [B, Hkv]; ctx: [B, n, Hkv, 2D]
        slot = (j % (self.window + 1)).view(1)
        old = state["score"].index_select(1, slot)
        state["score"].index_copy_(1, slot, torch.where(j >= 0, r_j[:, None], old))

    def _offer(self, state, j, score):
        """[L6] Token j leaves the window: offered to the buffer if r_j > 0 and no sink -> (entered, slot)."""
        offered = (j >= self.sink) & (score > 0)
        entered, _, slot = lte_buffer_push(state["buf_score"], state["buf_pos"], score, j, offered)
        return entered, slot

    def state_size(self, T: int) -> int:
        """Numbers held per sequence: k, v and scores of sinks, window, buffer; the router's inputs."""
        held = min(T, self.sink + self.window + 1 + self.buffer)
        scored = min(T, self.window + 1 + self.buffer)
        router = min(T, 2 * self.router.reach + 1) * 2 * self.head_dim
        return self.n_kv_head * (held * 2 * self.head_dim + scored + router) + self._key_conv_size()


# --- 3c. The inference rule [L6] as ops: streamed, and in parallel over a sequence -------------

def lte_buffer_push(buf_score, buf_pos, score, pos, offered=None):
    """[L6] Offer one token leaving the window to the buffer, in place: it enters when offered (by
    default r > 0) and at least as good as the lowest-scored token held (an empty slot is lowest; among
    equal scores the oldest), which leaves. So the buffer holds the top b by (r, position).
    buf_score, buf_pos: [..., b] (empty: -inf, -1); score: [...]; pos: int or 0-d; offered: bool [...].
    Returns (entered bool [...], evicted_pos int64 [...] (-1: none), slot int64 [...])."""
    low = buf_score.min(dim=-1, keepdim=True).values                           # [..., 1]
    oldest_low = torch.where(buf_score == low, buf_pos, torch.iinfo(torch.int64).max)
    slot = oldest_low.argmin(dim=-1, keepdim=True)                              # [..., 1]
    # Differs from the paper on ties only: there a newcomer enters when its score is higher.
    entered = (score > 0 if offered is None else offered) & (score >= low[..., 0])
    evicted = torch.where(entered, buf_pos.gather(-1, slot)[..., 0], -1)
    buf_score.scatter_(-1, slot, torch.where(entered, score, low[..., 0])[..., None])
    buf_pos.scatter_(-1, slot, torch.where(entered, pos, buf_pos.gather(-1, slot)[..., 0])[..., None])
    return entered, evicted, slot[..., 0]


def lte_visible_until(scores, window: int, sink: int, buffer: int):
    """[L6] `lte_buffer_push`'s rule over a whole sequence, in parallel: scores r [B, T, Hkv] -> until,
    int64 [B, T, Hkv], the last query that sees key j beyond the window (KEEP_FOREVER while retained,
    -1 if never), which `attention` takes as `keep`. Rank the offered tokens once by (r, position);
    after token t has left, the buffer holds the ranks <= R_t, the b-th smallest offered so far, so
    token j stays until the first t with R_t < rank_j (why: docs/lte.md)."""
    check_lte_rule(scores, window, sink, buffer)

    def running_kth_smallest(x, k: int, fill: int, chunk: int = 256):
        """out[..., t] = the k-th smallest of x[..., :t + 1] and k copies of `fill` (>= every x), a
        chunk at a time: the past matters only through its k smallest, never T x T."""
        *lead, T = x.shape
        k_smallest = x.new_full((*lead, k), fill)                               # [..., k]
        out = torch.empty_like(x)
        for c0 in range(0, T, chunk):
            xc = x[..., c0:c0 + chunk]                                          # [..., n]
            n = xc.shape[-1]
            not_yet = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)   # [t, i]: i arrives after t
            before = k_smallest[..., None, :].expand(*lead, n, k)               # [..., n, k]
            so_far = xc[..., None, :].expand(*lead, n, n).masked_fill(not_yet, fill)
            out[..., c0:c0 + n] = torch.cat([before, so_far], dim=-1).kthvalue(k, dim=-1).values
            k_smallest = torch.cat([k_smallest, xc], dim=-1).topk(k, dim=-1, largest=False).values
        return out

    # Differs from the paper's code, whose prefill keeps one static top b of the whole prompt for
    # every query: here each query sees what the streaming rule holds at its own step.
    B, T, Hkv = scores.shape
    until = torch.full((B, Hkv, T), -1, dtype=torch.int64, device=scores.device)   # [B, Hkv, T] until the end
    until[..., :sink] = KEEP_FOREVER
    if buffer > 0:
        # offered: not a sink, r > 0, and leaving the window within these T queries (j < T - w - 1)
        pos = torch.arange(T, device=scores.device)
        r = scores.detach().float().transpose(1, 2)                             # [B, Hkv, T]
        offered = (pos >= sink) & (pos < T - window - 1) & (r > 0)              # [B, Hkv, T]
        # each offered token's rank by (r, position), 0 = best: the higher score, on equal scores
        # the newer token (a stable sort of the time-reversed scores); T for tokens not offered
        newest_first = torch.where(offered, r, float("-inf")).flip(-1)          # [B, Hkv, T], time reversed
        order = newest_first.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=r.device).expand_as(order))
        rank = torch.where(offered, rank.flip(-1), T).contiguous()              # [B, Hkv, T]
        # a chunk costs O(chunk (b + chunk)) work on a CPU, but only a few launches on a GPU
        chunk = 64 if scores.device.type == "cpu" else 512
        worst_kept = running_kth_smallest(rank, buffer, fill=T, chunk=chunk)   # R_t: [B, Hkv, T]
        # first t with R_t < rank_j; R never grows, so -R is sorted
        leaves_at = torch.searchsorted(-worst_kept, -rank, right=True)          # [B, Hkv, T]
        last_query = torch.where(leaves_at < T, leaves_at + window, KEEP_FOREVER)
        until = torch.where(offered & (rank <= worst_kept), last_query, until)
    return until.transpose(1, 2).contiguous()                                   # [B, Hkv, T] -> [B, T, Hkv]


def lte_final_buffer(scores, until, window: int, sink: int, buffer: int):
    """What prefill hands to decoding: the buffer after the last query, the non-sinks still retained
    (until == KEEP_FOREVER), by position. scores, until: [B, T, Hkv] -> buf_score float32, buf_pos
    int64, both [B, Hkv, b] (empty slots -inf / -1)."""
    B, T, Hkv = scores.shape
    pos = torch.arange(T, device=scores.device)
    held = (until.transpose(1, 2) == KEEP_FOREVER) & (pos >= sink)              # [B, Hkv, T], <= b each
    pos = torch.where(held, pos, T)
    pos = F.pad(pos, (0, max(0, buffer - T)), value=T)                          # [B, Hkv, max(T, b)]
    buf_pos = pos.topk(buffer, dim=-1, largest=False).values                    # [B, Hkv, b], ascending
    empty = buf_pos == T
    r = scores.detach().float().transpose(1, 2)                                 # [B, Hkv, T]
    buf_score = r.gather(-1, buf_pos.clamp(max=T - 1)).masked_fill(empty, float("-inf"))
    return buf_score, buf_pos.masked_fill(empty, -1)


# =============================================================================================
# 4. MODEL
# =============================================================================================

@dataclass
class Config:
    """Sizes and per-mixer settings, checked when made; the defaults train on a laptop CPU with the
    README's recipe. `Config.preset(name)` picks a layer pattern, `Config.paper` the paper's models."""

    # Not fields: the names `layers` accepts; the paper's patterns (attention-type on odd layers, GDN on even)
    MIXER_NAMES = ("gdn", "swa", "attn", "nsa", "lte")
    PRESETS = {"gdn": ("gdn",), "gdn+swa": ("gdn", "swa"), "gdn+attn": ("gdn", "attn"),
               "gdn+nsa": ("gdn", "nsa"), "gdn+lte": ("gdn", "lte"), "transformer": ("attn",)}

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
    # LTE. Differs from the paper (the recipe that trained here): the cap in training, the router's
    # slower learning rate, lambda fixed; Config.paper has the paper's settings.
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
        check_config(self, self.MIXER_NAMES)
        self.layers = tuple(self.layers) or ("gdn",) * self.n_layer
        self.gdn_heads = self.gdn_heads or self.n_head
        self.gdn_head_dim = self.gdn_head_dim or self.head_dim
        self.gdn_value_dim = self.gdn_value_dim or self.gdn_head_dim
        self.mlp_hidden = self.mlp_hidden or 32 * math.ceil(8 * self.d_model / 3 / 32)
        self.lte_kernel_sizes, self.lte_dilations = tuple(self.lte_kernel_sizes), tuple(self.lte_dilations)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        """A named model: 'gdn', 'gdn+swa', 'gdn+attn', 'gdn+nsa', 'gdn+lte' or 'transformer'."""
        check_preset(name, overrides, cls.PRESETS)
        n_layer = overrides.get("n_layer", cls.n_layer)
        pattern = cls.PRESETS[name]
        return cls(layers=tuple(pattern[i % len(pattern)] for i in range(n_layer)), **overrides)

    @classmethod
    def paper(cls, name: str, size: str = "0.4B", **overrides) -> "Config":
        """Preset `name` at size '0.4B' or '1.4B' with the official configs' settings, LTE's training
        rule included (`with torch.device("meta"): TinyHybrid(config)` builds one without memory)."""
        check_preset(name, overrides, cls.PRESETS)
        # The official configs (SwiGLU: 2/3 * 4 d rounded up to a multiple of 256) at each size ...
        sizes = {"0.4B": dict(d_model=1024, gdn_head_dim=128, mlp_hidden=2816, n_head=16, n_kv_head=16),
                 "1.4B": dict(d_model=2048, gdn_head_dim=256, mlp_hidden=5632, n_head=32, n_kv_head=8)}
        # ... and what differs per mixer, at both sizes (windows as counted here: see the glossary).
        mixers = {"swa": dict(window=1023),
                  "lte": dict(window=768, lte_sink=4, lte_buffer=512, lte_kernel_sizes=(3, 3, 3),
                              lte_dilations=(2, 2, 2), lte_dropout=0.1, lte_train_cap=False, lte_router_lr_scale=1.0,
                              lte_lambda_every=32, lte_lambda_init=1e-9, lte_lambda_up=1.5, lte_lambda_down=2.0,
                              lte_lambda_min=1e-9, lte_lambda_max=1.0),
                  "nsa": dict(n_head=32, n_kv_head=2, nsa_block=64, nsa_topn=16, nsa_window=511)}
        if size not in sizes:
            raise ValueError(f"size must be one of {sorted(sizes)}, got {size!r}")
        settings = dict(vocab_size=32000, n_layer=24, head_dim=64, gdn_heads=8, **sizes[size])
        for mixer in cls.PRESETS[name]:
            settings.update(mixers.get(mixer, {}))
        return cls.preset(name, **(settings | overrides))


# Config's mixer names and layer patterns by their short names, and the mixer each name builds.
MIXER_NAMES, PRESETS = Config.MIXER_NAMES, Config.PRESETS
MIXERS = {
    "gdn": GatedDeltaNet,
    "swa": lambda config: Attention(config, window=config.window),
    "attn": Attention,
    "nsa": NativeSparseAttention,
    "lte": LTEAttention,
}


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
        """-> (x, penalty): LTE's L1 penalty [L4] in training, 0 for the other mixers."""
        y, penalty = self.mixer(self.norm1(x), state), 0.0
        if isinstance(self.mixer, LTEAttention):
            y, penalty = y
        x = x + y
        return x + self.mlp(self.norm2(x)), penalty

    def step(self, x, state):
        """One decoded token, x [B, 1, C], through the mixer's `step`: device work only."""
        x = x + self.mixer.step(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))


def optimizer_groups(model: nn.Module, lr: float, weight_decay: float = 0.1,
                     router_lr_scale: float = 0.1) -> list[dict]:
    """AdamW groups of the recipe, for any module: tensors of ndim >= 2 at lr with weight_decay,
    vectors without, LTE routers at router_lr_scale * lr without (why: docs/lte.md). A schedule sets
    group["lr"] = lr_now * group["lr_scale"]."""
    # Differs from the paper's code: one learning rate for every parameter there.
    router = {id(p) for m in model.modules() if isinstance(m, LTERouter) for p in m.parameters()}
    rest = [p for p in model.parameters() if id(p) not in router]
    groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": [p for p in model.parameters() if id(p) in router], "weight_decay": 0.0,
               "lr_scale": router_lr_scale}]
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


class TinyHybrid(nn.Module):
    """The interleaved language model: token embedding, blocks, final norm, tied output head.

    forward(idx, state=None) -> (logits [B, T, vocab], penalty): LTE's L1 penalty [L4] summed over
    the layers in training (0-d; 0 otherwise), for the caller's loss:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + penalty
    With `state` (from `init_state`) it continues a sequence, in place. Train with
    `optimizer_groups(lr)`, and call `update_lte_lambdas()` after every optimizer step."""

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
        self._init_weights()

    def forward(self, idx, state: list | None = None):
        # one decoded token on the GPU: skip the range check, it would wait for the device
        one_token_on_gpu = state is not None and idx.shape[1] == 1 and idx.is_cuda
        check_idx(idx, self.config.vocab_size, check_range=not one_token_on_gpu)
        if state is not None:
            check_state(state, len(self.blocks), idx.shape[0])
            for layer in state:                            # before any layer writes to its state
                check_room(layer, idx.shape[1])
        x = self.wte(idx)
        penalty = torch.zeros((), device=self.wte.weight.device)                # [L4], summed in layer order
        for i, block in enumerate(self.blocks):
            x, layer_penalty = block(x, None if state is None else state[i])
            if self.training:                              # eval has none: no work per layer while decoding
                penalty = penalty + layer_penalty
        return self.lm_head(self.norm(x)), penalty

    def _init_weights(self):
        """GPT-2 style: Linear and Embedding weights from N(0, 0.02), the residual output projections'
        divided by sqrt(2 n_layer), Linear biases 0; convolutions keep their own init."""
        # Differs from the paper's code: std 0.006 there, and the residual output projections drawn
        # like PyTorch's default, divided by sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if p.ndim == 2:
                residual = name.endswith(("o_proj.weight", "w2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def optimizer_groups(self, lr: float, weight_decay: float = 0.1) -> list[dict]:
        """`optimizer_groups` with config.lte_router_lr_scale: `AdamW(model.optimizer_groups(1e-3))`."""
        return optimizer_groups(self, lr, weight_decay, self.config.lte_router_lr_scale)

    # --- LTE's lambda controller ---
    def _lte_layers(self):
        return [(i, b.mixer) for i, b in enumerate(self.blocks) if isinstance(b.mixer, LTEAttention)]

    def update_lte_lambdas(self, count_step: bool = True):
        """Every LTE layer's `update_lambda` [L5]; call once per optimizer step."""
        for _, m in self._lte_layers():
            m.update_lambda(count_step)

    def lte_stats(self) -> list[dict]:
        """Per LTE layer: retained tokens per sequence (last training forward) and lambda, per KV head."""
        return [{"layer": i, "kept": m.last_kept.tolist(), "lambda": m.l1_lambda.tolist()}
                for i, m in self._lte_layers()]

    # --- decoding: the state, eager prefill, step and generate (decoder.py captures the step) ---
    def init_state(self, batch_size: int, device=None, dtype=None, max_len=None) -> list[dict]:
        """An empty decoding state, one dict per layer; max_len sizes full attention's and NSA's caches."""
        check_max_len(max_len)
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        return [b.mixer.init_state(batch_size, device, dtype, max_len=max_len) for b in self.blocks]

    @staticmethod
    def reset_state(state: list[dict]) -> None:
        """Empty a decoding state in place (a captured step keeps reading these very tensors)."""
        for layer in state:
            for value in layer.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
            if "buf_pos" in layer:
                layer["buf_score"].fill_(float("-inf"))
                layer["buf_pos"].fill_(-1)
            layer["length"] = 0

    @staticmethod
    def state_nbytes(state: list[dict]) -> int:
        """Bytes held per sequence by a decoding state."""
        tensors = [t for layer in state for t in layer.values() if isinstance(t, torch.Tensor)]
        batch = next((t.shape[0] for t in tensors if t.ndim > 0), 1)
        return sum(t.numel() * t.element_size() for t in tensors) // max(batch, 1)

    def state_bytes(self, T: int) -> int:
        """Bytes of one sequence's decoding state after T tokens (made on the CPU: works on meta too)."""
        return self.state_nbytes(self.init_state(1, device="cpu", max_len=T))

    def state_size(self, T: int) -> dict:
        """Numbers each mixer holds per sequence to decode token T + 1, by layer ("0:gdn", ...)."""
        layers = zip(self.blocks, self.config.layers)
        return {f"{i}:{name}": b.mixer.state_size(T) for i, (b, name) in enumerate(layers)}

    def decode_step(self, token, state: list[dict]):
        """token [B, 1] -> logits [B, vocab], device work only (decoder.py captures it; the caller counts)."""
        x = self.wte(token)                                                     # [B, 1, C]
        for block, layer in zip(self.blocks, state):
            x = block.step(x, layer)
        return self.lm_head(self.norm(x))[:, 0]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Prefill idx [B, T], then decode eagerly (`decode_step`; temperature 0: greedy) -> [B, T + max_new_tokens]."""
        check_idx(idx, self.config.vocab_size)
        check_sampling(max_new_tokens, temperature, top_k)
        was_training = self.training
        self.eval()
        try:
            state = self.init_state(idx.shape[0], max_len=idx.shape[1] + max_new_tokens)
            logits = self(idx, state)[0][:, -1].float()                         # the prompt, in parallel
            out = [idx]
            for i in range(max_new_tokens):
                token = self.sample(logits, temperature, top_k, generator)      # [B, 1]
                out.append(token)
                if i + 1 < max_new_tokens:
                    logits = self.decode_step(token, state).float()
                    for layer in state:                    # the host count, as forward keeps it
                        layer["length"] += 1
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)

    @staticmethod
    def sample(logits, temperature, top_k, generator):
        """The next token [B, 1] from logits [B, vocab] without a host sync: torch.multinomial's own
        method for one sample, argmax(p / q), q ~ Exp(1), so the same generator draws the same token."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1, keepdim=True)
