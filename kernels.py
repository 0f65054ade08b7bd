"""Triton kernels for tiny-hybrid: the ops of tiny_hybrid.py, with the same signatures, made fast.

Read it like tiny_hybrid.py, whose order it follows; every section opens with the equations its
kernels compute, forward and backward, and says how the work is cut into programs.

  0.  Shared            set-up, the precision rule, input checks, helpers every kernel uses
  1a. Gated DeltaNet    gated_delta_rule (chunked, forward + backward), gated_delta_rule_recurrent,
                        gated_delta_rule_recurrent_step (one token, the state updated in place)
  1b. Attention         attention(q, k, v, window=None, keep=None, scale=None): full causal, sliding
                        window and LTE's band plus kept columns, forward + backward;
                        attention_decode(q, k_cache, v_cache, valid=None, scale=None): one step
  1c. NSA               nsa_compressed_attention, nsa_block_scores, nsa_selected_attention
  1d. LTE's rule        lte_visible_until(scores, window, sink, buffer)
  2.  The tour          `python kernels.py`

Each op returns what its twin in tiny_hybrid.py returns and raises the same errors on bad input
(both call the same checks, from checks.py). The checks of every kernel against its reference are
test_kernels.py; the benchmarks and the tuning live in bench.py (`python bench.py kernels`).
`python kernels.py` is a tour of both: it runs test_kernels.py, then (on a GPU) bench.py's
headline benchmark of every op; `--check-only` stops after the checks, `--full` times every shape
and baseline of docs/kernels.md's tables.

One dialect, close to Triton's tutorials:
  - A kernel is `_<op>_<what>_kernel`, launched by the host function next to it. Small jit helpers
    (`_dot`, `_load_rows`, `_kept_tile`, ...) are inlined by Triton: cutting a kernel into them
    costs nothing at run time.
  - Pointer arguments end in `_ptr` (q_ptr); the tile loaded from one drops the suffix (q).
  - Sizes: B batch, T tokens, H query heads, Hkv key/value heads, G = H / Hkv heads per group,
    D head dim; Gated DeltaNet's K, V (key and value head dims), N chunks of L tokens, T_pad = N L.
  - Indices: b, h, hkv; bh = b H + h, bhk = b Hkv + hkv; i0 / j0 the first query / key of a tile,
    offs_i / offs_j / offs_d the positions along a tile's axes, *_off the element offset of row 0
    of one head.
  - Tiles: BLOCK_M query rows, BLOCK_N keys, BLOCK_D / BLOCK_K / BLOCK_V head-dim columns (from
    `_block_d`: powers of two >= 16, what tl.dot takes).
  - Every product goes through `_dot(a, b, PRECISION)`; the rows of a [B, T, heads, D] tensor
    through `_load_rows` / `_store_rows` (Gated DeltaNet's chunk kernels address whole tiles with
    `_token_tile`, `_chunk_tile` and `_state_tile`).
  - Launch settings sit in tables (`*_GPU_BLOCKS`, and `*_INTERPRETER_BLOCKS` for Triton's CPU
    interpreter) or in small functions at the head of their section; each says where it was
    measured, or that it is an untuned default.

The precision rule: float32 in means float32 math. Every kernel multiplies float32 inputs exactly
(tl.dot's input_precision="ieee", as the reference does) unless the caller allowed tf32 with
PyTorch's own switch -- torch.backends.cuda.matmul.fp32_precision = "tf32" (torch >= 2.9), or the
older torch.backends.cuda.matmul.allow_tf32 = True / torch.set_float32_matmul_precision("high") --
which then holds for every op alike (products rounded to 10-bit mantissas, in return for the
tensor cores). 16-bit inputs multiply on the tensor cores in their own dtype. Accumulation is
float32 always. An op decides once, in its forward, and its backward multiplies the same way.

Without a CUDA GPU the kernels run in Triton's interpreter: slow, exact whatever the precision,
fine for the tests' small shapes.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from checks import check_attention, check_decode, check_gdn, check_gqa, check_int, check_lte_rule, check_tensor


# =============================================================================================
# 0. Shared: set-up, the precision rule, input checks, tile helpers
# =============================================================================================

# --- Set-up: Triton is Linux-only; without a GPU its interpreter runs the kernels on the CPU ---

if importlib.util.find_spec("triton") is None:
    raise ImportError("kernels.py needs Triton, which ships for Linux only (pip install triton). "
                      "Everything in tiny_hybrid.py runs without it: leave Config.use_triton off.")

# TRITON_INTERPRET=0 set by hand keeps the compiler even without a GPU: kernels can then be built
# but not run (test_kernel_compile.py compiles them for a Hopper GPU that way).
INTERPRET = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "0"
if INTERPRET:
    # Triton reads this when it defines a jit function, its own library's included: it must be
    # set before Triton's first import. A test file that imports triton itself sets it first.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise ImportError("Triton was imported before kernels.py could switch it to its CPU interpreter "
                          "(no CUDA GPU here): import kernels first, or set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
    warnings.warn("kernels.py: no CUDA GPU, Triton kernels run in its interpreter on the CPU (slow; "
                  "meant for tests on small shapes)", RuntimeWarning, stacklevel=2)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel may read must be a constexpr
LOG2E = 1.4426950408889634  # scores are kept in base 2 so that exp2 (one instruction) does the softmax


# --- Dtypes and the precision rule -----------------------------------------------------------

def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype the kernels read: the common one of the inputs if a kernel can use it, else float32."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _tf32_allowed() -> bool:
    """Has the caller allowed tf32 for float32 matrix products, with PyTorch's own switch?
    torch.backends.cuda.matmul.fp32_precision = "tf32" (torch >= 2.9), or the older
    torch.backends.cuda.matmul.allow_tf32 = True / torch.set_float32_matmul_precision("high").
    Under CUDA autocast the caller has asked for low-precision products already: the float32
    tensors that reach a kernel there (GDN's normalised q and k, say) get tf32, as before the rule
    (exact products made a bf16 training step of gdn+swa 2.2x slower at 8K on an H200)."""
    if torch.is_autocast_enabled("cuda"):
        return True
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; it reflects the older switches too
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def _dot_precision(dtype: torch.dtype) -> str:
    """The precision rule, PRECISION of every kernel: float32 inputs get exact float32 products
    ("ieee"), like the reference, unless the caller allowed tf32; 16-bit inputs multiply on the
    tensor cores in their own dtype, where PRECISION does not apply ("tf32" is passed, as always;
    it also covers the few products of float32 intermediates, like GDN's triangular solve).
    Triton's interpreter multiplies exactly whatever PRECISION says."""
    return "ieee" if dtype == torch.float32 and not _tf32_allowed() else "tf32"


# --- Input checks, defaults and sizes shared by every op -------------------------------------

MAX_HEAD_DIM = 128  # the largest head-dim tile the kernels are built and checked for


def _check_kernel_limits(reference: str, head_dims: dict, tensors: dict) -> None:
    """What tiny_hybrid.<reference> accepts but the kernels do not: a head dim (name -> size) past
    MAX_HEAD_DIM, or a tensor (name -> tensor or None) on another device than the one Triton runs
    on here, or on several devices."""
    for name, d in head_dims.items():
        if d > MAX_HEAD_DIM:
            raise ValueError(f"head dim {name} = {d} is too large for the Triton kernels (at most "
                             f"{MAX_HEAD_DIM}); use tiny_hybrid.{reference}")
    given = {name: x for name, x in tensors.items() if x is not None}
    for name, x in given.items():
        if x.device.type != ("cpu" if INTERPRET else "cuda"):
            raise ValueError(f"{name} is on {x.device}, but Triton here runs "
                             f"{'on the CPU (interpreter)' if INTERPRET else 'on CUDA'}")
    if len({x.device for x in given.values()}) > 1:
        raise ValueError("all inputs must be on one device, got "
                         + ", ".join(f"{name} on {x.device}" for name, x in given.items()))


def _default_scale(scale, D: int) -> float:
    """The softmax / read-out scale: D^-1/2 unless the caller gives one (as in tiny_hybrid)."""
    return D ** -0.5 if scale is None else float(scale)


@functools.lru_cache(maxsize=None)
def _launched_as_is(fn):
    """For the ops a decoding step calls: inside torch.compile (the Decoder's compile=True) the op
    runs as written, a graph break, and inductor fuses the PyTorch ops around it. Tracing into the
    launch fails (inductor cannot take attention_decode's bool-to-int8 view of `valid`), and a break
    costs nothing once the step is captured in a CUDA graph: the replay launches kernels only."""
    return functools.wraps(fn)(torch.compiler.disable(fn))


def _multiprocessors(device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 or H200); 1 in the interpreter.
    Grids that must fill the GPU size themselves by it."""
    if INTERPRET:
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_d(D: int) -> int:
    """Head-dim tile: a power of two (Triton's rule) and >= 16 (the tensor cores' smallest K)."""
    return max(16, triton.next_power_of_2(D))


# --- Jit helpers shared by every kernel ------------------------------------------------------

# Triton's interpreter multiplies bfloat16 matrices as raw 16-bit integers; there the operands go
# through float32 first (bf16 x bf16 products are exact in float32, so the result is the same).
_BF16_DOT_VIA_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32 (PRECISION: "ieee" exact float32 products, or "tf32")."""
    if _BF16_DOT_VIA_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, rows, row_ok, row_stride, offs_d, D: tl.constexpr):
    """Gather rows `rows` of a matrix whose rows are `row_stride` apart: [len(rows), BLOCK_D],
    zeros for rows not ok and for the columns past D."""
    ptrs = ptr + rows[:, None] * row_stride + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(ptr, x, rows, row_ok, row_stride, offs_d, D: tl.constexpr):
    """Scatter the rows of x [len(rows), BLOCK_D] to `rows` (the inverse of _load_rows)."""
    ptrs = ptr + rows[:, None] * row_stride + offs_d[None, :]
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# =============================================================================================
# 1a. Gated DeltaNet (tiny_hybrid.gated_delta_rule, gated_delta_rule_recurrent)
# =============================================================================================
# Per head, with the state S [K, V], a log decay g_t <= 0 and beta_t in (0, 1):
#     S_t = e^(g_t) S_(t-1) + k_t u_t^T,   u_t = beta_t (v_t - e^(g_t) S_(t-1)^T k_t),   o_t = scale S_t^T q_t
# Chunked, as tiny_hybrid.gated_delta_rule's steps 3-6: in a chunk of L tokens, with the decay
# from its start gamma_i = g_1 + ... + g_i, Gamma_ij = e^(gamma_i - gamma_j) for j <= i, and S the
# state entering the chunk (rows of Q, K, V, U, W: the chunk's tokens):
#     A     = diag(beta) ((K K^T) * Gamma), strictly lower     A_inv = (I + A)^-1  (the UT transform)
#     W     = A_inv diag(beta e^gamma) K                       U'    = A_inv diag(beta) V
#     U     = U' - W S                                         (the chunk's u_t, all at once)
#     O     = scale (diag(e^gamma) Q S + (Q K^T * Gamma) U)
#     S_L   = e^(gamma_L) S + (diag(e^(gamma_L - gamma)) K)^T U     (the state leaving the chunk)
# One kernel per step, one program per (chunk, batch * head) unless said otherwise:
#   _gdn_ut_kernel         gamma and A_inv (step 3, step 4's solve)
#   _gdn_wy_kernel         W and U' (step 4)
#   _gdn_state_fwd_kernel  U and the state entering every chunk: the one walk over the chunks, one
#                          program per (value tile, batch * head)
#   _gdn_output_kernel     O, every chunk at once
# The backward's equations head its kernels (_gdn_state_bwd_kernel walks the chunks back, then
# _gdn_bwd_output_kernel and _gdn_bwd_wy_kernel go through O, U and the UT transform chunk by
# chunk). _gdn_recurrent_kernel is the definition itself, token by token: decoding and prefill.

# --- Jit helpers -----------------------------------------------------------------------------

@triton.jit
def _token_tile(b, h, t0, T, H, D, L: tl.constexpr, BLOCK_D: tl.constexpr, d0=0):
    """Offsets and mask of the [L, BLOCK_D] tile (tokens t0.., dims d0..) of head h of sequence b
    in a [B, T, H, D] tensor. Tokens past T are masked (they read as 0: the reference's padding)."""
    t = t0 + tl.arange(0, L)
    d = d0 + tl.arange(0, BLOCK_D)
    offs = ((b.to(tl.int64) * T + t[:, None]) * H + h) * D + d[None, :]
    return offs, (t[:, None] < T) & (d[None, :] < D)


@triton.jit
def _token_vec(b, h, t0, T, H, L: tl.constexpr):
    """Offsets and mask of L consecutive tokens of head h of sequence b in a [B, T, H] tensor."""
    t = t0 + tl.arange(0, L)
    return (b.to(tl.int64) * T + t) * H + h, t < T


@triton.jit
def _chunk_tile(bh, t0, T_pad, D, L: tl.constexpr, BLOCK_D: tl.constexpr, d0=0):
    """Offsets and mask of an [L, BLOCK_D] tile of a heads-first, padded work tensor [B*H, T_pad, D]."""
    t = t0 + tl.arange(0, L)
    d = d0 + tl.arange(0, BLOCK_D)
    return (bh.to(tl.int64) * T_pad + t[:, None]) * D + d[None, :], d[None, :] < D


@triton.jit
def _state_tile(bh, n, N, K, V, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, v0):
    """Offsets and mask of the [BLOCK_K, BLOCK_V] tile (value columns v0..) of state n of [B*H, N, K, V]."""
    dk = tl.arange(0, BLOCK_K)
    dv = v0 + tl.arange(0, BLOCK_V)
    offs = ((bh.to(tl.int64) * N + n) * K + dk[:, None]) * V + dv[None, :]
    return offs, (dk[:, None] < K) & (dv[None, :] < V)


@triton.jit
def _chunk_gamma(gamma_ptr, bh, t0, T_pad, L: tl.constexpr):
    """gamma of the chunk starting at t0 (the decay from its start, float32 [L], from the work
    tensor [B*H, T_pad]) and its last entry gamma_L, the decay over the whole chunk."""
    gam = tl.load(gamma_ptr + bh.to(tl.int64) * T_pad + t0 + tl.arange(0, L))
    return gam, tl.load(gamma_ptr + bh.to(tl.int64) * T_pad + t0 + L - 1)


@triton.jit
def _decay_matrix(gam, L: tl.constexpr, STRICT: tl.constexpr):
    """Gamma_ij = exp(gamma_i - gamma_j) on j < i (STRICT) or j <= i, else 0; [L] -> [L, L].
    Masked before exp, so the upper triangle (positive exponents) cannot overflow."""
    i = tl.arange(0, L)[:, None]
    j = tl.arange(0, L)[None, :]
    keep = (j < i) if STRICT else (j <= i)
    return tl.exp(tl.where(keep, gam[:, None] - gam[None, :], float("-inf")))


@triton.jit
def _unit_lower_inverse(A, L: tl.constexpr, LOG2_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular [L, L] A (L = 16 * 2^LOG2_BLOCKS), in two stages,
    so that only 15 steps are sequential (a plain forward substitution would take L - 1):
    (a) the 16 x 16 diagonal blocks A_diag of A, all blocks at once, by forward substitution: at
        step s, row s of every block becomes X_r = e_r - sum_{j<r} (A_diag)_rj X_j (rows j < r
        are final by then), one matrix product whose left side is zero but for those rows;
    (b) the rest: I + A = (I + A_diag)(I + N) with N = (I + A_diag)^-1 E and E = A - A_diag
        strictly block-lower, so N^(L/16) = 0 and (I + N)^-1 = (I - N)(I + N^2)(I + N^4)... is a
        finite product: (I + A)^-1 = (I + N)^-1 (I + A_diag)^-1, one factor per doubling.
    (A's powers grow like binomials, so no series in A itself: (a) substitutes.)

    Worked example of (a), one 3 x 3 block with A_diag = [[0, 0, 0], [a, 0, 0], [b, c, 0]]:
        s = 1:  X_1 = e_1 - a X_0           = [-a, 1, 0]
        s = 2:  X_2 = e_2 - b X_0 - c X_1   = [ac - b, -c, 1]
    and indeed (I + A_diag) [X_0; X_1; X_2] = I. Of (b), L = 32 (two blocks, LOG2_BLOCKS = 1):
        I + A = [[I + D_1, 0], [E_21, I + D_2]]   N = [[0, 0], [(I + D_2)^-1 E_21, 0]],  N^2 = 0
        (I + A)^-1 = (I - N) (I + A_diag)^-1
                   = [[(I + D_1)^-1, 0], [-(I + D_2)^-1 E_21 (I + D_1)^-1, (I + D_2)^-1]]
    """
    rows = tl.arange(0, L)[:, None]
    cols = tl.arange(0, L)[None, :]
    same_block = (rows // 16) == (cols // 16)
    A_diag = tl.where(same_block, A, 0.)
    inv = (rows == cols).to(tl.float32)                      # rows not yet reached stay e_r
    for s in range(1, 16):
        inv -= _dot(tl.where(rows % 16 == s, A_diag, 0.), inv, PRECISION)
    P = -_dot(inv, tl.where(same_block, 0., A), PRECISION)  # -N
    for i in tl.static_range(LOG2_BLOCKS):                  # inv <- (I + (-N)^(2^i)) inv
        if i > 0:
            P = _dot(P, P, PRECISION)
        inv += _dot(P, inv, PRECISION)
    return inv


# --- Forward ---------------------------------------------------------------------------------

@triton.jit
def _gdn_ut_kernel(k_ptr, g_ptr, beta_ptr,                                  # inputs, [B, T, H, *]
                   gamma_ptr, a_inv_ptr,                                    # outputs, [B*H, T_pad, *]
                   T, H, K, T_pad,
                   L: tl.constexpr, BLOCK_K: tl.constexpr, LOG2_BLOCKS: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Steps 3-4a for one chunk: gamma and the UT transform A_inv = (I + A)^-1.

    grid (N chunks, B*H). Writes gamma [L] and A_inv [L, L]. Only [L, L] tiles stay live (K K^T is
    summed over BLOCK_K-wide slices of K), so several programs share a multiprocessor: the triangular
    solve is a chain of small products, and other programs hide its latency.
    """
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * L

    # step 3: decay from the chunk's start
    offs, mask = _token_vec(b, h, t0, T, H, L)
    g = tl.load(g_ptr + offs, mask=mask, other=0.).to(tl.float32)
    beta = tl.load(beta_ptr + offs, mask=mask, other=0.).to(tl.float32)
    gam = tl.cumsum(g, 0)                                                        # [L]
    tl.store(gamma_ptr + bh.to(tl.int64) * T_pad + t0 + tl.arange(0, L), gam)

    # step 4a: A_ij = beta_i Gamma_ij (k_i . k_j), j < i, and A_inv = (I + A)^-1
    kk = tl.zeros([L, L], dtype=tl.float32)
    for d0 in range(0, K, BLOCK_K):
        k_offs, k_mask = _token_tile(b, h, t0, T, H, K, L, BLOCK_K, d0)
        k = tl.load(k_ptr + k_offs, mask=k_mask, other=0.)                       # [L, BLOCK_K]
        kk += _dot(k, tl.trans(k), PRECISION)                                    # [L, L]
    A = _decay_matrix(gam, L, True) * kk * beta[:, None]                         # [L, L]
    A_inv = _unit_lower_inverse(A, L, LOG2_BLOCKS, PRECISION)
    offs, mask = _chunk_tile(bh, t0, T_pad, L, L, L)
    tl.store(a_inv_ptr + offs, A_inv.to(a_inv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gdn_wy_kernel(k_ptr, v_ptr, beta_ptr, gamma_ptr, a_inv_ptr,            # inputs
                   w_ptr, u_prime_ptr,                                      # outputs, [B*H, T_pad, *]
                   T, H, K, V, T_pad,
                   L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """Step 4b for one chunk: the WY factors W = T diag(beta e^gamma) K and U' = T diag(beta) V.

    grid (N chunks, B*H). The forward runs it after _gdn_ut_kernel, the backward from the saved A_inv.
    """
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * L
    dt = w_ptr.dtype.element_ty

    offs, mask = _token_vec(b, h, t0, T, H, L)
    beta = tl.load(beta_ptr + offs, mask=mask, other=0.).to(tl.float32)          # [L]
    gam, _ = _chunk_gamma(gamma_ptr, bh, t0, T_pad, L)                           # [L]
    offs, mask = _chunk_tile(bh, t0, T_pad, L, L, L)
    A_inv = tl.load(a_inv_ptr + offs, mask=mask, other=0.)                       # [L, L] f32
    # the diagonal scales go onto T's columns ([L, L]) rather than onto K and V ([L, D])
    tw = (A_inv * (beta * tl.exp(gam))[None, :]).to(dt)
    tu = (A_inv * beta[None, :]).to(dt)
    # (loop variables get names of their own: a loop may not change a variable's shape)
    for d0 in range(0, K, BLOCK_K):
        t_offs, t_mask = _token_tile(b, h, t0, T, H, K, L, BLOCK_K, d0)
        k = tl.load(k_ptr + t_offs, mask=t_mask, other=0.)                       # [L, BLOCK_K]
        c_offs, c_mask = _chunk_tile(bh, t0, T_pad, K, L, BLOCK_K, d0)
        tl.store(w_ptr + c_offs, _dot(tw, k, PRECISION).to(dt), mask=c_mask)
    for d0 in range(0, V, BLOCK_V):
        t_offs, t_mask = _token_tile(b, h, t0, T, H, V, L, BLOCK_V, d0)
        v = tl.load(v_ptr + t_offs, mask=t_mask, other=0.)                       # [L, BLOCK_V]
        c_offs, c_mask = _chunk_tile(bh, t0, T_pad, V, L, BLOCK_V, d0)
        tl.store(u_prime_ptr + c_offs, _dot(tu, v, PRECISION).to(dt), mask=c_mask)


@triton.jit
def _gdn_state_fwd_kernel(k_ptr, w_ptr, u_prime_ptr, gamma_ptr, h0_ptr,  # inputs
                          h_ptr, u_ptr, ht_ptr,                          # outputs
                          T, H, K, V, T_pad, N,
                          L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                          HAS_H0: tl.constexpr, PRECISION: tl.constexpr):
    """Step 5, the recurrence: walk the N chunks carrying S [K, BLOCK_V] in float32 registers.

    grid (V / BLOCK_V, B*H). Writes h [N, K, V] (the state entering each chunk), U [T_pad, V] and the
    final state.
    """
    v_tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    v0 = v_tile * BLOCK_V
    dt = w_ptr.dtype.element_ty

    s_offs, s_mask = _state_tile(bh, 0, 1, K, V, BLOCK_K, BLOCK_V, v0)           # [B*H, K, V] tile
    if HAS_H0:
        S = tl.load(h0_ptr + s_offs, mask=s_mask, other=0.).to(tl.float32)       # [BLOCK_K, BLOCK_V]
    else:
        S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    for n in range(N):
        t0 = n * L
        offs, mask = _state_tile(bh, n, N, K, V, BLOCK_K, BLOCK_V, v0)
        tl.store(h_ptr + offs, S.to(h_ptr.dtype.element_ty), mask=mask)

        offs, mask = _chunk_tile(bh, t0, T_pad, K, L, BLOCK_K)
        w = tl.load(w_ptr + offs, mask=mask, other=0.)                           # [L, BLOCK_K]
        offs, mask = _chunk_tile(bh, t0, T_pad, V, L, BLOCK_V, v0)
        u = tl.load(u_prime_ptr + offs, mask=mask, other=0.).to(tl.float32) \
            - _dot(w, S.to(dt), PRECISION)                                       # U = U' - W S
        tl.store(u_ptr + offs, u.to(dt), mask=mask)

        gam, gam_last = _chunk_gamma(gamma_ptr, bh, t0, T_pad, L)                # [L], scalar
        offs, mask = _token_tile(b, h, t0, T, H, K, L, BLOCK_K)
        k = tl.load(k_ptr + offs, mask=mask, other=0.)                           # [L, BLOCK_K]
        # the decay to the chunk's end goes onto U ([L, BLOCK_V]) rather than K ([L, K]): fewer registers
        u_to_end = (u * tl.exp(gam_last - gam)[:, None]).to(dt)
        S = S * tl.exp(gam_last) + _dot(tl.trans(k), u_to_end, PRECISION)

    tl.store(ht_ptr + s_offs, S, mask=s_mask)


@triton.jit
def _gdn_output_kernel(q_ptr, k_ptr, gamma_ptr, h_ptr, u_ptr, o_ptr, scale,
                       T, H, K, V, T_pad, N,
                       L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Step 5, the output: O = scale (diag(e^gamma) Q S + (Q K^T * Gamma) U), every chunk at once.

    grid (N, V / BLOCK_V, B*H). Writes o [L, BLOCK_V] into [B, T, H, V] (tokens past T dropped: step 6).
    """
    n, v_tile, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    t0, v0 = n * L, v_tile * BLOCK_V
    dt = u_ptr.dtype.element_ty

    offs, mask = _token_tile(b, h, t0, T, H, K, L, BLOCK_K)
    q = tl.load(q_ptr + offs, mask=mask, other=0.)                               # [L, BLOCK_K]
    k = tl.load(k_ptr + offs, mask=mask, other=0.)                               # [L, BLOCK_K]
    gam, _ = _chunk_gamma(gamma_ptr, bh, t0, T_pad, L)                           # [L]
    offs, mask = _state_tile(bh, n, N, K, V, BLOCK_K, BLOCK_V, v0)
    S = tl.load(h_ptr + offs, mask=mask, other=0.)                               # [BLOCK_K, BLOCK_V]
    offs, mask = _chunk_tile(bh, t0, T_pad, V, L, BLOCK_V, v0)
    u = tl.load(u_ptr + offs, mask=mask, other=0.)                               # [L, BLOCK_V]

    o_state = _dot(q, S.to(q.dtype), PRECISION) * tl.exp(gam)[:, None]           # [L, BLOCK_V]
    p = _dot(q, tl.trans(k), PRECISION) * _decay_matrix(gam, L, False)           # [L, L]
    o = scale * (o_state + _dot(p.to(dt), u, PRECISION))

    offs, mask = _token_tile(b, h, t0, T, H, V, L, BLOCK_V, v0)
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)


# --- Backward --------------------------------------------------------------------------------
# With P = scale (Q K^T * Gamma) (j <= i), dS_next the gradient of the state leaving a chunk:
#   dU      = P^T dO + diag(e^(gamma_L - gamma)) K dS_next                     (U feeds O and S_next)
#   dS      = e^gamma_L dS_next + scale (diag(e^gamma) Q)^T dO - W^T dU        (S feeds O, U, S_next)
#   dQ      = scale diag(e^gamma) dO S^T + (scale dO U^T * Gamma) K
#   dK     += (scale dO U^T * Gamma)^T Q + diag(e^(gamma_L - gamma)) U dS_next^T
#   dW      = -dU S^T,   dU' = dU
# Through the UT transform (W = A_inv Xw, U' = A_inv Xu, A_inv = (I + A)^-1, so that
# d(A_inv) = -A_inv^T (.) A_inv^T):
#   dXw = A_inv^T dW,  dXu = A_inv^T dU',  dA = -(dXw W^T + dXu U'^T) on j < i
# and from A_ij = beta_i Gamma_ij k_i.k_j, Xw = diag(beta e^gamma) K, Xu = diag(beta) V the
# gradients of k, v, beta and gamma; gamma's gradient becomes g's by a reverse cumsum.

@triton.jit
def _gdn_state_bwd_kernel(q_ptr, k_ptr, w_ptr, gamma_ptr, do_ptr, dht_ptr,  # inputs
                          dh_ptr, du_ptr, dh0_ptr,                          # outputs
                          scale, T, H, K, V, T_pad, N,
                          L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                          PRECISION: tl.constexpr):
    """The recurrence backwards: walk the chunks from the last, carrying dS [K, BLOCK_V] in float32.

    grid (V / BLOCK_V, B*H). Writes dh [N, K, V] (gradient of the state LEAVING each chunk), dU [T_pad, V]
    and dS of the initial state.
    """
    v_tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    v0 = v_tile * BLOCK_V
    dt = w_ptr.dtype.element_ty

    s_offs, s_mask = _state_tile(bh, 0, 1, K, V, BLOCK_K, BLOCK_V, v0)
    dS = tl.load(dht_ptr + s_offs, mask=s_mask, other=0.).to(tl.float32)         # [BLOCK_K, BLOCK_V]

    for i in range(N):
        n = N - 1 - i
        t0 = n * L
        offs, mask = _state_tile(bh, n, N, K, V, BLOCK_K, BLOCK_V, v0)
        tl.store(dh_ptr + offs, dS.to(dh_ptr.dtype.element_ty), mask=mask)

        offs, mask = _token_tile(b, h, t0, T, H, K, L, BLOCK_K)
        q = tl.load(q_ptr + offs, mask=mask, other=0.)                           # [L, BLOCK_K]
        k = tl.load(k_ptr + offs, mask=mask, other=0.)                           # [L, BLOCK_K]
        offs, mask = _chunk_tile(bh, t0, T_pad, K, L, BLOCK_K)
        w = tl.load(w_ptr + offs, mask=mask, other=0.)                           # [L, BLOCK_K]
        offs, mask = _token_tile(b, h, t0, T, H, V, L, BLOCK_V, v0)
        do = tl.load(do_ptr + offs, mask=mask, other=0.)                         # [L, BLOCK_V]
        gam, gam_last = _chunk_gamma(gamma_ptr, bh, t0, T_pad, L)                # [L], scalar

        # P^T (j, i) = scale k_j . q_i Gamma_ij, i >= j. Row scales (decays) go on the [L, BLOCK_V]
        # side of each product, not on the [L, K] one: fewer registers.
        pt = scale * _dot(k, tl.trans(q), PRECISION) * tl.trans(_decay_matrix(gam, L, False))
        du = _dot(pt.to(dt), do, PRECISION) \
            + _dot(k, dS.to(dt), PRECISION) * tl.exp(gam_last - gam)[:, None]    # [L, BLOCK_V]
        offs, mask = _chunk_tile(bh, t0, T_pad, V, L, BLOCK_V, v0)
        tl.store(du_ptr + offs, du.to(dt), mask=mask)

        do_decayed = (do.to(tl.float32) * (scale * tl.exp(gam))[:, None]).to(dt)    # [L, BLOCK_V]
        dS = dS * tl.exp(gam_last) + _dot(tl.trans(q), do_decayed, PRECISION) \
            - _dot(tl.trans(w), du.to(dt), PRECISION)

    tl.store(dh0_ptr + s_offs, dS, mask=s_mask)


@triton.jit
def _gdn_bwd_output_kernel(q_ptr, k_ptr, gamma_ptr, h_ptr, u_ptr, du_ptr, dh_ptr, do_ptr,  # in
                           dq_ptr, dk_ptr, dw_ptr, dgam_ptr,                                # out
                           scale, T, H, K, V, T_pad, N,
                           L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Gradients through O, U = U' - W S and the state update, one chunk, looping over V tiles.

    grid (N, B*H). Writes dq (final, into [B, T, H, K]), and float32 partials [B*H, T_pad, *] of
    dk, dW and dgamma that _gdn_bwd_wy_kernel completes.
    """
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * L
    dt = u_ptr.dtype.element_ty

    dq_state = tl.zeros([L, BLOCK_K], dtype=tl.float32)  # dO S^T
    dk_state = tl.zeros([L, BLOCK_K], dtype=tl.float32)  # U dS_next^T
    dw = tl.zeros([L, BLOCK_K], dtype=tl.float32)    # -dU S^T
    r = tl.zeros([L, L], dtype=tl.float32)           # dO U^T
    s_dot_ds = tl.zeros([BLOCK_K], dtype=tl.float32)  # <S, dS_next>, row by row
    for v_tile in range(tl.cdiv(V, BLOCK_V)):
        v0 = v_tile * BLOCK_V
        t_offs, t_mask = _token_tile(b, h, t0, T, H, V, L, BLOCK_V, v0)
        do = tl.load(do_ptr + t_offs, mask=t_mask, other=0.)                     # [L, BLOCK_V]
        c_offs, c_mask = _chunk_tile(bh, t0, T_pad, V, L, BLOCK_V, v0)
        u = tl.load(u_ptr + c_offs, mask=c_mask, other=0.)                       # [L, BLOCK_V]
        du = tl.load(du_ptr + c_offs, mask=c_mask, other=0.)                     # [L, BLOCK_V]
        s_offs, s_mask = _state_tile(bh, n, N, K, V, BLOCK_K, BLOCK_V, v0)
        S = tl.load(h_ptr + s_offs, mask=s_mask, other=0.)                       # [BLOCK_K, BLOCK_V]
        dS = tl.load(dh_ptr + s_offs, mask=s_mask, other=0.)                     # [BLOCK_K, BLOCK_V]
        dq_state += _dot(do, tl.trans(S), PRECISION)
        dk_state += _dot(u, tl.trans(dS), PRECISION)
        dw -= _dot(du, tl.trans(S), PRECISION)
        r += _dot(do, tl.trans(u), PRECISION)
        s_dot_ds += tl.sum(S.to(tl.float32) * dS.to(tl.float32), 1)
    # (each result is stored as soon as it is final, and q, k load only now: short live ranges,
    # so that K = 128 fits in registers)
    offs, mask = _chunk_tile(bh, t0, T_pad, K, L, BLOCK_K)
    tl.store(dw_ptr + offs, dw, mask=mask)

    gam, gam_last = _chunk_gamma(gamma_ptr, bh, t0, T_pad, L)                    # [L], scalar
    t_offs, t_mask = _token_tile(b, h, t0, T, H, K, L, BLOCK_K)
    q = tl.load(q_ptr + t_offs, mask=t_mask, other=0.)                           # [L, BLOCK_K]
    k = tl.load(k_ptr + t_offs, mask=t_mask, other=0.)                           # [L, BLOCK_K]
    z = scale * r * _decay_matrix(gam, L, False)                                 # dL/d(Q K^T)

    # dgamma: from e^gamma in the state read-out, Gamma in P, e^(gamma_L - gamma) in the update
    # (terms that cancel exactly, the diagonal of P and the last token's own decay to the chunk
    # end, are left out: in float32 their rounding would swamp small gradients under strong decay).
    # Worked example, L = 2: S_L = e^(g_1) S + e^(g_1 - g_0) k_0 u_0^T + e^(g_1 - g_1) k_1 u_1^T;
    # with c_i = <k_i u_i^T, dS_next> (k_dk below, decay included for i = 0),
    #     dL/dgamma_1 gets  e^(g_1) <S, dS_next> + e^(g_1 - g_0) c_0 + (c_1 - c_1)
    #     dL/dgamma_0 gets -e^(g_1 - g_0) c_0
    # so the last row takes <S, dS_next> scaled and the sum of the others' k_dk, each other row
    # its own -k_dk, and the last token's +c_1 - c_1 is never formed. Likewise P_ij (j < i) adds
    # dP_ij P_ij to dgamma_i and takes it from dgamma_j, and P_ii = scale q_i.k_i has no gamma.
    dq_state *= (scale * tl.exp(gam))[:, None]
    dgam = tl.sum(q.to(tl.float32) * dq_state, 1)
    dq = dq_state + _dot(z.to(dt), k, PRECISION)
    tl.store(dq_ptr + t_offs, dq.to(dq_ptr.dtype.element_ty), mask=t_mask)

    dk_state *= tl.exp(gam_last - gam)[:, None]
    is_last = tl.arange(0, L) == L - 1
    k_dk = tl.where(is_last, 0., tl.sum(k.to(tl.float32) * dk_state, 1))         # [L]
    dgam += tl.where(is_last, tl.exp(gam_last) * tl.sum(s_dot_ds, 0) + tl.sum(k_dk, 0), -k_dk)
    dk = dk_state + _dot(tl.trans(z.to(dt)), q, PRECISION)
    tl.store(dk_ptr + offs, dk, mask=mask)

    e = r * scale * _dot(q, tl.trans(k), PRECISION) * _decay_matrix(gam, L, True)  # dP * P, j < i
    dgam += tl.sum(e, 1) - tl.sum(e, 0)
    tl.store(dgam_ptr + bh.to(tl.int64) * T_pad + t0 + tl.arange(0, L), dgam)


@triton.jit
def _gdn_bwd_wy_kernel(k_ptr, v_ptr, beta_ptr, gamma_ptr, a_inv_ptr, w_ptr, u_prime_ptr,  # in
                       du_ptr, dw_ptr, dk_part_ptr, dgam_ptr,                             # in
                       dk_ptr, dv_ptr, dg_ptr, dbeta_ptr,                                 # out
                       T, H, K, V, T_pad,
                       L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Gradients through the UT transform (step 4) and the cumsum (step 3), one chunk (the
    equations above the backward kernels).

    grid (N, B*H). Completes dk and writes dk, dv, dg, dbeta into the inputs' layouts.
    """
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * L
    dt = w_ptr.dtype.element_ty
    rows = tl.arange(0, L)[:, None]
    cols = tl.arange(0, L)[None, :]

    offs, mask = _token_vec(b, h, t0, T, H, L)
    beta = tl.load(beta_ptr + offs, mask=mask, other=0.).to(tl.float32)          # [L]
    gam, _ = _chunk_gamma(gamma_ptr, bh, t0, T_pad, L)                           # [L]
    offs, mask = _chunk_tile(bh, t0, T_pad, L, L, L)
    A_inv = tl.load(a_inv_ptr + offs, mask=mask, other=0.).to(dt)                # [L, L]
    w_offs, w_mask = _chunk_tile(bh, t0, T_pad, K, L, BLOCK_K)
    dw = tl.load(dw_ptr + w_offs, mask=w_mask, other=0.)                         # [L, BLOCK_K] f32
    w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.)                           # [L, BLOCK_K]

    # W = T Xw with Xw = diag(beta e^gamma) K: dXw = T^T dW, then its share of dA and the
    # direct gradients of k, beta, gamma
    dxw = _dot(tl.trans(A_inv), dw.to(dt), PRECISION)                            # [L, BLOCK_K]
    dA = -_dot(dxw.to(dt), tl.trans(w), PRECISION)                               # [L, L]
    k_offs, k_mask = _token_tile(b, h, t0, T, H, K, L, BLOCK_K)
    k = tl.load(k_ptr + k_offs, mask=k_mask, other=0.)                           # [L, BLOCK_K]
    eg = tl.exp(gam)
    k_dxw = tl.sum(dxw * k.to(tl.float32), 1)                                    # [L]
    dbeta = eg * k_dxw
    dgam_w = beta * eg * k_dxw
    dk = dxw * (beta * eg)[:, None]                                              # [L, BLOCK_K] f32

    # U' = T Xu with Xu = diag(beta) V, V tile by tile: dXu = T^T dU', dV = diag(beta) dXu
    for v_tile in range(tl.cdiv(V, BLOCK_V)):
        v0 = v_tile * BLOCK_V
        c_offs, c_mask = _chunk_tile(bh, t0, T_pad, V, L, BLOCK_V, v0)
        du = tl.load(du_ptr + c_offs, mask=c_mask, other=0.)                     # [L, BLOCK_V]
        u_prime = tl.load(u_prime_ptr + c_offs, mask=c_mask, other=0.)          # [L, BLOCK_V]
        t_offs, t_mask = _token_tile(b, h, t0, T, H, V, L, BLOCK_V, v0)
        v = tl.load(v_ptr + t_offs, mask=t_mask, other=0.).to(tl.float32)       # [L, BLOCK_V]
        dxu = _dot(tl.trans(A_inv), du, PRECISION)                               # [L, BLOCK_V]
        tl.store(dv_ptr + t_offs, (dxu * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=t_mask)
        dbeta += tl.sum(dxu * v, 1)
        dA -= _dot(dxu.to(dt), tl.trans(u_prime), PRECISION)
    dA = tl.where(cols < rows, dA, 0.)                                           # A is strictly lower

    # A = diag(beta) C with C = (K K^T) * Gamma (j < i)
    decay = _decay_matrix(gam, L, True)
    dA_c = dA * _dot(k, tl.trans(k), PRECISION) * decay                          # dA * C
    dbeta += tl.sum(dA_c, 1)
    e = dA_c * beta[:, None]                                                     # dA * A: dlog Gamma
    dgam = dgam_w + tl.sum(e, 1) - tl.sum(e, 0)
    dkk = (dA * decay * beta[:, None]).to(dt)                                    # dL/d(K K^T)
    dk += _dot(dkk, k, PRECISION) + _dot(tl.trans(dkk), k, PRECISION)
    dk += tl.load(dk_part_ptr + w_offs, mask=w_mask, other=0.)                   # from O, S_next
    tl.store(dk_ptr + k_offs, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)
    dgam += tl.load(dgam_ptr + bh.to(tl.int64) * T_pad + t0 + tl.arange(0, L))

    # gamma = cumsum(g)  =>  dg_i = sum_{m >= i} dgamma_m (a reverse cumsum)
    dg = tl.cumsum(dgam, 0, reverse=True)

    offs, mask = _token_vec(b, h, t0, T, H, L)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dbeta_ptr + offs, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mask)


# --- Decoding --------------------------------------------------------------------------------

@triton.jit
def _gdn_recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, o_ptr, ht_ptr, scale,
                          T, H, K, V,
                          BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_H0: tl.constexpr):
    """The recurrent definition, token by token, the state tile [K, BLOCK_V] kept in float32 registers.

    grid (V / BLOCK_V, B*H). Each value-column tile of the state evolves on its own (the delta rule's
    read-out k^T S only mixes rows), so tiles run in parallel. ht may alias h0 (in-place update):
    each program reads its tile before it writes it.
    """
    v_tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    v0 = v_tile * BLOCK_V
    dk = tl.arange(0, BLOCK_K)
    dv = v0 + tl.arange(0, BLOCK_V)
    s_offs, s_mask = _state_tile(bh, 0, 1, K, V, BLOCK_K, BLOCK_V, v0)
    if HAS_H0:
        S = tl.load(h0_ptr + s_offs, mask=s_mask, other=0.).to(tl.float32)      # [BLOCK_K, BLOCK_V]
    else:
        S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    for t in range(T):
        tok = (b.to(tl.int64) * T + t) * H + h                                   # [B, T, H] index
        q = tl.load(q_ptr + tok * K + dk, mask=dk < K, other=0.).to(tl.float32)  # [BLOCK_K]
        k = tl.load(k_ptr + tok * K + dk, mask=dk < K, other=0.).to(tl.float32)  # [BLOCK_K]
        v = tl.load(v_ptr + tok * V + dv, mask=dv < V, other=0.).to(tl.float32)  # [BLOCK_V]
        g = tl.load(g_ptr + tok).to(tl.float32)
        beta = tl.load(beta_ptr + tok).to(tl.float32)
        S = S * tl.exp(g)
        u = beta * (v - tl.sum(k[:, None] * S, 0))                               # [BLOCK_V]
        S = S + k[:, None] * u[None, :]                                          # rank-1 update
        o = scale * tl.sum(q[:, None] * S, 0)                                    # [BLOCK_V]
        tl.store(o_ptr + tok * V + dv, o.to(o_ptr.dtype.element_ty), mask=dv < V)

    tl.store(ht_ptr + s_offs, S, mask=s_mask)


# --- Host side: launches, the autograd op, the public functions ------------------------------

_GDN_CHUNK_SIZES = (16, 32, 64)


def _gdn_work_dtype(q, k, v) -> torch.dtype:
    """16-bit dots and intermediates when q, k, v share a 16-bit dtype, else float32."""
    if q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16):
        return q.dtype
    return torch.float32


def _gdn_seq_block_v(BH: int, V: int, device) -> int:
    """Value-tile width of the sequential kernels. They run one program per (B*H, V tile) and
    are latency-bound, so narrow the tiles while the programs still fit on the multiprocessors
    one each (measured on the H100, B*H = 32: BLOCK_V = 16 for V = 64, 32 for V = 128)."""
    BLOCK_V = min(64, _block_d(V))
    while BLOCK_V > 16 and 2 * BH * triton.cdiv(V, BLOCK_V) <= _multiprocessors(device):
        BLOCK_V //= 2
    return BLOCK_V


def _gdn_num_stages(x: torch.Tensor) -> int:
    """Software-pipelining depth of the loops: 3 for 16-bit tiles; float32 tiles are twice the
    size and 3 stages overflow the H100's 227 KB of shared memory, so no pipelining there.
    (Never 1 for 16-bit tiles: with Triton 3.6 on the H200, bf16 backward kernels built with one
    stage returned wrong gradients or faulted, while the same code with 3 stages checks out.)"""
    return 3 if x.element_size() == 2 else 1


def _gdn_ut(k, g, beta, L, precision):
    """Launch steps 3-4a: returns gamma [B*H, T_pad] and A_inv [B*H, T_pad, L], both float32
    (A_inv is rounded only once, when it is scaled into W and U'). Launch settings: BLOCK_K <= 64
    keeps only [L, L] tiles and a [L, 64] slice of K live, so that several programs share a
    multiprocessor and hide the solve's chain of small products (this kernel of its own took the
    UT transform from 0.93 to 0.40 ms at K = 128, T = 16K on the H200); num_warps=4 is an untuned
    default."""
    B, T, H, K = k.shape
    N = triton.cdiv(T, L)
    T_pad = N * L                                                 # T padded to whole chunks
    gamma = torch.empty(B * H, T_pad, device=k.device, dtype=torch.float32)
    a_inv = torch.empty(B * H, T_pad, L, device=k.device, dtype=torch.float32)
    _gdn_ut_kernel[(N, B * H)](k, g, beta, gamma, a_inv, T, H, K, T_pad, L=L,
                               BLOCK_K=min(64, _block_d(K)), LOG2_BLOCKS=(L // 16).bit_length() - 1,
                               PRECISION=precision, num_warps=4)
    return gamma, a_inv


def _gdn_wy(k, v, beta, gamma, a_inv, L, precision):
    """Launch step 4b: returns W [B*H, T_pad, K] and U' [B*H, T_pad, V] in the work dtype.
    Launch settings (64-wide slices, 4 warps): untuned defaults."""
    B, T, H, K = k.shape
    V = v.shape[3]
    T_pad = gamma.shape[1]
    w = torch.empty(B * H, T_pad, K, device=k.device, dtype=k.dtype)
    u_prime = torch.empty(B * H, T_pad, V, device=k.device, dtype=k.dtype)
    _gdn_wy_kernel[(T_pad // L, B * H)](k, v, beta, gamma, a_inv, w, u_prime, T, H, K, V, T_pad, L=L,
                                        BLOCK_K=min(64, _block_d(K)), BLOCK_V=min(64, _block_d(V)),
                                        PRECISION=precision, num_warps=4)
    return w, u_prime


def _gdn_state_fwd(k, w, u_prime, gamma, h0, L, precision):
    """Launch the forward recurrence: returns h [B*H, N, K, V], U [B*H, T_pad, V], final state f32.
    Launch settings: BLOCK_V from _gdn_seq_block_v (measured), num_stages from _gdn_num_stages,
    num_warps=4 an untuned default."""
    B, T, H, K = k.shape
    V = u_prime.shape[2]
    T_pad = u_prime.shape[1]
    N = T_pad // L
    h = torch.empty(B * H, N, K, V, device=k.device, dtype=k.dtype)
    u = torch.empty_like(u_prime)
    ht = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
    BLOCK_K, BLOCK_V = _block_d(K), _gdn_seq_block_v(B * H, V, k.device)
    _gdn_state_fwd_kernel[(triton.cdiv(V, BLOCK_V), B * H)](
        k, w, u_prime, gamma, h0 if h0 is not None else ht, h, u, ht, T, H, K, V, T_pad, N,
        L=L, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, HAS_H0=h0 is not None, PRECISION=precision, num_warps=4,
        num_stages=_gdn_num_stages(k))
    return h, u, ht


def _gdn_output(q, k, gamma, h, u, scale, L, out_dtype, precision):
    """Launch the chunk-parallel output: o [B, T, H, V] in out_dtype."""
    B, T, H, K = q.shape
    V = u.shape[2]
    T_pad = u.shape[1]
    N = T_pad // L
    o = torch.empty(B, T, H, V, device=q.device, dtype=out_dtype)
    # one program per chunk and V tile; at K = V = 128 a whole-V tile with 4 warps was the
    # fastest on the H200 (0.24 ms at T = 16K against 0.38 for 64-wide tiles with 8 warps)
    BLOCK_K, BLOCK_V = _block_d(K), _block_d(V)
    _gdn_output_kernel[(N, triton.cdiv(V, BLOCK_V), B * H)](
        q, k, gamma, h, u, o, scale, T, H, K, V, T_pad, N,
        L=L, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, PRECISION=precision, num_warps=4, num_stages=_gdn_num_stages(q))
    return o


def _gdn_validate(q, k, v, g, beta, initial_state, chunk_size) -> None:
    """The reference's checks (same errors), then the kernel's own limits."""
    check_gdn(q, k, v, g, beta, initial_state)
    check_int("chunk_size", chunk_size, low=1)
    if chunk_size not in _GDN_CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {_GDN_CHUNK_SIZES} for the Triton kernel, "
                         f"got {chunk_size}")
    _check_kernel_limits("gated_delta_rule", dict(K=k.shape[3], V=v.shape[3]),
                         dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state))


def _gdn_inputs(q, k, v, g, beta, initial_state, scale):
    """Contiguous work tensors: q, k, v in the work dtype, g, beta, the state as they come."""
    scale = _default_scale(scale, q.shape[3])
    wd = _gdn_work_dtype(q, k, v)
    q, k, v = (x.to(wd).contiguous() for x in (q, k, v))
    h0 = None if initial_state is None else initial_state.contiguous()
    return q, k, v, g.contiguous(), beta.contiguous(), h0, scale


def _gdn_forward(q, k, v, g, beta, h0, scale, L, out_dtype, precision):
    """The chunked forward on work tensors: returns (o, final_state, gamma, A_inv); the backward
    keeps gamma and A_inv so that it need not solve the triangular systems again."""
    gamma, a_inv = _gdn_ut(k, g, beta, L, precision)
    w, u_prime = _gdn_wy(k, v, beta, gamma, a_inv, L, precision)
    h, u, ht = _gdn_state_fwd(k, w, u_prime, gamma, h0, L, precision)
    return _gdn_output(q, k, gamma, h, u, scale, L, out_dtype, precision), ht, gamma, a_inv


def _gdn_state_bwd(q, k, w, gamma, do, dht, scale, L, precision):
    """Launch the backward recurrence: returns dh [B*H, N, K, V], dU [B*H, T_pad, V], dS_0 f32.
    Launch settings as _gdn_state_fwd."""
    B, T, H, K = k.shape
    V = do.shape[3]
    T_pad = w.shape[1]
    N = T_pad // L
    dh = torch.empty(B * H, N, K, V, device=k.device, dtype=k.dtype)
    du = torch.empty(B * H, T_pad, V, device=k.device, dtype=k.dtype)
    dh0 = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
    BLOCK_K, BLOCK_V = _block_d(K), _gdn_seq_block_v(B * H, V, k.device)
    _gdn_state_bwd_kernel[(triton.cdiv(V, BLOCK_V), B * H)](
        q, k, w, gamma, do, dht, dh, du, dh0, scale, T, H, K, V, T_pad, N,
        L=L, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, PRECISION=precision, num_warps=4, num_stages=_gdn_num_stages(k))
    return dh, du, dh0


def _gdn_bwd_config(kernel: str, K: int, V: int, x: torch.Tensor) -> dict:
    """Value tile, warps and pipelining of the chunk-parallel backward kernels ("output", "wy"):
    the fastest of a sweep on the H200 at T = 16K, B*H = 32, bf16 (output: 0.31 / 0.77 ms at
    K = 64 / 128 against 0.47 / 0.83 for the next best; wy: 0.38 / 0.61 against 0.64 / 1.0)."""
    BLOCK_V, warps = (64, 8) if kernel == "output" and _block_d(K) > 64 else (32, 4)
    return dict(BLOCK_V=min(BLOCK_V, _block_d(V)), num_warps=warps, num_stages=_gdn_num_stages(x))


def _gdn_bwd_output(q, k, gamma, h, u, du, dh, do, scale, L, dq_dtype, precision):
    """Launch the gradients through O, U and S: returns dq (final) and f32 partials dk, dW, dgamma."""
    B, T, H, K = k.shape
    V = u.shape[2]
    T_pad = u.shape[1]
    N = T_pad // L
    dq = torch.empty(B, T, H, K, device=k.device, dtype=dq_dtype)
    dk_part = torch.empty(B * H, T_pad, K, device=k.device, dtype=torch.float32)
    dw = torch.empty_like(dk_part)
    dgam = torch.empty(B * H, T_pad, device=k.device, dtype=torch.float32)
    _gdn_bwd_output_kernel[(N, B * H)](
        q, k, gamma, h, u, du, dh, do, dq, dk_part, dw, dgam, scale, T, H, K, V, T_pad, N,
        L=L, BLOCK_K=_block_d(K), PRECISION=precision, **_gdn_bwd_config("output", K, V, k))
    return dq, dk_part, dw, dgam


def _gdn_bwd_wy(k, v, beta, gamma, a_inv, w, u_prime, du, dw, dk_part, dgam, L, dtypes, precision):
    """Launch the gradients through the UT transform: returns dk, dv, dg, dbeta."""
    B, T, H, K = k.shape
    V = v.shape[3]
    T_pad = w.shape[1]
    N = T_pad // L
    dk = torch.empty(B, T, H, K, device=k.device, dtype=dtypes[1])
    dv = torch.empty(B, T, H, V, device=k.device, dtype=dtypes[2])
    dg = torch.empty(B, T, H, device=k.device, dtype=dtypes[3])
    dbeta = torch.empty(B, T, H, device=k.device, dtype=dtypes[4])
    _gdn_bwd_wy_kernel[(N, B * H)](
        k, v, beta, gamma, a_inv, w, u_prime, du, dw, dk_part, dgam, dk, dv, dg, dbeta,
        T, H, K, V, T_pad, L=L, BLOCK_K=_block_d(K), PRECISION=precision,
        **_gdn_bwd_config("wy", K, V, k))
    return dk, dv, dg, dbeta


def _gdn_backward(q, k, v, beta, h0, gamma, a_inv, scale, L, do, dht, dtypes, precision):
    """The chunked backward on work tensors. Recomputes W, U' (from the saved A_inv) and the
    chunk-start states h, U rather than storing them. Returns dq, dk, dv, dg, dbeta, dh0 in the
    dtypes of `dtypes` (the original inputs)."""
    B, T, H, K = k.shape
    V = v.shape[3]
    do = do.to(k.dtype).contiguous()
    dht = torch.zeros(B, H, K, V, device=k.device) if dht is None else dht.float().contiguous()
    w, u_prime = _gdn_wy(k, v, beta, gamma, a_inv, L, precision)
    h, u, _ = _gdn_state_fwd(k, w, u_prime, gamma, h0, L, precision)
    dh, du, dh0 = _gdn_state_bwd(q, k, w, gamma, do, dht, scale, L, precision)
    dq, dk_part, dw, dgam = _gdn_bwd_output(q, k, gamma, h, u, du, dh, do, scale, L, dtypes[0], precision)
    dk, dv, dg, dbeta = _gdn_bwd_wy(k, v, beta, gamma, a_inv, w, u_prime, du, dw, dk_part, dgam, L, dtypes,
                                    precision)
    return dq, dk, dv, dg, dbeta, None if h0 is None else dh0.to(dtypes[5])


class _GatedDeltaRule(torch.autograd.Function):
    """Chunked Gated DeltaNet; saves the inputs and the chunks' gamma and A_inv = (I + A)^-1 (float32,
    [B*H, T, L]: the size of one more input), the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, chunk_size):
        dtypes = tuple(None if x is None else x.dtype for x in (q, k, v, g, beta, initial_state))
        out_dtype = v.dtype
        q, k, v, g, beta, h0, scale = _gdn_inputs(q, k, v, g, beta, initial_state, scale)
        gamma = a_inv = None
        precision = _dot_precision(k.dtype)  # decided once: the backward multiplies the same way
        if q.shape[1] == 0:          # no tokens: nothing to launch (the reference fails on T = 0)
            B, _, H, K = k.shape
            o = torch.empty(B, 0, H, v.shape[3], device=v.device, dtype=out_dtype)
            ht = h0.float().clone() if h0 is not None else \
                torch.zeros(B, H, K, v.shape[3], device=v.device)
        else:
            o, ht, gamma, a_inv = _gdn_forward(q, k, v, g, beta, h0, scale, chunk_size, out_dtype, precision)
        ctx.save_for_backward(q, k, v, g, beta, h0, gamma, a_inv)
        ctx.scale, ctx.chunk_size, ctx.dtypes, ctx.precision = scale, chunk_size, dtypes, precision
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, gamma, a_inv = ctx.saved_tensors
        if q.shape[1] == 0:
            dh0 = None if h0 is None else dht.to(ctx.dtypes[5])
            return (torch.zeros_like(q, dtype=ctx.dtypes[0]), torch.zeros_like(k, dtype=ctx.dtypes[1]),
                    torch.zeros_like(v, dtype=ctx.dtypes[2]), torch.zeros_like(g), torch.zeros_like(beta),
                    None, dh0, None)
        dq, dk, dv, dg, dbeta, dh0 = _gdn_backward(q, k, v, beta, h0, gamma, a_inv, ctx.scale,
                                                   ctx.chunk_size, do, dht, ctx.dtypes, ctx.precision)
        return dq, dk, dv, dg, dbeta, None, dh0, None


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, chunk_size=64):
    """Gated DeltaNet, chunked form, in Triton: the twin of `tiny_hybrid.gated_delta_rule`.

    q, k: [B, T, H, K] (L2-normalised), v: [B, T, H, V], g: [B, T, H] log decay (<= 0),
    beta: [B, T, H] in (0, 1), initial_state: [B, H, K, V] or None, chunk_size L in (16, 32, 64);
    K, V <= 128. float32 / float16 / bfloat16 inputs; the state and all accumulation are float32,
    16-bit inputs use 16-bit tensor-core dots, float32 ones exact float32 products unless the
    caller allowed tf32 (the precision rule, section 0). Differentiable in q, k, v, g, beta,
    initial_state.
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32).
    """
    _gdn_validate(q, k, v, g, beta, initial_state, chunk_size)
    return _GatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, chunk_size)


def _gdn_recurrent_launch(q, k, v, g, beta, h0, ht, o, scale):
    """q, k [B, T, H, K], v, o [B, T, H, V], g, beta [B, T, H], contiguous; h0/ht [B, H, K, V] f32."""
    B, T, H, K = k.shape
    V = v.shape[3]
    BLOCK_K = _block_d(K)
    # untuned defaults: narrow tiles (more programs, and [K, BLOCK_V] stays in registers), and 8
    # warps for the [128, BLOCK_V] state
    BLOCK_V = min(_block_d(V), 32)
    _gdn_recurrent_kernel[(triton.cdiv(V, BLOCK_V), B * H)](
        q, k, v, g, beta, h0 if h0 is not None else ht, o, ht, scale, T, H, K, V,
        BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, HAS_H0=h0 is not None, num_warps=4 if BLOCK_K <= 64 else 8)


@_launched_as_is
def gated_delta_rule_recurrent(q, k, v, g, beta, scale=None, initial_state=None):
    """Gated DeltaNet token by token in one fused Triton kernel: the twin of
    `tiny_hybrid.gated_delta_rule_recurrent` (same arguments, checks and outputs).

    FORWARD ONLY (no autograd): meant for decoding and prefill; train with `gated_delta_rule`.
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32).
    """
    check_gdn(q, k, v, g, beta, initial_state)
    _check_kernel_limits("gated_delta_rule_recurrent", dict(K=k.shape[3], V=v.shape[3]),
                         dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state))
    B, T, H, K = k.shape
    V = v.shape[3]
    scale = _default_scale(scale, K)
    q, k, v, g, beta = (x.detach().contiguous() for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.detach().float().contiguous()
    o = torch.empty(B, T, H, V, device=v.device, dtype=v.dtype)
    ht = torch.empty(B, H, K, V, device=v.device, dtype=torch.float32)
    if T == 0:
        ht.copy_(h0) if h0 is not None else ht.zero_()
        return o, ht
    _gdn_recurrent_launch(q, k, v, g, beta, h0, ht, o, scale)
    return o, ht


def gated_delta_rule_recurrent_step(q, k, v, g, beta, state, scale=None):
    """One decoding step of Gated DeltaNet for every sequence; `state` is updated IN PLACE.

    q, k: [B, H, K], v: [B, H, V], g, beta: [B, H], state: [B, H, K, V] float32 contiguous.
        state <- exp(g) state;  state <- state + k (beta (v - state^T k))^T;  o = scale state^T q
    Returns o [B, H, V] in v's dtype. Forward only.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 3)
    check_tensor("g", g, 2)
    check_tensor("beta", beta, 2)
    check_tensor("state", state, 4)
    B, H, K = k.shape
    V = v.shape[2]
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:2] != (B, H):
        raise ValueError(f"v must be [B, H, V] = [{B}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, H):
            raise ValueError(f"{name} must be [B, H] = [{B}, {H}], got {tuple(x.shape)}")
    if state.shape != (B, H, K, V):
        raise ValueError(f"state must be [B, H, K, V] = [{B}, {H}, {K}, {V}], got {tuple(state.shape)}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor (it is updated in place), "
                         f"got {state.dtype}, contiguous={state.is_contiguous()}")
    _check_kernel_limits("gated_delta_rule_recurrent", dict(K=K, V=V),
                         dict(q=q, k=k, v=v, g=g, beta=beta, state=state))
    scale = _default_scale(scale, K)
    # [B, H, D] is [B, 1, H, D] in memory: a sequence of one token
    q, k, v, g, beta = (x.detach().contiguous().unsqueeze(1) for x in (q, k, v, g, beta))
    o = torch.empty(B, 1, H, V, device=v.device, dtype=v.dtype)
    _gdn_recurrent_launch(q, k, v, g, beta, state, state, o, scale)
    return o[:, 0]


# =============================================================================================
# 1b. Attention: full causal, sliding window, LTE's band plus kept columns; one decoding step
# =============================================================================================
# One op for the three patterns, as tiny_hybrid.attention: query i sees key j when j <= i and
# either i - j <= w (the band; full causal is w = T) or key j is kept for i (i <= until[j]: LTE's
# columns). Per head, with S = scale Q K^T on the visible pairs (-inf elsewhere):
#     P = softmax(S) row by row,   O = P V,   lse_i = log sum_j exp(S_ij)  (kept for the backward)
# The kernels hold scores in base 2, s = (q . k) qk_scale with qk_scale = scale log2(e), so that
# exp2, one instruction, does the softmax; the online softmax (_softmax_update) walks key tiles
# with a running max and sum.
#
# The cost follows the keys a query can see, not T. Example, T = 10, w = 2, key 1 kept until
# query 7, key 3 kept forever (x: the band, K: kept beyond the band, .: not seen):
#            key j:  0 1 2 3 4 5 6 7 8 9
#   query i = 0      x
#   query i = 1      x x
#   query i = 2      x x x
#   query i = 3      . x x x
#   query i = 4      . K x x x
#   query i = 5      . K . x x x
#   query i = 6      . K . K x x x
#   query i = 7      . K . K . x x x
#   query i = 8      . . . K . . x x x
#   query i = 9      . . . K . . . x x x
# A program owns a block of query rows [i0, i_last] and visits (1) its band, key tile by key tile
# (the tiles wholly inside every row's band skip the mask), then (2) the kept keys before the
# band, from a compact sorted list per (batch, KV head) that a small kernel builds on the device
# (no host sync): here cols = [1, 3], col_until = [7, 9] and the prefix counts
# nbefore = [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2] (nbefore[x]: listed keys at positions < x), so the
# block reads the first nbefore[i_last - w] entries. The two parts see disjoint keys: the band
# i - j <= w, the kept part i - j > w and i <= until[j]. The backward is organised the same way.

# Launch settings (BLOCK_M: queries, BLOCK_N: keys per tile; BLOCK: positions per step of the
# kept-list builder). GPU, D <= 64: "fwd", "dq" and "dkdv" are the fastest of a few candidates on
# an H100 (bf16, the LTE pattern at T = 8K; `python bench.py kernels --tune` re-measures): e.g.
# dkdv with 128 keys and 4 warps spills registers and runs 2.5x slower. "fwd_band" (a band without
# kept columns, as SWA): 64-query tiles, 0.147 ms against 0.177 with 128 at T = 8K on the H200.
# "kept_list": an untuned default.
ATTENTION_GPU_BLOCKS = {
    "fwd":       dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    "fwd_band":  dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "dq":        dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=5),
    "dkdv":      dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "kept_list": dict(BLOCK=1024),
}
# GPU, D > 64: untuned defaults, with fewer rows per program than at D = 64 so that the tiles fit
# in registers.
ATTENTION_GPU_BLOCKS_D128 = {
    "fwd":       dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "fwd_band":  dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "dq":        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "dkdv":      dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "kept_list": dict(BLOCK=1024),
}
# The interpreter pays per operation, not per element: small tiles keep the tests fast, and the
# tests' lengths still cross tile boundaries.
ATTENTION_INTERPRETER_BLOCKS = {
    "fwd":       dict(BLOCK_M=32, BLOCK_N=32),
    "fwd_band":  dict(BLOCK_M=32, BLOCK_N=32),
    "dq":        dict(BLOCK_M=32, BLOCK_N=32),
    "dkdv":      dict(BLOCK_M=32, BLOCK_N=32),
    "kept_list": dict(BLOCK=64),
}
# One decoding step: untuned defaults (BLOCK_N slots per tile; _decode_splits cuts the slots into
# enough pieces to fill the GPU).
DECODE_GPU_BLOCKS = dict(BLOCK_N=64, num_warps=4, num_stages=3)
DECODE_INTERPRETER_BLOCKS = dict(BLOCK_N=16)


def _blocks(kernel: str, D: int = 64) -> dict:
    """Launch settings of one attention kernel ("fwd", "fwd_band", "dq", "dkdv", "kept_list") for
    head dim D (the kept-list builder has none), from the tables above."""
    if INTERPRET:
        return ATTENTION_INTERPRETER_BLOCKS[kernel]
    return (ATTENTION_GPU_BLOCKS if D <= 64 else ATTENTION_GPU_BLOCKS_D128)[kernel]


def _check_attention_args(q, k, v, window, keep) -> None:
    """The checks of tiny_hybrid.attention (the same function, from checks.py), plus what only the
    kernels need."""
    check_attention(q, k, v, window, keep)
    _check_kernel_limits("attention", dict(D=q.shape[3]), dict(q=q, k=k, v=v))


# --- Building blocks shared by the kernels ---------------------------------------------------

@triton.jit
def _split_range(start, full_lo, full_hi, end, BLOCK: tl.constexpr):
    """Cut [start, end) into blocks of BLOCK that begin at `start`, and find the run of blocks that
    lie wholly inside [full_lo, full_hi): those need no mask. Returns (a, b): blocks of [start, a)
    and [b, end) are masked, those of [a, b) are not. All counts stay >= 0 (Triton divides ints
    like C, toward zero)."""
    n_end = tl.cdiv(end - start, BLOCK)
    n_a = tl.minimum(tl.cdiv(tl.maximum(full_lo - start, 0), BLOCK), n_end)
    n_b = tl.maximum(tl.minimum(tl.maximum(full_hi - start, 0) // BLOCK, n_end), n_a)
    return start + n_a * BLOCK, start + n_b * BLOCK


@triton.jit
def _band_visible(i, j, window):
    """Key j is in query i's band: 0 <= i - j <= window. i, j: positions broadcast to one 2-D
    shape ([BLOCK_M, 1] and [1, BLOCK_N] for scores, [1, BLOCK_M] and [BLOCK_N, 1] for transposed
    ones)."""
    diff = i - j
    return (diff >= 0) & (diff <= window)


@triton.jit
def _kept_visible(i, j, until, window):
    """Key j is seen by query i beyond the band: i - j > window and i <= until (until laid out
    like j). Shapes as in _band_visible."""
    return (i - j > window) & (i <= until)


@triton.jit
def _kept_tile(cols_ptr, col_until_ptr, k_ptr, v_ptr, n0, n_kept, offs_i, offs_d, window, row_stride,
               D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Entries n0 .. n0 + BLOCK_N of one head's kept list (cols, col_until: its key positions and
    visible-until; n_kept entries are valid): the keys' rows k, v [BLOCK_N, BLOCK_D] and which of
    the queries offs_i see them, visible [BLOCK_M, BLOCK_N]."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_list = offs_n < n_kept
    offs_j = tl.load(cols_ptr + offs_n, mask=in_list, other=0)
    until = tl.load(col_until_ptr + offs_n, mask=in_list, other=-1)
    k = _load_rows(k_ptr, offs_j, in_list, row_stride, offs_d, D)
    v = _load_rows(v_ptr, offs_j, in_list, row_stride, offs_d, D)
    return k, v, _kept_visible(offs_i[:, None], offs_j[None, :], until[None, :], window)


@triton.jit
def _softmax_update(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """One step of the online softmax. s [BLOCK_M, BLOCK_N]: masked scores in base 2 (-inf: not
    visible); m_i, l_i [BLOCK_M]: running max and sum; acc [BLOCK_M, BLOCK_D] += the softmax-weighted
    v [BLOCK_N, BLOCK_D]. The earlier terms are rescaled by alpha = 2^(m_old - m_new)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing yet has m_new = -inf: subtract 0 instead, so p = 0, not NaN.
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _dq_update(dq, q, do, k, v, lse, delta, visible, qk_scale, MASK: tl.constexpr,
               PRECISION: tl.constexpr):
    """dq [BLOCK_M, BLOCK_D] += dS k for one key tile (dS = P o (dP - delta)); visible
    [BLOCK_M, BLOCK_N] is used only when MASK. The caller multiplies by scale once, at the store."""
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base 2
    p = tl.math.exp2(s - lse[:, None])  # the softmax probabilities, from the forward's lse
    if MASK:
        p = tl.where(visible, p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PRECISION)


@triton.jit
def _dkdv_update(dk, dv, q, do, k, v, lse, delta, visible, qk_scale,
                 MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv [BLOCK_N, BLOCK_D] += the contribution of one query tile q, do [BLOCK_M, BLOCK_D]
    (dV += P^T dO, dK += dS^T Q), computed transposed ([BLOCK_N, BLOCK_M]) so that both products
    are plain dots; visible [BLOCK_N, BLOCK_M] is used only when MASK."""
    s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M], base 2
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASK:
        p_t = tl.where(visible, p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, PRECISION)
    dp_t = _dot(v, tl.trans(do), PRECISION)  # [BLOCK_N, BLOCK_M]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


# --- The kept-column list --------------------------------------------------------------------

@triton.jit
def _compact_kept_kernel(until_ptr, cols_ptr, col_until_ptr, nbefore_ptr, T, Hkv, window, BLOCK: tl.constexpr):
    """One program per (batch, KV head): list, in order, the keys seen beyond the band.

    until [B, T, Hkv] int32 (visible-until, clamped to [-1, T-1]). Writes cols [B, Hkv, T] (key
    positions, the first `count` entries valid), col_until [B, Hkv, T] (their visible-until) and
    nbefore [B, Hkv, T+1] (nbefore[x] = listed keys at positions < x; nbefore[T] = count)."""
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    list_base = pid.to(tl.int64) * T
    count_base = pid.to(tl.int64) * (T + 1)
    tl.store(nbefore_ptr + count_base, 0)
    total = tl.zeros([], dtype=tl.int32)  # listed keys so far
    for t0 in range(0, T, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        until = tl.load(until_ptr + (b * T + t) * Hkv + h, mask=t < T, other=-1)
        listed = until > t + window  # some query i in (t + window, until] sees key t
        inclusive = tl.cumsum(listed.to(tl.int32), 0) + total
        tl.store(nbefore_ptr + count_base + t + 1, inclusive, mask=t < T)
        tl.store(cols_ptr + list_base + inclusive - 1, t, mask=listed)
        tl.store(col_until_ptr + list_base + inclusive - 1, until, mask=listed)
        total += tl.sum(listed.to(tl.int32), 0)


def _kept_list(keep: torch.Tensor, window: int, T: int):
    """keep bool / int [B, T, Hkv] -> (cols, col_until, nbefore) int32 tensors (see the kernel).

    Visible-until values are clamped to [-1, T-1]: queries only exist at 0..T-1, so the answer is
    the same, and int32 suffices."""
    B, _, Hkv = keep.shape
    if keep.dtype == torch.bool:
        until = torch.where(keep, T - 1, -1).to(torch.int32)
    else:
        until = keep.clamp(-1, T - 1).to(torch.int32)
    until = until.contiguous()
    cols = torch.empty(B, Hkv, T, dtype=torch.int32, device=until.device)
    col_until = torch.empty_like(cols)
    nbefore = torch.empty(B, Hkv, T + 1, dtype=torch.int32, device=until.device)
    _compact_kept_kernel[(B * Hkv,)](until, cols, col_until, nbefore, T, Hkv, window, **_blocks("kept_list"))
    return cols, col_until, nbefore


# --- Forward ---------------------------------------------------------------------------------

@triton.jit
def _query_block(T, H, Hkv, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (query block, batch * query head) of the forward and dQ kernels: its first query i0
    (the last blocks see the most keys, so they start first and the grid's tail is short), bh, its
    KV head's list id bhk = b Hkv + hkv, and the element offsets of row 0 of its query head in
    [B, T, H, D] (q_off) and of its KV head in [B, T, Hkv, D] (kv_off)."""
    i0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // (H // Hkv)
    q_off = (b * T * H + h).to(tl.int64) * D          # row t of this head starts at q_off + t H D
    kv_off = (b * T * Hkv + hkv).to(tl.int64) * D
    return i0, bh, b * Hkv + hkv, q_off, kv_off


@triton.jit
def _fwd_keys(acc, m_i, l_i, q, k_ptr, v_ptr, offs_i, offs_d, j_lo, j_hi, T, window, row_stride, qk_scale,
              D: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Attend the query tile to band keys [j_lo, j_hi), BLOCK_N at a time (masked when MASK)."""
    for j0 in range(j_lo, j_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, offs_j, offs_j < T, row_stride, offs_d, D)
        v = _load_rows(v_ptr, offs_j, offs_j < T, row_stride, offs_d, D)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        if MASK:
            s = tl.where(_band_visible(offs_i[:, None], offs_j[None, :], window), s, NEG_INF)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_band(acc, m_i, l_i, q, k_ptr, v_ptr, offs_i, offs_d, i0, i_last, T, window, row_stride, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Attend queries [i0, i_last] to their band, keys [i0 - w, i_last]: the key blocks within
    [i_last - w, i0] are inside every row's band and below the diagonal, so they skip the mask."""
    j_lo = tl.maximum(i0 - window, 0)
    j_a, j_b = _split_range(j_lo, i_last - window, i0 + 1, i_last + 1, BLOCK_N)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_ptr, v_ptr, offs_i, offs_d, j_lo, j_a, T, window, row_stride,
                              qk_scale, D, MASK=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_ptr, v_ptr, offs_i, offs_d, j_a, j_b, T, window, row_stride,
                              qk_scale, D, MASK=False, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_ptr, v_ptr, offs_i, offs_d, j_b, i_last + 1, T, window,
                              row_stride, qk_scale, D, MASK=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cols_ptr, col_until_ptr, nbefore_ptr, T, H, Hkv,
                     window, qk_scale, D: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch * query head). q, o [B, T, H, D]; k, v [B, T, Hkv, D]
    (all contiguous); writes o and lse [B, H, T] (base-2 log-sum-exp of the scaled scores)."""
    i0, bh, bhk, q_off, kv_off = _query_block(T, H, Hkv, D, BLOCK_M)
    offs_i = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + q_off, offs_i, offs_i < T, H * D, offs_d, D)
    k_ptr += kv_off
    v_ptr += kv_off

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # 1. The band: keys [i0 - w, i_last].
    i_last = tl.minimum(i0 + BLOCK_M, T) - 1
    acc, m_i, l_i = _fwd_band(acc, m_i, l_i, q, k_ptr, v_ptr, offs_i, offs_d, i0, i_last, T, window, Hkv * D,
                              qk_scale, D, BLOCK_N, PRECISION)

    # 2. Kept columns beyond the band: the listed keys j < i_last - w (a prefix of the sorted list).
    if HAS_KEEP:
        list_base = bhk.to(tl.int64) * T
        n_kept = tl.load(nbefore_ptr + bhk.to(tl.int64) * (T + 1) + tl.maximum(i_last - window, 0))
        for n0 in range(0, n_kept, BLOCK_N):
            k, v, visible = _kept_tile(cols_ptr + list_base, col_until_ptr + list_base, k_ptr, v_ptr, n0, n_kept,
                                       offs_i, offs_d, window, Hkv * D, D, BLOCK_N)
            s = tl.where(visible, _dot(q, tl.trans(k), PRECISION) * qk_scale, NEG_INF)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, PRECISION)

    # Every real row sees at least its own key, so l_i > 0 there (padding rows are not stored).
    o = acc / l_i[:, None]
    _store_rows(o_ptr + q_off, o, offs_i, offs_i < T, H * D, offs_d, D)
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_i, m_i + tl.math.log2(l_i), mask=offs_i < T)


# --- Backward --------------------------------------------------------------------------------
# Per head, with dO given and P recomputed from lse (never stored):
#     dV = P^T dO
#     dP = dO V^T
#     dS = P o (dP - delta),     delta_i = sum_j P_ij dP_ij = rowsum(dO o O)_i
#     dQ = scale dS K,           dK = scale dS^T Q
# Two scales: inside the tiles P = exp2(s - lse2) with s = (q . k) qk_scale and lse2 the base-2
# lse, qk_scale = scale log2(e); the plain scale of dQ and dK (the chain rule of S = scale Q K^T)
# is applied once, at their stores, not in every tile.
# In the example above, column j holds key j's share of dK, dV:
#   _attn_bwd_dq_kernel         row by row like the forward (band, then the kept prefix); it also
#                               writes delta, which the other two read
#   _attn_bwd_dkdv_kernel       one program per tile of keys (and KV head): the x's of its
#                               columns, queries [j0, j_last + w] of each of the group's G heads
#   _attn_bwd_dkdv_kept_kernel  one program per tile of the kept list: the K's of its keys,
#                               queries (j_first + w, largest until]; it writes float32 partials
#                               at the keys' list slots, which the band kernel adds before its
#                               single store (key 3's slot is nbefore[3] = 1; key j is listed
#                               when nbefore[j + 1] > nbefore[j])
# Each walk cuts its range into masked, unmasked and masked runs (_split_range; whole tiles of
# BLOCK_M rows from the start in the kernels, single rows here). The band kernel, key tile 4..6
# with w = 4, and the kept kernel, the list tile {1, 3} of the example:
#          keys  4 5 6                               keys  1 3
#   query i = 4  x . .   [4, 6): masked       query i = 4  K x   [4, 6): masked (key 3 in band)
#             5  x x .                                  5  K x
#             6  x x x   [6, 9): no mask                6  K K   [6, 8): no mask
#             7  x x x                                  7  K K
#             8  x x x                                  8  . K   [8, 10): masked (key 1 gone)
#             9  . x x   [9, 11): masked                9  . K
#            10  . . x

@triton.jit
def _dq_keys(dq, q, do, lse, delta, k_ptr, v_ptr, offs_i, offs_d, j_lo, j_hi, T, window, row_stride, qk_scale,
             D: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of the query tile from band keys [j_lo, j_hi), BLOCK_N at a time (masked when MASK)."""
    for j0 in range(j_lo, j_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, offs_j, offs_j < T, row_stride, offs_d, D)
        v = _load_rows(v_ptr, offs_j, offs_j < T, row_stride, offs_d, D)
        visible = _band_visible(offs_i[:, None], offs_j[None, :], window)
        dq = _dq_update(dq, q, do, k, v, lse, delta, visible, qk_scale, MASK, PRECISION)
    return dq


@triton.jit
def _dq_band(dq, q, do, lse, delta, k_ptr, v_ptr, offs_i, offs_d, i0, i_last, T, window, row_stride, qk_scale,
             D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of queries [i0, i_last] from their band: the forward's three runs of key blocks."""
    j_lo = tl.maximum(i0 - window, 0)
    j_a, j_b = _split_range(j_lo, i_last - window, i0 + 1, i_last + 1, BLOCK_N)
    dq = _dq_keys(dq, q, do, lse, delta, k_ptr, v_ptr, offs_i, offs_d, j_lo, j_a, T, window, row_stride,
                  qk_scale, D, MASK=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    dq = _dq_keys(dq, q, do, lse, delta, k_ptr, v_ptr, offs_i, offs_d, j_a, j_b, T, window, row_stride,
                  qk_scale, D, MASK=False, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    dq = _dq_keys(dq, q, do, lse, delta, k_ptr, v_ptr, offs_i, offs_d, j_b, i_last + 1, T, window, row_stride,
                  qk_scale, D, MASK=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cols_ptr, col_until_ptr,
                        nbefore_ptr, T, H, Hkv, window, qk_scale, scale, D: tl.constexpr,
                        HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch * query head): dq [B, T, H, D], the same key walk as
    the forward (band, then the kept list). It first writes delta [B, H, T] = rowsum(O * dO) of
    its rows, which the dK, dV kernels read after it: one launch fewer than a kernel of its own,
    and an SWA forward + backward at 8K tokens costs as much host time as GPU time."""
    i0, bh, bhk, q_off, kv_off = _query_block(T, H, Hkv, D, BLOCK_M)
    offs_i = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + q_off, offs_i, offs_i < T, H * D, offs_d, D)
    do = _load_rows(do_ptr + q_off, offs_i, offs_i < T, H * D, offs_d, D)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + offs_i, mask=offs_i < T, other=0.0)
    o = _load_rows(o_ptr + q_off, offs_i, offs_i < T, H * D, offs_d, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # the softmax backward's correction term
    tl.store(delta_ptr + bh.to(tl.int64) * T + offs_i, delta, mask=offs_i < T)
    k_ptr += kv_off
    v_ptr += kv_off
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    i_last = tl.minimum(i0 + BLOCK_M, T) - 1
    dq = _dq_band(dq, q, do, lse, delta, k_ptr, v_ptr, offs_i, offs_d, i0, i_last, T, window, Hkv * D, qk_scale,
                  D, BLOCK_N, PRECISION)
    if HAS_KEEP:
        list_base = bhk.to(tl.int64) * T
        n_kept = tl.load(nbefore_ptr + bhk.to(tl.int64) * (T + 1) + tl.maximum(i_last - window, 0))
        for n0 in range(0, n_kept, BLOCK_N):
            k, v, visible = _kept_tile(cols_ptr + list_base, col_until_ptr + list_base, k_ptr, v_ptr, n0, n_kept,
                                       offs_i, offs_d, window, Hkv * D, D, BLOCK_N)
            dq = _dq_update(dq, q, do, k, v, lse, delta, visible, qk_scale, True, PRECISION)

    # s = scale * q.k, so dL/dq = scale * sum_j ds_ij k_j.
    _store_rows(dq_ptr + q_off, dq * scale, offs_i, offs_i < T, H * D, offs_d, D)


@triton.jit
def _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_j, until, offs_d, i_lo, i_hi, b, h, T,
                  H, window, qk_scale, D: tl.constexpr, KEPT: tl.constexpr, MASK: tl.constexpr,
                  BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one key tile from queries [i_lo, i_hi) of query head h, BLOCK_M at a time.
    KEPT picks the visibility rule: the band (False) or kept beyond the band (True)."""
    q_off = (b * T * H + h).to(tl.int64) * D
    row_off = (b * H + h).to(tl.int64) * T
    for i0 in range(i_lo, i_hi, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_ptr + q_off, offs_i, offs_i < T, H * D, offs_d, D)
        do = _load_rows(do_ptr + q_off, offs_i, offs_i < T, H * D, offs_d, D)
        lse = tl.load(lse_ptr + row_off + offs_i, mask=offs_i < T, other=0.0)
        delta = tl.load(delta_ptr + row_off + offs_i, mask=offs_i < T, other=0.0)
        if KEPT:  # [BLOCK_N, BLOCK_M], keys along rows
            visible = _kept_visible(offs_i[None, :], offs_j[:, None], until[:, None], window)
        else:
            visible = _band_visible(offs_i[None, :], offs_j[:, None], window) & (offs_i[None, :] < T)
        dk, dv = _dkdv_update(dk, dv, q, do, k, v, lse, delta, visible, qk_scale, MASK, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_runs(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_j, until, offs_d, i_lo, i_a, i_b, i_hi, b,
               h, T, H, window, qk_scale, D: tl.constexpr, KEPT: tl.constexpr, BLOCK_M: tl.constexpr,
               PRECISION: tl.constexpr):
    """dK, dV of one key tile from queries [i_lo, i_hi) of query head h, cut by _split_range:
    [i_lo, i_a) and [i_b, i_hi) masked, [i_a, i_b) seeing every key of the tile."""
    dk, dv = _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_j, until, offs_d, i_lo, i_a, b,
                           h, T, H, window, qk_scale, D, KEPT=KEPT, MASK=True, BLOCK_M=BLOCK_M, PRECISION=PRECISION)
    dk, dv = _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_j, until, offs_d, i_a, i_b, b,
                           h, T, H, window, qk_scale, D, KEPT=KEPT, MASK=False, BLOCK_M=BLOCK_M, PRECISION=PRECISION)
    dk, dv = _dkdv_queries(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_j, until, offs_d, i_b, i_hi, b,
                           h, T, H, window, qk_scale, D, KEPT=KEPT, MASK=True, BLOCK_M=BLOCK_M, PRECISION=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kept_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_kept_ptr, dv_kept_ptr,
                               cols_ptr, col_until_ptr, nbefore_ptr, T, H, Hkv, window, qk_scale,
                               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (block of BLOCK_N entries of the kept list, batch * KV head): the part of
    dK, dV that comes from queries beyond the band, for the G query heads of the group. Writes
    float32 partials dk_kept, dv_kept [B, Hkv, T, D] at the list slots (the band kernel adds them)."""
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hkv = bhk % Hkv
    G = H // Hkv
    list_base = bhk.to(tl.int64) * T
    n_list = tl.load(nbefore_ptr + bhk.to(tl.int64) * (T + 1) + T)
    if n0 < n_list:  # the list's length is known only here, on the device
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_list = offs_n < n_list
        offs_j = tl.load(cols_ptr + list_base + offs_n, mask=in_list, other=0)
        until = tl.load(col_until_ptr + list_base + offs_n, mask=in_list, other=-1)
        offs_d = tl.arange(0, BLOCK_D)
        kv_off = (b * T * Hkv + hkv).to(tl.int64) * D
        k = _load_rows(k_ptr + kv_off, offs_j, in_list, Hkv * D, offs_d, D)
        v = _load_rows(v_ptr + kv_off, offs_j, in_list, Hkv * D, offs_d, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        # Queries that see some listed key of the tile: (first key + w, largest visible-until].
        # Those past the last key's band and up to the smallest visible-until see every key.
        j_first = tl.min(tl.where(in_list, offs_j, T), 0)
        j_end = tl.max(tl.where(in_list, offs_j, -1), 0)
        until_min = tl.min(tl.where(in_list, until, T), 0)
        until_max = tl.max(until, 0)
        i_lo = j_first + window + 1
        i_a, i_b = _split_range(i_lo, j_end + window + 1, until_min + 1, until_max + 1, BLOCK_M)
        for g in range(G):
            dk, dv = _dkdv_runs(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_j, until, offs_d, i_lo, i_a,
                                i_b, until_max + 1, b, hkv * G + g, T, H, window, qk_scale, D, KEPT=True,
                                BLOCK_M=BLOCK_M, PRECISION=PRECISION)
        _store_rows(dk_kept_ptr + list_base * D, dk, offs_n, in_list, D, offs_d, D)
        _store_rows(dv_kept_ptr + list_base * D, dv, offs_n, in_list, D, offs_d, D)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dk_kept_ptr,
                          dv_kept_ptr, nbefore_ptr, T, H, Hkv, window, qk_scale, scale, D: tl.constexpr,
                          HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (key block, batch * KV head): dk, dv [B, T, Hkv, D] from the band queries
    of the G query heads of the group, plus (HAS_KEEP) the kept partials of listed keys."""
    j0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hkv = bhk % Hkv
    G = H // Hkv
    offs_j = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = (b * T * Hkv + hkv).to(tl.int64) * D
    k = _load_rows(k_ptr + kv_off, offs_j, offs_j < T, Hkv * D, offs_d, D)
    v = _load_rows(v_ptr + kv_off, offs_j, offs_j < T, Hkv * D, offs_d, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Band queries: [j0, j_last + w]. Those in [j_last, j0 + w] (and < T) see every key of the tile.
    j_last = tl.minimum(j0 + BLOCK_N, T) - 1
    i_hi = tl.minimum(j_last + window + 1, T)
    i_a, i_b = _split_range(j0, j_last, tl.minimum(j0 + window + 1, T), i_hi, BLOCK_M)
    for g in range(G):
        dk, dv = _dkdv_runs(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_j, offs_j, offs_d, j0, i_a, i_b,
                            i_hi, b, hkv * G + g, T, H, window, qk_scale, D, KEPT=False, BLOCK_M=BLOCK_M,
                            PRECISION=PRECISION)

    if HAS_KEEP:
        # A listed key j sits at slot nbefore[j] of the list, and is listed when nbefore[j+1] > nbefore[j].
        count_base = nbefore_ptr + bhk.to(tl.int64) * (T + 1)
        slot = tl.load(count_base + offs_j, mask=offs_j < T, other=0)
        listed = tl.load(count_base + offs_j + 1, mask=offs_j < T, other=0) > slot
        list_off = bhk.to(tl.int64) * T * D
        dk += _load_rows(dk_kept_ptr + list_off, slot, listed, D, offs_d, D)
        dv += _load_rows(dv_kept_ptr + list_off, slot, listed, D, offs_d, D)

    _store_rows(dk_ptr + kv_off, dk * scale, offs_j, offs_j < T, Hkv * D, offs_d, D)
    _store_rows(dv_ptr + kv_off, dv, offs_j, offs_j < T, Hkv * D, offs_d, D)


# --- The autograd op -------------------------------------------------------------------------

class _SparseCausalAttention(torch.autograd.Function):
    """q [B, T, H, D], k, v [B, T, Hkv, D] contiguous, one dtype; window an int in [0, T]
    (T: full causal); cols, col_until, nbefore: the kept list from _kept_list, or three Nones
    (the kernels then take None for those pointers: HAS_KEEP=False compiles their reads away).
    Saves the base-2 log-sum-exp lse [B, H, T] for the backward, which recomputes P from it."""

    @staticmethod
    def forward(ctx, q, k, v, window, scale, cols, col_until, nbefore):
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        has_keep = cols is not None
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        band_only = window < T and not has_keep
        cfg = dict(_blocks("fwd_band" if band_only else "fwd", D))
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
        precision = _dot_precision(q.dtype)  # decided once: the backward multiplies the same way
        _attn_fwd_kernel[grid](q, k, v, o, lse, cols, col_until, nbefore, T, H, Hkv, window,
                               scale * LOG2E, D=D, HAS_KEEP=has_keep, BLOCK_D=_block_d(D),
                               PRECISION=precision, **cfg)
        ctx.save_for_backward(q, k, v, o, lse, cols, col_until, nbefore)
        ctx.window, ctx.scale, ctx.has_keep, ctx.precision = window, scale, has_keep, precision
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cols, col_until, nbefore = ctx.saved_tensors
        window, scale, has_keep = ctx.window, ctx.scale, ctx.has_keep
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        do = do.to(q.dtype).contiguous()
        common = dict(D=D, BLOCK_D=_block_d(D), PRECISION=ctx.precision)

        # dQ first: its kernel also writes delta, which the dK, dV kernels read.
        cfg = dict(_blocks("dq", D))
        dq, delta = torch.empty_like(q), torch.empty_like(lse)                 # delta [B, H, T]
        _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
            q, k, v, o, do, lse, delta, dq, cols, col_until, nbefore, T, H, Hkv, window, scale * LOG2E,
            scale, HAS_KEEP=has_keep, **common, **cfg)
        cfg = dict(_blocks("dkdv", D))
        dk_kept = dv_kept = None
        if has_keep:
            # Compact float32 partials, one row per list slot: [B, Hkv, T, D].
            dk_kept = torch.empty(B, Hkv, T, D, dtype=torch.float32, device=q.device)
            dv_kept = torch.empty_like(dk_kept)
            _attn_bwd_dkdv_kept_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * Hkv)](
                q, k, v, do, lse, delta, dk_kept, dv_kept, cols, col_until, nbefore, T, H, Hkv, window,
                scale * LOG2E, **common, **cfg)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, dk_kept, dv_kept, nbefore, T, H, Hkv, window,
            scale * LOG2E, scale, HAS_KEEP=has_keep, **common, **cfg)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, window=None, keep=None, scale=None):
    """Causal softmax attention (full, sliding window, LTE band-plus-columns) in Triton.

    Same arguments, errors and result as tiny_hybrid.attention:
    q [B, T, H, D]; k, v [B, T, Hkv, D] (query head h reads KV head h // (H / Hkv));
    window None (full causal) or w >= 0 (query i sees key j when 0 <= i - j <= w);
    keep None, bool [B, T, Hkv] (kept forever) or integer [B, T, Hkv] (the last query index that
    sees key j beyond the window; -1: never). Returns o [B, T, H, D] in q's dtype; differentiable
    in q, k, v. Exact float32 products for float32 inputs unless the caller allowed tf32 (the
    precision rule, section 0); accumulation in float32 always.
    """
    _check_attention_args(q, k, v, window, keep)
    B, T, H, D = q.shape
    scale = _default_scale(scale, D)
    dtype = _compute_dtype(q, k, v)
    if q.numel() == 0 or k.numel() == 0:
        return (q * 0 + (k.sum() + v.sum()) * 0).to(q.dtype)  # empty, still connected to the graph
    # A window that reaches back past the first token is full causal attention.
    window = T if window is None else min(window, T)
    kept = (None, None, None)
    if keep is not None and window < T - 1:
        kept = _kept_list(keep.to(q.device), window, T)
    q_, k_, v_ = (x.to(dtype).contiguous() for x in (q, k, v))
    o = _SparseCausalAttention.apply(q_, k_, v_, window, scale, *kept)
    return o.to(q.dtype)


# --- One decoding step: one query per sequence against a cache of slots (split-K) ------------
# The G query heads of a KV group attend together to S cached slots (valid ones only). The slots
# are cut into splits, one program each (_decode_split_kernel), which keeps its running max m_s,
# sum l_s = sum_j exp(s_j - m_s) and unnormalised output acc_s = sum_j exp(s_j - m_s) v_j; the
# combine kernel merges them:  m = max_s m_s,   o = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s.

@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, S, H, Hkv,
                         keys_per_split, n_splits, qk_scale, D: tl.constexpr, HAS_VALID: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """One program per (split of the slots, batch * KV head): the G query heads of the group
    attend together to slots [split * keys_per_split, +keys_per_split). q [B, H, D],
    k, v [B, S, Hkv, D], valid [B, S, Hkv] (int8). Writes the split's running max and sum
    m_part, l_part [B, H, n_splits] and unnormalised output acc_part [B, H, n_splits, D]."""
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hkv = bhk % Hkv
    G = H // Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    head_ok = offs_g < G
    q_off = (b * H + hkv * G).to(tl.int64) * D   # the G heads of the group are adjacent rows
    q = _load_rows(q_ptr + q_off, offs_g, head_ok, D, offs_d, D)                # [BLOCK_G, BLOCK_D]
    kv_off = (b * S * Hkv + hkv).to(tl.int64) * D

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_lo = split * keys_per_split
    s_hi = tl.minimum(s_lo + keys_per_split, S)
    for s0 in range(s_lo, s_hi, BLOCK_N):
        offs_s = s0 + tl.arange(0, BLOCK_N)
        ok = offs_s < s_hi
        if HAS_VALID:
            ok &= tl.load(valid_ptr + (b * S + offs_s) * Hkv + hkv, mask=ok, other=0) != 0
        k = _load_rows(k_ptr + kv_off, offs_s, ok, Hkv * D, offs_d, D)
        v = _load_rows(v_ptr + kv_off, offs_s, ok, Hkv * D, offs_d, D)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(ok[None, :], s, NEG_INF)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, PRECISION)

    part = (b * H + hkv * G + offs_g).to(tl.int64) * n_splits + split          # [BLOCK_G]
    tl.store(m_part_ptr + part, m_i, mask=head_ok)
    tl.store(l_part_ptr + part, l_i, mask=head_ok)
    _store_rows(acc_part_ptr, acc, part, head_ok, D, offs_d, D)


@triton.jit
def _decode_combine_kernel(m_part_ptr, l_part_ptr, acc_part_ptr, o_ptr, n_splits, D: tl.constexpr,
                           BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch * query head): merge the splits' partial softmaxes into O [B, H, D].
    A head whose slots are all invalid gets NaN, as the reference's softmax over nothing does."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs_s < n_splits
    m = tl.load(m_part_ptr + bh * n_splits + offs_s, mask=ok, other=NEG_INF)
    l = tl.load(l_part_ptr + bh * n_splits + offs_s, mask=ok, other=0.0)
    acc = _load_rows(acc_part_ptr + bh * n_splits * D, offs_s, ok, D, offs_d, D)  # [BLOCK_SPLITS, BLOCK_D]
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - m_max)                   # a split that saw nothing has m = -inf: weight 0
    o = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    tl.store(o_ptr + bh * D + offs_d, o.to(o_ptr.dtype.element_ty), mask=offs_d < D)


def _check_decode_args(q, k_cache, v_cache, valid) -> None:
    """The checks of tiny_hybrid.attention_decode (the same function, from checks.py), plus the
    kernels' limits."""
    check_decode(q, k_cache, v_cache, valid)
    _check_kernel_limits("attention_decode", dict(D=q.shape[2]),
                         dict(q=q, k_cache=k_cache, v_cache=v_cache, valid=valid))


def _decode_splits(S: int, B: int, Hkv: int, block_n: int, device) -> int:
    """How many pieces to cut the slot axis into: enough programs to fill the GPU (about 2 per
    multiprocessor: an untuned default), never a piece smaller than one key block."""
    if INTERPRET:
        return min(triton.cdiv(S, block_n), 4)
    return max(1, min(triton.cdiv(S, block_n), triton.cdiv(2 * _multiprocessors(device), B * Hkv)))


@_launched_as_is
def attention_decode(q, k_cache, v_cache, valid=None, scale=None):
    """One decoding step in Triton; same arguments, errors and result as
    tiny_hybrid.attention_decode: q [B, H, D], k_cache, v_cache [B, S, Hkv, D], valid bool
    [B, S, Hkv] or None. Returns o [B, H, D] in q's dtype. Forward only (no autograd)."""
    _check_decode_args(q, k_cache, v_cache, valid)
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = _default_scale(scale, D)
    if q.numel() == 0:
        return q.clone()
    dtype = _compute_dtype(q, k_cache, v_cache)
    q_, k_, v_ = (x.to(dtype).contiguous() for x in (q, k_cache, v_cache))
    valid_ = valid.contiguous().view(torch.int8) if valid is not None else q_  # q_: unused pointer
    cfg = dict(DECODE_INTERPRETER_BLOCKS if INTERPRET else DECODE_GPU_BLOCKS)
    block_n = cfg["BLOCK_N"]
    n_splits = _decode_splits(S, B, Hkv, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(S, n_splits), block_n) * block_n
    n_splits = max(1, triton.cdiv(S, keys_per_split))
    m_part = torch.empty(B, H, n_splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B, H, n_splits, D, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(n_splits, B * Hkv)](
        q_, k_, v_, valid_, m_part, l_part, acc_part, S, H, Hkv, keys_per_split, n_splits, scale * LOG2E,
        D=D, HAS_VALID=valid is not None, BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)),
        BLOCK_D=_block_d(D), PRECISION=_dot_precision(dtype), **cfg)
    o = torch.empty(B, H, D, dtype=dtype, device=q.device)
    _decode_combine_kernel[(B * H,)](m_part, l_part, acc_part, o, n_splits, D=D,
                                     BLOCK_SPLITS=max(2, triton.next_power_of_2(n_splits)),
                                     BLOCK_D=_block_d(D))
    return o.to(q.dtype)


