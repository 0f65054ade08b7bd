"""Needles in a Shakespeare haystack at the paper's lengths (train_shakespeare.py --long).

The paper evaluates its hybrids on RULER's single-needle tasks at 1K-4K tokens; its reviewers asked
for longer contexts. Here a few facts ("needles", a key token then a value token) are planted at
controlled depths in real held-out text, and every one is queried at the very end of the sequence:

    text ... k1 v1 ... text ... k2 v2 ... text   k2 v2  k1 v1
                                                 ^ answer positions: input the key, target its value

This module holds what the task needs and nothing of the training: the sequences, the evaluation
grid (needle depth x context length, at 1x to 8x the training length), the heat map and the table.
It imports torch, numpy, recall_task.py and (for the figure) matplotlib, never the training script:
the script hands over the token ids of its keys and values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recall_task import BLOCK_LEN, fill_with_text   # a needle is a fact: [key, value]
EVAL_SEED = 2        # the held-out haystacks: the same for every model and seed
LENGTH_FACTORS = (1, 2, 4, 8)        # evaluation lengths, in training lengths
DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # needle depth: 0 = first text token, 1 = just before the queries
FILES = ("long.json", "long_heatmap.png")  # what --long writes into its --out


# ----------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------

def random_starts(n: int, room: int, rng: np.random.Generator) -> np.ndarray:
    """Start positions of n non-overlapping needle blocks drawn uniformly in [0, room), sorted.
    Drawing n distinct slots among room - n and shifting the i-th by i keeps the blocks apart."""
    if room < BLOCK_LEN * n:
        raise ValueError(f"{n} needles need {BLOCK_LEN * n} tokens of text, the haystack has {room}")
    slots = np.sort(rng.choice(room - n, size=n, replace=False))
    return slots + np.arange(n)


def starts_at_depth(n: int, room: int, depth: float) -> np.ndarray:
    """Start positions of n needle blocks side by side, the group at `depth` of the text (0 to 1)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must lie in [0, 1]")
    if room < BLOCK_LEN * n:
        raise ValueError(f"{n} needles need {BLOCK_LEN * n} tokens of text, the haystack has {room}")
    first = int(round(depth * (room - BLOCK_LEN * n)))
    return first + BLOCK_LEN * np.arange(n)


