"""End-to-end measurements of tiny-hybrid models.

    python bench.py decode      per-token decode latency and state memory against context length
    python bench.py train       training-step time, PyTorch reference vs Triton kernels (and gdn+lte
                                with its inference cap applied in training)
    python bench.py prefill     prefill time: a prompt of N tokens into a fresh decoding state
    python bench.py lte-rule    LTE's buffer rule alone (lte_visible_until): parallel reference,
                                Triton kernel, and the rule replayed token by token as decoding does
    python bench.py             all of them

Decode: a context of N tokens is represented by a state of the size N tokens leave behind, filled
with random numbers (prefilling 64K tokens through the O(T^2) reference would not fit in memory,
and a step's cost depends on the state's size, not its contents). Each step is then timed for
real: the median of `--steps` decoded tokens after a warm-up. Expected: flat lines for gdn,
gdn+swa and gdn+lte (constant state), growing ones for gdn+nsa and gdn+attn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import tiny_hybrid
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

def synthetic_state(model: TinyHybrid, batch: int, context: int, device) -> list[dict]:
    """The decoding state that `context` tokens leave behind, with random contents."""
    state = model.init_state(batch, device=device)
    for block, layer in zip(model.blocks, state):
        mixer = block.mixer
        name = type(mixer).__name__
        for key, value in list(layer.items()):
            if key == "pos":
                continue
            if value.dtype == torch.bool:
                value.fill_(True)
            elif key == "buf_pos":                      # as many retained tokens as could have left
                left = max(0, context - mixer.window - 1 - mixer.sink)
                n = min(left, value.shape[-1])
                value.fill_(-1)
                value[..., :n] = torch.arange(mixer.sink, mixer.sink + n, device=device)
            elif key == "buf_score":
                value.uniform_(0.0, 0.5)
            elif value.is_floating_point():
                value.normal_()
        if name == "Attention" and mixer.window is None or name == "NativeSparseAttention":
            shape = (batch, context, mixer.n_kv_head, mixer.head_dim)
            layer["k"], layer["v"] = torch.randn(shape, device=device), torch.randn(shape, device=device)
            layer["valid"] = torch.ones(shape[:3], dtype=torch.bool, device=device)
            if name == "NativeSparseAttention":
                del layer["valid"]
                n_cmp = context // mixer.block
                layer["k_cmp"] = torch.randn(batch, n_cmp, mixer.n_kv_head, mixer.head_dim, device=device)
                layer["v_cmp"] = torch.randn(batch, n_cmp, mixer.n_kv_head, mixer.head_dim, device=device)
        layer["pos"] = context
    return state


def _label(n: int) -> str:
    """A context length as a column label: 64K, 1000."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(model, batch: int, context: int, steps: int, device) -> tuple[float, int]:
    """Median milliseconds per decoded token, and state bytes per sequence, at a given context."""
    state = synthetic_state(model, batch, context, device)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    times = []
    for i in range(steps + 3):                          # 3 warm-up steps
        _sync(device)
        start = time.perf_counter()
        model(token, state=state)
        _sync(device)
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), TinyHybrid.state_nbytes(state)


def bench_decode(args, device) -> list[dict]:
    rows = []
    print(f"\ndecode: batch {args.batch}, {device_name(device)}, ms per token (median of {args.steps}) "
          f"and state MB per sequence")
    print(f"{'preset':10s}" + "".join(f"{_label(n):>8s} ms {'MB':>8s}" for n in args.contexts))
    for preset in args.presets:
        config = bench_config(preset, use_triton=args.use_triton)
        model = TinyHybrid(config).to(device).eval()
        line = f"{preset:10s}"
        for context in args.contexts:
            ms, nbytes = time_decode(model, args.batch, context, args.steps, device)
            rows.append({"preset": preset, "context": context, "ms_per_token": ms, "state_bytes": nbytes,
                         "device": device_name(device), "batch": args.batch, "use_triton": args.use_triton})
            line += f"{ms:11.2f} {nbytes / 2**20:8.2f}"
        print(line, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# training throughput
# ---------------------------------------------------------------------------------------------

def _train_variants(presets):
    """(label, preset, overrides) per row: gdn+lte also with the inference cap in training."""
    for preset in presets:
        yield preset, preset, {}
        if preset == "gdn+lte":
            yield "gdn+lte cap", preset, {"lte_train_cap": True}


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
                    _, loss = model(idx, idx)
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
        ax_t.plot(xs, [r["ms_per_token"] for r in mine], marker="o", label=preset)
        ax_m.plot(xs, [r["state_bytes"] / 2**20 for r in mine], marker="o", label=preset)
    for ax, label in ((ax_t, "ms per decoded token"), (ax_m, "state MB per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(f"decoding cost against context ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("what", nargs="?", choices=["decode", "train", "prefill", "lte-rule", "all"], default="all",
                        help="which measurement to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    parser.add_argument("--presets", nargs="+", default=list(DECODE_PRESETS), choices=list(tiny_hybrid.PRESETS),
                        help="model presets to measure")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 65536],
                        help="context lengths (tokens) for decode, prefill and lte-rule")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch")
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions per cell (median)")
    parser.add_argument("--train-len", type=int, default=2048, help="sequence length of the training step")
    parser.add_argument("--modes", nargs="+", choices=["torch", "triton"], default=["torch", "triton"],
                        help="training step on a GPU: reference ops, Triton kernels, or both")
    parser.add_argument("--use-triton", action="store_true",
                        help="decode and prefill through the Triton kernels (default: the PyTorch reference)")
    parser.add_argument("--out", default="out", help="folder for bench_<device>.json and the decode figure")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "train_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.contexts):
        parser.error(f"--contexts must all be >= 1, got {args.contexts}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch here; use --device cpu")
    return args


def main(argv=None):
    args = _parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if args.what in ("decode", "all"):
        results["decode"] = bench_decode(args, device)
        plot_decode(results["decode"], os.path.join(args.out, f"decode_{device.type}.png"))
    if args.what in ("train", "all"):
        results["train"] = bench_train(args, device)
    if args.what in ("prefill", "all"):
        results["prefill"] = bench_prefill(args, device)
    if args.what in ("lte-rule", "all"):
        results["lte_rule"] = bench_lte_rule(args, device)
    path = os.path.join(args.out, f"bench_{device.type}_{args.what}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
