"""Decoding: cached == uncached == teacher forcing, chunking, batching, seeds, early exit, beam
search (and its length normalisation), the minimum length, mirostat, rolling context and the NAR
levels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valle_jax import decoding as D
from valle_jax.config import ModelConfig
from valle_jax.models import init_model

STOP = 1024


def tiny(arch="transformer", **kw):
    return ModelConfig(arch=arch, d_model=48, n_heads=4, n_layers=2, **kw)


@pytest.fixture(scope="module")
def model():
    return init_model(tiny(), 0)


@pytest.fixture(scope="module")
def decoder(model):
    return D.Decoder(model)


def utterances(seed=0, sizes=((12, 40), (20, 70), (7, 25))):
    rng = np.random.default_rng(seed)
    texts = [list(rng.integers(1, 200, t)) for t, _ in sizes]
    prompts = [rng.integers(0, 1024, (p, 8)) for _, p in sizes]
    return texts, prompts


def inputs_of(texts, prompts, **caps):
    return D.make_inputs(texts, prompts, [0] * len(texts), 8, **caps)


GREEDY = D.Settings(max_ar_steps=40, ar_temp=0.0, nar_temp=0.0)


@pytest.mark.parametrize("arch", ["transformer", "llama"])
def test_cached_equals_uncached_recomputation(arch):
    cfg = tiny(arch, n_kv_heads=2 if arch == "llama" else 0)
    dec = D.Decoder(init_model(cfg, 1))
    inputs = inputs_of(*utterances(1))
    cached = dec.ar(inputs, GREEDY, keep_logits=True)
    full = dec.ar(inputs, GREEDY, cached=False, keep_logits=True)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
    steps = GREEDY.max_ar_steps
    np.testing.assert_allclose(np.asarray(cached.logits)[:, :steps], np.asarray(full.logits)[:, :steps], atol=1e-5)


def test_ar_logits_equal_teacher_forcing(model, decoder):
    """Each step's logits are the training forward's logits for the generated prefix."""
    texts, prompts = utterances(2)
    inputs = inputs_of(texts, prompts)
    out = decoder.ar(inputs, dataclasses.replace(GREEDY, ar_temp=1.0, seed=3), keep_logits=True)
    length = np.asarray(out.length)
    r = int(length.max())
    batch = {
        "text": jnp.asarray(inputs.text),
        "text_len": jnp.asarray(inputs.text_len),
        "lang": jnp.asarray(inputs.lang),
        "prompt": jnp.asarray(inputs.prompt),
        "prompt_len": jnp.asarray(inputs.prompt_len),
        "resp": jnp.asarray(np.asarray(out.tokens)[:, :r, None]),
        "resp_len": jnp.asarray(length),
    }
    logits, _ = model(batch, jnp.zeros((3,), jnp.int32))
    plen = np.asarray(inputs.text_len) + np.asarray(inputs.prompt_len) + 4
    for i in range(3):
        n = length[i] + bool(out.stopped[i])  # the logits that chose frames 0..len (and the stop)
        tf = np.asarray(logits)[i, plen[i] - 1 : plen[i] - 1 + n]
        np.testing.assert_allclose(np.asarray(out.logits)[i, :n], tf, atol=2e-5)


def test_chunk_sizes_give_identical_results(model):
    inputs = inputs_of(*utterances(3))
    settings = dataclasses.replace(GREEDY, ar_temp=1.0, top_k=50, seed=7)
    runs = [D.Decoder(model, chunk=c).ar(inputs, settings) for c in (1, 5, 8)]
    steps = settings.max_ar_steps
    for r in runs[1:]:
        np.testing.assert_array_equal(np.asarray(r.length), np.asarray(runs[0].length))
        np.testing.assert_array_equal(np.asarray(r.tokens)[:, :steps], np.asarray(runs[0].tokens)[:, :steps])


def test_batched_equals_one_by_one(decoder):
    texts, prompts = utterances(4)
    together = decoder.generate(inputs_of(texts, prompts), GREEDY)
    for i in range(len(texts)):
        alone = decoder.generate(inputs_of([texts[i]], [prompts[i]]), GREEDY)
        np.testing.assert_array_equal(alone.codes[0], together.codes[i])


def test_seeded_sampling_is_reproducible(decoder):
    inputs = inputs_of(*utterances(5))
    s = D.Settings(max_ar_steps=30, seed=11)
    a, b = decoder.generate(inputs, s), decoder.generate(inputs, s)
    c = decoder.generate(inputs, dataclasses.replace(s, seed=12))
    assert all(np.array_equal(x, y) for x, y in zip(a.codes, b.codes))
    assert not all(np.array_equal(x, y) for x, y in zip(a.codes, c.codes))


def test_per_row_step_limits_and_stop_flags(decoder):
    inputs = inputs_of(*utterances(6))
    knobs = D.Knobs.of(GREEDY, 3)._replace(max_steps=np.array([5, 17, 40], np.int32))
    out = decoder.ar(inputs, GREEDY, knobs=knobs)
    np.testing.assert_array_equal(np.asarray(out.length), [5, 17, 40])  # this random model never stops
    assert not np.asarray(out.stopped).any()


def _constant_step(logits_V, stop_at=None):
    """A step_fn whose state counts its calls; its logits force the stop token from step `stop_at`."""

    def step(count, tok, t):
        logits = jnp.broadcast_to(logits_V, (tok.shape[0], logits_V.shape[0]))
        if stop_at is not None:
            logits = jnp.where(t + 1 >= stop_at, jnp.where(jnp.arange(logits_V.shape[0]) == STOP, 50.0, -50.0), logits)
        return logits, count + 1

    return step


def test_early_exit_stops_the_loop():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=STOP + 1), jnp.float32).at[STOP].set(-1e9)
    knobs = D.Knobs.of(D.Settings(max_ar_steps=600, ar_temp=0.0), 2)
    out = jax.jit(
        lambda: D.ar_loop(
            jnp.tile(logits, (2, 1)),
            _constant_step(logits, stop_at=3),
            jnp.zeros((), jnp.int32),
            knobs,
            jax.random.key(0),
            n_slots=600,
            stop=STOP,
            chunk=8,
        )
    )()
    np.testing.assert_array_equal(np.asarray(out.length), [3, 3])
    assert np.asarray(out.stopped).all()
    assert int(out.state) == 8  # one chunk of steps ran, not 600


@pytest.mark.parametrize("arch", ["transformer", "llama", "retnet"])
def test_reordered_cache_continues_as_the_rows_it_took(arch):
    """Beams take over other beams' caches: after `reorder_cache(cache, rows)` row i steps exactly
    as row rows[i] did (a KV cache holds B*G rows per layer, so a wrong mapping mixes heads)."""
    model = init_model(tiny(arch, n_kv_heads=2 if arch == "llama" else 0), 4)
    inputs = inputs_of(*utterances(4))
    sp = D.prefix_slots(inputs)
    layers = model.backbone.unstack()
    _, cache, plen, _, _ = D._prefill(model, inputs, D.CacheSpec(sp + 8), layers)
    step = D._cached_step(model, sp, jnp.zeros((4,), jnp.int32), layers)
    tok = jnp.asarray([5, 6, 7])
    for t in range(2):  # two steps: the second reads keys the first wrote
        logits, (cache, plen) = step((cache, plen), tok, t)
    rows = jnp.asarray([2, 0, 2, 1])
    moved = D._reorderer(model)((cache, plen), rows)
    want, _ = step((cache, plen), tok, 2)
    got, _ = step(moved, tok[rows], 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want)[np.asarray(rows)], atol=1e-5)


def test_beam_search_beats_greedy_on_a_constructed_case():
    """Token 0 is likelier first (0.6), but every continuation after it is flat; token 1 (0.4) is
    followed by the stop token with 0.99. Greedy takes 0 and pays for it; beam search finds 1, stop."""
    v = STOP + 1
    first = np.full(v, -1e9, np.float32)
    first[[0, 1]] = np.log([0.6, 0.4])
    after0 = np.full(v, -1e9, np.float32)
    after0[:8] = np.log(1 / 8)
    after1 = np.full(v, -1e9, np.float32)
    after1[[STOP, 2]] = np.log([0.99, 0.01])
    table = jnp.asarray(np.stack([after0, after1, after0] + [after0] * 5))

    def step(prev, tok, t):
        return table[jnp.clip(tok, 0, 7)], tok

    def reorder(state, rows):
        return state[rows]

    # the reference's scoring (plain summed log-probabilities, no minimum length): here the shortest
    # beam is also the likeliest by every measure, so it must win however beams are ranked
    settings = D.Settings(max_ar_steps=6, ar_temp=1.0, beam_width=3, length_normalization=0.0, min_ar_steps=0)
    knobs = D.Knobs.of(settings, 3)
    out, score = jax.jit(
        lambda: D.beam_loop(
            jnp.tile(jnp.asarray(first), (3, 1)),
            step,
            reorder,
            jnp.zeros((3,), jnp.int32),
            knobs,
            width=3,
            n_slots=8,
            stop=STOP,
            chunk=4,
        )
    )()
    greedy = D.ar_loop(
        jnp.asarray(first)[None],
        step,
        jnp.zeros((1,), jnp.int32),
        D.Knobs.of(dataclasses.replace(settings, beam_width=0, ar_temp=0.0), 1),
        jax.random.key(0),
        n_slots=8,
        stop=STOP,
        chunk=4,
    )
    g = np.asarray(greedy.tokens[0])
    logp = jax.nn.log_softmax(jnp.asarray(first))[g[0]] + sum(
        jax.nn.log_softmax(table[min(g[i - 1], 7)])[g[i]] for i in range(1, 6)
    )
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, :2], [1, STOP])
    assert int(out.length[0]) == 1 and int(greedy.length[0]) == 6
    assert float(score[0]) == pytest.approx(np.log(0.4 * 0.99), abs=1e-4)
    assert float(score[0]) > float(logp) + 5


def _chain_or_stop_case():
    """A case where stopping at once is the likeliest sequence but the worst per token: the stop
    token first (0.4), or frames 0, 1, ..., 5 (0.6, then 0.7 each) and a stop (0.9). Every other
    way out is worse: a stop along the chain has 0.1, the tokens 10..17 off it spread 0.2."""
    v = STOP + 1
    first = np.full(v, -1e9, np.float32)
    first[[STOP, 0]] = np.log([0.4, 0.6])
    rows = []
    for k in range(5):  # after frame k: frame k + 1, or a premature stop, or off the chain
        row = np.full(v, -1e9, np.float32)
        row[[k + 1, STOP]] = np.log([0.7, 0.1])
        row[10:18] = np.log(0.2 / 8)
        rows.append(row)
    end = np.full(v, -1e9, np.float32)  # after frame 5: the stop
    end[[STOP, 10]] = np.log([0.9, 0.1])
    off = np.full(v, -1e9, np.float32)  # off the chain: a flat mumble
    off[10:18] = np.log(0.8 / 8)
    off[STOP] = np.log(0.2)
    table = jnp.asarray(np.stack(rows + [end, off]))

    def step(prev, tok, t):
        return table[jnp.where(tok <= 5, tok, 6)], tok

    chain = np.log(0.6) + 5 * np.log(0.7) + np.log(0.9)  # 6 frames and the stop: 7 tokens
    return jnp.asarray(first), step, chain


def _beam(first, step, settings, text_len=None, width=3, n_slots=16):
    knobs = D.Knobs.of(settings, width, text_len=text_len)
    out, score = jax.jit(
        lambda: D.beam_loop(
            jnp.tile(first, (width, 1)),
            step,
            lambda state, rows: state[rows],
            jnp.zeros((width,), jnp.int32),
            knobs,
            width=width,
            n_slots=n_slots,
            stop=STOP,
            chunk=4,
        )
    )()
    return np.asarray(out.tokens[0]), int(out.length[0]), float(score[0])


def test_an_early_stop_no_longer_wins_the_beam_search():
    """The issue's silent wav: with summed log-probabilities the beam that stops at once (0.4)
    outscores every longer one and the utterance has no frames. Length normalisation (the default)
    ranks the 6-frame chain first (mean log-probability -0.34 per token against -0.92); so does a
    minimum length alone (the default one, from the text, or an explicit one) with plain sums."""
    first, step, chain = _chain_or_stop_case()
    reference = D.Settings(max_ar_steps=12, beam_width=3, length_normalization=0.0, min_ar_steps=0)
    tokens, length, score = _beam(first, step, reference)
    assert length == 0 and tokens[0] == STOP and score == pytest.approx(np.log(0.4), abs=1e-4)

    defaults = D.Settings(max_ar_steps=12, beam_width=3)
    assert defaults.length_normalization > 0 and defaults.min_ar_steps == -1
    only_normalised = dataclasses.replace(defaults, min_ar_steps=0)
    text_len = np.full(3, 2 + 4)  # 4 phonemes: a minimum of 5 frames
    only_minimum = dataclasses.replace(reference, min_ar_steps=-1)
    for settings, lens in ((defaults, text_len), (only_normalised, None), (only_minimum, text_len)):
        tokens, length, score = _beam(first, step, settings, lens)
        np.testing.assert_array_equal(tokens[:7], [0, 1, 2, 3, 4, 5, STOP])
        assert length == 6, settings
        if lens is None:  # (a banned stop token leaves the other tokens its probability)
            assert score == pytest.approx(chain, abs=1e-4)
    tokens, length, _ = _beam(first, step, dataclasses.replace(reference, min_ar_steps=2))
    assert length == 6  # stopping at step 2 costs 0.1 and never catches up, even summed


def test_the_minimum_length_is_per_row_and_traced():
    """A stop-loving distribution ends each row exactly at its minimum (0: at once), all rows in one
    call and one compilation whatever the minimums are."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=STOP + 1), jnp.float32).at[STOP].set(30.0)
    settings = D.Settings(max_ar_steps=40, ar_temp=0.0)

    @jax.jit
    def run(knobs):
        return D.ar_loop(
            jnp.tile(logits, (3, 1)),
            _constant_step(logits),
            jnp.zeros((), jnp.int32),
            knobs,
            jax.random.key(0),
            n_slots=40,
            stop=STOP,
            chunk=8,
        )

    for mins in ([0, 4, 9], [17, 1, 0]):
        out = run(D.Knobs.of(settings, 3)._replace(min_steps=np.array(mins, np.int32)))
        np.testing.assert_array_equal(np.asarray(out.length), mins)
        assert np.asarray(out.stopped).all()
    assert run._cache_size() == 1


