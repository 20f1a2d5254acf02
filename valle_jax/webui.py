"""A Gradio web UI for synthesis: the reference's inference tab (reference.md §9).

    python -m valle_jax.webui --checkpoint PATH [--listen HOST:PORT] [--share] [--voice-dir DIR]

Text; a reference audio upload or microphone recording, or a saved voice (`--voice-dir`: `<name>.npz` voice
files of `python -m valle_jax.voice make`, as the server keeps them, valle_jax.serve); the language; every
sampling setting with the reference's defaults (decoding.Settings); the audio out with a download button, and
the settings actually used. "One utterance per line" decodes the lines as one batch and joins them in order.
Bad input (empty text, unknown symbols, an unreadable or too short reference) shows as a message in the page,
never a stack trace. The model loads once and is compiled for the default buckets before the page is served
(the log says how long that took).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np

from valle_jax.audio import SAMPLE_RATE, AudioError, write_wav
from valle_jax.codec import CodecUnavailable
from valle_jax.data.text import TextError
from valle_jax.decoding import DecodeError, Settings
from valle_jax.runtime import use_cpu_xla_flags
from valle_jax.serve.engine import Engine
from valle_jax.synthesize import add_vocoder_flags, vocoder_options
from valle_jax.tts import TTS, Prompt
from valle_jax.vocoder import VocoderUnavailable

log = logging.getLogger("valle_jax.webui")

# (Settings field, label, minimum, maximum, step): the sliders, in the reference's order
SLIDERS = [
    ("max_ar_steps", "Maximum AR frames (75 per second)", 1, 2700, 1),
    ("max_nar_levels", "NAR levels (0: all)", 0, 7, 1),
    ("ar_temp", "AR temperature (0: greedy)", 0.0, 1.5, 0.05),
    ("nar_temp", "NAR temperature (0: greedy)", 0.0, 1.5, 0.05),
    ("min_ar_temp", "Dynamic AR temperature floor (< 0: off)", -1.0, 1.5, 0.05),
    ("min_nar_temp", "Dynamic NAR temperature floor (< 0: off)", -1.0, 1.5, 0.05),
    ("top_p", "Top P (1: off)", 0.0, 1.0, 0.05),
    ("top_k", "Top K (0: off)", 0, 1024, 1),
    ("min_p", "Min P (0: off)", 0.0, 1.0, 0.01),
    ("repetition_penalty", "Repetition penalty (1: off)", 0.5, 5.0, 0.05),
    ("repetition_penalty_decay", "Repetition penalty length decay", -2.0, 2.0, 0.05),
    ("length_penalty", "Length penalty (0: off)", -2.0, 2.0, 0.05),
    ("min_ar_steps", "Minimum AR frames (-1: from the text, 0: off)", -1, 750, 1),
    ("beam_width", "Beam width (> 1: beam search)", 0, 32, 1),
    ("mirostat_tau", "Mirostat tau (0: off)", 0.0, 8.0, 0.05),
    ("mirostat_eta", "Mirostat eta", 0.0, 2.0, 0.05),
    ("ras_window", "Repetition-aware window (frames)", 1, 50, 1),
    ("ras_threshold", "Repetition-aware threshold", 0.0, 1.0, 0.01),
    ("seed", "Seed", 0, 2**31 - 1, 1),
]
INTS = {f.name for f in dataclasses.fields(Settings) if f.type in ("int", int)}
USER_ERRORS = (TextError, AudioError, DecodeError, ValueError)


class WebUI:
    """What the page's button calls: one model, voices from uploads or `voice_dir`."""

    def __init__(self, tts: TTS, voice_dir: str | Path | None = None, out_dir: str | Path | None = None):
        self.tts = tts
        self.voice_dir = Path(voice_dir) if voice_dir else None
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="valle_webui_"))
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def saved_voices(self) -> list[str]:
        return sorted(p.stem for p in self.voice_dir.glob("*.npz")) if self.voice_dir else []

    def voice(self, reference: str | None, saved: str | None, input_prompt_length: float) -> Prompt:
        if reference:
            return self.tts.prompt(reference, input_prompt_length)
        if saved:
            if saved not in self.saved_voices():
                raise AudioError(f"no saved voice {saved!r}")
            return self.tts.prompt(self.voice_dir / f"{saved}.npz", input_prompt_length)
        raise AudioError("no voice: upload or record a reference, or pick a saved voice")

    def generate(self, text, reference, saved, language, lines_mode, input_prompt_length, *values, progress=None):
        """(wav path, settings used). Raises gr.Error with a readable message on bad input."""
        try:
            settings = Settings(
                **{name: (int(v) if name in INTS else float(v)) for (name, *_), v in zip(SLIDERS, values)}
            )
            texts = TTS.lines(text or "") if lines_mode else [" ".join((text or "").split())]
            if not texts[0]:
                raise TextError("empty text: nothing to synthesise")
            voice = self.voice(reference, saved, float(input_prompt_length))
            if progress is not None:
                progress(0.1, desc=f"decoding {len(texts)} utterance(s)")
            t0 = time.perf_counter()
            codes = self.tts.generate_codes(
                texts, [voice] * len(texts), language=language, input_prompt_length=0.0, **dataclasses.asdict(settings)
            )
            if progress is not None:
                progress(0.8, desc="vocoding")
            parts = list(self.tts.decode_rows(codes))
            if not any(len(p) for p in parts):
                raise DecodeError("the model produced no audio (the stop token came first); try another seed")
            wav = np.concatenate(parts)
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from e
        path = self.out_dir / f"valle_{time.strftime('%Y%m%d-%H%M%S')}_{time.perf_counter_ns() % 10**6}.wav"
        write_wav(path, wav)
        used = dataclasses.asdict(settings) | {
            "language": language,
            "lines": len(texts),
            "voice_seconds": round(voice.seconds, 2),
            "audio_seconds": round(len(wav) / SAMPLE_RATE, 2),
            "seconds": round(time.perf_counter() - t0, 2),
            "vocoder": self.tts.vocoder,
        }
        return str(path), used

    def blocks(self, defaults: Settings | None = None) -> gr.Blocks:
        defaults = defaults or Settings()
        with gr.Blocks(title="valle_jax") as demo:
            gr.Markdown("## valle_jax: zero-shot text to speech")
            with gr.Row():
                with gr.Column():
                    text = gr.Textbox(label="Text", lines=4, elem_id="text", placeholder="What to say")
                    lines_mode = gr.Checkbox(label="One utterance per line (decoded as one batch)", elem_id="lines")
                    reference = gr.Audio(
                        label="Reference voice (upload or record)",
                        sources=["upload", "microphone"],
                        type="filepath",
                        elem_id="reference",
                    )
                    saved = gr.Dropdown(
                        choices=self.saved_voices(),
                        value=None,
                        label="or a saved voice",
                        elem_id="saved",
                        visible=bool(self.saved_voices()),
                    )
                    language = gr.Dropdown(
                        choices=list(self.tts.langs), value="en", label="Language", elem_id="language"
                    )
                    prompt_length = gr.Slider(
                        0,
                        30,
                        value=3.0,
                        step=0.5,
                        label="Reference seconds kept (0: all)",
                        elem_id="input_prompt_length",
                    )
                    with gr.Accordion("Sampling", open=False):
                        sliders = [
                            gr.Slider(lo, hi, value=getattr(defaults, name), step=step, label=label, elem_id=name)
                            for name, label, lo, hi, step in SLIDERS
                        ]
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    output = gr.Audio(
                        label="Output",
                        type="filepath",
                        interactive=False,
                        elem_id="output",
                        waveform_options=gr.WaveformOptions(show_recording_waveform=False),
                    )
                    used = gr.JSON(label="Settings used", elem_id="used")

            def run(*args, progress=gr.Progress()):
                return self.generate(*args, progress=progress)

            button.click(
                run,
                [text, reference, saved, language, lines_mode, prompt_length, *sliders],
                [output, used],
                concurrency_limit=1,
            )
        return demo


