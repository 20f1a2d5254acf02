"""Every default of valle_jax, with its unit. Other presets start from here and override.

    python -m tools.draw_batches --config configs/base.py --config.data.store=STORE
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # integer: seeds data order, prompt sampling and (later) initialisation

    # ---- data: the grain pipeline over a packed store (SPEC §6.5, §6.6) ----
    d = c.data = ml_collections.ConfigDict()
    d.store = ""  # path: a store written by `python -m tools.pack` (required to train)
    d.batch_size = 8  # utterances per global batch (split evenly over hosts)
    d.sample_type = "path"  # "path": each utterance once per epoch | "speaker" | "group": uniform over those
    d.phones_range = (4, 256)  # phoneme ids per utterance, <s> and </s> included, inclusive bounds
    d.duration_range = (1.0, 12.0)  # seconds of target audio, inclusive bounds
    d.min_utterances = 2  # utterances a speaker needs (after the filters above) to be kept
    d.prompt_duration = 3.0  # seconds: target prompt length; each prompt draws ±1 s around it
    d.max_prompts = 3  # utterances of the same speaker stitched into one prompt, at most
    d.random_utterance = 1.0  # probability of prompting with other utterances (else the target itself)
    d.prompt_levels = 8  # codec levels kept in prompts (the model's prom_levels)
    d.text_buckets = (32, 64, 128, 256)  # phoneme ids: text is padded up to one of these
    d.resp_buckets = (150, 300, 450, 600, 900)  # codec frames (75 per second): response padding sizes
    d.num_workers = 0  # grain worker processes building batches (0: in the main process)
    d.prefetch = 4  # batches buffered ahead of the consumer

    # ---- model: the reference's AR+NAR VALL-E (SPEC §2-3) ----
    m = c.model = ml_collections.ConfigDict()
    m.arch = "llama"  # backbone: "transformer" | "llama"
    m.size = "full"  # preset setting d_model/n_heads/n_layers: tiny | quarter | half | full | double | "" (use below)
    m.d_model = 1024  # width (used when size is "")
    m.n_heads = 16  # attention heads (used when size is "")
    m.n_layers = 12  # layers (used when size is "")
    m.n_kv_heads = 0  # key/value heads; 0 = n_heads; fewer = grouped-query attention (llama only)
    m.ffn_mult = 4  # feed-forward width as a multiple of d_model
    m.n_tokens = 1024  # codes per RVQ level (EnCodec); the stop token is this id
    m.n_prom_levels = 8  # codec levels summed into the prompt embedding
    m.n_resp_levels = 8  # codec levels predicted (level 0 by the AR, 1..7 by the NAR)
    m.n_langs = 1  # rows of the language table
    m.version = 3  # 3 = the reference; 4 adds learned per-level scalars to the code embeddings
    m.norm_eps = 0.0  # 0 = the backbone's own (LayerNorm 1e-5, RMSNorm 1e-6)
    m.rope_theta = 10_000.0  # RoPE base (llama)
    m.bidirectional_nar = False  # True: NAR levels attend both ways (the reference's later fix)
    m.dropout = 0.1  # probability, training only
    m.dtype = "float32"  # matmul compute dtype: float32 | bfloat16 (parameters stay float32)
    m.remat = False  # recompute layer activations in the backward pass (saves memory)
    return c
