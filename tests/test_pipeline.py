import dataclasses

import numpy as np
import pytest

from valle_jax.config import ConfigError, DataConfig
from valle_jax.data.pipeline import BatchPlan, batch_shapes, make_iterator, select
from valle_jax.data.store import Store

pytestmark = pytest.mark.needs_espeak


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_deterministic_for_a_seed(data_cfg):
    a = _take(make_iterator(data_cfg.store, data_cfg), 8)
    b = _take(make_iterator(data_cfg.store, data_cfg), 8)
    assert all(_equal(x, y) for x, y in zip(a, b))
    c = _take(make_iterator(data_cfg.store, dataclasses.replace(data_cfg, seed=1)), 8)
    assert not all(_equal(x, y) for x, y in zip(a, c))


def test_restore_after_k_batches_is_exact(data_cfg):
    it = make_iterator(data_cfg.store, data_cfg)
    _take(it, 7)  # crosses the 5-batch epoch boundary
    state = it.get_state()
    expected = _take(it, 6)
    fresh = make_iterator(data_cfg.store, data_cfg)
    fresh.set_state(state)
    assert all(_equal(x, y) for x, y in zip(expected, _take(fresh, 6)))


def test_worker_processes_give_the_same_batches_and_state(data_cfg):
    serial = _take(make_iterator(data_cfg.store, data_cfg), 6)
    it = make_iterator(data_cfg.store, dataclasses.replace(data_cfg, num_workers=2))
    first = _take(it, 3)
    state = it.get_state()
    assert all(_equal(x, y) for x, y in zip(serial[:3], first))
    fresh = make_iterator(data_cfg.store, dataclasses.replace(data_cfg, num_workers=2))
    fresh.set_state(state)
    assert all(_equal(x, y) for x, y in zip(serial[3:], _take(fresh, 3)))


def test_shapes_come_from_the_buckets_and_masks_are_consistent(data_cfg):
    store = Store(data_cfg.store)
    allowed = batch_shapes(data_cfg, store.n_levels)
    seen = set()
    for b in _take(make_iterator(store, data_cfg), 20):
        shape = (b["text"].shape, b["prompt"].shape, b["resp"].shape)
        assert shape in allowed
        seen.add(shape)
        for i, u in enumerate(b["utt"]):
            codes, text = store.read(u)
            assert b["text_len"][i] == len(text) and b["text"][i, : len(text)].tolist() == text.tolist()
            assert (b["text"][i, len(text) :] == 0).all()
            assert b["resp_len"][i] == len(codes) and np.array_equal(b["resp"][i, : len(codes)], codes)
            assert 1 <= b["prompt_len"][i] <= data_cfg.prompt_frames
            assert (b["prompt"][i, b["prompt_len"][i] :] == 0).all()
        assert b["row_valid"].all()
    assert len(seen) <= len(allowed)


def test_prompts_come_from_other_utterances_of_the_same_speaker(data_cfg):
    store = Store(data_cfg.store)
    codes = [store.read(i)[0] for i in range(len(store))]
    checked = 0
    for b in _take(make_iterator(store, data_cfg), 10):
        for i, u in enumerate(b["utt"]):
            prompt = b["prompt"][i, : b["prompt_len"][i]]
            same = [j for j in range(len(store)) if store.speaker[j] == store.speaker[u] and j != u]
            # the prompt starts with the first frames of another utterance of this speaker
            starts = [
                j
                for j in same
                if np.array_equal(
                    codes[j][: min(len(prompt), len(codes[j]))], prompt[: min(len(prompt), len(codes[j]))]
                )
            ]
            assert starts, f"prompt of utterance {u} is not from its speaker's other utterances"
            assert not np.array_equal(codes[u][: len(prompt)], prompt)
            # prompt_duration 1 s in the tiny preset: 0 .. 2 s
            assert len(prompt) <= int(data_cfg.prompt_duration * 75) + 75
            checked += 1
    assert checked == 40


