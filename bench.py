"""End-to-end measurements of tiny-hybrid models.

    python bench.py decode      per-token decode latency and state memory against context length
    python bench.py train       training-step throughput, PyTorch reference vs Triton kernels
    python bench.py             both

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
    label = lambda n: f"{n // 1024}K" if n % 1024 == 0 else str(n)   # context length: 64K, 1000
    print(f"{'preset':10s}" + "".join(f"{label(n):>8s} ms {'MB':>8s}" for n in args.contexts))
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

def bench_train(args, device) -> list[dict]:
    rows = []
    print(f"\ntraining step (forward + backward), batch {args.batch}, T {args.train_len}, "
          f"{device_name(device)}: tokens/s")
    modes = [False, True] if device.type == "cuda" else [False]
    print(f"{'preset':10s}" + "".join(f"{'triton' if m else 'torch':>12s}" for m in modes))
    for preset in args.presets:
        line = f"{preset:10s}"
        for use_triton in modes:
            torch.manual_seed(0)
            model = TinyHybrid(bench_config(preset, use_triton=use_triton)).to(device)
            idx = torch.randint(0, model.config.vocab_size, (args.batch, args.train_len), device=device)
            times = []
            for i in range(args.steps + 2):
                _sync(device)
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    _, loss = model(idx, idx)
                loss.backward()
                _sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - start)
            tok_s = args.batch * args.train_len / statistics.median(times)
            rows.append({"preset": preset, "use_triton": use_triton, "tokens_per_s": tok_s,
                         "device": device_name(device), "T": args.train_len, "batch": args.batch})
            line += f"{tok_s:12.0f}"
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["decode", "train", "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=list(DECODE_PRESETS))
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-len", type=int, default=2048)
    parser.add_argument("--use-triton", action="store_true", help="decode through the kernels too")
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if args.what in ("decode", "all"):
        results["decode"] = bench_decode(args, device)
        plot_decode(results["decode"], os.path.join(args.out, f"decode_{device.type}.png"))
    if args.what in ("train", "all"):
        results["train"] = bench_train(args, device)
    path = os.path.join(args.out, f"bench_{device.type}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