def test_minimum_steps_follow_the_text():
    s = D.Settings(max_ar_steps=100)
    np.testing.assert_array_equal(s.min_steps_for([2, 12, 1002]), [0, 12, 100])  # 0, 10 and 1000 phonemes
    assert s.min_steps_for(None) == 0  # no text known: no minimum
    assert dataclasses.replace(s, min_ar_steps=0).min_steps_for([12]) == 0
    assert dataclasses.replace(s, min_ar_steps=7).min_steps_for([500]) == 7
    knobs = D.Knobs.of(s, 2, text_len=[12, 42])
    np.testing.assert_array_equal(knobs.min_steps, [12, 50])
    np.testing.assert_array_equal(D.Knobs.of(s, 2, ar=False, text_len=[12, 42]).min_steps, [0, 0])
    for bad, match in (
        (dict(min_ar_steps=-2), "min_ar_steps"),
        (dict(min_ar_steps=101), "min_ar_steps"),
        (dict(length_normalization=-0.5), "length_normalization"),
        (dict(length_normalization=float("nan")), "finite"),
    ):
        with pytest.raises(D.DecodeError, match=match):
            dataclasses.replace(s, **bad)


@pytest.mark.parametrize("beam_width", [0, 4])
def test_a_stop_loving_model_still_speaks_its_minimum(model, beam_width):
    """A model whose first choice is always the stop token (the issue's demo model at beam width 16):
    with the defaults every row gets its text's minimum of frames; without a minimum (and with the
    reference's beam scores) none at all, which `generate` returns as empty codes."""
    dec = D.Decoder(model)
    params = jax.tree.map(lambda x: x, dec.params)
    params["classifier_bias"] = params["classifier_bias"].at[STOP].add(100.0)
    dec.params = params
    texts, prompts = utterances(11)
    inputs = inputs_of(texts, prompts)
    settings = D.Settings(max_ar_steps=40, beam_width=beam_width, ar_temp=0.0 if beam_width == 0 else 1.0)
    out = dec.generate(inputs, settings)
    want = settings.min_steps_for(np.asarray(inputs.text_len))
    assert list(want) == [12, 22, 6]  # floor(1.25 x phonemes): 10, 18 and 5 phonemes
    assert [len(c) for c in out.codes] == list(want) and out.stopped.all()
    bare = dec.generate(inputs, dataclasses.replace(settings, min_ar_steps=0, length_normalization=0.0))
    assert [len(c) for c in bare.codes] == [0, 0, 0]


