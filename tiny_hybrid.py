"""tiny-hybrid: hybrid linear / sparse attention language models, small and readable.

Implements, in plain PyTorch, the models of
    He & Garner, "Alleviating Forgetfulness of Linear Attention by Hybrid Sparse Attention and
    Contextualized Learnable Token Eviction", arXiv 2510.20787 (2025).

A linear-attention layer (Gated DeltaNet) keeps a fixed K x V state per head and forgets old facts
once that state is full. Interleaving it with a mixer that can look directly at past tokens gives
recall back; the paper's proposal, learnable token eviction (LTE), does so with a state of constant
size: a sliding window plus a few tokens that a tiny CNN decided to keep.

The file reads top to bottom:
    1. ops      pure functions on [B, T, H, D] tensors: Gated DeltaNet (chunked and recurrent),
                one causal softmax attention for full / sliding-window / LTE patterns, the NSA pieces
    2. mixers   nn.Modules (B, T, C) -> (B, T, C): GatedDeltaNet, Attention, NativeSparseAttention,
                LTEAttention (with its LTERouter)
    3. model    Config, presets, TinyHybrid

Glossary of dimension names
    B     batch size                     T     sequence length (time)
    C     model width (d_model)          H     query heads (GDN heads for GDN)
    Hkv   key/value heads (GQA: H % Hkv == 0; G = H // Hkv query heads share one KV head)
    D     attention head dim             K, V  key / value head dims of Gated DeltaNet
    w     window: query i sees key j when 0 <= i - j <= w (w + 1 keys, itself included)
    s     LTE sink tokens (always kept)  b     LTE retained-token buffer size
    l     NSA block length               n     NSA selected blocks per query
    L     chunk length of the chunked Gated DeltaNet form
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# "visible forever" in an LTE visibility list (see `attention`); any value >= T would do.
KEEP_FOREVER = torch.iinfo(torch.int32).max


# ---------------------------------------------------------------------------------------------
# Input checks: every public entry point names the argument, the value and what is allowed.
# ---------------------------------------------------------------------------------------------

def _check_tensor(name: str, x, ndim: int, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, T, H, D], k/v [B, T, Hkv, D] with H % Hkv == 0."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hkv * groups, D]: query head h reads KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


# =============================================================================================
# 1. OPS
# =============================================================================================

# --- 1a. Gated DeltaNet ----------------------------------------------------------------------

def _check_gdn(q, k, v, g, beta, initial_state) -> None:
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


def gated_delta_rule_recurrent(q, k, v, g, beta, scale=None, initial_state=None):
    """Gated DeltaNet, token by token (the definition; used for decoding and as the test oracle).

    q, k: [B, T, H, K] (already L2-normalised), v: [B, T, H, V], g: [B, T, H] log decay (<= 0),
    beta: [B, T, H] in (0, 1), initial_state: [B, H, K, V] or None (zeros).
    For every head, with state S (K x V):
        S_t = exp(g_t) S_{t-1}
        S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T        (delta rule: overwrite what k_t points at)
        o_t = scale * S_t^T q_t,   scale = K ** -0.5 by default
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32).
    """
    _check_gdn(q, k, v, g, beta, initial_state)
    B, T, H, K = k.shape
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, v.shape[3]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        k_t = k[:, t]                                                   # [B, H, K]
        u_t = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., None] * u_t[..., None, :]                      # rank-1 update
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, v.shape[3])
    return o.to(v.dtype if v.is_floating_point() else torch.float32), S


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, chunk_size=64):
    """Gated DeltaNet, chunked (WY / UT-transform) form: same function as the recurrent form.

    Shapes and arguments as `gated_delta_rule_recurrent`, plus chunk_size L. Inside a chunk, with
    gamma_i = g_1 + ... + g_i (decay from the chunk's start) and S_0 the state entering the chunk,
    the delta-rule updates u_i = beta_i (v_i - exp(gamma_i) S_0^T k_i - sum_{j<i} exp(gamma_i - gamma_j)
    (k_i . k_j) u_j) form a unit lower-triangular system (I + A) U = beta V - diag(beta e^gamma) K S_0.
    Solving it once per chunk (the UT transform) gives U = U' - W S_0 with
        W  = (I + A)^-1 diag(beta e^gamma) K,     U' = (I + A)^-1 diag(beta) V
    and then, with Gamma_ij = exp(gamma_i - gamma_j) for j <= i,
        O   = scale (diag(e^gamma) Q S_0 + (Q K^T * Gamma) U)
        S_L = e^{gamma_L} S_0 + (K * e^{gamma_L - gamma})^T U.
    Only step 5 runs sequentially over chunks; everything else is batched matrix algebra.
    """
    _check_gdn(q, k, v, g, beta, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = k.shape
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
        o = (gamma[:, :, n, :, None].exp() * q[:, :, n]) @ S + QK[:, :, n] @ U
        outputs.append(o)
        S = gamma[:, :, n, -1, None, None].exp() * S \
            + (k[:, :, n] * decay_to_end[:, :, n, :, None]).transpose(-1, -2) @ U

    # Step 6: back to [B, T, H, V], padding removed.
    o = torch.stack(outputs, dim=2)                                               # [B, H, N, L, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, Vd)[:, :T]
    return o.to(out_dtype), S


# --- 1b. One causal softmax attention: full, sliding window, LTE band-plus-columns ------------

def _visible_until(keep, T: int, Hkv: int, B: int, device) -> torch.Tensor | None:
    """Normalise `keep` to int64 [B, T, Hkv]: the last query index that may see key j
    (outside the window). None stays None."""
    if keep is None:
        return None
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be None or a tensor, got {type(keep).__name__}")
    if keep.shape != (B, T, Hkv):
        raise ValueError(f"keep must be [B, T, Hkv] = [{B}, {T}, {Hkv}], got {tuple(keep.shape)}")
    if keep.dtype == torch.bool:
        return torch.where(keep, KEEP_FOREVER, -1).to(device=device, dtype=torch.int64)
    if keep.is_floating_point() or keep.is_complex():
        raise TypeError(f"keep must be bool (kept forever) or integer (visible until), got {keep.dtype}")
    return keep.to(device=device, dtype=torch.int64)


def attention_mask(T: int, window=None, keep=None, B: int = 1, Hkv: int = 1, device=None,
                   T_k: int | None = None, offset: int = 0) -> torch.Tensor:
    """Which keys each query sees: bool [B, Hkv, T, T_k].

    Query i (absolute position offset + i) sees key j when j <= i and (window is None, or
    i - j <= window, or i <= visible_until[j]). `keep` is bool [B, T_k, Hkv] (True: kept forever)
    or integer [B, T_k, Hkv] (the last query position that sees key j beyond the window; -1: never).
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
        bool [B, T, Hkv]      True: kept forever (LTE in training),
        int  [B, T, Hkv]      the last query index that sees key j (LTE with its capped buffer:
                              visible until a higher-scored token pushes it out); -1 or any value
                              below j + w + 1 means "the window only".
        o_i = sum_j softmax_j(scale q_i . k_j | j visible to i) v_j,  scale = D ** -0.5 by default.
    Returns o [B, T, H, D] in q's dtype; the math is float32 on a dense mask (a reference, O(T^2)).
    """
    _check_gqa(q, k, v)
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be None or an int >= 0, got {window!r}")
    if keep is not None and window is None:
        raise ValueError("keep only makes sense with a window (full attention already sees every key)")
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
    _check_tensor("q", q, 3)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (B, S, Hkv, D) or v_cache.shape != k_cache.shape or H % Hkv:
        raise ValueError(f"k_cache and v_cache must be [B, S, Hkv, D] with H % Hkv == 0; got q "
                         f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    scale = D ** -0.5 if scale is None else scale
    G = H // Hkv
    kf = _repeat_kv(k_cache, G).float()                                          # [B, S, H, D]
    vf = _repeat_kv(v_cache, G).float()
    scores = torch.einsum("bhd,bshd->bhs", q.float(), kf) * scale                # [B, H, S]
    if valid is not None:
        if valid.shape != (B, S, Hkv) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be bool [B, S, Hkv] = [{B}, {S}, {Hkv}], got "
                             f"{valid.dtype} {tuple(valid.shape)}")
        scores = scores.masked_fill(~_repeat_kv(valid[..., None], G)[..., 0].transpose(1, 2), float("-inf"))
    return torch.einsum("bhs,bshd->bhd", scores.softmax(dim=-1), vf).to(q.dtype)
