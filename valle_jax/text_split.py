"""Long text into pieces the model can say: sentences, each at most `max_phonemes` phonemes.

A VALL-E model is trained on utterances of a few seconds (data.duration_range, phones_range) and
decodes at most `max_ar_steps` frames (6 s by default), so a paragraph given as one utterance is cut
off or falls apart. Synthesis therefore splits text at sentence ends (., !, ?, …, and 。！？ that need
no space after them), not at abbreviations (Mr., e.g.), initials (J. R.) or decimal points. A
sentence with more phonemes than the maximum is split again at clause punctuation (, ; : — and
their CJK forms), then between words, packing neighbours greedily up to the maximum; a word still
too long (scripts without spaces) is halved by characters. Line breaks always end a piece.

Hand-written rather than taken from an NLP library: the rules are few, language-neutral enough for
espeak's languages, and phoneme counts (from the model's own phonemizer) decide the lengths, which
no sentence splitter knows about.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# phoneme tokens (as valle_jax.data.text.tokenize counts them, word boundaries included) per piece:
# about 5 s of speech at espeak's pace (tools.make_demo_corpus speech: ~14 tokens per second), inside
# the default max_ar_steps (450 frames = 6 s) and the training duration_range (1..12 s)
DEFAULT_MAX_PHONEMES = 72

Counter = Callable[[Sequence[str]], list[int]]  # phoneme tokens of each text, in one phonemizer call

# a sentence ends with . ! ? … (repeats allowed: "?!", "..."), then maybe closing quotes or brackets,
# then whitespace; CJK full stops end one without any space
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’»)\]]*\s+|(?<=[。！？])[\"'”’»)\]」』]*\s*")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+|(?<=[，、；：])\s*")
# words whose period does not end a sentence
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no fig approx dept est inc ltd co mt ave cf al".split()
)


def _ends_abbreviation(head: str) -> bool:
    """Whether the text before a sentence break ends in an abbreviation or an initial."""
    last = head.rsplit(None, 1)[-1] if head.split() else ""
    if not last.endswith("."):
        return False
    word = last[:-1].lstrip("\"'“‘«([").lower()
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped, in order; a line break ends one. A fragment with no
    letters or digits (a lone "..." or "—") joins the sentence before it (or after, at the start),
    since it has no phonemes of its own."""
    out: list[str] = []
    for line in text.splitlines():
        start, pieces = 0, []
        for m in _SENTENCE_END.finditer(line):
            head = line[start : m.start()]
            nxt = line[m.end() : m.end() + 1]
            if _ends_abbreviation(line[: m.start()]) or (nxt and nxt.islower()):
                continue  # "Mr. Smith", "e.g. this", "J. R. R.": the sentence goes on
            pieces.append(head + line[m.start() : m.end()].rstrip())
            start = m.end()
        pieces.append(line[start:])
        for p in (p.strip() for p in pieces):
            if not p:
                continue
            if not _has_words(p) and out:
                out[-1] = f"{out[-1]} {p}"
            elif out and not _has_words(out[-1]):
                out[-1] = f"{out[-1]} {p}"
            else:
                out.append(p)
    return out


def _units(text: str, level: int) -> list[str]:
    """`text` cut one level finer: 0 clauses, 1 words, 2 halves by characters."""
    if level == 0:
        return [u for u in (u.strip() for u in _CLAUSE_END.split(text)) if u]
    if level == 1:
        return text.split()
    mid = len(text) // 2
    return [text[:mid], text[mid:]] if len(text) > 1 else [text]


def _join(units: Sequence[str], level: int) -> str:
    return ("" if level == 2 else " ").join(units)


def _greedy(counts: Sequence[int], cap: int, sep: int) -> list[int]:
    """Where greedy packing of units with these counts, at most `cap` per piece, starts each piece."""
    starts, n = [0], 0
    for i, c in enumerate(counts):
        if i > starts[-1] and n + sep + c > cap:
            starts.append(i)
            n = c
        else:
            n += (sep if i > starts[-1] else 0) + c
    return starts


def _pack(units: Sequence[str], counts: Sequence[int], max_phonemes: int, level: int) -> list[str]:
    """Neighbouring units (each at most `max_phonemes`) joined into as few pieces as greedy packing
    needs, balanced: the smallest cap that still needs no more pieces, so no piece is a leftover word."""
    sep = 0 if level == 2 else 1  # a word boundary token between two units
    fewest = len(_greedy(counts, max_phonemes, sep))
    lo, hi = max(counts), max_phonemes
    while lo < hi:  # the smallest cap with `fewest` pieces
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(_greedy(counts, mid, sep)) <= fewest else (mid + 1, hi)
    bounds = [*_greedy(counts, lo, sep), len(units)]
    return [_join(units[a:b], level) for a, b in zip(bounds, bounds[1:])]


def _fit(text: str, count: Counter, max_phonemes: int, level: int) -> list[str]:
    """`text` (known to be too long) as pieces of at most `max_phonemes` each, as far as cutting
    at `level` and finer allows."""
    if level > 2:
        return [text]  # one character: nothing left to cut
    units = _units(text, level)
    if len(units) < 2:
        return _fit(text, count, max_phonemes, level + 1)
    counts = count(units)
    out: list[str] = []
    run: list[int] = []  # indices of neighbouring units that fit
    for i, c in enumerate([*counts, None]):
        if c is not None and c <= max_phonemes:
            run.append(i)
            continue
        if run:
            out += _pack([units[j] for j in run], [counts[j] for j in run], max_phonemes, level)
            run = []
        if c is not None:  # a unit too long by itself: cut it finer (halves are halved again)
            out += _fit(units[i], count, max_phonemes, min(level + 1, 2))
    return out


def split_text(text: str, count: Counter, max_phonemes: int = DEFAULT_MAX_PHONEMES) -> list[str]:
    """`text` as pieces to synthesise one after another: its sentences, each cut further until it
    has at most `max_phonemes` phoneme tokens (by `count`). Pieces summed from their parts' counts
    are counted again as a whole (espeak's context can change a few phonemes) and halved at a word
    if they turn out longer."""
    if max_phonemes < 1:
        raise ValueError(f"max_phonemes must be >= 1, got {max_phonemes}")
    pieces = sentences(text)
    if not pieces:
        return []
    out: list[str] = []
    for piece, c in zip(pieces, count(pieces)):
        out += [piece] if c <= max_phonemes else _fit(piece, count, max_phonemes, 0)
    for _ in range(4):  # the re-count: rarely more than one round, never unbounded
        counts = count(out)
        over = [i for i, c in enumerate(counts) if c > max_phonemes and len(out[i].split()) > 1]
        if not over:
            break
        for i in reversed(over):
            words = out[i].split()
            half = len(words) // 2
            out[i : i + 1] = [" ".join(words[:half]), " ".join(words[half:])]
    return out