# =============================================================================================
# 1c. Native Sparse Attention: the compressed and the selected branch (the window branch is `attention`)
# =============================================================================================
# For the query of head h at position p (positions offset .., so that decoding can ask for one),
# with l-token blocks mean-pooled into k_cmp, v_cmp (tiny_hybrid.nsa_compress):
#   compressed   o = softmax_n(scale q . kc_n) vc over the complete blocks n < (p + 1) // l, and
#                its lse (o = 0, lse = -inf before the first block completes). The backward is
#                attention's (section 1b), plus the gradient that reaches lse: dlse_i adds
#                dlse_i P_in to dS_in, which only shifts delta_i to delta_i - dlse_i (_nsa_delta).
#   block scores score[p, hkv, n] = sum over the G heads h of the group of P_cmp[p, h, n]; the
#                top-n blocks (tiny_hybrid.nsa_select_blocks, a sort: no gradient) are selected.
#   selected     o = softmax_j(scale q . k_j) v over the keys j <= p of the blocks selected for
#                (p, hkv); backward as attention's.
# Rows of a program are (token, query head) pairs: the G query heads of one KV group for
# TQ = BLOCK_M // G consecutive tokens, so that one K/V tile serves G * TQ query rows (NSA's point:
# the heads of a group share their blocks) and the M side of every dot is >= 16 even for G = 1.
#
#   compressed   forward and dQ: one program per (token tile, batch * KV head), over the complete
#                blocks n < (p + 1) // l of each row's position p. dKc, dVc: one program per
#                (tile of compressed blocks, chunk of tokens, batch * KV head) writing float32
#                partials that the host sums: only T / l compressed keys, so without the token
#                chunks the grid would be a few dozen programs.
#   block scores one program per (token tile, tile of blocks, batch * KV head), looping over the G
#                heads: sum_g exp(s - lse) without the [B, T, H, Nc] float32 logits of the reference
#                (2 GB at the benchmark's T = 16K). Top-n selection stays the reference
#                `nsa_select_blocks` (torch.sort over [B, T, Hkv, Nc], no [B, T, H, *] tensor, and
#                its exact tie rule comes for free); bench.py's bench_kernel_nsa times it apart.
#   selected     forward and dQ: one program per (token tile, batch * KV head) visits the union of
#                its tokens' selected blocks (listed by torch ops on the device, _nsa_tile_union),
#                each block once; a row sees a block's keys only if its own token selected it
#                (and causally).
#                dK, dV: the selection inverted into one list per (batch, KV head, block) of the
#                tokens that chose it (a stable sort on the device, no host sync); one program per
#                (block, piece of its list) walks it.
# Decoding (one query at position t) uses `nsa_compressed_attention(..., offset=t)` and
# `nsa_block_scores(..., offset=t)` from here, t a 0-d tensor that the kernels read on the device
# (every kernel loads its offset from a 1-element tensor: no host sync, and a captured step reads
# the position of each replay); the selected branch gathers the n l selected tokens
# of the cache and calls `attention_decode` (split-K) through the same switch (tiny_hybrid's
# NativeSparseAttention._attend_gathered): one query per KV group is too little work for the tiles
# above.

