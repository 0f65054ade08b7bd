"""kernels.py against the reference ops of tiny_hybrid.py: forward, gradients, decoding, errors.

Every tensor a kernel sees lives on DEVICE, the kernels' device: with a CUDA GPU the kernels are
compiled and run there, without one they run in Triton's interpreter on the CPU (conftest.py sets
TRITON_INTERPRET then). The reference they are compared with runs on the same tensors. Inputs are
drawn on the CPU from seeded generators, then moved, so both devices test the same numbers.
Shapes are small (D=16, B<=2) for the interpreter; on a GPU each distinct shape class compiles once.
The long cases (COMPILED_ONLY: thousands of tokens, head dims up to 128, the GPU's tile sizes) run
only where the kernels are compiled. `python kernels.py` runs this file and reports its verdict.
"""

import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    # Triton must see this at its first import (kernels.py explains); set it before importorskip.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")  # Triton ships for Linux only

import kernels  # noqa: E402
import tiny_hybrid  # noqa: E402

# The kernels' device, the one place these tests decide where tensors live: kernels.py's own rule
# (its interpreter on the CPU without a CUDA GPU, else CUDA), as conftest.py's `kernel_device`
# gives it to tests elsewhere; a module constant here because parametrize lists below use it.
DEVICE = torch.device("cpu" if kernels.INTERPRET else "cuda")
# On a GPU each distinct head dim (a constexpr) compiles its own kernels, and float32's exact dots
# compile to long FMA loops: an attention kernel at D = 24 or 32 takes 30-50 s of one CPU core to
# build (measured by compiling the launches of this file for sm_90 on a CPU). There the cases
# below share head dims where a second one of the same kind adds only compile time.
ON_GPU_HEAD_DIM = {} if DEVICE.type == "cpu" else {32: 24}     # attention: D = 32 -> 24 (both pad to 32)
# Float32 is float32 here: no TF32 in PyTorch's products or cuDNN's convolutions (conftest.py).
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_float32")]

# Tolerances.
# float32: the kernels multiply in exact float32 (IEEE dots) and accumulate in float32, like the
#   reference; they differ only in summation order and in the online softmax's rescaling by
#   exp(m_old - m_new), i.e. a few float32 ulps of the largest terms (seen: <= 3e-6 on values of
#   size ~5). 2e-5 absolute plus 1e-5 relative leaves a ~5x margin and still catches any wrong mask
#   (one missing or extra key moves outputs by ~1e-2).
F32 = dict(atol=2e-5, rtol=1e-5)
# 16-bit inputs: the kernel rounds P (and dS) to the input dtype before the products with V (and
#   K, Q), as flash attention does, and rounds its output; bf16 keeps 8 bits (relative step 2^-8 =
#   0.4%), so errors of a few 1e-3 relative to the largest value are expected; 2e-2 bounds them.
LOW_PRECISION_REL = 2e-2
# The long cases below: their shapes only make sense compiled (the interpreter would take minutes).
COMPILED_ONLY = pytest.mark.skipif(kernels.INTERPRET, reason="a long case: run where the kernels are compiled")


def max_rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| over a whole tensor (NaN anywhere counts as an infinite error): one
    wrong value anywhere in a long sequence shows, where a norm over all of it would average it away."""
    err = (x.double() - ref.double()).abs().max().item()
    return err / max(ref.double().abs().max().item(), 1e-30) if err == err else float("inf")


def _inputs(B, T, H, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    do = torch.randn(B, T, H, D, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def _keep(kind, B, T, Hkv, seed=1):
    """None; "all" (bool, every key kept); "random" (bool, ~15% kept); "until" (integer
    visible-until values: -1, values inside the window, past T, and KEEP_FOREVER)."""
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "all":
        keep = torch.ones(B, T, Hkv, dtype=torch.bool)
    elif kind == "random":
        keep = torch.rand(B, T, Hkv, generator=g) < 0.15
    else:
        keep = torch.randint(-1, T + 3, (B, T, Hkv), generator=g)
        forever = torch.rand(B, T, Hkv, generator=g) < 0.1
        keep = torch.where(forever, tiny_hybrid.KEEP_FOREVER, keep)
    return keep.to(DEVICE)


def _forward_backward(fn, q, k, v, do, **kw):
    """fn's output and its gradients for q, k, v under the output gradient do."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o,) + torch.autograd.grad(o, (q, k, v), do)


# Every value of every axis appears (T: 1 17 64 100 257; window: None 0 1 16 63; keep: none, all,
# random, until; query heads per KV head: 1 2 4), with the long, multi-block cases paired with
# the hard patterns. The full product would take far too long in the interpreter.
CASES = [  # (B, T, H, Hkv, D, window, keep)
    (1, 1, 1, 1, 16, None, None),
    (1, 1, 4, 1, 16, 0, "all"),
    (2, 17, 2, 1, 16, 0, "random"),
    (1, 17, 4, 1, 24, 1, "all"),          # a head dim that is not a power of two
    (1, 64, 2, 2, 16, 1, "until"),
    (1, 64, 2, 1, 16, 63, "random"),      # the window covers everything: keep changes nothing
    (1, 64, 2, 2, 16, None, None),        # exactly one tile of queries in the interpreter
    (1, 100, 4, 1, 16, 16, "all"),
    (1, 100, 2, 1, 16, 16, "random"),
    (2, 100, 2, 2, 16, None, None),
    (1, 100, 2, 1, 32, 0, "until"),
    (1, 257, 4, 1, 16, 16, "random"),     # the hardest: many blocks, kept columns, GQA 4
    (1, 257, 2, 1, 16, 63, "until"),
    (1, 257, 2, 2, 16, None, None),
    (1, 257, 2, 1, 16, 16, None),
]


@pytest.mark.parametrize("B, T, H, Hkv, D, window, keep", CASES)
def test_attention_matches_reference(B, T, H, Hkv, D, window, keep):
    D = ON_GPU_HEAD_DIM.get(D, D)
    q, k, v, do = _inputs(B, T, H, Hkv, D)
    keep = _keep(keep, B, T, Hkv)
    got = _forward_backward(kernels.attention, q, k, v, do, window=window, keep=keep)
    want = _forward_backward(tiny_hybrid.attention, q, k, v, do, window=window, keep=keep)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **F32, msg=lambda m, name=name: f"{name}: {m}")