def test_mirostat_tracks_tau():
    v = STOP + 1
    logits = jnp.asarray(-1.1 * np.log(np.arange(1, v + 1)), jnp.float32).at[STOP].set(-1e9)  # Zipf-like
    settings = D.Settings(max_ar_steps=400, mirostat_tau=4.0, mirostat_eta=0.1)
    out = jax.jit(
        lambda: D.ar_loop(
            logits[None],
            _constant_step(logits),
            jnp.zeros((), jnp.int32),
            D.Knobs.of(settings, 1),
            jax.random.key(1),
            n_slots=400,
            stop=STOP,
            chunk=8,
            mode="mirostat",
        )
    )()
    logp2 = np.asarray(jax.nn.log_softmax(logits)) / np.log(2)
    surprise = -logp2[np.asarray(out.tokens[0])]
    assert abs(surprise[100:].mean() - 4.0) < 0.5, surprise[100:].mean()


def test_rolling_context_keeps_a_window(decoder):
    inputs = inputs_of(*utterances(7))
    windowed = decoder.ar(inputs, dataclasses.replace(GREEDY, max_ar_context=6))
    sp = inputs.text.shape[1] + inputs.prompt.shape[1] + 4
    cache, _ = windowed.state
    assert (np.asarray(cache["valid"])[:, sp:].sum(axis=1) == 6).all()
    wide = decoder.ar(inputs, dataclasses.replace(GREEDY, max_ar_context=10_000))
    plain = decoder.ar(inputs, GREEDY)
    np.testing.assert_array_equal(np.asarray(wide.tokens), np.asarray(plain.tokens))
    assert not np.array_equal(np.asarray(windowed.tokens), np.asarray(plain.tokens))


