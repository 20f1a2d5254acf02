"""Text -> phoneme tokens -> ids, as the reference does it (reference.md §1.1, §6.3).

Tokenisation follows the reference's g2p: the phonemised string is split into characters, and the
stress marks ˈ ˌ and the length mark ː are glued to the character before them. The reference writes
a word boundary as two empty tokens; its HDF5 loader collapses them to one " " id, its file loader
keeps two. We keep **one " " token per word boundary** (the HDF5 behaviour, which is what its
published models were trained on); docs/data.md says so.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources

from valle_jax.data import languages

BOS, EOS, SPACE = "<s>", "</s>", " "
GLUE_TO_PREVIOUS = ("ˈ", "ˌ", "ː")  # U+02C8, U+02CC, U+02D0
LANG_SYMMAP = languages.REFERENCE_LANGS  # the reference's language ids; stores extend it (data/languages.py)


class TextError(ValueError):
    """Text that cannot become phoneme ids (empty, unknown symbol, unsupported language)."""


@functools.cache
def reference_symmap() -> dict[str, int]:
    """The reference's hard-coded phone map: 229 symbols, ids 1..228 ('?' and 'p' share 7)."""
    raw = resources.files("valle_jax.data").joinpath("reference_symmap.json").read_text("utf-8")
    return json.loads(raw)


def tokenize(phonemes: str) -> list[str]:
    """Reference g2p tokenisation of one phonemised string, one " " per word boundary."""
    spaced = " ".join(phonemes)
    for mark in GLUE_TO_PREVIOUS:
        spaced = spaced.replace(f" {mark}", mark)
    # a word boundary became "a   b" -> ["a", "", "", "b"]; empty strings mean boundary
    tokens = [SPACE if t == "" else t for t in spaced.split(" ")]
    return collapse_spaces(tokens)


def collapse_spaces(tokens: Iterable[str]) -> list[str]:
    """Merges runs of word-boundary tokens into one; drops boundaries at the ends."""
    out: list[str] = []
    for t in tokens:
        if t == SPACE and (not out or out[-1] == SPACE):
            continue
        out.append(t)
    while out and out[-1] == SPACE:
        out.pop()
    return out


def parse_phn_txt(content: str) -> list[str]:
    """Reads a reference-format `.phn.txt` (tokens joined by single spaces, empty = boundary)."""
    return collapse_spaces(SPACE if t == "" else t for t in content.strip("\n").split(" "))


def format_phn_txt(tokens: Sequence[str]) -> str:
    """Writes tokens in the reference's `.phn.txt` layout: a boundary is two empty tokens."""
    parts: list[str] = []
    for t in tokens:
        parts.extend(("", "") if t == SPACE else (t,))
    return " ".join(parts)


def extend_symmap(symmap: Mapping[str, int], tokens: Iterable[str]) -> dict[str, int]:
    """Adds unseen symbols the way the reference's HDF5 builder does: each gets id len(map)."""
    out = dict(symmap)
    for t in tokens:
        if t not in out:
            out[t] = len(out)
    return out


def encode(tokens: Sequence[str], symmap: Mapping[str, int]) -> list[int]:
    """`[<s>] + tokens + [</s>]` as ids. Raises TextError naming every unknown symbol."""
    unknown = sorted({t for t in tokens if t not in symmap})
    if unknown:
        raise TextError(f"phoneme symbols not in the symbol map: {unknown!r}")
    if not tokens:
        raise TextError("no phonemes: the text is empty or has nothing pronounceable")
    return [symmap[BOS], *(symmap[t] for t in tokens), symmap[EOS]]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None or shutil.which("espeak") is not None


class Phonemizer:
    """phonemizer's espeak backend with stress and punctuation kept (reference.md §6.3), one per language."""

    def __init__(self, language: str = "en"):
        if not espeak_available():
            raise TextError(
                "espeak-ng is not installed, and phonemizer needs it: run `sudo apt-get install -y espeak-ng`"
            )
        languages.check(language)  # any code espeak-ng speaks
        from phonemizer.backend import EspeakBackend  # noqa: PLC0415 - optional heavy dependency: phonemizer

        self.language = language
        self._backend = EspeakBackend(languages.espeak_voice(language), preserve_punctuation=True, with_stress=True)

    def phonemize(self, texts: Sequence[str]) -> list[str]:
        """Phonemised strings, one per text (whole list in one espeak call: fast)."""
        return self._backend.phonemize(list(texts), strip=True, njobs=1)

    def tokens(self, texts: Sequence[str]) -> list[list[str]]:
        return [tokenize(s) for s in self.phonemize([t.replace("\n", " ") for t in texts])]