def test_attention_scale_and_strided_inputs():
    """A custom scale, and q, k, v that are views into one fused projection (not contiguous)."""
    B, T, H, Hkv, D = 1, 40, 2, 1, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(DEVICE)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)   # strided views
    do = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    keep = _keep("random", B, T, Hkv)
    got = _forward_backward(kernels.attention, q, k, v, do, window=5, keep=keep, scale=0.3)
    want = _forward_backward(tiny_hybrid.attention, q, k, v, do, window=5, keep=keep, scale=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_low_precision(dtype):
    """16-bit in, same dtype out (and gradients), close to the float32 reference on the same inputs."""
    B, T, H, Hkv, D = 1, 100, 4, 2, 16
    q, k, v, do = _inputs(B, T, H, Hkv, D, dtype)
    keep = _keep("random", B, T, Hkv)
    got = _forward_backward(kernels.attention, q, k, v, do, window=16, keep=keep)
    want = _forward_backward(tiny_hybrid.attention, *(x.float() for x in (q, k, v, do)), window=16, keep=keep)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype, name
        rel = (a.float() - b).abs().max() / b.abs().max()
        assert rel < LOW_PRECISION_REL, f"{name}: relative error {rel:.2e}"


ATTENTION_LONG_CASES = [  # (B, T, H, Hkv, D, window, keep, dtype)
    (2, 1000, 4, 2, 64, 128, "random", torch.bfloat16),
    (2, 777, 8, 2, 64, 100, "until", torch.bfloat16),     # GQA 4, ragged T
    (1, 1000, 4, 4, 64, None, None, torch.bfloat16),
    (2, 600, 4, 1, 64, 64, None, torch.float16),
    (1, 500, 4, 2, 32, 50, "random", torch.float32),     # D = 24 (ON_GPU_HEAD_DIM), in the same 32-wide tiles
    (1, 700, 2, 1, 128, 200, "random", torch.float16),    # the largest head dim
]


@COMPILED_ONLY
@pytest.mark.parametrize("B, T, H, Hkv, D, window, keep, dtype", ATTENTION_LONG_CASES)
def test_attention_long_sequences(B, T, H, Hkv, D, window, keep, dtype):
    """Hundreds of tiles, GPU tile sizes, the tuned and untuned (D = 128) launch tables: o, dq, dk,
    dv against the float32 reference on the same (rounded) inputs. Largest error anywhere against
    the largest value: float32 1e-4 (exact products, only the order of the float32 sums differs;
    one missing key moves a value by ~1e-2), 16-bit LOW_PRECISION_REL."""
    D = ON_GPU_HEAD_DIM.get(D, D)
    q, k, v, do = _inputs(B, T, H, Hkv, D, dtype)
    keep = _keep(keep, B, T, Hkv)
    got = _forward_backward(kernels.attention, q, k, v, do, window=window, keep=keep)
    want = _forward_backward(tiny_hybrid.attention, *(x.float() for x in (q, k, v, do)), window=window, keep=keep)
    limit = 1e-4 if dtype == torch.float32 else LOW_PRECISION_REL
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and max_rel_error(a, b) < limit, f"{name}: {max_rel_error(a, b):.1e}"


def test_attention_float64_in_float64_out():
    """Like the reference: computed in float32, returned in the input's dtype."""
    q, k, v, _ = _inputs(1, 17, 2, 1, 16, torch.float64)
    o = kernels.attention(q, k, v, window=3)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, tiny_hybrid.attention(q, k, v, window=3), **F32)


def test_kept_list_is_the_sorted_keys_seen_beyond_the_band():
    """The compact list the kernels walk: positions j with visible_until[j] > j + w, in order,
    their visible-until values, and the prefix counts."""
    B, T, Hkv, w = 2, 150, 3, 10
    keep = _keep("until", B, T, Hkv)
    cols, col_until, nbefore = kernels._kept_list(keep, w, T)
    until = keep.clamp(-1, T - 1)
    for b in range(B):
        for h in range(Hkv):
            listed = torch.nonzero(until[b, :, h] > torch.arange(T, device=DEVICE) + w).flatten()
            n = len(listed)
            assert nbefore[b, h, -1] == n
            assert torch.equal(cols[b, h, :n].long(), listed)
            assert torch.equal(col_until[b, h, :n].long(), until[b, listed, h])
            flags = torch.zeros(T + 1, dtype=torch.long, device=DEVICE)
            flags[listed + 1] = 1
            assert torch.equal(nbefore[b, h].long(), flags.cumsum(0))