def test_nar_reuses_the_prefix_and_never_samples_stop(model, decoder):
    inputs = inputs_of(*utterances(8))
    ar = decoder.ar(inputs, GREEDY)
    # a stop-loving classifier: the NAR must still never emit the stop token
    params = jax.tree.map(lambda x: x, decoder.params)
    params["classifier_bias"] = params["classifier_bias"].at[STOP].add(100.0)
    settings = dataclasses.replace(GREEDY, nar_temp=1.0)
    knobs = D.Knobs.of(settings, 3, ar=False)
    r = int(np.asarray(ar.length).max())
    key = jax.random.key(0)
    plan = D.NarPlan(sign_aware=True)
    start = D.NarStart(ar.state[0], ar.tokens[:, :r], ar.length, jnp.asarray(7))
    with_cache = decoder._nar(params, inputs, start, knobs, key, plan=plan)
    full = decoder._nar(params, inputs, start._replace(cache=None), knobs, key, plan=plan)
    np.testing.assert_array_equal(np.asarray(with_cache), np.asarray(full))
    codes = np.asarray(with_cache)
    assert codes.max() < STOP and (codes[:, :, 1:] != 0).any()


def test_nar_level_count(decoder):
    inputs = inputs_of(*utterances(9))
    for levels, expect in ((3, 4), (0, 8)):  # 0 means every level, as in the reference
        out = decoder.generate(inputs, dataclasses.replace(GREEDY, max_nar_levels=levels))
        assert all(c.shape == (40, expect) for c in out.codes)


