"""Languages: espeak-ng's codes for phonemes, and the map from code to the model's language row.

Any language espeak-ng speaks can be phonemised, packed and trained. Its id (the row of the
model's language table) comes from the store that the run trains on, and travels with the run
and its exports: the reference's `en` = 0 and `ja` = 1 stay (its checkpoints were trained with
them, reference.md §1.2), and a new code gets the next free id as a store first uses it, just as
unseen phoneme symbols do.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

REFERENCE_LANGS = {"en": 0, "ja": 1}  # reference.md §1.2
ESPEAK_ALIASES = {"en": "en-us"}  # the reference phonemises "en" as espeak's en-us
LIST_COMMAND = "python -m tools.phonemize --list-languages"
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")

# text.py imports this module (for its Phonemizer) and reads the names above while it loads, so
# they come first; text's names are read here only when a function runs
from valle_jax.data import text as T  # noqa: E402


def espeak_voice(code: str) -> str:
    """The espeak-ng language a code phonemises with."""
    return ESPEAK_ALIASES.get(code, code)


@functools.cache
def supported() -> dict[str, str]:
    """{code: name} of every language the installed espeak-ng speaks, plus our aliases."""
    if not T.espeak_available():
        raise T.TextError(
            "espeak-ng is not installed, and phonemizer needs it: run `sudo apt-get install -y espeak-ng`"
        )
    from phonemizer.backend import EspeakBackend  # noqa: PLC0415 - optional heavy dependency: phonemizer

    langs = dict(EspeakBackend.supported_languages())
    for code, voice in ESPEAK_ALIASES.items():
        langs.setdefault(code, langs.get(voice, voice))
    return dict(sorted(langs.items()))


def check(code: str) -> str:
    """`code` if espeak-ng speaks it; TextError saying how to list the codes otherwise. Without
    espeak-ng (a machine that only packs or trains) only the code's spelling is checked."""
    if not isinstance(code, str) or not _CODE.match(code):
        raise T.TextError(
            f"language {code!r} is not a language code (such as en, de, fr-fr); `{LIST_COMMAND}` lists them"
        )
    if T.espeak_available() and code not in supported():
        raise T.TextError(
            f"language {code!r} is not supported by espeak-ng; `{LIST_COMMAND}` lists the supported codes"
        )
    return code


def extend(langs: Mapping[str, int], codes: Iterable[str]) -> dict[str, int]:
    """`langs` with each unseen code (in the order given) at the next free id."""
    out = dict(langs)
    for code in codes:
        if code not in out:
            out[code] = max(out.values(), default=-1) + 1
    return out


def store_langs(codes: Iterable[str]) -> dict[str, int]:
    """The language map of a store holding `codes`: the reference's, extended in sorted order (so
    the same set of languages always gets the same ids)."""
    return extend(REFERENCE_LANGS, sorted(set(codes)))


def language_id(code: str, langs: Mapping[str, int], n_langs: int) -> int:
    """The model row of `code`, from the model's map; TextError when it has none for it."""
    known = [k for k, v in langs.items() if v < n_langs]
    if code not in langs or langs[code] >= n_langs:
        raise T.TextError(f"language {code!r} is not supported by this model (it knows {known})")
    return langs[code]