@pytest.mark.parametrize("H, Hkv, D, S, dtype", [
    (4, 2, 16, 100, torch.float32),      # 4 splits of 32 slots (the interpreter's split-K path)
    (4, 1, 16, 37, torch.float32),       # GQA 4, a ragged last split
    (2, 2, 16, 64, torch.bfloat16),
    (4, 2, 16, 100, torch.bfloat16),
])
def test_attention_decode_matches_reference(H, Hkv, D, S, dtype):
    """float32: also the largest error anywhere below 1e-5 of the largest value (one forward, no
    gradients: a few float32 ulps). bf16: the reference rounds its float32 result to bf16 too, so
    the two are at most ~2 bf16 steps (2^-8 relative each) apart: below 1e-2 of the largest value."""
    B = 2
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, D, generator=g).to(DEVICE, dtype)
    k_cache, v_cache = (torch.randn(B, S, Hkv, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    valid = torch.rand(B, S, Hkv, generator=g) < 0.6
    valid[0, : S // 2] = False            # a whole split with nothing valid must weigh nothing
    valid = valid.to(DEVICE)
    for vmask, scale in ((valid, None), (None, 0.5)):
        got = kernels.attention_decode(q, k_cache, v_cache, vmask, scale=scale)
        want = tiny_hybrid.attention_decode(q, k_cache, v_cache, vmask, scale=scale)
        assert got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, **F32)
        assert max_rel_error(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


@COMPILED_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, Hkv, D, S", [(3, 8, 2, 64, 5000), (2, 32, 2, 128, 333), (4, 8, 8, 64, 70000)])
def test_attention_decode_long_caches(B, H, Hkv, D, S, dtype):
    """Caches of up to 70K slots (many splits of the split-K path), ~30% of them invalid; the
    limits of test_attention_decode_matches_reference. Drawn on the GPU: 70K slots are a gigabyte
    to draw on the CPU."""
    g = torch.Generator(device=DEVICE).manual_seed(S)
    q = torch.randn(B, H, D, device=DEVICE, generator=g).to(dtype)
    k_cache, v_cache = (torch.randn(B, S, Hkv, D, device=DEVICE, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(B, S, Hkv, device=DEVICE, generator=g) < 0.7
    got = kernels.attention_decode(q, k_cache, v_cache, valid)
    want = tiny_hybrid.attention_decode(q, k_cache, v_cache, valid)
    assert max_rel_error(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_attention_decode_agrees_with_parallel_attention():
    """The last row of causal SWA attention == one decode step over the window's slots."""
    B, T, H, Hkv, D, w = 1, 50, 4, 2, 16, 7
    q, k, v, _ = _inputs(B, T, H, Hkv, D)
    full = kernels.attention(q, k, v, window=w)[:, -1]
    step = kernels.attention_decode(q[:, -1], k[:, T - 1 - w:], v[:, T - 1 - w:])
    torch.testing.assert_close(step, full, **F32)


def _bad_attention_inputs():
    q, k, v, _ = _inputs(1, 8, 4, 2, 16)
    return [  # (args, kwargs) that tiny_hybrid.attention rejects
        ((q.tolist(), k, v), {}),                                     # not a tensor
        ((q.long(), k, v), {}),                                       # not floating point
        ((q[0], k, v), {}),                                           # wrong number of dims
        ((q, k, v[:, :, :1]), {}),                                    # k and v differ
        ((q[:, :4], k, v), {}),                                       # T differs
        ((q[:, :, :3], k, v), {}),                                    # 3 heads on 2 KV heads
        ((q, k, v), dict(window=-1)),
        ((q, k, v), dict(window=2.5)),
        ((q, k, v), dict(keep=torch.ones(1, 8, 2, dtype=torch.bool, device=DEVICE))),  # keep, no window
        ((q, k, v), dict(window=2, keep=[True] * 8)),
        ((q, k, v), dict(window=2, keep=torch.ones(1, 8, 4, dtype=torch.bool, device=DEVICE))),
        ((q, k, v), dict(window=2, keep=torch.ones(1, 8, 2, device=DEVICE))),  # float keep
    ]


@pytest.mark.parametrize("i", range(12))
def test_attention_rejects_what_the_reference_rejects(i):
    args, kwargs = _bad_attention_inputs()[i]
    with pytest.raises((TypeError, ValueError)) as want:
        tiny_hybrid.attention(*args, **kwargs)
    with pytest.raises(want.type) as got:
        kernels.attention(*args, **kwargs)
    assert str(got.value) == str(want.value)


def test_attention_decode_rejects_what_the_reference_rejects():
    q = torch.randn(2, 4, 16, device=DEVICE)
    kc = torch.randn(2, 10, 2, 16, device=DEVICE)
    valid = torch.ones(2, 10, 2, dtype=torch.bool, device=DEVICE)
    bad = [((q[0], kc, kc), {}), ((q, kc[..., :8], kc[..., :8]), {}), ((q, kc, kc[:, :5]), {}),
           ((q[:, :3], kc, kc), {}), ((q.int(), kc, kc), {}), ((q, kc, kc, valid.int()), {}),
           ((q, kc, kc, valid[:, :5]), {})]
    for args, kwargs in bad:
        with pytest.raises((TypeError, ValueError)) as want:
            tiny_hybrid.attention_decode(*args, **kwargs)
        with pytest.raises(want.type) as got:
            kernels.attention_decode(*args, **kwargs)
        assert str(got.value) == str(want.value)


def test_kernel_limits_are_named():
    """What only the kernels refuse, named with the reference to use instead: head dims past 128,
    and inputs on a device Triton does not run on here (a meta tensor has a shape but no data)."""
    q = torch.randn(1, 4, 1, 136, device=DEVICE)
    with pytest.raises(ValueError, match=r"head dim D = 136 is too large .*; use tiny_hybrid.attention$"):
        kernels.attention(q, q, q)
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"^k is on meta, but Triton here runs on "):
        kernels.attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match=r"^scores is on meta, but Triton here runs on "):
        kernels.lte_visible_until(torch.zeros(1, 5, 1, device="meta"), 2, 1, 2)


# =============================================================================================
# Gated DeltaNet kernels
# =============================================================================================
import math  # noqa: E402

# Errors are relative, ||out - ref|| / ||ref||, over a whole tensor.
#
# Tolerances, and why:
#   float32  1e-4. The kernels do exact float32 arithmetic here (IEEE dots), the reference does
#            float32 too, in another order: both sit ~1e-6 from the exact result; 1e-4 leaves room
#            for the ill-conditioned cases (strong decay, beta near 1) and still catches any
#            wrong term, whose error would be O(1).
#   bf16     5e-2 on outputs and gradients. The reference rounds only the inputs; the kernels also
#            store W, U', U, the chunk states and T in bf16 and multiply in bf16 (like production
#            kernels do): each rounding is ~2^-9 relative and the delta rule's prediction error
#            v - S^T k cancels, which amplifies them. On the H100 this gives 2e-3 to 4e-3 (the same
#            as flash-linear-attention); here 1e-2 to 2e-2, because Triton's interpreter converts
#            float32 to bf16 by truncation, not round-to-nearest (half the values land one ulp off).
F32_TOL = 1e-4
BF16_TOL = 5e-2
STRONG, WEAK = (-5.0, -3.0), (-0.02, -0.005)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, decay, dtype=torch.float32, with_h0=True, seed=0):
    """Inputs like a GDN layer makes them: L2-normalised q, k; v ~ N(0, 1); log decays g uniform in
    `decay` (float32, <= 0); beta = sigmoid(randn) (float32); h0 ~ N(0, 1) or None."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(DEVICE, dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(DEVICE, dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(DEVICE, dtype)
    lo, hi = decay
    g = (lo + (hi - lo) * torch.rand(B, T, H, generator=gen)).to(DEVICE)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen)).to(DEVICE)
    torch.manual_seed(seed)
    h0 = torch.randn(B, H, K, V).to(DEVICE) if with_h0 else None
    return q, k, v, g, beta, h0


def randn(*shape):
    """torch.randn on the CPU's global generator (seeded by the caller), moved to DEVICE."""
    return torch.randn(*shape).to(DEVICE)


def run_with_grads(fn, q, k, v, g, beta, h0, do, dht, **kw):
    """o, final state and the gradients of <o, do> + <state, dht> w.r.t. every input."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]
    h0 = None if h0 is None else h0.detach().clone().requires_grad_()
    o, ht = fn(*leaves, initial_state=h0, **kw)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    grads = [x.grad for x in leaves] + ([] if h0 is None else [h0.grad])
    return o, ht, grads


GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")

# (T, chunk, initial state, decay, K, V): every T, every chunk size, both decays, with and without
# a state, a few head dims (powers of two and not); B = 2, H = 2.
CASES = [
    (1, 16, True, STRONG, 16, 16),
    (15, 32, False, WEAK, 16, 16),
    (15, 64, True, STRONG, 16, 32) if DEVICE.type == "cpu" else (15, 64, True, STRONG, 24, 40),   # GPU: K, V of a case below
    (64, 64, True, WEAK, 32, 16),
    (64, 16, False, STRONG, 16, 16),
    (100, 32, True, STRONG, 16, 16),
    (100, 64, False, WEAK, 24, 40),
    (200, 16, True, WEAK, 16, 16),
    (200, 64, True, STRONG, 16, 16),
    (200, 32, False, WEAK, 32, 32),
    (64, 16, True, WEAK, 8, 8),          # train_shakespeare's GDN: 2 heads of key dim 8 (tiles padded to 16)
]


@pytest.mark.parametrize("T,L,with_h0,decay,K,V", CASES)
def test_chunked_matches_reference_fp32(T, L, with_h0, decay, K, V):
    q, k, v, g, beta, h0 = make_inputs(2, T, 2, K, V, decay, with_h0=with_h0, seed=T + L)
    do = randn(2, T, 2, V)
    dht = randn(2, 2, K, V)
    o, ht, grads = run_with_grads(kernels.gated_delta_rule, q, k, v, g, beta, h0, do, dht, chunk_size=L)
    o_ref, ht_ref, grads_ref = run_with_grads(tiny_hybrid.gated_delta_rule, q, k, v, g, beta, h0, do, dht,
                                              chunk_size=L)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32 and o.shape == (2, T, 2, V)
    assert rel_err(o, o_ref) < F32_TOL
    assert rel_err(ht, ht_ref) < F32_TOL
    for name, a, b in zip(GRAD_NAMES, grads, grads_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) < F32_TOL, f"{name}: {rel_err(a, b):.2e}"


def test_chunked_matches_recurrent_definition():
    """Also against the token-by-token definition (not only the reference's chunked form)."""
    q, k, v, g, beta, h0 = make_inputs(1, 50, 2, 16, 16, (-1.0, -0.01), seed=3)
    o, ht = kernels.gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, chunk_size=16)
    o_ref, ht_ref = tiny_hybrid.gated_delta_rule_recurrent(q, k, v, g, beta, scale=0.3, initial_state=h0)
    assert rel_err(o, o_ref) < F32_TOL and rel_err(ht, ht_ref) < F32_TOL


def test_chunked_near_duplicate_keys():
    """The hard case for the UT transform: no decay, beta near 1, almost parallel keys, so that
    I + A is far from the identity. Checked against the float32 reference like the rest."""
    torch.manual_seed(0)
    base = randn(1, 1, 2, 16)
    k = torch.nn.functional.normalize(base + 0.01 * randn(1, 128, 2, 16), dim=-1)
    q = torch.nn.functional.normalize(randn(1, 128, 2, 16), dim=-1)
    v = randn(1, 128, 2, 16)
    g, beta = torch.zeros(1, 128, 2, device=DEVICE), torch.full((1, 128, 2), 0.99, device=DEVICE)
    o, ht = kernels.gated_delta_rule(q, k, v, g, beta, chunk_size=64)
    o_ref, ht_ref = tiny_hybrid.gated_delta_rule(q, k, v, g, beta, chunk_size=64)
    assert rel_err(o, o_ref) < F32_TOL and rel_err(ht, ht_ref) < F32_TOL


def test_chunked_bf16_close():
    q, k, v, g, beta, h0 = make_inputs(1, 100, 2, 32, 32, (-0.5, -0.01), dtype=torch.bfloat16,
                                       seed=7)
    do = randn(1, 100, 2, 32)
    dht = randn(1, 2, 32, 32)
    beta = beta.to(torch.bfloat16)
    o, ht, grads = run_with_grads(kernels.gated_delta_rule, q, k, v, g, beta, h0, do, dht, chunk_size=32)
    o_ref, ht_ref, grads_ref = run_with_grads(tiny_hybrid.gated_delta_rule, q, k, v, g, beta, h0, do, dht,
                                              chunk_size=32)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert rel_err(o, o_ref) < BF16_TOL and rel_err(ht, ht_ref) < BF16_TOL
    for name, a, b in zip(GRAD_NAMES, grads, grads_ref):
        assert a.dtype == b.dtype, name                      # gradients in each input's dtype
        assert rel_err(a, b) < BF16_TOL, f"{name}: {rel_err(a, b):.2e}"


# (B, T, H, K, V, chunk): the first runs everywhere; the others, long, with the largest head dims
# and K != V, where the kernels are compiled.
GDN_LARGEST_ERROR_CASES = [
    (1, 100, 2, 16, 16, 32),
    pytest.param(1, 300, 2, 48, 96, 32, marks=COMPILED_ONLY),
    pytest.param(2, 1000, 4, 64, 64, 64, marks=COMPILED_ONLY),
    pytest.param(2, 777, 4, 128, 128, 64, marks=COMPILED_ONLY),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, H, K, V, L", GDN_LARGEST_ERROR_CASES)
def test_chunked_largest_error_anywhere(B, T, H, K, V, L, dtype):
    """Output, final state and every gradient, measured by their largest error anywhere against
    their largest value, with decays from -1 (forgets within a few tokens) to -0.01 (remembers).
    float32: F32_TOL (exact products; seen: <= 4e-7). bf16 q, k, v: 3e-2, for the reasons of
    BF16_TOL (the kernels store W, U', the chunk states and their gradients in bf16 too, and
    v - S^T k cancels); seen: <= 2.2e-2 in the interpreter, whose bf16 conversion truncates."""
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, (-1.0, -0.01), dtype=dtype, seed=0)
    do, dht = randn(B, T, H, V), randn(B, H, K, V)
    o, ht, grads = run_with_grads(kernels.gated_delta_rule, q, k, v, g, beta, h0, do, dht, chunk_size=L)
    o_ref, ht_ref, grads_ref = run_with_grads(tiny_hybrid.gated_delta_rule, q, k, v, g, beta, h0, do, dht,
                                              chunk_size=L)
    limit = F32_TOL if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("o", "state") + GRAD_NAMES, [o, ht, *grads], [o_ref, ht_ref, *grads_ref]):
        assert max_rel_error(a, b) < limit, f"{name}: {max_rel_error(a, b):.1e}"


def test_chunked_no_tokens():
    """T = 0: empty output, the state passes through (the reference's recurrent form agrees)."""
    q, k, v, g, beta, h0 = make_inputs(1, 0, 2, 16, 16, WEAK, seed=1)
    o, ht = kernels.gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o_ref, ht_ref = tiny_hybrid.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=h0)
    assert o.shape == o_ref.shape and torch.equal(ht, ht_ref)


def test_recurrent_step_matches_reference_step_by_step():
    B, T, H, K, V = 2, 6, 2, 16, 32
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, (-1.0, -0.01), seed=11)
    state = h0.clone()
    state_ref = h0.clone()
    for t in range(T):
        o = kernels.gated_delta_rule_recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        sl = slice(t, t + 1)
        o_ref, state_ref = tiny_hybrid.gated_delta_rule_recurrent(q[:, sl], k[:, sl], v[:, sl], g[:, sl],
                                                         beta[:, sl], initial_state=state_ref)
        assert o.shape == (B, H, V)
        assert rel_err(o, o_ref[:, 0]) < F32_TOL, t
        assert rel_err(state, state_ref) < F32_TOL, t