LN2 = 0.6931471805599453

# Launch settings: untuned defaults, checked and timed on an H200 (docs/kernels.md). "slc": M = 16 rows is
# one token's 16 heads at the paper's G = 16, the smallest tile the tensor cores take; its
# num_stages=1 is checked on the GPU by check_nsa_selected_stages. `python bench.py kernels` prints
# a breakdown to tune by (at 16K the selected-block kernel and the top-n sort take most of the
# forward).
NSA_GPU_BLOCKS = {
    "cmp":      dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "cmp_dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "scores":   dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "slc":      dict(BLOCK_M=16, num_warps=4, num_stages=1),
    "slc_dkdv": dict(BLOCK_M=64, num_warps=4, num_stages=2),
}
# The interpreter pays per program and per call of a jit helper, hardly per element: big row tiles.
NSA_INTERPRETER_BLOCKS = {name: dict(BLOCK_M=64, BLOCK_N=16) for name in NSA_GPU_BLOCKS}
NSA_DELTA_BLOCK_M = 64  # rows per program of the correction-term kernel: an untuned default


def _nsa_blocks(kernel: str, G: int, block: int | None = None) -> dict:
    """Launch parameters of one NSA kernel: BLOCK_M rows hold at least one token's G heads;
    for the selected branch BLOCK_N covers one block of l keys (16..64 keys a tile)."""
    cfg = dict((NSA_INTERPRETER_BLOCKS if INTERPRET else NSA_GPU_BLOCKS)[kernel])
    if kernel != "scores":  # the scores kernel's rows are tokens, one head at a time
        cfg["BLOCK_M"] = max(cfg["BLOCK_M"], triton.next_power_of_2(G))
    if block is not None:
        cfg["BLOCK_N"] = min(64, max(16, triton.next_power_of_2(block)))
    return cfg


