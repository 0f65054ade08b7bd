"""The recall task: MQAR-style facts [key, value] hidden in a text and queried later by repeating the
key, at controlled distances; text-free drills; the curriculum that mixes them; the task's loss; the
fixed held-out batches (evaluation cells, the probe) and the distance bins of the report.

It imports the token layout from corpus.py (keys and values are reserved tokens after the BPE).
"""

from __future__ import annotations

import numpy as np
import torch

from corpus import KEY_ID0, N_KEYS, N_VALUES, VALUE_ID0

IGNORE_INDEX = -100  # target of positions without a loss (torch's cross_entropy default)
BLOCK_LEN = 2  # a fact [key, value] and a query [key, value] are 2 tokens each


# A training / evaluation sequence is a Shakespeare passage with facts and queries inserted:
#
#     ... text  k v  text ... text  k v  text ...
#                 ^fact's value       ^answer position: input k (its second appearance), target v
#
# Each fact is queried exactly once, later in the sequence. The distance of a query is
# (answer position) - (position of the fact's value token): with sliding-window attention of
# window w, the fact's value is directly visible at the answer position when distance <= w.
#
# Targets: text tokens predict the next text token; the answer position predicts the value;
# everything else is IGNORE_INDEX: the text token before a block (the block's place is random),
# and every token of a block except the answer position (what follows a fact's key is random; a
# block's last token gets no loss either, so that a block carries no loss at all besides its
# answer). The text itself runs on unbroken around the blocks.