@pytest.mark.parametrize("with_h0", [True, False])
def test_recurrent_matches_reference(with_h0):
    q, k, v, g, beta, h0 = make_inputs(1, 15, 2, 16, 24, STRONG if with_h0 else WEAK,
                                       with_h0=with_h0, seed=5)
    o, ht = kernels.gated_delta_rule_recurrent(q, k, v, g, beta, scale=0.5, initial_state=h0)
    o_ref, ht_ref = tiny_hybrid.gated_delta_rule_recurrent(q, k, v, g, beta, scale=0.5, initial_state=h0)
    assert rel_err(o, o_ref) < F32_TOL and rel_err(ht, ht_ref) < F32_TOL
    # bf16 in, bf16 out; the recurrent kernel keeps everything else in float32
    args = [x.to(torch.bfloat16) for x in (q, k, v)] + [g, beta]
    o16, ht16 = kernels.gated_delta_rule_recurrent(*args, scale=0.5, initial_state=h0)
    o_ref16, ht_ref16 = tiny_hybrid.gated_delta_rule_recurrent(*args, scale=0.5, initial_state=h0)
    assert o16.dtype == torch.bfloat16
    assert rel_err(o16, o_ref16) < 1e-2 and rel_err(ht16, ht_ref16) < 1e-4


def _bad_inputs():
    """(description, args, kwargs) that the reference rejects."""
    q, k, v, g, beta, h0 = make_inputs(1, 8, 2, 16, 16, WEAK)
    return [
        ("q not a tensor", (q.tolist(), k, v, g, beta), {}),
        ("k 3-d", (q, k[..., 0], v, g, beta), {}),
        ("integer v", (q, k, v.long(), g, beta), {}),
        ("q, k shapes differ", (q[:, :, :1], k, v, g, beta), {}),
        ("v wrong T", (q, k, v[:, :4], g, beta), {}),
        ("g wrong shape", (q, k, v, g[:, :4], beta), {}),
        ("beta wrong heads", (q, k, v, g, beta[..., :1]), {}),
        ("h0 wrong shape", (q, k, v, g, beta), {"initial_state": h0[..., :8]}),
        ("h0 3-d", (q, k, v, g, beta), {"initial_state": h0[0]}),
    ]


@pytest.mark.parametrize("fn_name", ["gated_delta_rule", "gated_delta_rule_recurrent"])
def test_bad_inputs_raise_like_reference(fn_name):
    ours, ref = getattr(kernels, fn_name), getattr(tiny_hybrid, fn_name)
    for what, args, kwargs in _bad_inputs():
        with pytest.raises((TypeError, ValueError)) as expected:
            ref(*args, **kwargs)
        with pytest.raises(expected.type) as got:
            ours(*args, **kwargs)
        assert str(got.value) == str(expected.value), what


def test_bad_chunk_size():
    q, k, v, g, beta, _ = make_inputs(1, 8, 2, 16, 16, WEAK)
    for bad in (0, -16, 16.0, "64"):
        with pytest.raises(ValueError) as expected:
            tiny_hybrid.gated_delta_rule(q, k, v, g, beta, chunk_size=bad)
        with pytest.raises(ValueError) as got:
            kernels.gated_delta_rule(q, k, v, g, beta, chunk_size=bad)
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="chunk_size must be one of"):   # valid for the reference
        kernels.gated_delta_rule(q, k, v, g, beta, chunk_size=48)
    big = randn(1, 8, 2, 256)
    with pytest.raises(ValueError, match="head dim K = 256"):
        kernels.gated_delta_rule(big, big, v, g, beta)


def test_bad_step_inputs():
    q, k, v, g, beta, h0 = make_inputs(1, 1, 2, 16, 16, WEAK)
    args = [q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]]
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        kernels.gated_delta_rule_recurrent_step(*args, h0.double())
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        kernels.gated_delta_rule_recurrent_step(*args, h0.transpose(-1, -2).contiguous().transpose(-1, -2))
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\]"):
        kernels.gated_delta_rule_recurrent_step(*args, h0[..., :8].contiguous())
    with pytest.raises(ValueError, match=r"g must be \[B, H\]"):
        kernels.gated_delta_rule_recurrent_step(*args[:3], g[:, 0, :1], args[4], h0)
    with pytest.raises(ValueError, match="v must have 3 dims"):
        kernels.gated_delta_rule_recurrent_step(args[0], args[1], v, args[3], args[4], h0)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        kernels.gated_delta_rule_recurrent_step(None, *args[1:], h0)
    assert math.isfinite(kernels.gated_delta_rule_recurrent_step(*args, h0.clone()).sum().item())


# =============================================================================================
# The model through the kernels
# =============================================================================================

def _training_loss(model, idx):
    """Logits, and the loss of a training step predicting idx itself, LTE's penalty included."""
    logits, penalty = model(idx)
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()) + penalty