def test_nar_runs_over_a_tight_bucket(decoder):
    """The NAR's cost follows its padded length: 160 frames take the 225 bucket, not the AR's 300."""
    inputs = inputs_of(*utterances(10, sizes=((12, 40),)))
    settings = dataclasses.replace(GREEDY, max_ar_steps=160)
    ar = decoder.ar(inputs, settings)
    assert int(np.asarray(ar.length)[0]) == 160 and ar.tokens.shape[1] >= 300
    assert decoder.nar(inputs, ar, settings).shape[1] == 225


def test_bad_settings_are_named():
    with pytest.raises(D.DecodeError, match="top_p"):
        D.Settings(top_p=0.0)
    with pytest.raises(D.DecodeError, match="beam search and mirostat"):
        D.Settings(beam_width=4, mirostat_tau=3.0)
    with pytest.raises(D.DecodeError, match="prompt 0"):
        D.make_inputs([[1, 2]], [np.zeros((10, 4))], [0], 8)


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_bfloat16_decodes_a_batch(cpu_kernels):
    """bf16 on a batch of several rows: bf16 step weights under the CPU kernels (tests/test_kernels.py
    checks their numbers), and bf16 weights and compute through XLA's dot (its CPU runtime lacks
    batched bf16 dots into float32: the attention contractions run in float32 there)."""
    dec = D.Decoder(init_model(tiny(dtype="bfloat16"), 0), cpu_kernels=cpu_kernels)
    out = dec.generate(inputs_of(*utterances(10)), dataclasses.replace(GREEDY, max_ar_steps=10))
    assert [c.shape for c in out.codes] == [(10, 8)] * 3


