"""valle_jax: VALL-E (neural-codec language model for zero-shot TTS) in JAX/Flax.

    from valle_jax import TTS
    tts = TTS.load("models/my-model")
    wav = tts.synthesize("Hello there.", "voice.wav")   # float32, 24 kHz

Data preparation lives in `tools/` (quantize, phonemize, pack) and `valle_jax.data`; training in
`python -m valle_jax.train`; synthesis in `python -m valle_jax.synthesize` and `TTS`.
"""

__version__ = "0.1.0"

__all__ = ["TTS", "load_model"]


def __getattr__(name):  # imported on first use: `import valle_jax` stays light (no JAX, no torch)
    if name == "TTS":
        from valle_jax.tts import TTS  # noqa: PLC0415 - lazy on purpose (see above)

        return TTS
    if name == "load_model":
        from valle_jax.checkpointing import load_model  # noqa: PLC0415 - lazy on purpose (see above)

        return load_model
    raise AttributeError(f"module 'valle_jax' has no attribute {name!r}")
