"""kernels.py against the reference ops of tiny_hybrid.py: forward, gradients, decoding, errors.

Without a CUDA GPU the kernels run in Triton's interpreter, so shapes here are small (D=16, B<=2).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton must see this at its first import (kernels.py explains); set it before importorskip.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")  # Triton ships for Linux only

import kernels  # noqa: E402
import tiny_hybrid  # noqa: E402

DEVICE = "cpu" if kernels.INTERPRET else "cuda"

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
    (1, 100, 4, 1, 16, 16, "all"),
    (2, 100, 2, 2, 16, None, None),
    (1, 100, 2, 1, 32, 0, "until"),
    (1, 257, 4, 1, 16, 16, "random"),     # the hardest: many blocks, kept columns, GQA 4
    (1, 257, 2, 1, 16, 63, "until"),
    (1, 257, 2, 2, 16, None, None),
    (1, 257, 2, 1, 16, 16, None),
]


@pytest.mark.parametrize("B, T, H, Hkv, D, window, keep", CASES)
def test_attention_matches_reference(B, T, H, Hkv, D, window, keep):
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
])
def test_attention_decode_matches_reference(H, Hkv, D, S, dtype):
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
        else:  # the reference rounds its float32 result to bf16 too: at most ~2 bf16 steps apart
            assert ((got.float() - want.float()).abs().max() / want.float().abs().max()) < LOW_PRECISION_REL


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
    """What only the kernels refuse: head dims past 128."""
    q = torch.randn(1, 4, 1, 136, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 128"):
        kernels.attention(q, q, q)