# ---- continuation (VALL-E's continuation task: the response starts with given frames) --------------
def _continuation(seed, lengths, levels=8):
    rng = np.random.default_rng(seed)
    given = [rng.integers(0, 1024, (k, levels)) if k else None for k in lengths]
    return given, D.make_continuation(given, levels)


def test_continuation_conditions_on_the_given_frames(model, decoder):
    """The AR takes the given frames as its first outputs and conditions on them: each greedy frame
    after them is the argmax of the training forward's logits over the whole response, given frames
    first; the given frames keep their codes at every NAR level, and `generate` returns only what
    follows them."""
    texts, prompts = utterances(11)
    inputs = inputs_of(texts, prompts)
    given, cont = _continuation(0, (9, 0, 5))
    settings = dataclasses.replace(GREEDY, max_ar_steps=12, min_ar_steps=0, nar_temp=1.0, seed=4)
    out = decoder.ar(inputs, settings, continuation=cont)
    tokens, length, stopped = np.asarray(out.tokens), np.asarray(out.length), np.asarray(out.stopped)
    k = np.asarray(cont.length)
    for i, g in enumerate(given):
        if g is not None:
            np.testing.assert_array_equal(tokens[i, : len(g)], g[:, 0])
    assert list(length[~stopped]) == list(k[~stopped] + 12) and (length > k).all()  # the limit counts new frames
    r = int(length.max())
    batch = dict(inputs._asdict(), resp=jnp.asarray(tokens[:, :r, None]), resp_len=jnp.asarray(length))
    logits, _ = model(batch, jnp.zeros((3,), jnp.int32))
    plen = np.asarray(inputs.text_len) + np.asarray(inputs.prompt_len) + 4
    for i in range(3):  # logits at position plen - 1 + t choose frame t
        n = length[i] + bool(stopped[i])
        chosen = np.asarray(logits)[i, plen[i] - 1 + k[i] : plen[i] - 1 + n].argmax(-1)
        np.testing.assert_array_equal(tokens[i, k[i] : n], chosen)
    codes = np.asarray(decoder.nar(inputs, out, settings, cont))
    for i, g in enumerate(given):
        if g is not None:
            np.testing.assert_array_equal(codes[i, : len(g)], g)
    assert (codes[1, :, 1:] != 0).any()  # the row without given frames is sampled as ever
    gen = decoder.generate(inputs, settings, continuation=cont)
    for i in range(3):
        np.testing.assert_array_equal(gen.codes[i], codes[i, k[i] : length[i]])


