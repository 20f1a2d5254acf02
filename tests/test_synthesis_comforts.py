"""Synthesis comforts: sentence splitting of long text, output formats by suffix, WAV on stdout,
pauses, the progress bar over --text-file, TTS.sample_rate and TTS.save."""

import io
import re

import numpy as np
import pytest
import soundfile as sf

from valle_jax import audio_io, synthesize, text_split
from valle_jax.audio import HOP_LENGTH, SAMPLE_RATE, AudioError

# 2,000 characters of prose: sentences of every length, abbreviations, initials, decimals, a quote
# and one sentence far too long for a piece (it must be cut at its commas, then between words)
PARAGRAPH = (
    "Mr. Hale walked to the harbor at 6.30 in the morning, as he had done every day for years. "
    "The fishing boats were already out, and the water was calm and grey. "
    '"Will it rain today?" asked his neighbor, Dr. J. R. Moss, who was painting his fence. '
    "Hale did not answer at once. "
    "He looked at the sky, then at the gulls circling above the old lighthouse, then at the long "
    "line of clouds gathering over the hills to the west, where the wind, which had been quiet all "
    "week, was beginning to rise again with a low and steady sound that every sailor in the village "
    "knew well, and feared a little, and respected a great deal more than any forecast. "
    "Yes. "
    "It will rain by noon, he said at last, and it will not stop before the evening. "
    "The painter sighed, put down his brush, and went inside to make a pot of tea. "
    "By eleven the first drops fell on the stones of the quay. "
    "Children ran home from the beach, and shopkeepers pulled in their awnings. "
    "The market emptied in minutes! "
    "Only the baker stayed open, selling warm bread to anyone who came in from the storm. "
    "In the afternoon the rain grew heavy, and the streets turned into small rivers. "
    "Hale sat by his window with a book, but he did not read it; he watched the sea instead. "
    "The boats came back one by one, their crews wet and tired but safe. "
    "When the last one was tied up, he closed the book and smiled. "
    "That evening the clouds broke, and a pale gold light spread over the water. "
    "The neighbors came out again, talking about the weather, as neighbors always do. "
    "Dr. Moss finished his fence the next morning, and it looked very fine indeed. "
    "Hale said nothing about it, but he nodded as he passed, which was praise enough. "
    "The harbor master wrote in his log that the storm had been short but fierce. "
    "Two small boats had lost their masts, and one net was never found. "
    "Nobody was hurt, and by the weekend the village looked as it always had. "
    "And so the summer went on, one quiet day after another, until the autumn came."
)


def test_the_paragraph_is_two_thousand_characters():
    assert 1900 <= len(PARAGRAPH) <= 2100


def test_sentences_end_at_punctuation_not_at_abbreviations_initials_or_decimals():
    got = text_split.sentences('Mr. Hale met Dr. J. R. Moss at 6.30 today. "Rain?" he asked! E.g. this.\nNext line')
    assert got == ["Mr. Hale met Dr. J. R. Moss at 6.30 today.", '"Rain?" he asked!', "E.g. this.", "Next line"]
    cjk = text_split.sentences("Wait... what? ... Fine。日本語です。")
    assert cjk == ["Wait... what? ...", "Fine。", "日本語です。"]
    assert text_split.sentences(" \n ") == []


def test_pieces_are_cut_at_clauses_then_words_and_balanced():
    count = lambda texts: [len(t.replace(" ", "")) for t in texts]  # noqa: E731 - letters as "phonemes"
    pieces = text_split.split_text("aaaa bbbb, cccc dddd eeee ffff gggg hhhh. Short one.", count, 12)
    assert pieces == ["aaaa bbbb,", "cccc dddd", "eeee ffff", "gggg hhhh.", "Short one."]
    assert text_split.split_text("abcdefghij", count, 3) == ["ab", "cde", "fg", "hij"]  # no spaces: by characters
    with pytest.raises(ValueError, match="max_phonemes"):
        text_split.split_text("a", count, 0)