def warm_up(tts: TTS, settings: Settings | None = None) -> float:
    """Compiles the default buckets (one utterance, a short text, a 3 s voice); seconds."""
    return Engine(tts, max_batch=1).warm_up([1], settings=settings)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m valle_jax.webui", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="model directory, training directory or .pth")
    p.add_argument("--codec-dir", type=Path, default=None, help="EnCodec weights folder")
    add_vocoder_flags(p)
    p.add_argument("--listen", default="127.0.0.1:7860", help="HOST:PORT")
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs the network)")
    p.add_argument(
        "--voice-dir", type=Path, default=None, help="saved voices (<name>.npz voice files, as the server keeps them)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--listen must be HOST:PORT, got {args.listen!r}")
    t0 = time.perf_counter()
    try:
        tts = TTS.load(args.checkpoint, codec_dir=args.codec_dir, dtype=args.dtype, **vocoder_options(args))
        tts.codec  # noqa: B018 - a missing codec is an error now, not at the first click
        if args.vocoder == "vocos":
            tts.vocos  # noqa: B018
    except (CodecUnavailable, VocoderUnavailable, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warm = warm_up(tts)
    ui = WebUI(tts, args.voice_dir)
    log.info("model loaded and compiled in %.1f s (warm-up %.1f s)", time.perf_counter() - t0, warm)
    ui.blocks().launch(server_name=host, server_port=int(port), share=args.share, allowed_paths=[str(ui.out_dir)])
    return 0


if __name__ == "__main__":
    use_cpu_xla_flags()  # before JAX starts (see valle_jax/runtime.py)
    sys.exit(main())