# --- Input checks ----------------------------------------------------------------------------

def _check_nsa_compressed_args(q, k_cmp, v_cmp, block, offset) -> None:
    """q [B, T, H, D]; k_cmp, v_cmp [B, Nc, Hkv, D] with H % Hkv == 0; block >= 1; offset >= 0."""
    for name, x in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        check_tensor(name, x, 4)
    if k_cmp.shape != v_cmp.shape:
        raise ValueError(f"k_cmp and v_cmp must have the same shape, got {tuple(k_cmp.shape)} and "
                         f"{tuple(v_cmp.shape)}")
    if q.shape[0] != k_cmp.shape[0] or q.shape[3] != k_cmp.shape[3] or q.shape[2] % max(k_cmp.shape[2], 1):
        raise ValueError(f"q {tuple(q.shape)} and k_cmp {tuple(k_cmp.shape)} must agree on B and D, and "
                         f"the query heads must be a multiple of the key/value heads")
    check_int("block", block, low=1)
    if isinstance(offset, torch.Tensor):  # a decoding step's position: its value stays on the device
        if offset.ndim != 0 or offset.dtype.is_floating_point or offset.dtype == torch.bool or \
                offset.device != q.device:
            raise ValueError(f"offset must be an int >= 0 or a 0-d integer tensor on q's device ({q.device}), "
                             f"got a {offset.ndim}-d {offset.dtype} tensor on {offset.device}")
    elif not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 or a 0-d integer tensor, got {offset!r}")
    _check_kernel_limits("nsa_compressed_attention", dict(D=q.shape[3]), dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp))