def _range(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    """An int n or an inclusive range (lo, hi) -> (lo, hi), validated."""
    lo, hi = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if not lo <= hi:
        raise ValueError(f"{name}={value!r}: expected an int or an inclusive range (lo, hi) with lo <= hi")
    return int(lo), int(hi)


def _check_keys(n_keys: int) -> None:
    if not 1 <= n_keys <= N_KEYS:
        raise ValueError(f"n_keys={n_keys}: must lie in [1, N_KEYS={N_KEYS}] (the reserved key tokens)")


def _check_recall_args(seq_len: int, n_facts: tuple[int, int], distance_range: tuple[int, int],
                       n_keys: int = N_KEYS) -> None:
    """Raise ValueError unless n_facts facts at distances in distance_range can fit in seq_len tokens."""
    lo, hi = distance_range
    _check_keys(n_keys)
    if n_facts[0] < 0 or n_facts[1] > n_keys:
        raise ValueError(f"n_facts={n_facts}: must lie in [0, n_keys={n_keys}] (keys are distinct)")
    if lo < BLOCK_LEN - 1:
        raise ValueError(f"distance_range={distance_range}: the smallest distance is {BLOCK_LEN - 1} (query right after fact)")
    if hi > seq_len - BLOCK_LEN:
        raise ValueError(f"distance_range={distance_range}: the largest distance in seq_len={seq_len} is {seq_len - BLOCK_LEN}")
    if 2 * BLOCK_LEN * n_facts[1] > seq_len + 1:
        raise ValueError(f"n_facts={n_facts}: {n_facts[1]} facts and queries need {2 * BLOCK_LEN * n_facts[1]} > seq_len + 1 tokens")


def place_blocks(
    stream_len: int, distances: np.ndarray, rng: np.random.Generator, tries: int = 10
) -> tuple[np.ndarray, np.ndarray] | None:
    """Start positions of fact blocks and query blocks in a stream of stream_len tokens, or None.

    distances [n] int: query i's answer position (its key) minus fact i's value position, so that
    the query block starts at fact_start + 1 + distance. Blocks never overlap. Pairs are placed
    greedily, longest distance first, each at a uniformly random free spot; when a pair finds no
    spot the layout is drawn again, up to `tries` times, then None (long distances crowd facts to
    the start and queries to the end: a few of them may simply not fit together).
    Returns (fact_starts [n], query_starts [n]) int64.
    """
    order = np.argsort(-distances, kind="stable")
    for _ in range(tries):
        free = np.ones(stream_len, dtype=bool)
        fact_starts = np.zeros(len(distances), dtype=np.int64)
        for i in order:
            gap = 1 + int(distances[i])  # query start - fact start
            block_free = free[:-1] & free[1:]  # [stream_len - 1]: BLOCK_LEN = 2 free tokens from f
            spots = np.flatnonzero(block_free[: len(block_free) - gap] & block_free[gap:])
            if len(spots) == 0:
                break
            f = int(rng.choice(spots))
            free[f : f + BLOCK_LEN] = False
            free[f + gap : f + gap + BLOCK_LEN] = False
            fact_starts[i] = f
        else:
            return fact_starts, fact_starts + 1 + distances.astype(np.int64)
    return None


def _draw_layout(
    stream_len: int, n_facts: int, distance_range: tuple[int, int], rng: np.random.Generator, draws: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances drawn uniformly from distance_range, and a layout for them: (distances, fact_starts, query_starts).

    Distances that cannot be laid out together are drawn again (rare unless many facts ask for
    distances near the longest possible: that conditioning slightly favours the shorter ones).
    """
    for _ in range(draws):
        distances = rng.integers(distance_range[0], distance_range[1] + 1, size=n_facts)
        layout = place_blocks(stream_len, distances, rng)
        if layout is not None:
            return (distances, *layout)
    raise ValueError(
        f"could not fit n_facts={n_facts} facts at distance_range={distance_range} into seq_len={stream_len - 1} "
        f"tokens in {draws} draws: ask for fewer facts, shorter distances or a longer sequence"
    )


def fill_with_text(stream: np.ndarray, is_text: np.ndarray, tokens: np.ndarray, rng: np.random.Generator,
                   what: str) -> tuple[np.ndarray, np.ndarray]:
    """Fill the positions of `stream` where is_text with a passage of `tokens` at a random offset,
    then split the stream into inputs idx [T] and next-token targets [T] (T = len(stream) - 1), the
    targets IGNORE_INDEX except from text to text. `what` names the sequence in the error."""
    n_text = int(is_text.sum())
    if len(tokens) < n_text:
        raise ValueError(f"tokens has {len(tokens)} tokens, {what} needs {n_text} of text")
    offset = int(rng.integers(0, len(tokens) - n_text + 1))
    stream[is_text] = tokens[offset : offset + n_text]
    idx, targets = stream[:-1].copy(), stream[1:].copy()
    targets[~(is_text[:-1] & is_text[1:])] = IGNORE_INDEX  # only text -> text is language modelling
    return idx, targets


def make_sequence(
    tokens: np.ndarray, seq_len: int, n_facts: int, distance_range: tuple[int, int], rng: np.random.Generator,
    n_keys: int = N_KEYS,
) -> dict[str, np.ndarray]:
    """One sequence: a passage of `tokens` (random offset) with n_facts facts and their queries, the
    keys distinct, drawn from the first n_keys key tokens.

    Returns numpy arrays: idx [T], targets [T] (IGNORE_INDEX where no loss), answer_mask [T] bool,
    and per answer, in position order: answer_pos [n], answer_distance [n], answer_value [n].
    """
    stream_len = seq_len + 1  # one more than the inputs: targets are the stream shifted by one
    distances, fact_starts, query_starts = _draw_layout(stream_len, n_facts, distance_range, rng)
    keys = KEY_ID0 + rng.choice(n_keys, size=n_facts, replace=False)
    values = VALUE_ID0 + rng.integers(0, N_VALUES, size=n_facts)

    stream = np.zeros(stream_len, dtype=np.int64)
    is_text = np.ones(stream_len, dtype=bool)
    for f, q, key, value in zip(fact_starts, query_starts, keys, values):
        stream[f : f + BLOCK_LEN] = (key, value)
        stream[q : q + BLOCK_LEN] = (key, value)
        is_text[f : f + BLOCK_LEN] = is_text[q : q + BLOCK_LEN] = False
    idx, targets = fill_with_text(stream, is_text, tokens, rng, "a sequence")
    answer_pos = np.sort(query_starts)  # the query's key: its target is the value
    targets[answer_pos] = stream[answer_pos + 1]
    answer_mask = np.zeros(seq_len, dtype=bool)
    answer_mask[answer_pos] = True
    distance_at = dict(zip(query_starts, distances))
    answer_distance = np.array([distance_at[p] for p in answer_pos], dtype=np.int64)
    return dict(
        idx=idx,
        targets=targets,
        answer_mask=answer_mask,
        answer_pos=answer_pos.astype(np.int64),
        answer_distance=answer_distance,
        answer_value=targets[answer_pos],
    )


def make_batch(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    n_facts: int | tuple[int, int],
    distance_range: int | tuple[int, int],
    rng: np.random.Generator,
    n_keys: int = N_KEYS,
) -> dict[str, torch.Tensor]:
    """A batch of recall sequences, all drawn from rng (same seed, same batch).

    tokens: [N] int, a tokenized split. n_facts: per sequence, an int or an inclusive range
    (lo, hi) drawn per sequence. distance_range: inclusive (lo, hi) (or an int) of fact-to-query
    distances in tokens, drawn uniformly per query; lo >= 2, hi <= seq_len - 3. n_keys: how many of the
    reserved key tokens the facts draw from.

    Returns torch tensors (B = batch_size, T = seq_len, N = number of answers in the batch):
      idx [B, T] int64             input tokens
      targets [B, T] int64         next-token targets, IGNORE_INDEX (-100) where there is none
      answer_mask [B, T] bool      positions whose target is a recall answer
      answer_batch [N] int64       row of each answer            } in the order of
      answer_pos [N] int64         column of each answer         } answer_mask.nonzero(), so
      answer_distance [N] int64    fact-to-query distance        } logits[answer_mask] lines up
      answer_n_facts [N] int64     number of facts in its row    } with them
    """
    n_facts, distance_range = _range("n_facts", n_facts), _range("distance_range", distance_range)
    _check_recall_args(seq_len, n_facts, distance_range, n_keys)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    rows = []
    for _ in range(batch_size):
        n = int(rng.integers(n_facts[0], n_facts[1] + 1))
        rows.append(make_sequence(tokens, seq_len, n, distance_range, rng, n_keys))
    return collate(rows)


def make_drill_sequence(n_facts: int, rng: np.random.Generator, n_keys: int = N_KEYS) -> dict[str, np.ndarray]:
    """A text-free recall drill: n_facts facts and their queries and nothing else (T = 4 n_facts).

    The 2 n_facts blocks come in random order; the first block of a key is its fact, the second
    its query. Same arrays as `make_sequence`.
    """
    _check_keys(n_keys)
    if not 1 <= n_facts <= n_keys:
        raise ValueError(f"n_facts={n_facts}: a drill needs 1 to n_keys={n_keys} facts")
    order = rng.permutation(np.repeat(np.arange(n_facts), 2))             # [2n]: the fact of block b
    keys = KEY_ID0 + rng.choice(n_keys, size=n_facts, replace=False)
    values = VALUE_ID0 + rng.integers(0, N_VALUES, size=n_facts)
    idx = np.stack([keys[order], values[order]], axis=1).reshape(-1)     # [2n, 2] -> [4n]
    is_fact = np.zeros(len(order), dtype=bool)
    is_fact[np.unique(order, return_index=True)[1]] = True               # first block of each key
    fact_block = np.empty(n_facts, dtype=np.int64)
    fact_block[order[is_fact]] = np.flatnonzero(is_fact)
    answer_pos = BLOCK_LEN * np.flatnonzero(~is_fact)                    # each query's key
    answer_distance = answer_pos - (BLOCK_LEN * fact_block[order[~is_fact]] + 1)
    targets = np.full(len(idx), IGNORE_INDEX, dtype=np.int64)
    targets[answer_pos] = idx[answer_pos + 1]
    return dict(idx=idx, targets=targets, answer_mask=targets != IGNORE_INDEX, answer_pos=answer_pos,
                answer_distance=answer_distance, answer_value=targets[answer_pos])


def make_drill_batch(batch_size: int, n_facts: int, rng: np.random.Generator, n_keys: int = N_KEYS) -> dict[str, torch.Tensor]:
    """A batch of `make_drill_sequence`s (T = 4 n_facts), collated like `make_batch`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    return collate([make_drill_sequence(n_facts, rng, n_keys) for _ in range(batch_size)])


def collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Sequences of equal length -> the batch dict of `make_batch` (answers in answer_mask order)."""
    batch = {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in ("idx", "targets", "answer_mask")}
    n = [len(row["answer_pos"]) for row in rows]
    batch["answer_batch"] = torch.from_numpy(np.repeat(np.arange(len(rows)), n))
    batch["answer_pos"] = torch.from_numpy(np.concatenate([row["answer_pos"] for row in rows]))
    batch["answer_distance"] = torch.from_numpy(np.concatenate([row["answer_distance"] for row in rows]))
    batch["answer_n_facts"] = torch.from_numpy(np.repeat(np.array(n, dtype=np.int64), n))
    return batch


def distance_bins(window: int, max_distance: int) -> list[tuple[int, int]]:
    """Inclusive distance bins that straddle a sliding window: [2, w/2], [w/2+1, w], [w+1, 2w], [2w+1, 4w], ...

    The edge at w separates facts an SWA layer of window w still sees from those it cannot.
    The last bin is clipped to max_distance (e.g. seq_len - 3, the largest distance possible).
    """
    if window < 4 or max_distance < BLOCK_LEN - 1:
        raise ValueError(f"window={window}, max_distance={max_distance}: need window >= 4 and max_distance >= 2")
    edges = [BLOCK_LEN - 1, window // 2 + 1, window + 1]
    while edges[-1] <= max_distance:
        edges.append(2 * edges[-1] - 1)  # 2w+1, 4w+1, ...
    return [(lo, min(hi - 1, max_distance)) for lo, hi in zip(edges, edges[1:]) if lo <= max_distance]


# ---- the curriculum ----------------------------------------------------------------------------
#
# A small model learns associative recall through a sudden phase change (an
# "induction" circuit forms), and Shakespeare between the facts delays it far beyond a CPU
# budget: with text from the first step, every GDN-based model stayed at chance for thousands
# of steps. So the first `drill_frac` of the steps are text-free drills (facts and queries only);
# after that a quarter of the batches stay drills (so the skill is not lost) and the rest
# alternate between short fact-dense passages and full-length haystacks.


def task_for_step(step: int, args, schedule_steps: int | None = None) -> str:
    """The kind of training batch `step`: "drill", "dense" or "haystack" (see the curriculum).
    schedule_steps: the length the curriculum was planned for (default args.steps; see --resume)."""
    if step < args.drill_frac * (schedule_steps or args.steps) or step % 4 == 0:
        return "drill"
    return "dense" if step % 4 == 2 else "haystack"


TRAINING_KEYS = ("idx", "targets", "answer_mask", "answer_batch", "answer_pos")  # what a step reads of a batch


# ---- the loss ------------------------------------------------------------------------------------

def recall_loss(logits: torch.Tensor, batch: dict, answer_weight: float) -> torch.Tensor:
    """Cross-entropy over every target, the recall answers weighted `answer_weight` times a text token."""
    total, count = recall_sums(logits, batch, answer_weight)
    return total / count.clamp(min=1)


def recall_sums(logits: torch.Tensor, batch: dict, answer_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """recall_loss as (weighted sum, sum of weights): a data-parallel job adds them over its shards."""
    targets = batch["targets"].flatten()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets,
                                           ignore_index=IGNORE_INDEX, reduction="none")
    weight = torch.where(batch["answer_mask"].flatten(), answer_weight, 1.0) * (targets != IGNORE_INDEX)
    return (ce * weight).sum(), weight.sum()


# ---- the fixed held-out batches ----------------------------------------------------------------

# Every model and every seed is scored on the same held-out batches, drawn from this seed, so that
# the spread over seeds is the spread of training alone (seed 0's runs keep their earlier numbers).
EVAL_SEED = 1


def eval_batch(val_tokens, args, length: int, n_facts: int, distances: tuple[int, int]):
    """A fixed held-out batch for one evaluation cell (the same for every model and seed), or None if
    the facts cannot fit at those distances."""
    rng = np.random.default_rng((EVAL_SEED, length, n_facts, distances[0]))
    try:
        return make_batch(val_tokens, args.eval_batch, length, n_facts, distances, rng, args.n_keys)
    except ValueError:
        return None


# The probe holds PROBE_BATCHES x --eval-batch sequences at the hardest setting: by default 64
# sequences of 24 facts, 1536 queries, so that a reading's standard error is about 1.3 points at
# 50 % recall (binomial), below the rule's 2 points; it costs about one training step.
PROBE_BATCHES = 4


def probe_batch(val_tokens: np.ndarray, args) -> dict | None:
    """The fixed held-out probe: PROBE_BATCHES * --eval-batch sequences at the training length with the
    most facts, in the longest distance bin that they can fill (the report's hardest setting). The
    same batch for every model, seed and step; None if no bin can hold the facts."""
    n = max(args.eval_facts)
    for lo, hi in reversed(distance_bins(args.window, args.seq_len - BLOCK_LEN)):
        rng = np.random.default_rng((EVAL_SEED, args.seq_len, n, lo, PROBE_BATCHES))
        try:
            return make_batch(val_tokens, PROBE_BATCHES * args.eval_batch, args.seq_len, n, (lo, hi), rng,
                              args.n_keys)
        except ValueError:
            continue  # n facts cannot all lie this far back: try the next shorter bin
    return None


def recall_batches(val_tokens, args, length: int) -> dict[str, dict]:
    """The main table's held-out haystacks at `length` with the most facts, by distance bin."""
    n = max(args.eval_facts)
    batches = {f"{lo}-{hi}": eval_batch(val_tokens, args, length, n, (lo, hi))
               for lo, hi in distance_bins(args.window, length - BLOCK_LEN)}
    return {name: batch for name, batch in batches.items() if batch is not None}


def key_value_ids(args) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of the first --n-keys keys and of every value (--long's needles draw from them)."""
    return KEY_ID0 + np.arange(args.n_keys), VALUE_ID0 + np.arange(N_VALUES)
