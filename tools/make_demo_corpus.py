"""Builds a small multi-speaker speech corpus with espeak-ng voices, deterministically.

    python -m tools.make_demo_corpus OUT_DIR [--voices N] [--sentences M] [--languages en,de]

One speaker = an espeak-ng accent + voice variant + pitch + speed. Layout:
OUT_DIR/<group = accent>/<speaker>/<speaker>_<nnn>.wav (24 kHz mono 16-bit) and .txt (transcript).
With several --languages the speakers take them in turn; an English speaker's group is its accent
(en-us, en-gb, ...), another language's group is its code (de), so that
`tools.phonemize --group-language de=de` and `tools.pack --group-language de=de` find them.
The same arguments give byte-identical files. Existing files are kept (a rerun only fills gaps).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from tools.common import Report, setup_logging
from valle_jax.atomic import write_text
from valle_jax.audio import SAMPLE_RATE, resample, write_wav

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "f1", "m3", "f2", "m5", "f3", "m7", "f4", "m2", "f5", "m4", "m6", "m8")
PITCHES = (50, 35, 65, 45, 58)  # espeak -p, 0..99
SPEEDS = (165, 150, 180, 140, 172)  # espeak -s, words per minute

SENTENCES = (
    "The little boat drifted slowly toward the quiet harbor.",
    "Please bring three apples and a loaf of bread.",
    "A sudden gust of wind scattered the papers across the floor.",
    "She painted the old fence a bright shade of green.",
    "We watched the stars appear one by one above the hills.",
    "The train leaves the station at half past seven.",
    "His voice echoed through the empty hall.",
    "Fresh snow covered the roofs of the village overnight.",
    "The museum opens its new exhibit next Tuesday.",
    "Our neighbor grows tomatoes, beans and sweet peppers.",
    "The clock on the tower struck noon as we arrived.",
    "Heavy rain flooded the narrow street near the market.",
    "Can you hear the birds singing in the garden?",
    "The chef tasted the soup and added a pinch of salt.",
    "Bright lanterns lit the path down to the river.",
    "They found an old map hidden inside the book.",
    "The kitten chased a ball of yarn under the table.",
    "A strong cup of coffee helps me start the morning.",
    "The mountain road curves sharply after the bridge.",
    "Children laughed as the puppet show began.",
    "He fixed the broken chair with glue and patience.",
    "The library is quiet except for turning pages.",
    "Warm light filled the kitchen on winter evenings.",
    "The orchestra tuned their instruments before the concert.",
    "A gentle breeze carried the smell of pine trees.",
    "Please close the window before the storm arrives.",
    "The farmer counted the sheep in the lower field.",
    "Her letter arrived two weeks after she sent it.",
    "The old lighthouse still guides ships along the coast.",
    "We planted seven rows of corn behind the barn.",
    "The speaker paused, smiled, and continued her story.",
    "Bees move from flower to flower all afternoon.",
    "The bakery sells warm rolls early every morning.",
    "A narrow staircase led up to the attic.",
    "The students solved the puzzle in under an hour.",
    "Thick fog rolled in from the sea at dusk.",
    "He whistled a cheerful tune while walking home.",
    "The garden gate creaked as it swung open.",
    "Rivers carve deep valleys over thousands of years.",
    "Bring a warm coat, because the nights get cold.",
)


# sentences per language (written for this demo); English keeps its accents, others speak espeak's default
GERMAN = (
    "Der kleine Hund schläft unter dem Tisch in der Küche.",
    "Morgen fahren wir mit dem Zug an die See.",
    "Im Garten blühen im Frühling viele bunte Blumen.",
    "Kannst du mir bitte das Salz und den Pfeffer geben?",
    "Die alte Brücke führt über einen breiten Fluss.",
    "Am Abend lesen die Kinder gern ein Buch.",
    "Der Bäcker verkauft frisches Brot schon früh am Morgen.",
    "Auf dem Berg liegt noch ein wenig Schnee.",
    "Wir treffen uns um sieben Uhr vor dem Kino.",
    "Der Wind weht kalt über die leeren Felder.",
    "Meine Schwester spielt jeden Tag Klavier.",
    "Nach dem Regen scheint wieder die Sonne.",
)
SENTENCES_OF = {"de": GERMAN}  # English: SENTENCES below


def speaker_specs(n: int, languages: tuple[str, ...] = ("en",)) -> list[tuple[str, str, int, int]]:
    """n distinct (accent, variant, pitch, speed) tuples, always the same for the same arguments;
    speaker i speaks languages[i % len(languages)] (English-only lists are what they always were)."""
    specs = []
    for i in range(n):
        lang, k = languages[i % len(languages)], i // len(languages)  # k: the speaker's index in its language
        specs.append(
            (
                ACCENTS[k % len(ACCENTS)] if lang == "en" else lang,
                VARIANTS[k % len(VARIANTS)],
                PITCHES[(k // len(ACCENTS)) % len(PITCHES)],
                SPEEDS[(k // 3) % len(SPEEDS)],
            )
        )
    if len(set(specs)) != n:
        raise ValueError(f"cannot make {n} distinct voices from the built-in lists")
    return specs


def sentences_of(lang: str) -> tuple[str, ...]:
    if lang == "en":
        return SENTENCES
    if lang not in SENTENCES_OF:
        raise SystemExit(f"no demo sentences for language {lang!r}; known: {['en', *SENTENCES_OF]}")
    return SENTENCES_OF[lang]


def speaker_name(spec) -> str:
    _, variant, pitch, speed = spec
    return f"{variant}_p{pitch}_s{speed}"


def check_espeak(specs) -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng is not installed: run `sudo apt-get install -y espeak-ng` (Debian/Ubuntu)")
    # espeak-ng silently falls back to the default voice for an unknown variant: check ours exist
    listing = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    files = {line.split()[4].rsplit("/", 1)[-1] for line in listing.splitlines()[1:] if len(line.split()) >= 5}
    missing = sorted({v for _, v, _, _ in specs} - files)
    if missing:
        raise SystemExit(f"espeak-ng lacks the voice variants {missing}; reinstall espeak-ng-data")
    return exe


def synthesize(exe: str, spec, text: str) -> np.ndarray:
    accent, variant, pitch, speed = spec
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(
            [exe, "-v", f"{accent}+{variant}", "-p", str(pitch), "-s", str(speed), "-w", tmp.name, text],
            check=True,
            capture_output=True,
        )
        wav, sr = sf.read(tmp.name, dtype="float32")
    return resample(wav, sr, SAMPLE_RATE)


HELD_OUT_TEXT = "A quiet voice read the old letter aloud, one line at a time."


def held_out_voice(path: Path, voices: int, text: str = HELD_OUT_TEXT) -> Path:
    """A reference recording of a voice the corpus of `voices` speakers does not hold (the next
    spec in the list), saying a sentence the corpus does not hold either. Kept if it exists."""
    if not path.exists():
        spec = speaker_specs(voices + 1)[voices]
        write_wav(path, synthesize(check_espeak([spec]), spec, text))
    return path


def build(
    out_dir: Path, voices: int, sentences: int, jobs: int | None = None, languages: tuple[str, ...] = ("en",)
) -> Report:
    texts = {lang: sentences_of(lang) for lang in languages}
    specs = speaker_specs(voices, languages)
    exe = check_espeak(specs)
    work = []
    for i, spec in enumerate(specs):
        name = speaker_name(spec)
        lang, s = languages[i % len(languages)], i // len(languages)
        for j in range(sentences):
            text = texts[lang][(s * 7 + j) % len(texts[lang])]
            work.append((spec, text, out_dir / spec[0] / name / f"{name}_{j:03d}"))
    report = Report("make_demo_corpus")
    todo = [w for w in work if not (w[2].with_suffix(".wav").exists() and w[2].with_suffix(".txt").exists())]
    report.skipped = len(work) - len(todo)

    def make(item):
        spec, text, stem = item
        write_wav(stem.with_suffix(".wav"), synthesize(exe, spec, text))
        write_text(stem.with_suffix(".txt"), text + "\n")

    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        for _ in tqdm(pool.map(make, todo), total=len(todo), desc="synthesising", unit="utt"):
            report.done += 1
    seconds = sum(sf.info(str(w[2].with_suffix(".wav"))).duration for w in work)
    report.extra.append(
        f"{voices} speakers x {sentences} sentences = {len(work)} utterances, "
        f"{seconds / 60:.1f} min of audio in {out_dir}"
    )
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_demo_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="where to write <group>/<speaker>/<id>.wav|.txt")
    p.add_argument("--voices", type=int, default=8, help="number of speakers (default 8)")
    p.add_argument("--sentences", type=int, default=12, help="utterances per speaker (default 12)")
    p.add_argument("--jobs", type=int, default=None, help="parallel espeak-ng processes (default: CPU count)")
    p.add_argument(
        "--languages",
        default="en",
        help=f"comma-separated languages the speakers take in turn: en, {', '.join(SENTENCES_OF)} (default en)",
    )
    args = p.parse_args(argv)
    setup_logging()
    if args.voices < 1 or args.sentences < 1:
        p.error("--voices and --sentences must be >= 1")
    langs = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    if not langs or len(set(langs)) != len(langs):
        p.error(f"--languages takes distinct codes separated by commas, got {args.languages!r}")
    return build(args.out_dir, args.voices, args.sentences, args.jobs, langs).finish()


if __name__ == "__main__":
    sys.exit(main())