@pytest.mark.parametrize("arch", ["llama", "retnet"])
def test_given_frames_prefilled_in_one_pass_equal_stepped(arch):
    """The given frames every row has (8 here: the shortest row's 9, down to the chunk) go through the
    model in one pass after the prefix; the longer rows step the rest. Greedy, the frames after them
    and the logits every step chose from are those of stepping every given frame (into a KV cache;
    a recurrent state continued chunkwise)."""
    cfg = dataclasses.replace(tiny(arch, retention_chunk=8 if arch == "retnet" else 0), n_layers=1)
    dec = D.Decoder(init_model(cfg, 1))
    inputs = inputs_of(*utterances(13))
    _, cont = _continuation(2, (19, 9, 13))
    settings = dataclasses.replace(GREEDY, max_ar_steps=8, min_ar_steps=0)
    one_pass = dec.ar(inputs, settings, continuation=cont, keep_logits=True)
    stepped = dec.ar(inputs, settings, continuation=cont, keep_logits=True, prefill_given=False)
    np.testing.assert_array_equal(np.asarray(one_pass.tokens), np.asarray(stepped.tokens))
    np.testing.assert_array_equal(np.asarray(one_pass.length), np.asarray(stepped.length))
    n = int(np.asarray(stepped.length).max())
    np.testing.assert_allclose(np.asarray(one_pass.logits)[:, :n], np.asarray(stepped.logits)[:, :n], atol=1e-5)


def test_continuation_with_beams_and_bad_continuations(decoder):
    inputs = inputs_of(*utterances(12))
    given, cont = _continuation(1, (6, 3, 0))
    beams = decoder.ar(inputs, dataclasses.replace(GREEDY, beam_width=3, max_ar_steps=8), continuation=cont)
    tokens = np.asarray(beams.tokens)
    np.testing.assert_array_equal(tokens[0, :6], given[0][:, 0])
    np.testing.assert_array_equal(tokens[1, :3], given[1][:, 0])
    assert (tokens[:, :8] != STOP).any(axis=1).all()
    with pytest.raises(D.DecodeError, match=r"continuation codes must be \[3, frames, 8\]"):
        decoder.ar(inputs, GREEDY, continuation=D.make_continuation(given, 4))
    with pytest.raises(D.DecodeError, match="must lie in 0..1023"):
        decoder.ar(inputs, GREEDY, continuation=cont._replace(codes=np.full_like(cont.codes, STOP)))
    with pytest.raises(D.DecodeError, match="expected codes"):
        D.make_continuation([np.zeros((4,), np.int32)], 8)
