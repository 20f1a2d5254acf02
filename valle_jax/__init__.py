"""valle_jax: VALL-E (neural-codec language model for zero-shot TTS) in JAX/Flax.

Data preparation lives in `tools/` (quantize, phonemize, pack) and `valle_jax.data`
(store and grain pipeline); the model, training and synthesis APIs are added here as they land.
"""
__version__ = "0.1.0"
