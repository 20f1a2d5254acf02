"""Every default of valle_jax, with its unit. Other presets start from here and override.

python -m tools.draw_batches --config configs/base.py --config.data.store=STORE
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # integer: seeds data order, prompt sampling and (later) initialisation

    # ---- data: the grain pipeline over a packed store (reference.md §6.5, §6.6) ----
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

    # ---- model: the reference's AR+NAR VALL-E (reference.md §2-3) ----
    m = c.model = ml_collections.ConfigDict()
    m.arch = "llama"  # backbone: "transformer" | "llama" | "retnet" | "mistral" | "mixtral" | "bitnet"
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
    m.norm_eps = 0.0  # 0 = the backbone's own (transformer 1e-5, llama and retnet 1e-6)
    m.rope_theta = 0.0  # RoPE base; 0 = the arch's own (mixtral 1e6, others 1e4)
    m.experts = 0  # FFN experts per layer (llama family: Mixtral; retnet: XMoE); 0 = the arch's own (mixtral 8)
    m.experts_per_token = 0  # experts per token; 0 = min(2, experts), as the reference
    m.sliding_window = -1  # earlier positions a query sees; -1 = the arch's own (mistral 4096, mixtral 900), 0 = none
    m.router_aux_loss_coef = 0.001  # weight of the MoE load-balancing loss
    m.moe_dispatch = "dropless"  # "dropless" (grouped matmuls) | "capacity" (fixed slots; faster on CPU)
    m.capacity_factor = 1.25  # capacity dispatch: slots per expert = factor * tokens * k / experts
    m.moe_second_policy = "random"  # retnet XMoE: "random" keeps the 2nd expert with probability 2*p2 | "all"
    m.moe_eval_capacity = 0.25  # retnet XMoE outside training: slots per expert = ceil(this * positions); 0 = none
    m.bitnet = False  # BitNet b1.58: every backbone matmul ternary (arch "bitnet" always); docs/model.md
    m.bidirectional_nar = False  # True: NAR levels attend both ways (the reference's later fix)
    m.dropout = 0.1  # probability, training only
    m.dtype = "float32"  # matmul compute dtype: float32 | bfloat16 (parameters stay float32)
    m.remat = False  # recompute layer activations in the backward pass (saves memory)
    m.scan_unroll = 0  # layers per scan iteration; 0 = fully unrolled (faster, less memory; 1 = compile once per layer)
    m.retnet_variant = "fork"  # retnet layout: "fork" (the reference's checkpoints) | "torchscale" (upstream 0.3.0)
    m.retention_chunk = 0  # retnet: chunk size (positions) of the chunkwise form; 0 = parallel form
    # LoRA adapters (docs/training.md): with rank > 0 only the adapters train, on the train.init_from model
    m.lora = ml_collections.ConfigDict()
    m.lora.rank = 0  # adapter rank (0 = no adapters)
    m.lora.alpha = 16.0  # the update is scaled by alpha / rank
    m.lora.dropout = 0.0  # probability of dropping an adapter input feature (one mask per step)
    m.lora.targets = ("attention", "ffn")  # presets (attention: q/k/v/o; ffn: the FFN matrices) or path regexes
    m.attention = "dense"  # "dense" | "blocked": query blocks with recomputation, no [B,H,S,S] kept for backward

    # ---- mesh: how devices are laid out and what is sharded over them ----
    h = c.mesh = ml_collections.ConfigDict()
    h.shape = (-1, 1, 1, 1)  # devices along (data, fsdp, tensor, expert); one -1 takes the rest
    # logical axis -> mesh axes ("" = replicated; "a,b" = both). A dimension that a mesh axis size
    # does not divide stays replicated. "batch" shards the data over the data-parallel axes; the
    # expert axis is one of them: an MoE layer sends each token to the device holding its expert.
    h.rules = (
        ("batch", "data,fsdp,expert"),
        ("experts", "expert"),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("layers", ""),
        ("head_dim", ""),
    )

    # ---- optim: optax optimizer, schedule, clipping, accumulation, freezing (reference.md §7.2) ----
    o = c.optim = ml_collections.ConfigDict()
    o.name = "adamw"  # "adamw" | "prodigy" | "sgd"
    o.learning_rate = 3.25e-4  # peak LR (prodigy: its lr multiplier, normally 1.0)
    o.b1 = 0.9  # adamw / prodigy first-moment decay
    o.b2 = 0.96  # adamw / prodigy second-moment decay (the reference's 0.96)
    o.eps = 1e-7  # adamw / prodigy epsilon
    o.weight_decay = 0.01  # decoupled weight decay (adamw, prodigy)
    o.d_coef = 1.0  # prodigy: D-estimate coefficient (the reference passes its learning_rate here)
    o.momentum = 0.0  # sgd momentum (0 = plain SGD)
    o.schedule = "constant"  # "constant" | "cosine" (warmup + cosine) | "linear" (warmup + linear decay)
    o.warmup_steps = 0  # optimizer steps of linear warmup from 0
    o.decay_steps = 0  # optimizer steps of decay after warmup (0 = until train.steps)
    o.end_lr_ratio = 0.0  # final LR as a fraction of the peak (cosine / linear)
    o.clip_norm = 100.0  # global gradient-norm clip (0 = off); the reference's gradient_clipping
    o.grad_accum = 1  # batches accumulated into one optimizer step
    o.frozen = ()  # regexes over parameter paths ("backbone/q", "text_emb"): never updated
    o.embeddings = ""  # model dir or reference .pth whose *_emb tables are injected and frozen (reference.md §7.8)

    # ---- train: the loop, checkpoints, logging ----
    t = c.train = ml_collections.ConfigDict()
    t.steps = 100_000  # optimizer steps in total
    t.log_every = 10  # optimizer steps between console/TensorBoard lines
    t.save_every = 100  # optimizer steps between checkpoints (async)
    t.keep = 4  # checkpoints kept (the newest ones)
    t.eval_every = 250  # optimizer steps between validation passes (0 = never)
    t.eval_batches = 8  # validation batches per pass
    t.eval_store = ""  # validation store (default: data.store, read in order)
    t.eval_audio = 0  # validation utterances synthesised per pass into WORKDIR/samples/STEP/ (0 = none)
    t.eval_audio_steps = 450  # AR frames at most per synthesised sample (75 per second)
    t.eval_codec_dir = ""  # EnCodec weights folder for the samples ("" = the pretrained weights)
    t.level_probs = ()  # per-level training probabilities (empty = uniform over 8 levels, reference.md §2.6)
    t.nonfinite = "stop"  # non-finite loss or gradient: "stop" (the bad update is never applied) | "skip"
    t.peak_flops = 0.0  # per-device peak FLOP/s for MFU (0 = known device table, CPU measured)
    t.export_on_quit = False  # also export the model when `quit` or a signal stops training
    # a new run starts from these weights (fresh optimizer, step 0); a workdir with checkpoints resumes
    # instead. Model dir, training workdir, fp32.pth / .pth / .npz / .safetensors, hf://OWNER/REPO[/PATH][@REV]
    t.init_from = ""
    t.init_from_step = -1  # the checkpoint of a training workdir given as init_from (-1 = its newest good one)
    return c