def needle_sequence(tokens: np.ndarray, length: int, starts: np.ndarray, rng: np.random.Generator,
                    key_ids: np.ndarray, value_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One haystack of `length` input tokens: text of `tokens` (random offset) with needles whose
    blocks start at `starts` (positions in the stream before the queries, non-overlapping), then
    every needle's query, in random order, at the end. Keys are distinct, drawn from key_ids;
    values from value_ids.

    Returns numpy arrays: idx [T], targets [T] (IGNORE_INDEX where no loss), answer_mask [T] bool,
    and per answer, in position order: answer_pos [n], answer_distance [n] (answer position minus
    its needle's value position), answer_value [n]."""
    n = len(starts)
    stream_len = length + 1                         # targets are the stream shifted by one
    room = stream_len - BLOCK_LEN * n               # the stream before the queries
    if n == 0 or starts.max() + BLOCK_LEN > room:
        raise ValueError(f"needle starts {starts.tolist()}: need 1 or more, inside the {room} tokens before "
                         f"the queries")
    keys = rng.choice(key_ids, size=n, replace=False)
    values = rng.choice(value_ids, size=n)
    stream = np.zeros(stream_len, dtype=np.int64)
    is_text = np.ones(stream_len, dtype=bool)
    for start, key, value in zip(starts, keys, values):
        stream[start : start + BLOCK_LEN] = (key, value)
        is_text[start : start + BLOCK_LEN] = False
    order = rng.permutation(n)                      # which needle each query block asks for
    query_starts = room + BLOCK_LEN * np.arange(n)
    stream[query_starts] = keys[order]
    stream[query_starts + 1] = values[order]
    is_text[room:] = False
    idx, targets = fill_with_text(stream, is_text, tokens, rng, f"a haystack of {length}")
    targets[query_starts] = values[order]                   # the query's key predicts the value
    answer_mask = np.zeros(length, dtype=bool)
    answer_mask[query_starts] = True
    value_pos = starts[order] + 1
    return dict(idx=idx, targets=targets, answer_mask=answer_mask, answer_pos=query_starts.astype(np.int64),
                answer_distance=(query_starts - value_pos).astype(np.int64), answer_value=values[order])


def training_haystack(tokens: np.ndarray, length: int, max_needles: int, rng: np.random.Generator,
                      key_ids: np.ndarray, value_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A training haystack: 1 to max_needles needles at uniformly random depths, queried at the end."""
    n = int(rng.integers(1, max_needles + 1))
    starts = random_starts(n, length + 1 - BLOCK_LEN * n, rng)
    return needle_sequence(tokens, length, starts, rng, key_ids, value_ids)


def eval_batch(val_tokens: np.ndarray, length: int, n: int, depth: float, rows: int,
               key_ids: np.ndarray, value_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The held-out haystacks of one grid cell: `rows` sequences of `length` tokens with n needles
    side by side at `depth`, the same for every model and seed. Every row has n answers, so the
    answers stack as [rows, n]: idx, targets [rows, T]; answer_pos, answer_distance [rows, n]."""
    rng = np.random.default_rng((EVAL_SEED, length, n, int(round(1000 * depth))))
    starts = starts_at_depth(n, length + 1 - BLOCK_LEN * n, depth)
    seqs = [needle_sequence(val_tokens, length, starts, rng, key_ids, value_ids) for _ in range(rows)]
    return {key: torch.from_numpy(np.stack([s[key] for s in seqs]))
            for key in ("idx", "targets", "answer_pos", "answer_distance")}


# ----------------------------------------------------------------------------------------------
# Evaluation grid
# ----------------------------------------------------------------------------------------------

def distance_edges(window: int, longest: int) -> list[int]:
    """Lower edges of the distance bins: inside the window (1..w), then w+1..2w, 2w+1..4w, ...
    up to the longest distance; the edge at w separates what a sliding window still sees."""
    edges = [1, window + 1]
    while edges[-1] * 2 - 1 <= longest:
        edges.append(2 * edges[-1] - 1)
    return edges


def bin_name(edges: list[int], i: int, longest: int) -> str:
    hi = edges[i + 1] - 1 if i + 1 < len(edges) else longest
    return f"{edges[i]}-{hi}"


@torch.no_grad()
def answer_hits(model, batch: dict, device, tokens_per_forward: int, pairs_per_forward: int = 2**28) -> torch.Tensor:
    """Right answers of a cell, [rows, n] bool, in forwards of at most tokens_per_forward tokens
    (the logits' memory) and pairs_per_forward query-key pairs per head (the reference ops build
    [rows, heads, T, T] attention matrices: 1 GiB a head at this default)."""
    rows, length = batch["idx"].shape
    step = max(1, min(tokens_per_forward // length, pairs_per_forward // length**2))
    hits = []
    for lo in range(0, rows, step):
        idx = batch["idx"][lo : lo + step].to(device)
        pos = batch["answer_pos"][lo : lo + step].to(device)                       # [r, n]
        logits, _ = model(idx)                                                      # [r, T, vocab]
        picked = torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # [r, n, vocab]
        want = torch.gather(batch["targets"][lo : lo + step].to(device), 1, pos)           # [r, n]
        hits.append((picked.argmax(-1) == want).cpu())
    return torch.cat(hits)


def evaluate_grid(model, val_tokens: np.ndarray, train_len: int, window: int, needles: tuple[int, ...],
                  rows: int, key_ids: np.ndarray, value_ids: np.ndarray, device,
                  tokens_per_forward: int = 32768) -> dict:
    """Recall of every needle count, context length (LENGTH_FACTORS x train_len) and depth, in eval
    mode; and the same answers pooled by fact-to-query distance.

    Returns {"lengths": [...], "depths": [...], "recall": {n: {length: {depth: acc}}},
             "by_distance": {n: {bin: acc}}} (keys as strings, for JSON)."""
    was_training = model.training
    model.eval()
    lengths = [f * train_len for f in LENGTH_FACTORS]
    edges = distance_edges(window, lengths[-1])
    recall, by_distance = {}, {}
    for n in needles:
        cells, sums, counts = {}, np.zeros(len(edges)), np.zeros(len(edges))
        for length in lengths:
            cells[str(length)] = {}
            for depth in DEPTHS:
                batch = eval_batch(val_tokens, length, n, depth, rows, key_ids, value_ids)
                hits = answer_hits(model, batch, device, tokens_per_forward)
                cells[str(length)][f"{depth:.1f}"] = hits.float().mean().item()
                which = np.searchsorted(edges, batch["answer_distance"].numpy(), side="right") - 1
                np.add.at(sums, which.ravel(), hits.numpy().ravel())
                np.add.at(counts, which.ravel(), 1)
        recall[str(n)] = cells
        by_distance[str(n)] = {bin_name(edges, i, lengths[-1]): float(sums[i] / counts[i])
                               for i in range(len(edges)) if counts[i]}
    model.train(was_training)
    return {"lengths": lengths, "depths": list(DEPTHS), "recall": recall, "by_distance": by_distance}


# ----------------------------------------------------------------------------------------------
# Report: table and heat map
# ----------------------------------------------------------------------------------------------

def pooled(cells: dict[str, float]) -> float:
    return float(np.mean(list(cells.values())))


def table_rows(models: dict[str, dict], n: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the report table for n needles: per model its state at the training and
    the longest length, recall at each length (all depths pooled), and by distance."""
    first = next(iter(models.values()))
    lengths = first["grid"]["lengths"]
    bins = list(first["grid"]["by_distance"][str(n)])
    header = ["model", f"state KB @{lengths[0]}", f"@{lengths[-1]}", *(f"T={t}" for t in lengths),
              *(f"d {b}" for b in bins)]
    rows = []
    for name, result in models.items():
        grid, state = result["grid"], result["state_bytes"]
        rows.append([name, f"{state[str(lengths[0])] / 1024:.0f}", f"{state[str(lengths[-1])] / 1024:.0f}",
                     *(f"{pooled(grid['recall'][str(n)][str(t)]):.0%}" for t in lengths),
                     *(f"{grid['by_distance'][str(n)].get(b, float('nan')):.0%}" for b in bins)])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), *(line(row) for row in rows)])


def plot_heatmaps(models: dict[str, dict], n: int, path: Path, title: str) -> None:
    """One panel per model: recall of n needles by depth (rows) and context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(models)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        grid = models[name]["grid"]
        lengths, depths = grid["lengths"], grid["depths"]
        cells = grid["recall"][str(n)]
        image = np.array([[cells[str(t)][f"{d:.1f}"] for t in lengths] for d in depths])  # [depths, lengths]
        ax.imshow(image, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(image):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{t // 1024}K" if t >= 1024 else str(t) for t in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        kb = models[name]["state_bytes"][str(lengths[-1])] / 1024
        ax.set_title(f"{name}\nstate {kb:.0f} KB per sequence at {lengths[-1]}", fontsize=9)
        ax.set_xlabel("context length (training length: first column)")
        ax.set_ylabel("needle depth")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
