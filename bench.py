"""End-to-end measurements of tiny-hybrid models.

    python bench.py decode      per-token decode latency, eager and captured (CUDA graph), and state
                                memory against context length; tokens/s at a large batch
    python bench.py train       training-step time, PyTorch reference vs Triton kernels (and gdn+lte
                                with its inference cap applied in training)
    python bench.py prefill     prefill time: a prompt of N tokens into a fresh decoding state
    python bench.py lte-rule    LTE's buffer rule alone (lte_visible_until): parallel reference,
                                Triton kernel, and the rule replayed token by token as decoding does
    python bench.py             all of the above
    python bench.py kernels     each Triton kernel of kernels.py against its reference and the fastest
                                baselines (CUDA GPU only): a headline shape per op, --full for every
                                table of docs/kernels.md, --tune to pick attention tiles first

Decode: a context of N tokens is represented by a state of the size N tokens leave behind, filled
with random numbers (prefilling 64K tokens through the O(T^2) reference would not fit in memory,
and a step's cost depends on the state's size, not its contents). Each step is then timed for
real, two ways in the same run: eager (`model(token, state=state)`, Python and one launch per op)
and captured (`Decoder.step`: one CUDA graph replay per token, CUDA only). A time is the median
over 3 rounds of `--steps` back-to-back tokens (one sync per round), after a warm-up. Expected:
flat lines for gdn, gdn+swa and gdn+lte (constant state), growing ones for gdn+nsa and gdn+attn
(their caches are preallocated to the context plus the timed tokens, and a step reads all of it).
Then the same at `--throughput-batch` sequences (64 by default on CUDA), in tokens per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

import tiny_hybrid
from decoder import Decoder
from tiny_hybrid import Config, TinyHybrid

DECODE_PRESETS = ("gdn", "gdn+swa", "gdn+lte", "gdn+nsa", "gdn+attn")


def bench_config(preset: str, **overrides) -> Config:
    """A mid-size model with the paper's proportions scaled down (window 512, buffer 256)."""
    base = dict(vocab_size=4096, n_layer=4, d_model=512, n_head=8, n_kv_head=2, head_dim=64,
                window=512, lte_sink=4, lte_buffer=256, nsa_block=64, nsa_topn=16)
    base.update(overrides)
    return Config.preset(preset, **base)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

def fill_synthetic(model: TinyHybrid, state: list[dict], context: int) -> None:
    """Make `state` (from init_state with max_len > context) the state that `context` tokens leave
    behind, in place, with random contents."""
    for block, layer in zip(model.blocks, state):
        mixer = block.mixer
        for key, value in layer.items():
            if not isinstance(value, torch.Tensor) or key == "pos":
                continue
            if key == "valid" and "max_len" in layer:       # full attention: the first `context` slots
                value.zero_()
                value[:, :context] = True
            elif value.dtype == torch.bool:
                value.fill_(True)
            elif key == "buf_pos":                          # as many retained tokens as could have left
                left = max(0, context - mixer.window - 1 - mixer.sink)
                n = min(left, value.shape[-1])
                value.fill_(-1)
                value[..., :n] = torch.arange(mixer.sink, mixer.sink + n, device=value.device)
            elif key == "buf_score":
                value.uniform_(0.0, 0.5)
            elif value.is_floating_point():
                value.normal_()
        layer["pos"].fill_(context)
        layer["length"] = context


def _label(n: int) -> str:
    """A context length as a column label: 64K, 1000."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ms_per_token(step, steps: int, device, rounds: int = 3, warmup: int = 3) -> float:
    """Median over `rounds` of the mean time of `steps` back-to-back calls of step(), in ms."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(times)


def _decode_max_len(context: int, steps: int) -> int:
    """Room for the context and every token _ms_per_token decodes (3 warm-up + 3 rounds)."""
    return context + 3 + 3 * steps


@torch.no_grad()
def time_decode(model, batch: int, context: int, steps: int, device,
                compile: bool = False) -> tuple[float, float | None, int]:
    """ms per decoded token at a given context, eager and captured (None without CUDA), and the
    state's bytes per sequence."""
    max_len = _decode_max_len(context, steps)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    state = model.init_state(batch, device=device, max_len=max_len)
    fill_synthetic(model, state, context)
    eager = _ms_per_token(lambda: model(token, state=state), steps, device)
    nbytes = TinyHybrid.state_nbytes(state)
    state = None                                         # free the eager cache before capturing
    captured = None
    if device.type == "cuda":
        decoder = Decoder(model, batch, max_len, compile=compile)   # captures its step (on an empty state)
        fill_synthetic(model, decoder.state, context)
        captured = _ms_per_token(lambda: decoder.step(token), steps, device)
        del decoder
        torch.cuda.empty_cache()
    return eager, captured, nbytes