@pytest.mark.needs_espeak
def test_a_2000_character_paragraph_splits_into_sentences_under_the_phoneme_maximum():
    from valle_jax.data.text import Phonemizer

    ph = Phonemizer("en")
    count = lambda texts: [len(t) for t in ph.tokens(texts)]  # noqa: E731
    limit = 40
    pieces = text_split.split_text(PARAGRAPH, count, limit)
    assert " ".join(pieces) == PARAGRAPH  # nothing lost, nothing reordered
    assert max(count(pieces)) <= limit
    assert pieces[0].startswith("Mr. Hale walked") and "Dr. J. R. Moss" in " ".join(pieces[:8])  # not cut there
    assert '"Will it rain today?" asked his neighbor,' in pieces and "Yes." in pieces
    first = next(i for i, p in enumerate(pieces) if p.startswith("He looked"))
    last = next(i for i, p in enumerate(pieces) if p.endswith("any forecast."))
    assert last - first >= 3  # the long sentence: several pieces
    ends = sum(p.endswith((".", "!", "?", ",", ";")) for p in pieces)
    assert ends >= 0.75 * len(pieces)  # most cuts fall on punctuation, not between words
    whole = text_split.split_text(PARAGRAPH, count)  # the default maximum keeps most sentences whole
    assert len(whole) < len(pieces) and max(count(whole)) <= text_split.DEFAULT_MAX_PHONEMES


@pytest.mark.parametrize("suffix, fmt", [(".wav", "WAV"), (".flac", "FLAC"), (".ogg", "OGG"), (".MP3", "MP3")])
def test_the_suffix_picks_the_format(tmp_path, suffix, fmt):
    wav = (0.3 * np.sin(np.arange(SAMPLE_RATE) / 10.0)).astype(np.float32)
    audio_io.write_audio(tmp_path / f"out{suffix}", wav)
    info = sf.info(str(tmp_path / f"out{suffix}"))
    assert info.format == fmt and info.samplerate == SAMPLE_RATE and abs(info.frames - len(wav)) < 2000
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]  # no temp file left


def test_an_unknown_suffix_is_refused_and_stdout_gets_wav_bytes():
    with pytest.raises(AudioError, match=r"suffix '\.xyz'.*\.wav, \.flac, \.ogg"):
        audio_io.output_format("out.xyz")
    buf = io.BytesIO()
    audio_io.write_audio("-", np.zeros(100, np.float32), stdout=buf)
    assert buf.getvalue()[:4] == b"RIFF" and sf.info(io.BytesIO(buf.getvalue())).frames == 100


def test_join_puts_pauses_between_non_empty_pieces():
    a, b = np.ones(10, np.float32), 2 * np.ones(5, np.float32)
    out = audio_io.join([a, np.zeros(0, np.float32), b], 0.001, sample_rate=4000)
    np.testing.assert_array_equal(out, np.r_[a, np.zeros(4), b])
    assert len(audio_io.join([np.zeros(0)], 0.5)) == 0
    with pytest.raises(AudioError, match="pause"):
        audio_io.join([a], -1.0)


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("voice") / "voice.wav"
    sf.write(path, 0.3 * np.sin(np.arange(2 * SAMPLE_RATE) / 7.0), SAMPLE_RATE)
    return path


