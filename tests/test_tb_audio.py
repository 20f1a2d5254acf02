"""Evaluation audio in TensorBoard: clips in the Audio tab, their phonemes in the Text tab."""

import numpy as np

from valle_jax.training import monitor
from valle_jax.training.evaluation import phoneme_text


def test_audio_and_its_text_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = monitor.MetricsWriter(tmp_path)
    wav = 0.5 * np.sin(np.arange(2400, dtype=np.float32) / 5.0)
    writer.write_audio(7, "eval_audio/0_hyp", wav, 24_000, "həlˈoʊ")
    writer.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"audio": 0, "tensors": 0})
    ea.Reload()
    (clip,) = ea.Audio("eval_audio/0_hyp")
    assert clip.step == 7 and clip.sample_rate == 24_000 and clip.encoded_audio_string[:4] == b"RIFF"
    (text,) = [t for tag in ea.Tags()["tensors"] if tag.startswith("eval_audio/0_hyp") for t in ea.Tensors(tag)]
    assert text.step == 7 and "həlˈoʊ" in text.tensor_proto.string_val[0].decode()


def test_phoneme_text_reads_a_batch_row_back():
    symmap = {"<s>": 1, "</s>": 2, " ": 3, "h": 4, "i": 5, "?": 7, "p": 7}
    assert phoneme_text(np.array([1, 4, 5, 3, 4, 7, 9, 2]), symmap) == "hi h?<9>"