def _offset_on_device(offset, device) -> torch.Tensor:
    """The position of the first query as a 1-element int32 tensor that the kernels load: a host int
    is written there (no sync), a decoding step's 0-d tensor is read where it is (no .item())."""
    if isinstance(offset, torch.Tensor):
        return offset.reshape(1).to(torch.int32)                                # [1]
    return torch.full((1,), offset, dtype=torch.int32, device=device)


def _check_nsa_selected_args(q, k, v, block_idx, block) -> None:
    check_gqa(q, k, v)
    check_tensor("block_idx", block_idx, 4, floating=False)
    B, T, Hkv = k.shape[:3]
    if block_idx.shape[:3] != (B, T, Hkv) or block_idx.is_floating_point() or block_idx.dtype == torch.bool:
        raise ValueError(f"block_idx must be integer [B, T, Hkv, n] = [{B}, {T}, {Hkv}, n], got "
                         f"{block_idx.dtype} {tuple(block_idx.shape)}")
    check_int("block", block, low=1)
    _check_kernel_limits("nsa_selected_attention", dict(D=q.shape[3]),
                         dict(q=q, k=k, v=v, block_idx=block_idx))


# --- Jit helpers -----------------------------------------------------------------------------

@triton.jit
def _tile_rows(t0, t_end, G, BLOCK_M: tl.constexpr):
    """Rows of a (token, query head) tile: row r is head r % G of the group, token t0 + r // G,
    for the BLOCK_M // G tokens from t0 (rows past them, or at tokens >= t_end, are not ok).
    Returns token [BLOCK_M], head in the group [BLOCK_M], ok [BLOCK_M]."""
    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // G
    return tok, r % G, (r < (BLOCK_M // G) * G) & (tok < t_end)


@triton.jit
def _n_complete(tok, offset, block, Nc):
    """Complete compressed blocks for the query at position offset + tok: (p + 1) // l, at most Nc."""
    return tl.minimum((offset + tok + 1) // block, Nc)


@triton.jit
def _tile_selection(block_idx_ptr, b, tok, ok, T, Hkv, hkv, n_sel, BLOCK_S: tl.constexpr):
    """Each row's selected blocks, read from block_idx [B, T, Hkv, n] (int32): [BLOCK_M, BLOCK_S],
    -1 past n and on rows that are not ok."""
    offs_s = tl.arange(0, BLOCK_S)
    rows = ((b * T + tok).to(tl.int64) * Hkv + hkv) * n_sel                  # [BLOCK_M]
    return tl.load(block_idx_ptr + rows[:, None] + offs_s[None, :], mask=ok[:, None] & (offs_s[None, :] < n_sel),
                   other=-1)


@triton.jit
def _group_offsets(b, hkv, T, H, G: tl.constexpr, D: tl.constexpr):
    """Element offsets of the first query head of KV group (b, hkv): q_off in [B, T, H, D] (row
    (t, g) of the group at q_off + (t H + g) D) and lse_off in [B, H, T] (at lse_off + g T + t)."""
    q_off = (b.to(tl.int64) * T * H + hkv * G) * D
    lse_off = (b.to(tl.int64) * H + hkv * G) * T
    return q_off, lse_off


@triton.jit
def _group_tile(T, H, Hkv, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (token tile, batch * KV head) of the forward and dQ kernels: its batch b, KV head
    hkv, rows (tok, g, ok: see _tile_rows) and _group_offsets."""
    t0 = tl.program_id(0) * (BLOCK_M // G)
    b = tl.program_id(1) // Hkv
    hkv = tl.program_id(1) % Hkv
    tok, g, ok = _tile_rows(t0, T, G, BLOCK_M)
    q_off, lse_off = _group_offsets(b, hkv, T, H, G, D)
    return b, hkv, tok, g, ok, q_off, lse_off


@triton.jit
def _cmp_tile(kc_ptr, vc_ptr, n0, Nc, n_seen, offs_d, row_stride, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Compressed blocks n0 .. n0 + BLOCK_N: their rows kc, vc [BLOCK_N, BLOCK_D] and which rows of
    the tile see them, visible [BLOCK_M, BLOCK_N] (a row sees its n_seen complete blocks)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kc = _load_rows(kc_ptr, offs_n, offs_n < Nc, row_stride, offs_d, D)
    vc = _load_rows(vc_ptr, offs_n, offs_n < Nc, row_stride, offs_d, D)
    return kc, vc, offs_n[None, :] < n_seen[:, None]


@triton.jit
def _slc_tile(k_ptr, v_ptr, j0, j_end, tok, chose, offs_d, row_stride, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys j0 .. j0 + BLOCK_N of a selected block that ends at j_end: their rows k, v
    [BLOCK_N, BLOCK_D] and which rows see them, visible [BLOCK_M, BLOCK_N]: those whose token chose
    the block (chose [BLOCK_M]), causally (j <= tok)."""
    offs_j = j0 + tl.arange(0, BLOCK_N)
    k = _load_rows(k_ptr, offs_j, offs_j < j_end, row_stride, offs_d, D)
    v = _load_rows(v_ptr, offs_j, offs_j < j_end, row_stride, offs_d, D)
    return k, v, chose[:, None] & (offs_j[None, :] <= tok[:, None]) & (offs_j < j_end)[None, :]


# --- Compressed attention --------------------------------------------------------------------

@triton.jit
def _nsa_cmp_fwd_kernel(q_ptr, kc_ptr, vc_ptr, o_ptr, lse_ptr, T, Nc, H, Hkv, block, offset_ptr, qk_scale,
                        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (token tile, batch * KV head). q, o [B, T, H, D]; kc, vc [B, Nc, Hkv, D].
    Writes o (0 on rows with no complete block) and lse [B, H, T] in base 2 (-inf on those rows)."""
    offset = tl.load(offset_ptr)
    b, hkv, tok, g, ok, q_off, lse_off = _group_tile(T, H, Hkv, G, D, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kc_ptr += (b.to(tl.int64) * Nc * Hkv + hkv) * D
    vc_ptr += (b.to(tl.int64) * Nc * Hkv + hkv) * D
    q = _load_rows(q_ptr + q_off, tok * H + g, ok, D, offs_d, D)            # [BLOCK_M, BLOCK_D]
    n_seen = tl.where(ok, _n_complete(tok, offset, block, Nc), 0)           # [BLOCK_M]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, tl.max(n_seen, 0), BLOCK_N):
        kc, vc, visible = _cmp_tile(kc_ptr, vc_ptr, n0, Nc, n_seen, offs_d, Hkv * D, D, BLOCK_N)
        s = tl.where(visible, _dot(q, tl.trans(kc), PRECISION) * qk_scale, NEG_INF)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, vc, PRECISION)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]               # nothing to attend to: o = 0
    _store_rows(o_ptr + q_off, o, tok * H + g, ok, D, offs_d, D)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), NEG_INF)
    tl.store(lse_ptr + lse_off + g * T + tok, lse, mask=ok)


@triton.jit
def _nsa_cmp_bwd_dq_kernel(q_ptr, kc_ptr, vc_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, T, Nc, H, Hkv, block,
                           offset_ptr, qk_scale, scale, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dq [B, T, H, D]: the forward's walk, with P recomputed from lse and delta [B, H, T]."""
    offset = tl.load(offset_ptr)
    b, hkv, tok, g, ok, q_off, lse_off = _group_tile(T, H, Hkv, G, D, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kc_ptr += (b.to(tl.int64) * Nc * Hkv + hkv) * D
    vc_ptr += (b.to(tl.int64) * Nc * Hkv + hkv) * D
    q = _load_rows(q_ptr + q_off, tok * H + g, ok, D, offs_d, D)
    do = _load_rows(do_ptr + q_off, tok * H + g, ok, D, offs_d, D)
    lse = tl.load(lse_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
    delta = tl.load(delta_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
    n_seen = tl.where(ok, _n_complete(tok, offset, block, Nc), 0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, tl.max(n_seen, 0), BLOCK_N):
        kc, vc, visible = _cmp_tile(kc_ptr, vc_ptr, n0, Nc, n_seen, offs_d, Hkv * D, D, BLOCK_N)
        dq = _dq_update(dq, q, do, kc, vc, lse, delta, visible, qk_scale, True, PRECISION)
    _store_rows(dq_ptr + q_off, dq * scale, tok * H + g, ok, D, offs_d, D)


@triton.jit
def _nsa_cmp_bwd_dkdv_kernel(q_ptr, kc_ptr, vc_ptr, do_ptr, lse_ptr, delta_ptr, dkc_ptr, dvc_ptr, T, Nc, H, Hkv,
                             block, offset_ptr, tokens_per_chunk, qk_scale, scale, G: tl.constexpr, D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr):
    """One program per (tile of compressed blocks, chunk of tokens, batch * KV head): the part of
    dKc, dVc that comes from the chunk's queries (all G heads). Writes float32 partials
    dkc, dvc [n_chunks, B, Nc, Hkv, D]; the host sums over the chunks."""
    offset = tl.load(offset_ptr)
    n0 = tl.program_id(0) * BLOCK_N
    chunk = tl.program_id(1)
    b = tl.program_id(2) // Hkv
    hkv = tl.program_id(2) % Hkv
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kc_off = (b.to(tl.int64) * Nc * Hkv + hkv) * D
    kc = _load_rows(kc_ptr + kc_off, offs_n, offs_n < Nc, Hkv * D, offs_d, D)
    vc = _load_rows(vc_ptr + kc_off, offs_n, offs_n < Nc, Hkv * D, offs_d, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_off, lse_off = _group_offsets(b, hkv, T, H, G, D)

    # Block n0 is complete from position (n0 + 1) l - 1 on: earlier tokens see none of the tile.
    t_lo = tl.maximum(chunk * tokens_per_chunk, (n0 + 1) * block - 1 - offset)
    t_hi = tl.minimum((chunk + 1) * tokens_per_chunk, T)
    for t0 in range(t_lo, t_hi, BLOCK_M // G):
        tok, g, ok = _tile_rows(t0, t_hi, G, BLOCK_M)
        q = _load_rows(q_ptr + q_off, tok * H + g, ok, D, offs_d, D)
        do = _load_rows(do_ptr + q_off, tok * H + g, ok, D, offs_d, D)
        lse = tl.load(lse_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
        n_seen = tl.where(ok, _n_complete(tok, offset, block, Nc), 0)
        visible = offs_n[:, None] < n_seen[None, :]                              # [BLOCK_N, BLOCK_M]
        dk, dv = _dkdv_update(dk, dv, q, do, kc, vc, lse, delta, visible, qk_scale, True, PRECISION)

    part_off = ((chunk * (tl.num_programs(2) // Hkv) + b).to(tl.int64) * Nc * Hkv + hkv) * D
    _store_rows(dkc_ptr + part_off, dk * scale, offs_n, offs_n < Nc, Hkv * D, offs_d, D)
    _store_rows(dvc_ptr + part_off, dv, offs_n, offs_n < Nc, Hkv * D, offs_d, D)


@triton.jit
def _nsa_delta_kernel(o_ptr, do_ptr, delta_ptr, T, H, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """delta [B, H, T] = rowsum(O * dO) in float32 (the softmax backward's correction term)."""
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    base = (b * T * H + h).to(tl.int64) * D
    o = _load_rows(o_ptr + base, offs_i, offs_i < T, H * D, offs_d, D).to(tl.float32)
    do = _load_rows(do_ptr + base, offs_i, offs_i < T, H * D, offs_d, D).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * T + offs_i, tl.sum(o * do, 1), mask=offs_i < T)


def _nsa_delta(o, do, dlse=None):
    """delta [B, H, T] float32 = rowsum(O * dO) - dlse: the softmax backward's correction term. A
    gradient of the log-sum-exp adds dlse_i p_ij to dS_ij, i.e. it only shifts delta."""
    B, T, H, D = o.shape
    delta = torch.empty(B, H, T, dtype=torch.float32, device=o.device)
    _nsa_delta_kernel[(triton.cdiv(T, NSA_DELTA_BLOCK_M), B * H)](o, do, delta, T, H, D=D, BLOCK_M=NSA_DELTA_BLOCK_M,
                                                                  BLOCK_D=_block_d(D))
    if dlse is not None:  # [B, H, T]; rows with lse = -inf see nothing, their gradient does not count
        delta -= torch.nan_to_num(dlse.float(), posinf=0.0, neginf=0.0)
    # A row that sees no key has o = NaN (selected branch): delta 0 keeps its p = 0 from making dS NaN.
    return torch.nan_to_num_(delta)


def _nsa_token_chunks(T: int, programs: int, tokens_per_step: int, device) -> int:
    """Tokens per chunk of the compressed dKc, dVc kernel: enough chunks to fill the GPU (about 2
    programs per multiprocessor: an untuned default), each a whole number of token steps."""
    n_chunks = 2 if INTERPRET else max(1, triton.cdiv(2 * _multiprocessors(device), programs))
    per_chunk = triton.cdiv(triton.cdiv(T, n_chunks), tokens_per_step) * tokens_per_step
    return max(per_chunk, tokens_per_step)


class _NSACompressedAttention(torch.autograd.Function):
    """q [B, T, H, D], k_cmp, v_cmp [B, Nc, Hkv, D] contiguous, one dtype, Nc >= 1. Returns
    (o, lse [B, H, T] natural log); both differentiable. Saves the base-2 lse for the backward."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, block, offset, scale):
        B, T, H, D = q.shape
        Nc, Hkv = k_cmp.shape[1], k_cmp.shape[2]
        G = H // Hkv
        o = torch.empty_like(q)
        lse2 = torch.empty(B, H, T, dtype=torch.float32, device=q.device)      # base 2
        offset = _offset_on_device(offset, q.device)
        cfg = _nsa_blocks("cmp", G)
        precision = _dot_precision(q.dtype)  # decided once: the backward multiplies the same way
        _nsa_cmp_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"] // G), B * Hkv)](
            q, k_cmp, v_cmp, o, lse2, T, Nc, H, Hkv, block, offset, scale * LOG2E, G=G, D=D,
            BLOCK_D=_block_d(D), PRECISION=precision, **cfg)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse2, offset)
        ctx.block, ctx.scale, ctx.precision = block, scale, precision
        return o, lse2 * LN2                                                   # natural log, [B, H, T]

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse2, offset = ctx.saved_tensors
        block, scale = ctx.block, ctx.scale
        B, T, H, D = q.shape
        Nc, Hkv = k_cmp.shape[1], k_cmp.shape[2]
        G = H // Hkv
        do = do.to(q.dtype).contiguous()
        delta = _nsa_delta(o, do, dlse)
        common = dict(G=G, D=D, BLOCK_D=_block_d(D), PRECISION=ctx.precision)

        cfg = _nsa_blocks("cmp_dkdv", G)
        key_tiles = triton.cdiv(Nc, cfg["BLOCK_N"])
        per_chunk = _nsa_token_chunks(T, key_tiles * B * Hkv, cfg["BLOCK_M"] // G, q.device)
        n_chunks = triton.cdiv(T, per_chunk)
        dkc = torch.empty(n_chunks, B, Nc, Hkv, D, dtype=torch.float32, device=q.device)
        dvc = torch.empty_like(dkc)
        _nsa_cmp_bwd_dkdv_kernel[(key_tiles, n_chunks, B * Hkv)](
            q, k_cmp, v_cmp, do, lse2, delta, dkc, dvc, T, Nc, H, Hkv, block, offset, per_chunk,
            scale * LOG2E, scale, **common, **cfg)

        cfg = _nsa_blocks("cmp", G)
        dq = torch.empty_like(q)
        _nsa_cmp_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"] // G), B * Hkv)](
            q, k_cmp, v_cmp, do, lse2, delta, dq, T, Nc, H, Hkv, block, offset, scale * LOG2E, scale,
            **common, **cfg)
        return dq, dkc.sum(0).to(k_cmp.dtype), dvc.sum(0).to(v_cmp.dtype), None, None, None


@_launched_as_is
def nsa_compressed_attention(q, k_cmp, v_cmp, block: int, scale=None, offset=0):
    """NSA's compressed branch in Triton; same arguments and result as
    tiny_hybrid.nsa_compressed_attention: q [B, T, H, D] at positions offset .. offset + T - 1
    (offset: an int, or a 0-d integer tensor on q's device, as a decoding step keeps it),
    k_cmp, v_cmp [B, Nc, Hkv, D] (mean-pooled blocks of `block` tokens); the query at position p
    attends to the complete blocks n < (p + 1) // block. Returns (o [B, T, H, D] in q's dtype,
    lse [B, T, H] float32); o = 0 and lse = -inf where no block is complete. Differentiable in
    q, k_cmp, v_cmp, through o and lse."""
    _check_nsa_compressed_args(q, k_cmp, v_cmp, block, offset)
    B, T, H, D = q.shape
    scale = _default_scale(scale, D)
    if q.numel() == 0 or k_cmp.shape[1] == 0:  # nothing to attend to; still connected to the graph
        o = (q * 0 + (k_cmp.sum() + v_cmp.sum()) * 0).to(q.dtype)
        return o, torch.full((B, T, H), float("-inf"), device=q.device)
    dtype = _compute_dtype(q, k_cmp, v_cmp)
    q_, k_, v_ = (x.to(dtype).contiguous() for x in (q, k_cmp, v_cmp))
    o, lse = _NSACompressedAttention.apply(q_, k_, v_, block, offset, scale)
    return o.to(q.dtype), lse.transpose(1, 2)                                   # [B, H, T] -> [B, T, H]


# --- Block scores ----------------------------------------------------------------------------

@triton.jit
def _nsa_scores_kernel(q_ptr, kc_ptr, lse_ptr, score_ptr, T, Nc, H, Hkv, block, offset_ptr, qk_scale,
                       G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (tile of BLOCK_M tokens, tile of BLOCK_N compressed blocks, batch * KV head):
    score [B, T, Hkv, Nc] float32 = sum over the G heads h of the group of exp2(s_h - lse_h), 0 on
    blocks not complete yet. q [B, T, H, D], kc [B, Nc, Hkv, D], lse [B, T, H] (base 2)."""
    offset = tl.load(offset_ptr)
    offs_t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(2) // Hkv
    hkv = tl.program_id(2) % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    n_seen = tl.where(offs_t < T, _n_complete(offs_t, offset, block, Nc), 0)     # [BLOCK_M]
    visible = offs_n[None, :] < n_seen[:, None]                                  # [BLOCK_M, BLOCK_N]
    score = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if tl.program_id(1) * BLOCK_N < tl.max(n_seen, 0):  # else: no block of the tile is complete yet
        kc = _load_rows(kc_ptr + (b.to(tl.int64) * Nc * Hkv + hkv) * D, offs_n, offs_n < Nc, Hkv * D, offs_d, D)
        for g in range(G):  # the heads in a fixed order: the sum is reproducible
            h = hkv * G + g
            q = _load_rows(q_ptr + (b.to(tl.int64) * T * H + h) * D, offs_t, offs_t < T, H * D, offs_d, D)
            lse = tl.load(lse_ptr + (b.to(tl.int64) * T + offs_t) * H + h, mask=offs_t < T, other=0.0)
            s = _dot(q, tl.trans(kc), PRECISION) * qk_scale
            score += tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
    ptrs = score_ptr + ((b.to(tl.int64) * T + offs_t) * Hkv + hkv)[:, None] * Nc + offs_n[None, :]
    tl.store(ptrs, score, mask=(offs_t < T)[:, None] & (offs_n < Nc)[None, :])


@_launched_as_is
def nsa_block_scores(q, k_cmp, lse, block: int, scale=None, offset=0):
    """tiny_hybrid.nsa_block_scores in Triton: the compressed attention probabilities summed over the
    query heads of each KV group. q [B, T, H, D], k_cmp [B, Nc, Hkv, D], lse [B, T, H] (natural log,
    from nsa_compressed_attention). Returns [B, T, Hkv, Nc] float32; no gradient."""
    _check_nsa_compressed_args(q, k_cmp, k_cmp, block, offset)
    check_tensor("lse", lse, 3)
    B, T, H, D = q.shape
    Nc, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    if lse.shape != (B, T, H):
        raise ValueError(f"lse must be [B, T, H] = [{B}, {T}, {H}], got {tuple(lse.shape)}")
    scale = _default_scale(scale, D)
    scores = torch.zeros(B, T, Hkv, Nc, dtype=torch.float32, device=q.device)
    if scores.numel() == 0:
        return scores
    with torch.no_grad():
        dtype = _compute_dtype(q, k_cmp)
        q_, k_ = (x.detach().to(dtype).contiguous() for x in (q, k_cmp))
        lse2 = (lse.detach().float() * LOG2E).contiguous()                      # base 2, [B, T, H]
        cfg = _nsa_blocks("scores", H // Hkv)
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), triton.cdiv(Nc, cfg["BLOCK_N"]), B * Hkv)
        _nsa_scores_kernel[grid](q_, k_, lse2, scores, T, Nc, H, Hkv, block, _offset_on_device(offset, q.device),
                                 scale * LOG2E, G=H // Hkv, D=D,
                                 BLOCK_D=_block_d(D), PRECISION=_dot_precision(dtype), **cfg)
    return scores


# --- Selected attention ----------------------------------------------------------------------

@triton.jit
def _nsa_slc_fwd_kernel(q_ptr, k_ptr, v_ptr, block_idx_ptr, union_ptr, n_union_ptr, T, H, Hkv, block, n_sel,
                        union_len, o_ptr, lse_ptr, qk_scale, G: tl.constexpr, D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (token tile, batch * KV head). q, o [B, T, H, D]; k, v [B, T, Hkv, D];
    block_idx [B, T, Hkv, n] int32 (-1: none); union [B, Hkv, n_tiles, union_len] and n_union
    [B, Hkv, n_tiles]: the blocks the tile's tokens chose, each once (_nsa_tile_union). Row (t, g)
    sees key j of a visited block c when t chose c and j <= t. Writes o and lse [B, H, T] (base 2)."""
    b, hkv, tok, g, ok, q_off, lse_off = _group_tile(T, H, Hkv, G, D, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptr += (b.to(tl.int64) * T * Hkv + hkv) * D
    v_ptr += (b.to(tl.int64) * T * Hkv + hkv) * D
    q = _load_rows(q_ptr + q_off, tok * H + g, ok, D, offs_d, D)
    sel = _tile_selection(block_idx_ptr, b, tok, ok, T, Hkv, hkv, n_sel, BLOCK_S)  # [BLOCK_M, BLOCK_S]
    union_id = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for e in range(0, tl.load(n_union_ptr + union_id)):
        c = tl.load(union_ptr + union_id * union_len + e)
        chose = tl.sum((sel == c).to(tl.int32), 1) > 0                          # [BLOCK_M]
        j_end = tl.minimum(c * block + block, T)
        for j0 in range(c * block, j_end, BLOCK_N):  # one tile when l <= 64
            k, v, visible = _slc_tile(k_ptr, v_ptr, j0, j_end, tok, chose, offs_d, Hkv * D, D, BLOCK_N)
            s = tl.where(visible, _dot(q, tl.trans(k), PRECISION) * qk_scale, NEG_INF)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, v, PRECISION)

    # A row that sees no key gets NaN, as the reference's softmax over nothing does. NaN is made
    # here as -inf * 0: a NaN global breaks Triton's recompile check (NaN != NaN reads as "changed").
    seen = l_i > 0
    o = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], NEG_INF * 0.0)
    _store_rows(o_ptr + q_off, o, tok * H + g, ok, D, offs_d, D)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), NEG_INF)
    tl.store(lse_ptr + lse_off + g * T + tok, lse, mask=ok)


@triton.jit
def _nsa_slc_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, block_idx_ptr, union_ptr, n_union_ptr, T, H, Hkv, block, n_sel,
                           union_len, do_ptr, lse_ptr, delta_ptr, dq_ptr, qk_scale, scale, G: tl.constexpr,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
    """dq [B, T, H, D]: the forward's walk over the tile's blocks, P recomputed from lse."""
    b, hkv, tok, g, ok, q_off, lse_off = _group_tile(T, H, Hkv, G, D, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptr += (b.to(tl.int64) * T * Hkv + hkv) * D
    v_ptr += (b.to(tl.int64) * T * Hkv + hkv) * D
    q = _load_rows(q_ptr + q_off, tok * H + g, ok, D, offs_d, D)
    do = _load_rows(do_ptr + q_off, tok * H + g, ok, D, offs_d, D)
    lse = tl.load(lse_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
    delta = tl.load(delta_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
    sel = _tile_selection(block_idx_ptr, b, tok, ok, T, Hkv, hkv, n_sel, BLOCK_S)
    union_id = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for e in range(0, tl.load(n_union_ptr + union_id)):
        c = tl.load(union_ptr + union_id * union_len + e)
        chose = tl.sum((sel == c).to(tl.int32), 1) > 0
        j_end = tl.minimum(c * block + block, T)
        for j0 in range(c * block, j_end, BLOCK_N):
            k, v, visible = _slc_tile(k_ptr, v_ptr, j0, j_end, tok, chose, offs_d, Hkv * D, D, BLOCK_N)
            dq = _dq_update(dq, q, do, k, v, lse, delta, visible, qk_scale, True, PRECISION)
    _store_rows(dq_ptr + q_off, dq * scale, tok * H + g, ok, D, offs_d, D)


@triton.jit
def _nsa_slc_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tokens_ptr,
                             starts_ptr, T, H, Hkv, block, n_blocks, tokens_per_piece, qk_scale, scale,
                             G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (batch * KV head, key block c, piece of its list): the part of dk, dv
    [B, T, Hkv, D] (float32, zeroed) of the block's keys that comes from the piece's queries, all G
    heads, BLOCK_M // G tokens at a time. List i = (b Hkv + hkv)(n_blocks + 1) + c holds the tokens
    that chose c, tokens[starts[i] : starts[i + 1]]. Block 0 is in every token's list: cutting
    lists into pieces keeps its program from running alone at the end. A list of one piece is
    stored, the pieces of a longer one are added atomically (their float32 sum order may vary)."""
    bhk = tl.program_id(0)
    c = tl.program_id(1)
    piece = tl.program_id(2)
    b = bhk // Hkv
    hkv = bhk % Hkv
    list_id = bhk.to(tl.int64) * (n_blocks + 1) + c
    e_first = tl.load(starts_ptr + list_id)
    e_last = tl.load(starts_ptr + list_id + 1)
    e_lo = e_first + piece * tokens_per_piece
    e_hi = tl.minimum(e_lo + tokens_per_piece, e_last)
    if e_lo < e_hi:
        r = tl.arange(0, BLOCK_M)
        g = r % G
        offs_d = tl.arange(0, BLOCK_D)
        q_off, lse_off = _group_offsets(b, hkv, T, H, G, D)
        kv_off = (b.to(tl.int64) * T * Hkv + hkv) * D
        j_end = tl.minimum(c * block + block, T)
        for j0 in range(c * block, j_end, BLOCK_N):  # one pass when l <= 64
            offs_j = j0 + tl.arange(0, BLOCK_N)
            k = _load_rows(k_ptr + kv_off, offs_j, offs_j < j_end, Hkv * D, offs_d, D)
            v = _load_rows(v_ptr + kv_off, offs_j, offs_j < j_end, Hkv * D, offs_d, D)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for e0 in range(e_lo, e_hi, BLOCK_M // G):
                ok = (r < (BLOCK_M // G) * G) & (e0 + r // G < e_hi)
                tok = tl.load(tokens_ptr + e0 + r // G, mask=ok, other=0)        # [BLOCK_M]
                q = _load_rows(q_ptr + q_off, tok * H + g, ok, D, offs_d, D)
                do = _load_rows(do_ptr + q_off, tok * H + g, ok, D, offs_d, D)
                lse = tl.load(lse_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
                delta = tl.load(delta_ptr + lse_off + g * T + tok, mask=ok, other=0.0)
                visible = (offs_j[:, None] <= tok[None, :]) & ok[None, :]          # [BLOCK_N, BLOCK_M]
                dk, dv = _dkdv_update(dk, dv, q, do, k, v, lse, delta, visible, qk_scale, True, PRECISION)
            rows_ok = (offs_j < j_end)[:, None] & (offs_d < D)[None, :]
            dk_ptrs = dk_ptr + kv_off + offs_j[:, None] * (Hkv * D) + offs_d[None, :]
            dv_ptrs = dv_ptr + kv_off + offs_j[:, None] * (Hkv * D) + offs_d[None, :]
            if e_last - e_first <= tokens_per_piece:
                tl.store(dk_ptrs, dk * scale, mask=rows_ok)
                tl.store(dv_ptrs, dv, mask=rows_ok)
            else:
                tl.atomic_add(dk_ptrs, dk * scale, mask=rows_ok)
                tl.atomic_add(dv_ptrs, dv, mask=rows_ok)


def _nsa_list_pieces(T: int, tokens_per_step: int) -> int:
    """Tokens per piece of a block's list in the selected dK, dV kernel (untuned defaults): at most
    16 pieces (block 0's list has all T tokens), at least 256 tokens (fewer would cost more atomics
    than they save). The interpreter gets short pieces so that the tests cross piece boundaries."""
    per_piece = 32 if INTERPRET else max(256, triton.cdiv(T, 16))
    return triton.cdiv(per_piece, tokens_per_step) * tokens_per_step


def _nsa_clean_selection(block_idx, n_blocks: int) -> torch.Tensor:
    """block_idx (any integer dtype) [B, T, Hkv, n] -> int32, each token's blocks sorted, with -1 for
    duplicates and for indices that hold no key (< 0 or >= n_blocks): the reference ignores both
    (a key is seen once however often its block is listed)."""
    idx = torch.where((block_idx >= 0) & (block_idx < n_blocks), block_idx, -1).sort(dim=-1).values
    repeated = torch.zeros_like(idx, dtype=torch.bool)
    repeated[..., 1:] = idx[..., 1:] == idx[..., :-1]
    return idx.masked_fill(repeated, -1).to(torch.int32).contiguous()


def _nsa_tile_union(block_idx: torch.Tensor, tokens_per_tile: int, n_blocks: int):
    """The blocks each tile of tokens_per_tile tokens visits: the union of its tokens' choices.

    block_idx int32 [B, T, Hkv, n] from _nsa_clean_selection. Returns union int32
    [B, Hkv, n_tiles, tokens_per_tile n] (ascending, then padding) and its length per tile, int32
    [B, Hkv, n_tiles]. Neighbouring tokens share blocks (block 0 and the recent ones at least), so
    a tile loads each block once for all its rows."""
    B, T, Hkv, n = block_idx.shape
    n_tiles = triton.cdiv(T, tokens_per_tile)
    x = torch.where(block_idx >= 0, block_idx, n_blocks)                     # none -> n_blocks: sorts last
    pad = x.new_full((B, n_tiles * tokens_per_tile - T, Hkv, n), n_blocks)
    x = torch.cat([x, pad], dim=1).view(B, n_tiles, tokens_per_tile, Hkv, n)
    x = x.permute(0, 3, 1, 2, 4).reshape(B, Hkv, n_tiles, tokens_per_tile * n).sort(dim=-1).values
    repeated = torch.zeros_like(x, dtype=torch.bool)
    repeated[..., 1:] = x[..., 1:] == x[..., :-1]
    x = x.masked_fill(repeated, n_blocks).sort(dim=-1).values
    return x.to(torch.int32).contiguous(), (x < n_blocks).sum(dim=-1, dtype=torch.int32)


def _nsa_block_lists(block_idx: torch.Tensor, n_blocks: int):
    """Invert the selection: for each (batch, KV head, block c), the tokens that chose c, in order.

    block_idx int32 [B, T, Hkv, n] from _nsa_clean_selection. Returns tokens int32 [B Hkv T n]
    (the lists one after the other; unused entries last) and starts int32 [B Hkv (n_blocks + 1) + 1]:
    list (bh, c) is tokens[starts[i] : starts[i + 1]] with i = bh (n_blocks + 1) + c (c = n_blocks
    collects the -1 entries). A stable sort on the device: no host sync."""
    B, T, Hkv, n = block_idx.shape
    per_head = block_idx.permute(0, 2, 1, 3).reshape(B * Hkv, T * n)            # [B, T, Hkv, n] -> [B Hkv, T n]
    bucket = torch.where(per_head >= 0, per_head, n_blocks).long()
    bucket += torch.arange(B * Hkv, device=block_idx.device)[:, None] * (n_blocks + 1)
    sorted_bucket, entry = bucket.flatten().sort(stable=True)                   # token order kept per list
    tokens = ((entry % (T * n)) // n).to(torch.int32)
    bounds = torch.arange(B * Hkv * (n_blocks + 1) + 1, device=block_idx.device)
    starts = torch.searchsorted(sorted_bucket, bounds).to(torch.int32)
    return tokens, starts


class _NSASelectedAttention(torch.autograd.Function):
    """q [B, T, H, D], k, v [B, T, Hkv, D] contiguous, one dtype; block_idx from
    _nsa_clean_selection. Saves the base-2 lse [B, H, T] for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, block, scale):
        B, T, H, D = q.shape
        Hkv, n_sel = k.shape[2], block_idx.shape[3]
        G = H // Hkv
        cfg = _nsa_blocks("slc", G, block)
        n_blocks = triton.cdiv(T, block)
        union, n_union = _nsa_tile_union(block_idx, cfg["BLOCK_M"] // G, n_blocks)
        o = torch.empty_like(q)
        lse2 = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        precision = _dot_precision(q.dtype)  # decided once: the backward multiplies the same way
        _nsa_slc_fwd_kernel[(union.shape[2], B * Hkv)](
            q, k, v, block_idx, union, n_union, T, H, Hkv, block, n_sel, union.shape[3], o, lse2,
            scale * LOG2E, G=G, D=D, BLOCK_D=_block_d(D), BLOCK_S=max(2, triton.next_power_of_2(n_sel)),
            PRECISION=precision, **cfg)
        ctx.save_for_backward(q, k, v, block_idx, union, n_union, o, lse2)
        ctx.block, ctx.scale, ctx.precision = block, scale, precision
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, block_idx, union, n_union, o, lse2 = ctx.saved_tensors
        block, scale = ctx.block, ctx.scale
        B, T, H, D = q.shape
        Hkv, n_sel = k.shape[2], block_idx.shape[3]
        G = H // Hkv
        do = do.to(q.dtype).contiguous()
        delta = _nsa_delta(o, do)
        common = dict(G=G, D=D, BLOCK_D=_block_d(D), PRECISION=ctx.precision)

        n_blocks = triton.cdiv(T, block)
        tokens, starts = _nsa_block_lists(block_idx, n_blocks)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)     # keys nobody chose: 0
        dv = torch.zeros_like(dk)
        cfg = _nsa_blocks("slc_dkdv", G, block)
        per_piece = _nsa_list_pieces(T, cfg["BLOCK_M"] // G)
        # Batch * KV head on the fast axis: block 0, which every token chooses, starts first.
        _nsa_slc_bwd_dkdv_kernel[(B * Hkv, n_blocks, triton.cdiv(T, per_piece))](
            q, k, v, do, lse2, delta, dk, dv, tokens, starts, T, H, Hkv, block, n_blocks, per_piece,
            scale * LOG2E, scale, **common, **cfg)

        cfg = _nsa_blocks("slc", G, block)
        dq = torch.empty_like(q)
        _nsa_slc_bwd_dq_kernel[(union.shape[2], B * Hkv)](
            q, k, v, block_idx, union, n_union, T, H, Hkv, block, n_sel, union.shape[3], do, lse2, delta, dq,
            scale * LOG2E, scale, BLOCK_S=max(2, triton.next_power_of_2(n_sel)), **common, **cfg)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def nsa_selected_attention(q, k, v, block_idx, block: int, scale=None):
    """NSA's selected branch in Triton; same arguments and result as
    tiny_hybrid.nsa_selected_attention: q [B, T, H, D], k, v [B, T, Hkv, D], block_idx integer
    [B, T, Hkv, n] (-1: no block). Query i sees key j when block j // block is selected for
    (i, its KV head) and j <= i. Returns o [B, T, H, D] in q's dtype; differentiable in q, k, v."""
    _check_nsa_selected_args(q, k, v, block_idx, block)
    B, T, H, D = q.shape
    scale = _default_scale(scale, D)
    if q.numel() == 0:
        return (q * 0 + (k.sum() + v.sum()) * 0).to(q.dtype)
    dtype = _compute_dtype(q, k, v)
    q_, k_, v_ = (x.to(dtype).contiguous() for x in (q, k, v))
    idx = _nsa_clean_selection(block_idx.to(q.device), triton.cdiv(T, block))
    return _NSASelectedAttention.apply(q_, k_, v_, idx, block, scale).to(q.dtype)


# =============================================================================================
# 1d. LTE's buffer rule in parallel (tiny_hybrid.lte_visible_until)
# =============================================================================================
# Token j (sink <= j, leaving the window as query j + w + 1 arrives, score r_j > 0) is offered to
# the buffer of b slots; token i beats j when r_i > r_j, or r_i = r_j and i is newer. Then
#     until[j] = KEEP_FOREVER   if j < sink, or fewer than b offered tokens ever beat j,
#              = i_b + w        if j's b-th beater i_b comes after j (the query at which i_b
#                               leaves the window and pushes j out),
#              = -1             otherwise (b beaters left before j: j never enters).

# The buffer always holds the top b offered tokens by (r, position), so an offered token j stays
# from the moment it leaves the window until the b-th offered token that beats it leaves (never
# if that one left before j). The reference finds that moment through a running order statistic;
# here every key counts its beaters directly, a tile of keys against a tile of tokens at a time:
# O(T^2) comparisons, but all of them independent, which a GPU does in well under a millisecond at 8K.

# tiny_hybrid.KEEP_FOREVER, the visible-until of a key no query ever loses (a test holds the two
# equal); restated here so that this file needs no model code.
KEEP_FOREVER = torch.iinfo(torch.int32).max

# Launch settings, measured on the H200 at B = 4, T = 8K, Hkv = 2: 32 x 32 tiles with 4 warps
# 0.46 ms; 64 x 64 0.80; 128 x 128 2.6 (the best of 27 tried).
LTE_RULE_GPU_BLOCKS = dict(BLOCK_J=32, BLOCK_I=32, num_warps=4)
LTE_RULE_INTERPRETER_BLOCKS = dict(BLOCK_J=32, BLOCK_I=32)


@triton.jit
def _lte_until_kernel(r_ptr, until_ptr, T, Hkv, n_left, window, sink, buffer, KEEP_FOREVER: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program per (block of keys j, batch x KV head). r [B, T, Hkv] float32 scores; writes
    until [B, T, Hkv] int64. Offered tokens are j in [sink, n_left) with r_j > 0; token i beats j
    when r_i > r_j, or r_i == r_j and i is newer (the tie rule of tiny_hybrid.lte_buffer_push)."""
    pid_j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = (bh // Hkv) * T * Hkv + bh % Hkv                  # element (b, 0, h) of [B, T, Hkv]
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    r_j = tl.load(r_ptr + base + j * Hkv, mask=j < T, other=0.0)
    beaten = tl.zeros([BLOCK_J], dtype=tl.int32)             # offered tokens seen so far that beat j
    bth = tl.full([BLOCK_J], -1, dtype=tl.int32)             # position of the b-th of them (-1: none yet)
    for i0 in range(sink, n_left, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        r_i = tl.load(r_ptr + base + i * Hkv, mask=i < n_left, other=0.0)  # 0: not offered
        beats = (r_i[None, :] > 0) & ((r_i[None, :] > r_j[:, None]) |
                                      ((r_i[None, :] == r_j[:, None]) & (i[None, :] > j[:, None])))
        n_beats = tl.sum(beats.to(tl.int32), axis=1)
        crossing = (beaten < buffer) & (beaten + n_beats >= buffer)
        if tl.max(crossing.to(tl.int32), axis=0) > 0:       # some key meets its b-th beater in this tile
            count = beaten[:, None] + tl.cumsum(beats.to(tl.int32), axis=1)   # [BLOCK_J, BLOCK_I]
            at = tl.min(tl.where(beats & (count == buffer), i[None, :], n_left), axis=1)
            bth = tl.where(crossing, at, bth)
        beaten += n_beats
    offered = (j >= sink) & (j < n_left) & (r_j > 0) & (buffer > 0)
    entered = offered & ((bth < 0) | (bth > j))
    until = tl.where(bth < 0, KEEP_FOREVER, bth.to(tl.int64) + window)
    until = tl.where(entered, until, -1)
    until = tl.where(j < sink, KEEP_FOREVER, until)
    tl.store(until_ptr + base + j * Hkv, until, mask=j < T)


def lte_visible_until(scores, window: int, sink: int, buffer: int):
    """LTE's capped visibility in Triton; same arguments, errors and result as
    tiny_hybrid.lte_visible_until: scores [B, T, Hkv] -> until int64 [B, T, Hkv]. No autograd
    (the rule has no gradient). The buffer prefill keeps follows from until, by
    tiny_hybrid.lte_final_buffer."""
    check_lte_rule(scores, window, sink, buffer)
    _check_kernel_limits("lte_visible_until", {}, dict(scores=scores))
    B, T, Hkv = scores.shape
    r = scores.detach().float().contiguous()
    until = torch.empty(B, T, Hkv, dtype=torch.int64, device=r.device)
    n_left = max(sink, T - window - 1)                       # tokens [sink, n_left) leave within T queries
    blocks = LTE_RULE_INTERPRETER_BLOCKS if INTERPRET else LTE_RULE_GPU_BLOCKS
    grid = (triton.cdiv(T, blocks["BLOCK_J"]), B * Hkv)
    _lte_until_kernel[grid](r, until, T, Hkv, n_left, window, sink, buffer,
                            KEEP_FOREVER=KEEP_FOREVER, **blocks)
    return until


# =============================================================================================
# 2. The tour (`python kernels.py`): the checks' verdict, then the headline benchmarks
# =============================================================================================
# The checks are test_kernels.py (every kernel against its reference, forward and backward, on
# small shapes everywhere and on large ones on a GPU); the benchmarks are bench.py's. Each runs in
# a process of its own, so that this file imports neither.

def main() -> None:
    parser = argparse.ArgumentParser(description="Check the Triton kernels against tiny_hybrid (pytest "
                                     "test_kernels.py), then, on a CUDA GPU, time them with bench.py's headline "
                                     "kernel benchmarks (python bench.py kernels times them alone).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--check-only", action="store_true", help="run the checks, skip the benchmarks")
    parser.add_argument("-k", dest="select", metavar="EXPRESSION",
                        help="run only the checks whose test names match (pytest's -k)")
    parser.add_argument("--full", action="store_true", help="benchmarks: every length and baseline of the "
                        "docs/kernels.md's tables (tens of minutes: flex_attention compiles for every shape)")
    parser.add_argument("--tune", action="store_true",
                        help="benchmarks: pick attention block sizes by measuring first")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="benchmarks: stop timing flex_attention after this many seconds (the rest print as nan)")
    args = parser.parse_args()
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if importlib.util.find_spec("pytest") is None:
        parser.error("the checks need pytest (pip install pytest)")
    here = Path(__file__).resolve().parent
    checks = [sys.executable, "-m", "pytest", "-q", "test_kernels.py"] + (["-k", args.select] if args.select else [])
    where = "in Triton's CPU interpreter, a few minutes" if INTERPRET else "compiled on the GPU"
    print(f"checks ({where}): python {shlex.join(checks[1:])}", flush=True)
    checks_ok = subprocess.run(checks, cwd=here).returncode == 0
    print("checks:", "all passed" if checks_ok else "FAILED", flush=True)
    benches_ok = True
    if INTERPRET and not args.check_only:
        print("no CUDA GPU: benchmarks skipped (they time the compiled kernels)")
    elif not args.check_only:
        bench = [sys.executable, "bench.py", "kernels"] + ["--full"] * args.full + ["--tune"] * args.tune
        bench += ["--budget-s", str(args.budget_s)] if args.budget_s != float("inf") else []
        print(f"benchmarks: python {shlex.join(bench[1:])}", flush=True)
        benches_ok = subprocess.run(bench, cwd=here).returncode == 0
    sys.exit(0 if checks_ok and benches_ok else 1)


if __name__ == "__main__":
    main()