def _timed_or_nan(fn, device):
    """fn(), or NaNs where the device runs out of memory (printed as "-")."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return float("nan"), float("nan"), 0


def _ms(x) -> str:
    return f"{'-':>9s}" if x is None or x != x else f"{x:9.3f}"


def bench_decode(args, device) -> list[dict]:
    rows = []
    captured = "compiled and captured" if args.compile else "captured"
    print(f"\ndecode: batch {args.batch}, {device_name(device)}, use_triton={args.use_triton}, ms per token "
          f"(median of 3 x {args.steps} tokens), eager and {captured} (one CUDA graph replay per token; "
          f"CUDA only), and the state in MB per sequence")
    print(f"{'preset':10s}" + "".join(f"{_label(n) + ' eager':>13s}{'captured':>10s}{'MB':>9s}" for n in args.contexts))
    for preset in args.presets:
        torch.manual_seed(0)
        model = TinyHybrid(bench_config(preset, use_triton=args.use_triton)).to(device).eval()
        line = f"{preset:10s}"
        for context in args.contexts:
            eager, captured, nbytes = _timed_or_nan(
                lambda: time_decode(model, args.batch, context, args.steps, device, args.compile), device)
            rows.append({"preset": preset, "context": context, "batch": args.batch, "compile": args.compile,
                         "eager_ms_per_token": eager, "captured_ms_per_token": captured, "state_bytes": nbytes,
                         "device": device_name(device), "use_triton": args.use_triton})
            line += f"{_ms(eager):>13s}{_ms(captured):>10s}{nbytes / 2**20:9.2f}"
        print(line, flush=True)
    return rows


def bench_decode_throughput(args, device) -> list[dict]:
    """Tokens per second at a large batch (--throughput-batch), eager and captured."""
    batch = args.throughput_batch
    rows = []
    print(f"\ndecode throughput: batch {batch}, {device_name(device)}, use_triton={args.use_triton}, "
          f"tokens per second (batch / time per step), eager and captured")
    print(f"{'preset':10s}" + "".join(f"{_label(n) + ' eager':>13s}{'captured':>10s}" for n in args.contexts))
    tok_s = lambda ms: batch / ms * 1e3 if ms is not None and ms == ms else None
    for preset in args.presets:
        torch.manual_seed(0)
        model = TinyHybrid(bench_config(preset, use_triton=args.use_triton)).to(device).eval()
        line = f"{preset:10s}"
        for context in args.contexts:
            eager, captured, _ = _timed_or_nan(
                lambda: time_decode(model, batch, context, args.steps, device, args.compile), device)
            rows.append({"preset": preset, "context": context, "batch": batch, "compile": args.compile,
                         "eager_tokens_per_s": tok_s(eager),
                         "captured_tokens_per_s": tok_s(captured), "device": device_name(device),
                         "use_triton": args.use_triton})
            cells = [tok_s(eager), tok_s(captured)]
            line += "".join(f"{'-' if c is None else f'{c:.0f}':>{w}s}" for c, w in zip(cells, (13, 10)))
        print(line, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# training throughput
# ---------------------------------------------------------------------------------------------

def _train_variants(presets):
    """(label, preset, overrides) per row: gdn+lte without and with the inference cap in training."""
    for preset in presets:
        if preset == "gdn+lte":   # the paper's training (every r > 0 kept), then with the inference cap
            yield preset, preset, {"lte_train_cap": False}
            yield "gdn+lte cap", preset, {"lte_train_cap": True}
        else:
            yield preset, preset, {}


def _median_ms(fn, steps: int, device, warmup: int = 2) -> float:
    times = []
    for i in range(steps + warmup):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_train(args, device) -> list[dict]:
    rows = []
    print(f"\ntraining step (forward + backward), batch {args.batch}, T {args.train_len}, "
          f"{device_name(device)}: ms per step (tokens/s)")
    modes = [m == "triton" for m in args.modes] if device.type == "cuda" else [False]
    print(f"{'preset':12s}" + "".join(f"{'triton' if m else 'torch':>22s}" for m in modes))
    for label, preset, overrides in _train_variants(args.presets):
        line = f"{label:12s}"
        for use_triton in modes:
            torch.manual_seed(0)
            model = TinyHybrid(bench_config(preset, use_triton=use_triton, **overrides)).to(device)
            idx = torch.randint(0, model.config.vocab_size, (args.batch, args.train_len), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits, penalty = model(idx)
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten()) + penalty
                loss.backward()
            ms = _median_ms(step, args.steps, device)
            tok_s = args.batch * args.train_len / ms * 1e3
            rows.append({"preset": label, "use_triton": use_triton, "ms_per_step": ms, "tokens_per_s": tok_s,
                         "device": device_name(device), "T": args.train_len, "batch": args.batch})
            line += f"{ms:12.1f} ({tok_s:7.0f})"
        print(line, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def bench_prefill(args, device) -> list[dict]:
    """A prompt of N tokens into a fresh decoding state: the eval-mode parallel forward plus filling
    the state. Lengths the PyTorch reference cannot hold in memory print as "-"."""
    rows = []
    print(f"\nprefill, batch {args.batch}, {device_name(device)}, use_triton={args.use_triton}: ms per prompt")
    print(f"{'preset':10s}" + "".join(f"{_label(n):>10s}" for n in args.contexts))
    for preset in args.presets:
        model = TinyHybrid(bench_config(preset, use_triton=args.use_triton)).to(device).eval()
        line = f"{preset:10s}"
        for context in args.contexts:
            idx = torch.randint(0, model.config.vocab_size, (args.batch, context), device=device)

            def prefill():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    model(idx, state=model.init_state(args.batch, device=device))
            try:
                ms = _median_ms(prefill, max(1, args.steps // 4), device, warmup=1)
            except torch.OutOfMemoryError:
                ms = float("nan")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append({"preset": preset, "context": context, "ms": ms, "device": device_name(device),
                         "batch": args.batch, "use_triton": args.use_triton})
            line += f"{ms:10.1f}" if ms == ms else f"{'-':>10s}"
        print(line, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# LTE's buffer rule alone
# ---------------------------------------------------------------------------------------------

def stream_visible_until(scores, window: int, sink: int, buffer: int):
    """LTE's rule replayed token by token with `lte_buffer_push`, as decoding applies it (and as
    the parallel forward used to): one step per token that leaves the window."""
    B, T, Hkv = scores.shape
    until = torch.full((B, T, Hkv), -1, dtype=torch.int64, device=scores.device)
    until[:, :sink] = tiny_hybrid.KEEP_FOREVER
    buf_score = torch.full((B, Hkv, buffer), float("-inf"), device=scores.device)
    buf_pos = torch.full((B, Hkv, buffer), -1, dtype=torch.int64, device=scores.device)
    for j in range(sink, max(sink, T - window - 1)):    # token j leaves as query j + w + 1 arrives
        entered, evicted, _ = tiny_hybrid.lte_buffer_push(buf_score, buf_pos, scores[:, j].float(), j)
        until[:, j] = torch.where(entered, tiny_hybrid.KEEP_FOREVER, -1)
        gone = evicted.clamp(min=0)[:, None, :]                                 # [B, 1, Hkv]
        until.scatter_(1, gone, torch.where(evicted >= 0, j + window, until.gather(1, gone)[:, 0])[:, None])
    return until, buf_score, buf_pos


def bench_lte_rule(args, device) -> list[dict]:
    """lte_visible_until at bench_config's sizes (B = args.batch, Hkv = 2, w = 512, b = 256)."""
    config = bench_config("gdn+lte")
    w, s, b, Hkv = config.window, config.lte_sink, config.lte_buffer, config.n_kv_head
    impls = {"parallel (torch)": tiny_hybrid.lte_visible_until}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        import kernels
        impls["kernel (triton)"] = kernels.lte_visible_until
    impls["token by token"] = stream_visible_until
    rows = []
    print(f"\nLTE buffer rule, B {args.batch}, Hkv {Hkv}, w {w}, b {b}, {device_name(device)}: ms per call")
    print(f"{'implementation':18s}" + "".join(f"{_label(n):>10s}" for n in args.contexts))
    for name, fn in impls.items():
        line = f"{name:18s}"
        for context in args.contexts:
            if name == "token by token" and context > 8192:   # seconds per call: the point is made
                line += f"{'-':>10s}"
                continue
            scores = torch.randn(args.batch, context, Hkv, device=device) * 0.2
            ms = _median_ms(lambda: fn(scores, w, s, b), 1 if name == "token by token" else 5, device, warmup=1)
            rows.append({"implementation": name, "context": context, "ms": ms, "device": device_name(device),
                         "batch": args.batch})
            line += f"{ms:10.2f}"
        print(line, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# kernels: each Triton kernel of kernels.py against the reference and the fastest baselines
# ---------------------------------------------------------------------------------------------
# kernels.py imports Triton and, without a GPU, switches it to its interpreter: every function
# here imports it when called, so that the other measurements need neither.

def _do_bench(fn, rep: int, warmup: int = 10, grad_to_none=None) -> float:
    """Median ms of fn() by triton.testing.do_bench (CUDA events, the L2 cache flushed between calls)."""
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def _bench_ms(fn, backward: bool, inputs, do, rep: int = 60) -> float:
    """Median ms of fn(*inputs) (forward, no autograd), or of its forward + backward."""
    if not backward:
        with torch.no_grad():
            return _do_bench(lambda: fn(*inputs), rep)
    return _do_bench(lambda: fn(*inputs).backward(do), rep, grad_to_none=list(inputs))


def _peak_tflops() -> float:
    """Measured bf16 matmul rate (8192^3), the ceiling for the attention's products."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / _do_bench(lambda: a @ b, rep=100) / 1e9


def _visible_pairs(T: int, window, keep) -> float:
    """(query, key) pairs visible per query head, summed over the batch: the useful work."""
    if window is None or window >= T - 1:
        per_head = T * (T + 1) / 2
    else:
        per_head = (window + 1) * (T - window) + window * (window + 1) / 2
    B, Hkv = (1, 1) if keep is None else (keep.shape[0], keep.shape[2])
    total = per_head * B * Hkv
    if keep is not None:  # a kept key j is also seen by the queries j + w + 1 .. T - 1
        j = torch.arange(T, device=keep.device)[None, :, None]
        total += ((T - 1 - window - j).clamp(min=0) * keep).sum().item()
    return total / (B * Hkv)


def tune_kernel_attention(T: int = 8192, Hkv: int = 8) -> list[dict]:
    """Try a few block configurations of each attention kernel on the LTE pattern; keep the fastest
    in kernels.ATTENTION_GPU_BLOCKS for the rest of the run (and print them, to be written into that table)."""
    import kernels
    B, H, D, window = 4, 8, 64, 512
    q, k, v, do = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=x != "do")
                   for h, x in ((H, "q"), (Hkv, "k"), (Hkv, "v"), (H, "do")))
    keep = torch.rand(B, T, Hkv, device="cuda") < 0.125
    candidates = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)],
        "dq": [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 5)],
        "dkdv": [(64, 128, 8, 3), (32, 128, 4, 5), (64, 64, 4, 3), (64, 128, 4, 3)],
    }
    table = kernels.ATTENTION_GPU_BLOCKS
    rows = []
    for kernel, options in candidates.items():
        timings = []
        for bm, bn, warps, stages in options:
            table[kernel] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            ms = _bench_ms(lambda *x: kernels.attention(*x, window=window, keep=keep), kernel != "fwd", (q, k, v), do)
            timings.append((ms, dict(table[kernel])))
            rows.append(dict(kernel=kernel, **table[kernel], ms=ms))
            print(f"  tune {kernel:5s} BM={bm:3d} BN={bn:3d} warps={warps} stages={stages}: {ms:.3f} ms", flush=True)
        table[kernel] = min(timings, key=lambda t: t[0])[1]
    print(f"  chosen: {table}")
    return rows


def _attention_bench_inputs(B: int, T: int, H: int, Hkv: int, D: int):
    """bf16 q [B, T, H, D], k, v [B, T, Hkv, D] and do for ours, and the same as [B, h, T, D]
    leaf tensors (and do) for flex_attention and SDPA."""
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # [B, h, T, D]
    return (q, k, v), do, (qt, kt, vt), do.transpose(1, 2).contiguous()


def _flex_block_mask(mask_fn, B: int, H: int, T: int):
    """flex_attention's block mask for mask_fn(b, h, q_idx, kv_idx), built compiled."""
    from torch.nn.attention.flex_attention import create_block_mask
    with warnings.catch_warnings():  # _compile=True is deprecated, still the fast path in 2.11
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_block_mask(mask_fn, B, H, T, T, device="cuda", _compile=True)


def bench_kernel_attention(Ts=(8192, 2048, 16384, 4096, 1024), kv_heads=(8, 2), deadline: float = float("inf"),
                           flex: bool = True) -> list[dict]:
    """kernels.attention vs flex_attention (LTE, SWA) and SDPA flash (full causal), bf16, B=4, H=8,
    D=64, w=512. flex=False skips flex_attention, which compiles for every shape (about a minute)."""
    import kernels
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    flex_fn = torch.compile(flex_attention, dynamic=False)
    B, H, D, window = 4, 8, 64, 512
    peak = _peak_tflops()
    try:  # does the flash backend take GQA directly?
        x = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(x, x[:, :2], x[:, :2], is_causal=True, enable_gqa=True)
        flash_gqa = True
    except RuntimeError:
        flash_gqa = False
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    print("attention, bf16, B=4, H=8, D=64, window 512, lte = window + 12.5% random kept columns; ms = median")
    header = (f"{'T':>6} {'Hkv':>3} {'pattern':7} | {'ours fwd':>8} {'base fwd':>8} | {'ours f+b':>8} {'base f+b':>8} "
              f"{'x f+b':>6} | {'TF/s fwd':>8} {'TF/s f+b':>8} {'%peak':>5} | baseline")
    print(header)
    lines, rows = [], []
    for T in Ts:
        for Hkv in kv_heads:
            G = H // Hkv
            (q, k, v), do, (qt, kt, vt), do_t = _attention_bench_inputs(B, T, H, Hkv, D)
            keep = torch.rand(B, T, Hkv, device="cuda") < 0.125
            keep_bh = keep.transpose(1, 2).contiguous()                                       # [B, Hkv, T]

            def lte_mask(b, h, qi, kj):
                return (kj <= qi) & ((qi - kj <= window) | keep_bh[b, h // G, kj])

            def swa_mask(b, h, qi, kj):
                return (kj <= qi) & (qi - kj <= window)

            def sdpa(q_, k_, v_):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    if G > 1 and not flash_gqa:  # flash without GQA support: repeated K/V, timed too
                        k_, v_ = k_.repeat_interleave(G, 1), v_.repeat_interleave(G, 1)
                    return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=G > 1 and flash_gqa)

            for pattern in ("lte", "swa", "causal"):
                w = None if pattern == "causal" else window
                kp = keep if pattern == "lte" else None
                ours = lambda q_, k_, v_: kernels.attention(q_, k_, v_, window=w, keep=kp)
                if pattern == "causal":
                    base = sdpa
                    base_name = "SDPA flash" + ("" if G == 1 else ", enable_gqa" if flash_gqa else ", K/V repeated")
                else:
                    base_name = f"flex {pattern}, enable_gqa" if G > 1 else f"flex {pattern}"
                    bm = _flex_block_mask(lte_mask if pattern == "lte" else swa_mask, B, H, T) if flex else None
                    base = lambda q_, k_, v_, bm=bm: flex_fn(q_, k_, v_, block_mask=bm, enable_gqa=G > 1)
                t = [_bench_ms(ours, False, (q, k, v), do), float("nan"), _bench_ms(ours, True, (q, k, v), do), float("nan")]
                if pattern == "causal" or flex and time.time() < deadline:  # flex compiles per shape: slow
                    t[1] = _bench_ms(base, False, (qt, kt, vt), do_t)
                    t[3] = _bench_ms(base, True, (qt, kt, vt), do_t)
                else:
                    base_name += " (skipped: --full times it)" if not flex else " (skipped: time budget)"
                flops = 4 * D * _visible_pairs(T, w, kp) * B * H
                tf_fwd, tf_fb = flops / t[0] / 1e9, 3.5 * flops / t[2] / 1e9
                line = (f"{T:6d} {Hkv:3d} {pattern:7} | {t[0]:8.3f} {t[1]:8.3f} | {t[2]:8.3f} {t[3]:8.3f} "
                        f"{t[3] / t[2]:6.2f} | {tf_fwd:8.0f} {tf_fb:8.0f} {100 * tf_fb / peak:5.0f} | {base_name}")
                print(line, flush=True)
                lines.append(line)
                rows.append(dict(T=T, Hkv=Hkv, pattern=pattern, ours_fwd_ms=t[0], base_fwd_ms=t[1], ours_fb_ms=t[2],
                                 base_fb_ms=t[3], baseline=base_name, tflops_fb=tf_fb, peak_tflops=peak))
    print("\n" + header + "\n" + "\n".join(sorted(lines, key=lambda r: (int(r.split()[1]), int(r.split()[0])))))
    return rows


def bench_kernel_swa_spread(T: int = 8192, reps: int = 8) -> list[dict]:
    """SWA forward + backward against flex_attention, alternated `reps` times in one process.

    Single medians of this pair drift by up to 2x between measurements on a shared machine, and
    both sides drift together; alternating them and taking the median of the medians compares
    them under the same conditions."""
    import kernels
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    B, H, D, window = 4, 8, 64, 512
    print(f"\nSWA f+b, bf16, B={B}, H={H}, D={D}, T={T}, window {window}: ms per measurement, alternated")
    rows = []
    for Hkv in (8, 2):
        inputs, do, inputs_t, do_t = _attention_bench_inputs(B, T, H, Hkv, D)
        mask = _flex_block_mask(lambda b, h, qi, kj: (kj <= qi) & (qi - kj <= window), B, H, T)
        ours = lambda q_, k_, v_: kernels.attention(q_, k_, v_, window=window)
        base = lambda q_, k_, v_: flex(q_, k_, v_, block_mask=mask, enable_gqa=Hkv < H)
        times = {"ours": [], "flex": []}
        for _ in range(reps):
            times["ours"].append(_bench_ms(ours, True, inputs, do))
            times["flex"].append(_bench_ms(base, True, inputs_t, do_t))
        for name, ms in times.items():
            print(f"Hkv={Hkv} {name}: " + " ".join(f"{x:.3f}" for x in ms) + f" | median {statistics.median(ms):.3f}")
        ratio = statistics.median(times["flex"]) / statistics.median(times["ours"])
        print(f"Hkv={Hkv} flex / ours (medians): {ratio:.2f}x")
        rows.append(dict(T=T, Hkv=Hkv, ours_fb_ms=times["ours"], flex_fb_ms=times["flex"], flex_over_ours=ratio))
    return rows


def bench_kernel_decode() -> list[dict]:
    """One decoding step: kernels.attention_decode vs the reference (einsum + softmax), bf16, B=4,
    H=8 on Hkv=2, D=64."""
    import kernels
    print("\nattention_decode, bf16, B=4, H=8, Hkv=2, D=64, 90% valid slots; ms = median")
    print(f"{'S':>7} | {'ours':>7} {'reference':>9}")
    rows = []
    for S in (1024, 8192, 65536):
        q = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
        kc, vc = (torch.randn(4, S, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        valid = torch.rand(4, S, 2, device="cuda") < 0.9
        ms = [_do_bench(lambda f=f: f(q, kc, vc, valid), rep=50)
              for f in (kernels.attention_decode, tiny_hybrid.attention_decode)]
        print(f"{S:7d} | {ms[0]:7.4f} {ms[1]:9.4f}")
        rows.append(dict(S=S, ours_ms=ms[0], reference_ms=ms[1]))
    return rows


def _gdn_inputs(B: int, T: int, H: int, D: int, dtype):
    """Gated DeltaNet's inputs as a layer makes them, seeded, on the GPU: L2-normalised q, k
    [B, T, H, D] and v in `dtype`; log decays g in [-0.2, -0.005] and beta = sigmoid(randn),
    float32 [B, T, H]."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)
    q, k = (torch.nn.functional.normalize(randn(B, T, H, D), dim=-1).to(dtype) for _ in range(2))
    v = randn(B, T, H, D).to(dtype)
    lo, hi = -0.2, -0.005
    g = lo + (hi - lo) * torch.rand(B, T, H, device="cuda", generator=gen)
    return q, k, v, g, torch.sigmoid(randn(B, T, H))


def bench_kernel_gdn(Ts=(1024, 4096, 16384), dims=(64, 128), B=4, H=8, with_reference=True, with_fla=True) -> list[dict]:
    """Median ms of forward and forward+backward, bf16, for kernels.gated_delta_rule, the PyTorch
    reference and (when importable) flash-linear-attention's chunk_gated_delta_rule."""
    import kernels
    fla_fn = None
    if with_fla:
        try:
            import fla.ops.common.chunk_o as fla_chunk_o
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_fn
            fla_chunk_o.TRITON_ABOVE_3_7_1 = True    # fla's Hopper guard (its issue #640): timing only
        except ImportError:
            fla_fn = None
    impls = {"triton": lambda q, k, v, g, b: kernels.gated_delta_rule(q, k, v, g, b)}
    if with_reference:
        impls["torch ref"] = lambda q, k, v, g, b: tiny_hybrid.gated_delta_rule(q, k, v, g, b)
    if fla_fn is not None:
        impls["fla"] = lambda q, k, v, g, b: fla_fn(q, k, v, g, b, output_final_state=True)
    rows = []
    print(f"\nGated DeltaNet, bf16, B={B}, H={H}, chunk 64; ms = median")
    print(f"{'impl':10s} {'K=V':>4s} {'T':>6s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
    for D in dims:
        for T in Ts:
            q, k, v, g, beta = _gdn_inputs(B, T, H, D, torch.bfloat16)
            beta = beta.to(torch.bfloat16)
            for name, fn in impls.items():
                if name == "torch ref" and T > 4096:
                    continue                                   # minutes and tens of GB: skip
                ins = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
                do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

                def fwd():
                    with torch.no_grad():
                        return fn(*ins)

                def fwd_bwd():
                    o, _ = fn(*ins)
                    o.backward(do)
                t_f = _do_bench(fwd, rep=100, warmup=25)
                t_fb = _do_bench(fwd_bwd, rep=100, warmup=25, grad_to_none=ins)
                rows.append(dict(impl=name, K=D, V=D, T=T, fwd_ms=t_f, fb_ms=t_fb))
                print(f"{name:10s} {D:4d} {T:6d} {t_f:8.3f} {t_fb:11.3f}", flush=True)
    return rows


def _nsa_core(ops, q, k, v, gates, block: int, top_n: int, n_recent: int, window):
    """NativeSparseAttention's work between the projections, with the ops of `ops` (kernels or
    tiny_hybrid): compress, compressed attention, scores, top-n, selected attention, window, gated
    sum. window None leaves the window branch out (what fla's parallel_nsa does without flash-attn)."""
    k_cmp, v_cmp = tiny_hybrid.nsa_compress(k, block), tiny_hybrid.nsa_compress(v, block)
    o_cmp, lse = ops.nsa_compressed_attention(q, k_cmp, v_cmp, block)
    block_idx = tiny_hybrid.nsa_select_blocks(ops.nsa_block_scores(q, k_cmp, lse, block), block, top_n, n_recent)
    o_slc = ops.nsa_selected_attention(q, k, v, block_idx, block)
    if window is None:
        g = gates.to(o_cmp.dtype)
        return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc
    return tiny_hybrid.nsa_combine(gates, o_cmp, o_slc, ops.attention(q, k, v, window=window))


def bench_kernel_nsa(Ts=(2048, 8192, 16384), B=4, H=32, Hkv=2, D=64, block=64, top_n=16, window=512) -> list[dict]:
    """The NSA mixer core (_nsa_core, no projections), bf16, the paper's shapes: ours with and
    without the window branch, the PyTorch reference, and flash-linear-attention's parallel_nsa
    (compressed + selected only: its window branch needs flash-attn). Median ms."""
    import kernels
    try:
        from fla.ops.nsa import parallel_nsa as fla_nsa
    except ImportError:
        fla_nsa = None
        print("\nfla not installed: its column is skipped")
    print(f"\nNSA core, bf16, B={B}, H={H} on Hkv={Hkv}, D={D}, block {block}, {top_n} blocks, window {window}; "
          f"ms = median (fla: no window branch; compare it with 'ours -swa')")
    print(f"{'T':>6} | {'ours fwd':>8} {'-swa':>7} {'ref':>8} {'fla':>7} | {'ours f+b':>8} {'-swa':>7} {'ref':>8} "
          f"{'fla':>7} | ours fwd: cmp scores select slc swa")
    rows = []
    for T in Ts:
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        gates = torch.rand(B, T, H, 3, device="cuda", requires_grad=True)
        do = torch.randn_like(q)
        t = {}
        for name, ops, w in (("ours", kernels, window), ("-swa", kernels, None), ("ref", tiny_hybrid, window)):
            fn = lambda q_, k_, v_, g_, ops=ops, w=w: _nsa_core(ops, q_, k_, v_, g_, block, top_n, 2, w)
            # The reference is dense: [B, H, T, T] float32 scores, several alive at once.
            dense_gb = B * H * T * T * 4 / 1e9
            if name == "ref" and 10 * dense_gb > torch.cuda.mem_get_info()[0] / 1e9:
                t[name] = (float("nan"), float("nan"))
                continue
            try:
                t[name] = tuple(_bench_ms(fn, bwd, (q, k, v, gates), do, rep=30) for bwd in (False, True))
            except torch.cuda.OutOfMemoryError:
                t[name] = (float("nan"), float("nan"))
            torch.cuda.empty_cache()
        t["fla"] = (float("nan"), float("nan"))
        if fla_nsa is not None:
            g_cmp, g_slc = (gates[..., i].detach().to(torch.bfloat16).requires_grad_() for i in range(2))
            fn = lambda q_, k_, v_, a, b_: fla_nsa(q_, k_, v_, a, b_, block_counts=top_n, block_size=block)
            t["fla"] = tuple(_bench_ms(fn, bwd, (q, k, v, g_cmp, g_slc), do, rep=30) for bwd in (False, True))
        # Where our forward's time goes, piece by piece.
        with torch.no_grad():
            k_cmp, v_cmp = tiny_hybrid.nsa_compress(k, block), tiny_hybrid.nsa_compress(v, block)
            o_cmp, lse = kernels.nsa_compressed_attention(q, k_cmp, v_cmp, block)
            scores = kernels.nsa_block_scores(q, k_cmp, lse, block)
            block_idx = tiny_hybrid.nsa_select_blocks(scores, block, top_n)
            parts = [lambda: kernels.nsa_compressed_attention(q, k_cmp, v_cmp, block),
                     lambda: kernels.nsa_block_scores(q, k_cmp, lse, block),
                     lambda: tiny_hybrid.nsa_select_blocks(scores, block, top_n),
                     lambda: kernels.nsa_selected_attention(q, k, v, block_idx, block),
                     lambda: kernels.attention(q, k, v, window=window)]
            split = [_do_bench(f, rep=30, warmup=5) for f in parts]
        note = "" if t["ref"][0] == t["ref"][0] else f"  (ref skipped: dense [B,H,T,T] = {dense_gb:.0f} GB)"
        print(f"{T:6d} | {t['ours'][0]:8.2f} {t['-swa'][0]:7.2f} {t['ref'][0]:8.2f} {t['fla'][0]:7.2f} | "
              f"{t['ours'][1]:8.2f} {t['-swa'][1]:7.2f} {t['ref'][1]:8.2f} {t['fla'][1]:7.2f} | "
              + " ".join(f"{x:.2f}" for x in split) + note, flush=True)
        rows.append(dict(T=T, **{f"{name}_fwd_ms": x[0] for name, x in t.items()},
                         **{f"{name}_fb_ms": x[1] for name, x in t.items()},
                         fwd_split_ms=dict(zip(("cmp", "scores", "select", "slc", "swa"), split))))
    return rows


def bench_kernel_lte_rule(Ts=(2048, 8192, 65536), B=4, Hkv=2, window=512, sink=4, buffer=256) -> list[dict]:
    """kernels.lte_visible_until vs the parallel PyTorch reference, median ms."""
    import kernels
    print(f"\nlte_visible_until, B={B}, Hkv={Hkv}, w={window}, s={sink}, b={buffer}; ms = median")
    print(f"{'T':>6} | {'kernel':>8} {'reference':>9}")
    rows = []
    for T in Ts:
        scores = torch.randn(B, T, Hkv, device="cuda") * 0.2
        ms = [_do_bench(lambda f=f: f(scores, window, sink, buffer), rep=50, warmup=5)
              for f in (kernels.lte_visible_until, tiny_hybrid.lte_visible_until)]
        print(f"{T:6d} | {ms[0]:8.3f} {ms[1]:9.3f}", flush=True)
        rows.append(dict(T=T, kernel_ms=ms[0], reference_ms=ms[1]))
    return rows


@contextlib.contextmanager
def _tf32(allowed: bool):
    """PyTorch's switch for tf32 in float32 matrix products, which kernels.py's precision rule
    follows, set for the duration of a block."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def bench_kernel_precision(B: int = 4) -> list[dict]:
    """What the precision rule costs: forward + backward of attention (LTE, T = 8K, D = 64),
    gated_delta_rule (T = 16K, K = V = 128) and the NSA core (T = 8K, 32 heads on 2), float32 with
    exact products (the rule's default), float32 with tf32 allowed, and bf16; median ms. The
    first float32 call of each op also compiles its kernels: that time is printed too (exact
    float32 products compile to long FMA loops)."""
    import kernels
    print(f"\nprecision: forward + backward, B={B}; ms = median (first call, compile included, in brackets)")
    print(f"{'op':18s} | {'float32 exact':>20s} {'float32 tf32':>20s} {'bf16':>20s}")
    rows = []
    for op in ("attention", "gated_delta_rule", "nsa"):
        line, row = f"{op:18s} |", dict(op=op)
        for name, dtype, tf32 in (("float32 exact", torch.float32, False), ("float32 tf32", torch.float32, True),
                                  ("bf16", torch.bfloat16, False)):
            with _tf32(tf32):
                fn, inputs, do = _precision_case(kernels, op, B, dtype)
                start = time.time()
                fn(*inputs).backward(do)
                torch.cuda.synchronize()
                first = time.time() - start
                ms = _bench_ms(fn, True, inputs, do, rep=30)
            row[name] = dict(ms=ms, first_call_s=first)
            line += f" {ms:9.3f} ({first:6.1f} s)"
        print(line, flush=True)
        rows.append(row)
    return rows


def _precision_case(kernels, op: str, B: int, dtype):
    """(fn, inputs, do) of one op at bench_kernel_precision's shape: fn(*inputs) returns one tensor."""
    def randn(*shape, grad=True):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=grad)
    if op == "attention":
        T, H, Hkv, D = 8192, 8, 2, 64
        keep = torch.rand(B, T, Hkv, device="cuda") < 0.125
        return (lambda q, k, v: kernels.attention(q, k, v, window=512, keep=keep),
                (randn(B, T, H, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D)), randn(B, T, H, D, grad=False))
    if op == "gated_delta_rule":
        T, H, D = 16384, 8, 128
        q, k, v, g, beta = _gdn_inputs(B, T, H, D, dtype)
        inputs = [x.requires_grad_() for x in (q, k, v, g, beta)]
        return lambda *x: kernels.gated_delta_rule(*x)[0], inputs, randn(B, T, H, D, grad=False)
    T, H, Hkv, D = 8192, 32, 2, 64
    gates = torch.rand(B, T, H, 3, device="cuda", requires_grad=True)
    return (lambda q, k, v, g: _nsa_core(kernels, q, k, v, g, 64, 16, 2, 512),
            (randn(B, T, H, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D), gates), randn(B, T, H, D, grad=False))


# The default: one headline shape per op (a few minutes on one GPU). --full: every length and
# baseline of docs/kernels.md's tables (tens of minutes: flex_attention compiles for every shape).
KERNEL_BENCHES = {
    "attention": lambda deadline: bench_kernel_attention(Ts=(8192,), kv_heads=(2,), flex=False),
    "attention_decode": lambda deadline: bench_kernel_decode(),
    "gated_delta_rule": lambda deadline: bench_kernel_gdn(Ts=(16384,), dims=(128,), with_reference=False),
    "nsa": lambda deadline: bench_kernel_nsa(Ts=(8192,)),
    "lte_visible_until": lambda deadline: bench_kernel_lte_rule(Ts=(8192,)),
}
KERNEL_FULL_BENCHES = {
    "attention": lambda deadline: bench_kernel_attention(deadline=deadline),
    "swa_spread": lambda deadline: bench_kernel_swa_spread(),
    "attention_decode": lambda deadline: bench_kernel_decode(),
    "gated_delta_rule": lambda deadline: bench_kernel_gdn(),
    "nsa": lambda deadline: bench_kernel_nsa(),
    "lte_visible_until": lambda deadline: bench_kernel_lte_rule(),
    "precision": lambda deadline: bench_kernel_precision(),
}


def bench_kernels(full: bool = False, tune: bool = False, budget_s: float = float("inf")) -> tuple[bool, dict]:
    """The kernel benchmarks (headline shapes, or every table with `full`), on the current CUDA GPU.
    Returns (every section ran, {section: rows}); a section that fails prints its traceback and
    the others still run."""
    start = time.time()
    results, ok = {}, True
    sections = dict(KERNEL_FULL_BENCHES if full else KERNEL_BENCHES)
    if tune:
        sections = {"tune_attention": lambda deadline: tune_kernel_attention(), **sections}
    for name, bench in sections.items():
        try:  # one broken section should not hide the others' numbers
            results[name] = bench(deadline=start + budget_s)
        except Exception:
            traceback.print_exc()
            ok = False
    return ok, results


# ---------------------------------------------------------------------------------------------

def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def plot_decode(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        xs = [r["context"] for r in mine]
        line, = ax_t.plot(xs, [r["eager_ms_per_token"] for r in mine], marker="o", label=f"{preset} eager")
        if any(r["captured_ms_per_token"] is not None for r in mine):
            ax_t.plot(xs, [r["captured_ms_per_token"] for r in mine], marker="o", linestyle="--",
                      color=line.get_color(), label=f"{preset} captured")
        ax_m.plot(xs, [r["state_bytes"] / 2**20 for r in mine], marker="o", label=preset)
    for ax, label in ((ax_t, "ms per decoded token"), (ax_m, "state MB per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"decoding cost against context ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("what", nargs="?", choices=["decode", "train", "prefill", "lte-rule", "all", "kernels"],
                        default="all", help="which measurement to run ('all': every one but kernels)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    parser.add_argument("--presets", nargs="+", default=list(DECODE_PRESETS), choices=list(tiny_hybrid.PRESETS),
                        help="model presets to measure")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 65536],
                        help="context lengths (tokens) for decode, prefill and lte-rule")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch")
    parser.add_argument("--throughput-batch", type=int, default=None,
                        help="decode: sequences per batch of the tokens/s table (default: 64 on CUDA, none on "
                             "the CPU; 0: no table)")
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions per cell (median)")
    parser.add_argument("--train-len", type=int, default=2048, help="sequence length of the training step")
    parser.add_argument("--modes", nargs="+", choices=["torch", "triton"], default=["torch", "triton"],
                        help="training step on a GPU: reference ops, Triton kernels, or both")
    parser.add_argument("--use-triton", action="store_true",
                        help="decode and prefill through the Triton kernels (default: the PyTorch reference)")
    parser.add_argument("--compile", action="store_true",
                        help="decode: fuse the captured step with torch.compile first (tens of seconds per "
                             "preset and context; CUDA only)")
    parser.add_argument("--out", default="out", help="folder for bench_<device>.json and the decode figure")
    parser.add_argument("--full", action="store_true",
                        help="kernels: every length and baseline of docs/kernels.md's tables (tens of minutes: "
                             "flex_attention compiles for every shape)")
    parser.add_argument("--tune", action="store_true", help="kernels: pick attention block sizes by measuring first")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="kernels: stop timing flex_attention after this many seconds (the rest print as nan)")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "train_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.throughput_batch is not None and args.throughput_batch < 0:
        parser.error(f"--throughput-batch must be >= 0, got {args.throughput_batch}")
    if args.throughput_batch is None:
        args.throughput_batch = 64 if args.device.startswith("cuda") else 0
    if args.compile and (args.what not in ("decode", "all") or not args.device.startswith("cuda")):
        parser.error("--compile applies to decode on a CUDA GPU only (it fuses the captured step)")
    if any(n < 1 for n in args.contexts):
        parser.error(f"--contexts must all be >= 1, got {args.contexts}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch here; use --device cpu")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.what != "kernels" and (args.full or args.tune or args.budget_s != float("inf")):
        parser.error("--full, --tune and --budget-s apply to 'kernels' only")
    if args.what == "kernels" and (not torch.cuda.is_available() or not args.device.startswith("cuda")):
        parser.error("kernels: the kernel benchmarks time Triton kernels on a CUDA GPU, and none is in use here "
                     "(python kernels.py --check-only checks them in Triton's CPU interpreter)")
    return args


def main(argv=None):
    args = _parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if args.what in ("decode", "all"):
        results["decode"] = bench_decode(args, device)
        plot_decode(results["decode"], os.path.join(args.out, f"decode_{device.type}.png"))
        if args.throughput_batch:
            results["decode_throughput"] = bench_decode_throughput(args, device)
    if args.what in ("train", "all"):
        results["train"] = bench_train(args, device)
    if args.what in ("prefill", "all"):
        results["prefill"] = bench_prefill(args, device)
    if args.what in ("lte-rule", "all"):
        results["lte_rule"] = bench_lte_rule(args, device)
    ok = True
    if args.what == "kernels":
        ok, results["kernels"] = bench_kernels(full=args.full, tune=args.tune, budget_s=args.budget_s)
    path = os.path.join(args.out, f"bench_{device.type}_{args.what}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