class FakeCodec:
    """EnCodec's shapes without its cost (the real codec is tested in test_codec and test_synthesize):
    what these tests check is the text and audio handling around it."""

    is_random = False

    def encode_batch(self, wavs):
        return [np.zeros((-(-len(w) // HOP_LENGTH), 8), np.int16) for w in wavs]

    def decode(self, codes):
        return np.full((len(codes) * HOP_LENGTH,), 0.25, np.float32)

    def decode_rows(self, rows, map_rows=map):
        return (self.decode(c) for c in rows)


@pytest.fixture
def fake_codec(monkeypatch):
    from valle_jax.tts import TTS

    monkeypatch.setattr(TTS, "codec", FakeCodec())


@pytest.mark.needs_espeak
def test_the_api_decodes_a_paragraph_as_one_batch_in_one_voice_and_joins_it_with_pauses(
    tiny_model_dir, voice_wav, fake_codec, tmp_path, monkeypatch
):
    """The decoder itself is tested elsewhere (test_synthesize, test_decoding): here it returns
    `steps` frames per row, so the test sees what synthesis hands it and what it does with the result."""
    from valle_jax import TTS
    from valle_jax.decoding import Decoder, Output

    tts = TTS.load(tiny_model_dir)
    assert tts.sample_rate == SAMPLE_RATE
    calls, steps, pause = [], 3, 0.1

    def generate(self, inputs, settings):
        calls.append(inputs)
        b = len(inputs.text_len)
        return Output([np.full((steps, 8), 5, np.int32)] * b, np.ones(b, bool))

    monkeypatch.setattr(Decoder, "generate", generate)
    wav = tts.synthesize(PARAGRAPH, str(voice_wav), max_phonemes=40, pause=pause)
    assert set(np.unique(wav)) == {0.0, 0.25}  # the pieces' audio and the silences
    n = len(tts.split(PARAGRAPH, max_phonemes=40))
    assert n > 25 and len(calls) == 1 and len(calls[0].text_len) == n  # every piece in one batch
    prompts = np.asarray(calls[0].prompt)
    assert all((prompts[i] == prompts[0]).all() for i in range(n))  # one voice
    assert len(wav) == n * steps * HOP_LENGTH + (n - 1) * round(pause * SAMPLE_RATE)
    one = tts.synthesize("First sentence. Second one.\nA new line.", str(voice_wav), split=False, pause=pause)
    assert len(calls[-1].text_len) == 2 and len(one) == 2 * steps * HOP_LENGTH + round(pause * SAMPLE_RATE)
    tts.save(tmp_path / "para.flac", wav)
    assert sf.info(str(tmp_path / "para.flac")).format == "FLAC"


def fake_codes(self, texts, references, progress=None, batch_size=8, **kwargs):
    """generate_codes' contract without decoding: frames by text length, progress per batch."""
    fake_codes.batch_sizes.append(batch_size)
    out = []
    for start in range(0, len(texts), batch_size):
        out += [np.full((2 + len(t) % 3, 8), 7, np.int32) for t in texts[start : start + batch_size]]
        if progress:
            progress(len(texts[start : start + batch_size]))
    return out


@pytest.mark.needs_espeak
def test_cli_writes_only_wav_to_stdout(tiny_model_dir, voice_wav, fake_codec, monkeypatch, capsysbinary):
    from valle_jax.tts import TTS

    fake_codes.batch_sizes = []
    monkeypatch.setattr(TTS, "generate_codes", fake_codes)
    text = "One sentence here. And a second one! A third?"
    args = [text, str(voice_wav), "--out", "-", "--checkpoint", str(tiny_model_dir)]
    assert synthesize.main([*args, "--pause", "0.2"]) == 0
    out, err = capsysbinary.readouterr()
    wav, sr = sf.read(io.BytesIO(out))
    frames = sum(2 + len(t) % 3 for t in ["One sentence here.", "And a second one!", "A third?"])
    assert sr == SAMPLE_RATE and len(wav) == frames * HOP_LENGTH + 2 * round(0.2 * SAMPLE_RATE)
    assert b"wrote 1 file(s)" in err and fake_codes.batch_sizes == [3]  # one batch of three pieces


@pytest.mark.needs_espeak
def test_cli_text_file_shows_progress_and_writes_the_chosen_format(
    tiny_model_dir, voice_wav, fake_codec, tmp_path, monkeypatch, capsys
):
    from valle_jax.tts import TTS

    fake_codes.batch_sizes = []
    monkeypatch.setattr(TTS, "generate_codes", fake_codes)
    lines = tmp_path / "lines.txt"
    lines.write_text("First. Second.\nThird line.\n\nFourth. Fifth. Sixth.\n")
    out = tmp_path / "wavs"
    common = ["--checkpoint", str(tiny_model_dir)]
    rc = synthesize.main([str(voice_wav), "--text-file", str(lines), "--out", str(out), *common, "--format", "flac"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["0001.flac", "0002.flac", "0004.flac"]
    assert sf.info(str(out / "0004.flac")).format == "FLAC"
    err = capsys.readouterr().err
    assert re.search(r"synthesising: 100%.*6/6", err) and fake_codes.batch_sizes == [8]
    # usage errors, before loading: an unknown suffix, stdout with a text file
    assert synthesize.main(["Hi.", str(voice_wav), "--out", str(tmp_path / "x.aiff"), *common]) == 2
    assert "cannot tell the audio format" in capsys.readouterr().err
    assert synthesize.main([str(voice_wav), "--text-file", str(lines), "--out", "-", *common]) == 2
    assert "--out - (stdout)" in capsys.readouterr().err