def _model_pair(preset, **overrides):
    settings = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=16, window=8,
                    lte_sink=2, lte_buffer=3, lte_dropout=0.0, gdn_chunk_size=16, nsa_block=4, nsa_topn=3)
    settings.update(overrides)
    torch.manual_seed(0)
    ref = tiny_hybrid.TinyHybrid(tiny_hybrid.Config.preset(preset, **settings)).to(DEVICE)
    fast = tiny_hybrid.TinyHybrid(tiny_hybrid.Config.preset(preset, use_triton=True, **settings)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("preset,overrides", [
    ("gdn+swa", {}), ("gdn+attn", {}), ("gdn+nsa", {}),
    ("gdn+lte", {}),                                    # the cap in training: LTE's rule, visible-until keep
    ("gdn+lte", dict(lte_train_cap=False)),             # the paper's training: every r > 0 kept (bool keep)
])
def test_model_with_triton_equals_reference(preset, overrides):
    """Logits and every parameter gradient; the attention and GDN kernels run in float32 (IEEE)."""
    ref, fast = _model_pair(preset, **overrides)
    idx = torch.randint(0, 61, (2, 37)).to(DEVICE)
    logits_ref, loss_ref = _training_loss(ref, idx)
    logits, loss = _training_loss(fast, idx)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    loss_ref.backward()
    loss.backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("preset", ["gdn+lte", "gdn+attn"])
def test_decoding_with_triton_equals_parallel_reference(preset):
    ref, fast = _model_pair(preset)
    ref.eval(), fast.eval()
    idx = torch.randint(0, 61, (2, 30)).to(DEVICE)
    with torch.no_grad():
        full, _ = ref(idx)
        state = fast.init_state(2, device=DEVICE)
        parts = [fast(idx[:, :11], state=state)[0]] + [fast(idx[:, t: t + 1], state=state)[0] for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


# =============================================================================================
# Native Sparse Attention kernels
# =============================================================================================
# Tolerances: F32 above, for the same reason: exact float32 products (IEEE dots in the interpreter),
# float32 accumulation, only the summation order and the online softmax's rescaling differ (seen:
# <= 8e-6 absolute on gradients of size ~10). One wrong block or key moves outputs by ~1e-2.
# Selection: the kernel's scores differ from the reference's by float32 rounding (~1e-7), so on
# random inputs both select the same blocks; the tests assert that the sets are equal, and the
# selected-attention tests feed the same block_idx to both sides.

def _nsa_inputs(B, T, H, Hkv, D, block, offset=0, dtype=torch.float32, seed=0):
    """q [B, T, H, D] at positions offset.., the keys and values of all offset + T positions,
    their compressed blocks, and gradients for o and lse."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, offset + T, Hkv, D, generator=g)
    v = torch.randn(B, offset + T, Hkv, D, generator=g)
    do = torch.randn(B, T, H, D, generator=g)
    dlse = torch.randn(B, T, H, generator=g)
    q, k, v, do = (x.to(DEVICE, dtype) for x in (q, k, v, do))
    k_cmp, v_cmp = tiny_hybrid.nsa_compress(k, block), tiny_hybrid.nsa_compress(v, block)
    return q, k, v, k_cmp, v_cmp, do, dlse.to(DEVICE)


def _compressed_with_grads(fn, q, k_cmp, v_cmp, do, dlse, block, offset):
    """o, lse and the gradients of <o, do> + <lse, dlse> (rows with lse = -inf left out)."""
    q, k_cmp, v_cmp = (x.detach().clone().requires_grad_() for x in (q, k_cmp, v_cmp))
    o, lse = fn(q, k_cmp, v_cmp, block, offset=offset)
    loss = (o.float() * do.float()).sum() + (torch.where(lse.isfinite(), lse, 0.0) * dlse).sum()
    return (o, lse) + torch.autograd.grad(loss, (q, k_cmp, v_cmp))


NSA_CMP_CASES = [  # (B, T, H, Hkv, D, block, offset)
    (1, 37, 2, 2, 16, 16, 0),       # G = 1, T not a multiple of the block
    (2, 50, 4, 2, 24, 16, 0),       # G = 2, a head dim that is not a power of two
    (1, 80, 8, 2, 16, 4, 0),        # G = 4, 20 compressed blocks: more than one key tile
    (1, 100, 16, 1, 16, 32, 0),     # G = 16
    (1, 130, 4, 1, 32, 64, 0),      # block 64
    (1, 10, 4, 2, 16, 16, 0),       # no block complete yet: o = 0, lse = -inf
    (2, 1, 4, 2, 16, 16, 47),       # decoding: one query at position 47
    (1, 6, 6, 2, 16, 16, 29),       # G = 3, a few queries after a prefix, a block completes inside
]


@pytest.mark.parametrize("B, T, H, Hkv, D, block, offset", NSA_CMP_CASES)
def test_nsa_compressed_attention_matches_reference(B, T, H, Hkv, D, block, offset):
    q, _, _, k_cmp, v_cmp, do, dlse = _nsa_inputs(B, T, H, Hkv, D, block, offset)
    got = _compressed_with_grads(kernels.nsa_compressed_attention, q, k_cmp, v_cmp, do, dlse, block, offset)
    want = _compressed_with_grads(tiny_hybrid.nsa_compressed_attention, q, k_cmp, v_cmp, do, dlse, block, offset)
    assert torch.equal(got[1].isinf(), want[1].isinf())
    for name, a, b in zip(("o", "lse", "dq", "dk_cmp", "dv_cmp"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **F32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("B, T, H, Hkv, D, block, offset", NSA_CMP_CASES)
def test_nsa_block_scores_and_selection_match_reference(B, T, H, Hkv, D, block, offset):
    q, _, _, k_cmp, _, _, _ = _nsa_inputs(B, T, H, Hkv, D, block, offset)
    _, lse = tiny_hybrid.nsa_compressed_attention(q, k_cmp, k_cmp, block, offset=offset)
    got = kernels.nsa_block_scores(q, k_cmp, lse, block, offset=offset)
    want = tiny_hybrid.nsa_block_scores(q, k_cmp, lse, block, offset=offset)
    torch.testing.assert_close(got, want, **F32)
    top_n = 4
    assert torch.equal(tiny_hybrid.nsa_select_blocks(got, block, top_n, 1, offset=offset),
                       tiny_hybrid.nsa_select_blocks(want, block, top_n, 1, offset=offset))


def _selected_with_grads(fn, q, k, v, do, block_idx, block):
    return _forward_backward(fn, q, k, v, do, block_idx=block_idx, block=block)


NSA_SLC_CASES = [  # (B, T, H, Hkv, D, block, top_n, n_recent)
    (1, 37, 2, 2, 16, 16, 2, 1),    # G = 1, T not a multiple of the block
    (2, 70, 4, 2, 16, 16, 3, 1),    # G = 2
    (1, 100, 8, 2, 32, 32, 3, 2),   # G = 4, block 32
    (1, 100, 16, 1, 16, 64, 2, 1),  # G = 16, block 64 (one complete block, one partial)
    (1, 45, 6, 2, 24, 8, 4, 2),     # G = 3 (rows of a tile left over), block 8
]


@pytest.mark.parametrize("B, T, H, Hkv, D, block, top_n, n_recent", NSA_SLC_CASES)
def test_nsa_selected_attention_matches_reference(B, T, H, Hkv, D, block, top_n, n_recent):
    """On the blocks NSA selects (the kernel's scores, checked equal to the reference's above)."""
    q, k, v, k_cmp, v_cmp, do, _ = _nsa_inputs(B, T, H, Hkv, D, block)
    _, lse = kernels.nsa_compressed_attention(q, k_cmp, v_cmp, block)
    block_idx = tiny_hybrid.nsa_select_blocks(kernels.nsa_block_scores(q, k_cmp, lse, block), block, top_n, n_recent)
    got = _selected_with_grads(kernels.nsa_selected_attention, q, k, v, do, block_idx, block)
    want = _selected_with_grads(tiny_hybrid.nsa_selected_attention, q, k, v, do, block_idx, block)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **F32, msg=lambda m, name=name: f"{name}: {m}")


def test_nsa_selected_attention_any_block_idx():
    """Indices the reference ignores or reads causally: -1, out of range, repeated, future blocks;
    each token keeps its own block in slot 0 so that it sees at least itself. A custom scale."""
    B, T, H, Hkv, D, block = 2, 60, 4, 2, 16, 8
    q, k, v, _, _, do, _ = _nsa_inputs(B, T, H, Hkv, D, block)
    g = torch.Generator().manual_seed(4)
    block_idx = torch.randint(-2, T // block + 3, (B, T, Hkv, 5), generator=g)
    block_idx[..., 0] = (torch.arange(T) // block)[None, :, None]
    block_idx[..., 4] = block_idx[..., 3]                                  # a repeated block
    block_idx = block_idx.to(DEVICE)
    got = _forward_backward(kernels.nsa_selected_attention, q, k, v, do, block_idx=block_idx, block=block, scale=0.4)
    want = _forward_backward(tiny_hybrid.nsa_selected_attention, q, k, v, do, block_idx=block_idx, block=block,
                             scale=0.4)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **F32, msg=lambda m, name=name: f"{name}: {m}")


def test_nsa_block_lists_invert_the_selection():
    """The lists the selected dK, dV kernel walks: per (batch, KV head, block) the tokens that chose
    it, in order; entries without a block go to the last list of their (batch, KV head)."""
    B, T, Hkv, n, n_blocks = 2, 30, 2, 3, 4
    g = torch.Generator().manual_seed(6)
    idx = kernels._nsa_clean_selection(torch.randint(-1, n_blocks + 1, (B, T, Hkv, n), generator=g).to(DEVICE), n_blocks)
    tokens, starts = kernels._nsa_block_lists(idx, n_blocks)
    for b in range(B):
        for h in range(Hkv):
            for c in range(n_blocks):
                i = (b * Hkv + h) * (n_blocks + 1) + c
                want = torch.nonzero((idx[b, :, h] == c).any(dim=-1)).flatten()
                assert torch.equal(tokens[starts[i]: starts[i + 1]].long(), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nsa_low_precision(dtype):
    """16-bit in, same dtype out (and gradients), close to the float32 reference on the same inputs
    (LOW_PRECISION_REL, as for attention)."""
    B, T, H, Hkv, D, block = 1, 64, 4, 2, 16, 16
    q, k, v, k_cmp, v_cmp, do, dlse = _nsa_inputs(B, T, H, Hkv, D, block, dtype=dtype)
    got = _compressed_with_grads(kernels.nsa_compressed_attention, q, k_cmp, v_cmp, do, dlse, block, 0)
    want = _compressed_with_grads(tiny_hybrid.nsa_compressed_attention, *(x.float() for x in (q, k_cmp, v_cmp, do)),
                                  dlse, block, 0)
    block_idx = tiny_hybrid.nsa_select_blocks(tiny_hybrid.nsa_block_scores(q.float(), k_cmp.float(), want[1], block),
                                              block, 3, 1)
    got += _forward_backward(kernels.nsa_selected_attention, q, k, v, do, block_idx=block_idx, block=block)
    want += _forward_backward(tiny_hybrid.nsa_selected_attention, *(x.float() for x in (q, k, v, do)),
                              block_idx=block_idx, block=block)
    names = ("o_cmp", "lse", "dq", "dk_cmp", "dv_cmp", "o_slc", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        finite = b.isfinite()
        rel = (a.float() - b)[finite].abs().max() / b[finite].abs().max()
        assert rel < LOW_PRECISION_REL, f"{name}: relative error {rel:.2e}"


NSA_LONG_CASES = [  # (B, T, H, Hkv, D, block, top_n, dtype)
    (2, 2000, 32, 2, 64, 64, 16, torch.bfloat16),   # the paper's G = 16
    (1, 777, 8, 2, 128, 32, 8, torch.float16),
    (2, 500, 4, 4, 32, 16, 5, torch.float32),
    (1, 600, 2, 1, 64, 16, 6, torch.bfloat16),
]


@COMPILED_ONLY
@pytest.mark.parametrize("B, T, H, Hkv, D, block, top_n, dtype", NSA_LONG_CASES)
def test_nsa_long_sequences(B, T, H, Hkv, D, block, top_n, dtype):
    """Every NSA kernel at GPU tile sizes against the float32 reference on the same (rounded)
    inputs: compressed o, lse and gradients, block scores, the blocks they pick, selected o and
    gradients (on the blocks the reference's scores pick). Largest error anywhere against the
    largest value: float32 1e-4, 16-bit LOW_PRECISION_REL. The picks: all equal in float32; in
    16-bit the scores' rounding may flip near-ties, for under 1% of (token, KV head) pairs."""
    q, k, v, k_cmp, v_cmp, do, dlse = _nsa_inputs(B, T, H, Hkv, D, block, dtype=dtype)
    got = _compressed_with_grads(kernels.nsa_compressed_attention, q, k_cmp, v_cmp, do, dlse, block, 0)
    want = _compressed_with_grads(tiny_hybrid.nsa_compressed_attention, *(x.float() for x in (q, k_cmp, v_cmp, do)),
                                  dlse, block, 0)
    scores_ref = tiny_hybrid.nsa_block_scores(q.float(), k_cmp.float(), want[1], block)
    scores = kernels.nsa_block_scores(q, k_cmp, want[1], block)
    block_idx = tiny_hybrid.nsa_select_blocks(scores_ref, block, top_n)
    picked = tiny_hybrid.nsa_select_blocks(scores, block, top_n)
    differ = (picked.sort(-1).values != block_idx.sort(-1).values).any(-1).float().mean().item()
    assert differ < (1e-6 if dtype == torch.float32 else 1e-2)
    got += (scores,) + _selected_with_grads(kernels.nsa_selected_attention, q, k, v, do, block_idx, block)
    want += (scores_ref,) + _selected_with_grads(tiny_hybrid.nsa_selected_attention,
                                                 *(x.float() for x in (q, k, v, do)), block_idx, block)
    limit = 1e-4 if dtype == torch.float32 else LOW_PRECISION_REL
    names = ("o_cmp", "lse", "dq_cmp", "dk_cmp", "dv_cmp", "scores", "o_slc", "dq_slc", "dk", "dv")
    for name, a, b in zip(names, got, want):
        # lse = -inf where no block is complete yet, in both
        err = max_rel_error(a.float().nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0))
        assert err < limit, f"{name}: {err:.1e}"


NSA_STAGES_CASES = [  # (B, T, H, Hkv, D, block, top_n): G = 1 to 16, D = 64 and 128, blocks 16 to 64
    (2, 2000, 32, 2, 64, 64, 16), (1, 4100, 16, 1, 128, 64, 16), (2, 1500, 8, 2, 64, 32, 8),
    (1, 1000, 4, 2, 128, 16, 6), (2, 777, 2, 2, 64, 16, 5), (1, 3000, 6, 2, 64, 64, 4),
]


@COMPILED_ONLY
@pytest.mark.parametrize("B, T, H, Hkv, D, block, top_n", NSA_STAGES_CASES)
def test_nsa_selected_stages_of_the_table(B, T, H, Hkv, D, block, top_n, monkeypatch):
    """NSA's selected-branch forward and dQ kernels run with the num_stages of NSA_GPU_BLOCKS["slc"]
    (1), the setting that gave wrong bf16 gradients and illegal memory accesses in Gated DeltaNet's
    backward (Triton 3.6, H200; kernels._gdn_num_stages). bf16 forward + backward three times over:
    o, dq, dk, dv against the float32 reference (LOW_PRECISION_REL), and o, dq (the two kernels the
    setting launches; no atomics) against the same launches with num_stages=3, which must agree to
    1e-3 of the largest value (pipelining moves loads, not arithmetic). Compiles a second variant
    of both kernels."""
    q, k, v, k_cmp, v_cmp, do, _ = _nsa_inputs(B, T, H, Hkv, D, block, dtype=torch.bfloat16)
    _, lse = tiny_hybrid.nsa_compressed_attention(q.float(), k_cmp.float(), v_cmp.float(), block)
    block_idx = tiny_hybrid.nsa_select_blocks(tiny_hybrid.nsa_block_scores(q.float(), k_cmp.float(), lse, block),
                                              block, top_n)
    want = _selected_with_grads(tiny_hybrid.nsa_selected_attention, *(x.float() for x in (q, k, v, do)),
                                block_idx, block)
    table = kernels.NSA_GPU_BLOCKS["slc"]
    runs = {}
    for stages in (table["num_stages"], 3):
        monkeypatch.setitem(kernels.NSA_GPU_BLOCKS, "slc", dict(table, num_stages=stages))
        runs[stages] = [_selected_with_grads(kernels.nsa_selected_attention, q, k, v, do, block_idx, block)
                        for _ in range(3)]
        torch.cuda.synchronize()  # an illegal memory access surfaces here at the latest
    for tabled, staged in zip(runs[table["num_stages"]], runs[3]):
        for name, a, b in zip(("o", "dq", "dk", "dv"), tabled, want):
            assert max_rel_error(a, b) < LOW_PRECISION_REL, f"{name}: {max_rel_error(a, b):.1e}"
        for name, a, b in zip(("o", "dq"), tabled, staged):
            assert max_rel_error(a, b) < 1e-3, f"{name} vs num_stages=3: {max_rel_error(a, b):.1e}"


def _bad_nsa_calls():
    q, k, v, k_cmp, v_cmp, _, _ = _nsa_inputs(1, 16, 4, 2, 16, 4)
    idx = torch.zeros(1, 16, 2, 2, dtype=torch.long, device=DEVICE)
    cmp, slc = kernels.nsa_compressed_attention, kernels.nsa_selected_attention
    return [  # (call, what the message must name)
        (lambda: cmp(q, k_cmp, v_cmp, 0), "block"),
        (lambda: cmp(q, k_cmp, v_cmp, 4.0), "block"),
        (lambda: cmp(q, k_cmp, v_cmp, 4, offset=-1), "offset"),
        (lambda: cmp(q, k_cmp[0], v_cmp, 4), "k_cmp"),
        (lambda: cmp(q, k_cmp, v_cmp[:, :2], 4), "v_cmp"),
        (lambda: cmp(q, k_cmp[..., :8], v_cmp[..., :8], 4), "k_cmp"),
        (lambda: cmp(q[:, :, :3], k_cmp, v_cmp, 4), "heads"),
        (lambda: slc(q, k, v, idx.float(), 4), "block_idx"),
        (lambda: slc(q, k, v, idx[:, :5], 4), "block_idx"),
        (lambda: slc(q, k, v, idx, 0), "block"),
        (lambda: slc(q, k[:, :5], v[:, :5], idx, 4), "q"),
        (lambda: kernels.nsa_block_scores(q, k_cmp, torch.zeros(1, 16, 3, device=DEVICE), 4), "lse"),
    ]


@pytest.mark.parametrize("i", range(12))
def test_nsa_bad_inputs_are_named(i):
    call, name = _bad_nsa_calls()[i]
    with pytest.raises((TypeError, ValueError), match=name):
        call()


def _nsa_model_pair(**overrides):
    """A small gdn+nsa model, reference and Triton, where the score-based choice matters: 8 blocks
    of 8 tokens at T=48, top 4 with the first and one recent block forced, G = 4."""
    settings = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=1, head_dim=16, window=8,
                    gdn_chunk_size=16, nsa_block=8, nsa_topn=4, nsa_recent=1)
    settings.update(overrides)
    torch.manual_seed(0)
    ref = tiny_hybrid.TinyHybrid(tiny_hybrid.Config.preset("gdn+nsa", **settings)).to(DEVICE)
    fast = tiny_hybrid.TinyHybrid(tiny_hybrid.Config.preset("gdn+nsa", use_triton=True, **settings)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_nsa_model_with_triton_equals_reference():
    """Logits and every parameter gradient (the gates' included) of a gdn+nsa model."""
    ref, fast = _nsa_model_pair()
    idx = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits_ref, loss_ref = _training_loss(ref, idx)
    logits, loss = _training_loss(fast, idx)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    loss_ref.backward()
    loss.backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_nsa_decoding_with_triton_equals_parallel_reference():
    """Prefill then token by token through the kernels (compressed attention and scores at an
    offset, the selected and window branches through attention_decode) == the parallel reference."""
    ref, fast = _nsa_model_pair()
    ref.eval(), fast.eval()
    idx = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        full, _ = ref(idx)
        state = fast.init_state(2, device=DEVICE)
        parts = [fast(idx[:, :13], state=state)[0]] + [fast(idx[:, t: t + 1], state=state)[0] for t in range(13, 32)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


# =============================================================================================
# LTE's buffer rule
# =============================================================================================

from test_tiny_hybrid import LTE_RULE_CASES, assert_lte_rule_matches_stream  # noqa: E402


def _tied_scores(g, shape):
    """Scores in steps of 1/16 from -0.25 to 0.5: many exact ties; 5 values in 13 are <= 0 (never
    offered to the buffer)."""
    return torch.randint(-4, 9, shape, generator=g).float() / 16


# The reference's cases, and one for the kernel's tiles: ties across several tiles of 32 tokens
# competing for a buffer of 16.
LTE_KERNEL_CASES = {**LTE_RULE_CASES, "tied, buffer 16": (2, 300, 2, 7, 4, 16, _tied_scores)}


@pytest.mark.parametrize("case", LTE_KERNEL_CASES)
def test_lte_visible_until_kernel_equals_the_streaming_rule(case):
    """The kernel counts beaters pairwise, the reference tracks a running order statistic: two
    different computations of one rule, each checked against the token-by-token oracle, exactly."""
    B, T, Hkv, w, s, b, make = LTE_KERNEL_CASES[case]
    scores = make(torch.Generator().manual_seed(0), (B, T, Hkv)).to(DEVICE)
    until = kernels.lte_visible_until(scores, w, s, b)     # once: the interpreter takes seconds at T = 300
    assert_lte_rule_matches_stream(scores, w, s, b, rule=lambda *_: until)
    assert torch.equal(until, tiny_hybrid.lte_visible_until(scores, w, s, b))


@COMPILED_ONLY
@pytest.mark.parametrize("scores", ["random", "tied"])
@pytest.mark.parametrize("B, T", [(4, 2048), (4, 8192), (1, 65536)])
def test_lte_visible_until_kernel_long_sequences(B, T, scores):
    """At the paper's budget (w = 512, s = 4, b = 256, Hkv = 2), up to 64K tokens: equal to the
    reference exactly (test_tiny_hybrid.py holds the reference to the token-by-token rule at 64K)."""
    g = torch.Generator().manual_seed(T)
    r = torch.randn(B, T, 2, generator=g) * 0.2 if scores == "random" else _tied_scores(g, (B, T, 2))
    r = r.to(DEVICE)
    assert torch.equal(kernels.lte_visible_until(r, 512, 4, 256), tiny_hybrid.lte_visible_until(r, 512, 4, 256))


def test_keep_forever_is_tiny_hybrids():
    """kernels.py restates the sentinel rather than import the model's file."""
    assert kernels.KEEP_FOREVER == tiny_hybrid.KEEP_FOREVER


@pytest.mark.parametrize("bad", [
    dict(scores=torch.zeros(2, 5, device=DEVICE)), dict(scores=torch.zeros(1, 0, 1, device=DEVICE)),
    dict(window=-1), dict(sink=1.5),
    dict(buffer=-2), dict(buffer=True),
])
def test_lte_visible_until_kernel_rejects_what_the_reference_rejects(bad):
    args = dict(scores=torch.zeros(1, 5, 1, device=DEVICE), window=2, sink=1, buffer=2) | bad
    with pytest.raises((ValueError, TypeError)) as want:
        tiny_hybrid.lte_visible_until(**args)
    with pytest.raises(type(want.value), match=re.escape(str(want.value))):
        kernels.lte_visible_until(**args)


# =============================================================================================
# The precision rule: float32 in means exact float32 products, unless the caller allows tf32
# =============================================================================================

def _run_float32_ops():
    """A small float32 forward and backward of every op that multiplies matrices."""
    B, T, H, Hkv, D, block = 1, 40, 4, 2, 16, 8
    q, k, v, do = _inputs(B, T, H, Hkv, D)
    _forward_backward(kernels.attention, q, k, v, do, window=4, keep=_keep("random", B, T, Hkv))
    kernels.attention_decode(q[:, -1], k, v)
    gdn = make_inputs(B, T, 2, 16, 16, WEAK)
    run_with_grads(kernels.gated_delta_rule, *gdn, randn(B, T, 2, 16), randn(B, 2, 16, 16), chunk_size=16)
    k_cmp, v_cmp = tiny_hybrid.nsa_compress(k, block), tiny_hybrid.nsa_compress(v, block)
    _, lse = kernels.nsa_compressed_attention(q, k_cmp, v_cmp, block)
    _compressed_with_grads(kernels.nsa_compressed_attention, q, k_cmp, v_cmp, do, randn(B, T, H), block, 0)
    scores = kernels.nsa_block_scores(q, k_cmp, lse, block)
    block_idx = tiny_hybrid.nsa_select_blocks(scores, block, 2, 1)
    _forward_backward(kernels.nsa_selected_attention, q, k, v, do, block_idx=block_idx, block=block)


def _launch_precisions(monkeypatch) -> dict:
    """{kernel name: the PRECISION values it was launched with} over _run_float32_ops."""
    import inspect
    from triton.runtime.interpreter import InterpretedFunction
    seen = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        if "PRECISION" in inspect.signature(self.fn).parameters:
            launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup", "num_warps", "num_stages")}
            precision = inspect.signature(self.fn).bind(*args, **launch).arguments["PRECISION"]
            seen.setdefault(self.fn.__name__, set()).add(precision)
        return run(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(InterpretedFunction, "run", recording_run)
        _run_float32_ops()
    return seen


@pytest.mark.skipif(not kernels.INTERPRET, reason="records the launches through Triton's interpreter")
def test_float32_means_exact_products_unless_the_caller_allows_tf32(monkeypatch):
    """Every kernel that multiplies gets PRECISION "ieee" for float32 inputs, Gated DeltaNet's
    included; with PyTorch's own tf32 switch on, every one gets "tf32"."""
    with_products = {name for name, fn in vars(kernels).items()
                     if name.endswith("_kernel") and "PRECISION" in getattr(fn, "arg_names", ())}
    assert {"_gdn_ut_kernel", "_attn_fwd_kernel", "_decode_split_kernel", "_nsa_slc_fwd_kernel"} <= with_products
    assert _launch_precisions(monkeypatch) == {name: {"ieee"} for name in with_products}
    # Switched and restored by hand: cuBLAS's switches are computed attributes that monkeypatch
    # (pytest >= 9) cannot restore, and torch >= 2.9 refuses to read the legacy allow_tf32 once
    # the current fp32_precision has been set.
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        assert kernels._tf32_allowed()
        assert _launch_precisions(monkeypatch) == {name: {"tf32"} for name in with_products}
    finally:
        matmul.fp32_precision = before


def test_tf32_switches_are_pytorchs():
    """set_float32_matmul_precision("high") allows tf32 like allow_tf32 does; "highest" forbids it."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert kernels._tf32_allowed() and kernels._dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert not kernels._tf32_allowed() and kernels._dot_precision(torch.float32) == "ieee"
        assert kernels._dot_precision(torch.bfloat16) == "tf32"      # 16-bit: the tensor cores' own dtype
    finally:
        torch.set_float32_matmul_precision(before)


# =============================================================================================
# The scripts, run the way a user runs them
# =============================================================================================
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).parent


def _run_script(*args, timeout=300):
    """python <args> in a subprocess, with the environment a user has (no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_python_kernels_py_gives_the_checks_verdict():
    """The tour runs this file's tests (here two quick ones, by -k, or it would start itself again)
    and says whether they passed, with its exit code; without a GPU it says why no benchmark runs
    (with one, --check-only leaves the benchmarks to bench.py's own tests)."""
    few = ["-k", "keep_forever_is or imports_no_model"]
    run = _run_script("kernels.py", *few, *([] if kernels.INTERPRET else ["--check-only"]))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\b2 passed\b", run.stdout) and "checks: all passed" in run.stdout
    if kernels.INTERPRET:
        assert "no CUDA GPU: benchmarks skipped" in run.stdout


@pytest.mark.parametrize("interpret", [True, False])
@pytest.mark.parametrize("checks_rc, bench_rc", [(0, 0), (1, 0), (0, 1)])
def test_python_kernels_py_exit_code_and_benchmark_flags(monkeypatch, capsys, interpret, checks_rc, bench_rc):
    """The tour with its two commands faked (pytest ran for real above; bench.py's kernels command
    needs a GPU): it exits non-zero when either fails, hands --full, --tune and --budget-s to
    bench.py on a GPU, and runs no benchmark without one or with --check-only."""
    commands = []

    def fake_run(command, cwd):
        commands.append(command[1:])
        return subprocess.CompletedProcess(command, checks_rc if len(commands) == 1 else bench_rc)
    monkeypatch.setattr(kernels, "INTERPRET", interpret)
    monkeypatch.setattr(kernels.subprocess, "run", fake_run)
    for check_only in ([], ["--check-only"]):
        commands.clear()
        argv = ["kernels.py", "-k", "attention", "--full", "--tune", "--budget-s", "30", *check_only]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            kernels.main()
        out = capsys.readouterr().out
        assert commands[0] == ["-m", "pytest", "-q", "test_kernels.py", "-k", "attention"]
        assert ("checks: all passed" if checks_rc == 0 else "checks: FAILED") in out
        if interpret or check_only:
            assert commands[1:] == []
            assert ("no CUDA GPU: benchmarks skipped" in out) == (interpret and not check_only)
            assert done.value.code == (0 if checks_rc == 0 else 1)
        else:
            assert commands[1:] == [["bench.py", "kernels", "--full", "--tune", "--budget-s", "30.0"]]
            assert done.value.code == (0 if checks_rc == bench_rc == 0 else 1)


def test_kernels_py_imports_no_model_code():
    """kernels.py imports torch, Triton, checks.py and the standard library, nowhere anything
    else (no function imports tiny_hybrid or bench lazily either): no import circle."""
    import ast
    tree = ast.parse((HERE / "kernels.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    top = {name.split(".")[0] for name in imported} - set(sys.stdlib_module_names) - {"__future__"}
    assert top == {"torch", "triton", "checks"}


def test_scripts_refuse_bad_flags_in_one_line():
    run = _run_script("kernels.py", "--budget-s", "0")
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].endswith("--budget-s must be > 0, got 0.0")
    assert "Traceback" not in run.stderr
    run = _run_script("bench.py", "decode", "--full")
    assert run.returncode == 2 and "apply to 'kernels' only" in run.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_bench_py_kernels_needs_a_gpu():
    """The kernel benchmarks time GPU kernels: without one, one clear line and exit code 2, before any work."""
    run = _run_script("bench.py", "kernels", "--out", str(HERE / "out" / "never_written"))
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "kernels: the kernel benchmarks time Triton kernels on a CUDA GPU" in last and "Traceback" not in run.stderr
    assert not (HERE / "out" / "never_written").exists()