def test_target_is_the_prompt_only_when_asked(data_cfg):
    cfg = dataclasses.replace(data_cfg, random_utterance=0.0)
    b = next(make_iterator(cfg.store, cfg))
    for i in range(len(b["utt"])):
        n = b["prompt_len"][i]
        assert np.array_equal(b["prompt"][i, :n], b["resp"][i, :n])


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shards_are_disjoint_and_complete(data_cfg, hosts):
    cfg = dataclasses.replace(data_cfg, batch_size=4)
    full = _take(make_iterator(cfg.store, cfg), 6)
    shards = [_take(make_iterator(cfg.store, cfg, process_index=h, process_count=hosts), 6) for h in range(hosts)]
    for k in range(6):
        for key in full[k]:
            if key in ("text", "prompt", "resp"):
                # each host pads to its own rows' bucket: compare the valid parts
                rows = [r for s in shards for r in s[k][key]]
                lens = np.concatenate([s[k][key + "_len"] for s in shards])
                for i, (r, n) in enumerate(zip(rows, lens)):
                    assert np.array_equal(r[:n], full[k][key][i][:n])
            else:
                assert np.array_equal(np.concatenate([s[k][key] for s in shards]), full[k][key])
    utts = [u for k in range(5) for s in shards for u in s[k]["utt"]]  # one epoch = 5 batches of 4
    assert len(utts) == len(set(utts)) == 20


def test_filters(data_cfg):
    store = Store(data_cfg.store)
    lo = int(np.sort(store.phones)[5])
    e = select(store, dataclasses.replace(data_cfg, phones_range=(lo, 10_000)))
    assert (store.phones[e.utts] >= lo).all() and len(e.utts) == (store.phones >= lo).sum()
    d = float(np.median(store.durations))
    e = select(store, dataclasses.replace(data_cfg, duration_range=(0.0, d)))
    assert (store.durations[e.utts] <= d).all()
    e = select(store, dataclasses.replace(data_cfg, min_utterances=6))  # 5 utterances per speaker
    assert len(e.utts) == 0
    with pytest.raises(ValueError, match="passes the data filters"):
        BatchPlan(store, dataclasses.replace(data_cfg, min_utterances=6))


@pytest.mark.parametrize("sample_type", ["speaker", "group"])
def test_speaker_and_group_sampling(data_cfg, sample_type):
    cfg = dataclasses.replace(data_cfg, sample_type=sample_type)
    store = Store(cfg.store)
    speakers = np.concatenate([b["speaker"] for b in _take(make_iterator(store, cfg), 25)])
    counts = np.bincount(speakers, minlength=4)
    assert (counts > 10).all()  # 100 draws, uniform over 4 speakers (or 4 one-speaker groups)


def test_eval_mode_keeps_every_utterance_once(data_cfg):
    cfg = dataclasses.replace(data_cfg, batch_size=3)
    it = make_iterator(cfg.store, cfg, num_epochs=1, shuffle=False, drop_remainder=False)
    batches = list(it)
    utts = np.concatenate([b["utt"][b["row_valid"]] for b in batches])
    assert sorted(utts.tolist()) == list(range(20)) and len(batches) == 7
    assert sum(int((~b["row_valid"]).sum()) for b in batches) == 1  # 7 x 3 slots for 20 utterances
    assert (batches[-1]["utt"][~batches[-1]["row_valid"]] == -1).all()


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="data.sample_type"):
        DataConfig(sample_type="speakers")
    with pytest.raises(ConfigError, match="data.resp_buckets"):
        DataConfig(resp_buckets=(300, 150))


def test_dropped_remainder_is_not_biased_to_long_utterances(data_cfg):
    frames = np.sort(Store(data_cfg.store).frames)
    buckets = tuple(sorted({int(frames[4]), int(frames[9]), int(frames[14]), int(frames[-1])}))
    # 20 utterances in 4 response buckets, batches of 3: 2 left out per epoch
    cfg = dataclasses.replace(data_cfg, batch_size=3, resp_buckets=buckets)
    plan = BatchPlan(Store(cfg.store), cfg)
    key = plan.text_bucket * len(cfg.resp_buckets) + plan.resp_bucket
    left_out = [set(range(20)) - set(plan.epoch(e).ravel().tolist()) for e in range(30)]
    assert all(len(x) == 2 for x in left_out)
    # the left-out utterances come from every bucket, not only the longest one
    assert {int(key[u]) for x in left_out for u in x} == set(np.unique(key).tolist())
