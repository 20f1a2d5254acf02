"""Languages beyond en/ja: any espeak-ng code, ids from the store and the run, a two-language demo
corpus through phonemize, pack, the pipeline and synthesis's language lookup."""

import dataclasses
import json

import numpy as np
import pytest

from valle_jax.config import ConfigError, ModelConfig
from valle_jax.data import languages
from valle_jax.data.text import TextError

pytestmark = pytest.mark.needs_espeak


def test_an_unsupported_code_says_how_to_list_the_supported_ones(capsys):
    from tools import pack, phonemize
    from valle_jax.data.text import Phonemizer
    from valle_jax.tts import TTS

    hint = r"python -m tools\.phonemize --list-languages"
    for check in (languages.check, Phonemizer, TTS.check_language):
        with pytest.raises(TextError, match=rf"'xx'.*not supported by espeak-ng.*{hint}"):
            check("xx")
    with pytest.raises(TextError, match="not a language code"):
        languages.check("../en")
    with pytest.raises(pack.StoreError, match=hint):
        pack.check_options("en", {"g": "xx"}, None, 1024)
    assert phonemize.main(["--list-languages"]) == 0
    listed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert {"en", "de", "fr-fr", "ja", "cmn"} <= set(listed) and listed["de"] == "German"


def test_ids_keep_the_reference_and_new_codes_take_the_next_free_one():
    assert languages.store_langs(["en"]) == {"en": 0, "ja": 1}
    assert languages.store_langs(["fr-fr", "de", "en"]) == {"en": 0, "ja": 1, "de": 2, "fr-fr": 3}
    assert languages.language_id("de", {"en": 0, "ja": 1, "de": 2}, n_langs=3) == 2
    with pytest.raises(TextError, match=r"not supported by this model \(it knows \['en'\]\)"):
        languages.language_id("de", {"en": 0, "ja": 1, "de": 2}, n_langs=1)


def test_a_two_language_corpus_goes_through_phonemize_pack_pipeline_and_synthesis_lookup(codec, tmp_path):
    from configs import tiny
    from tools import make_demo_corpus, pack, phonemize, quantize
    from valle_jax import runs
    from valle_jax.checkpointing import params_of, save_model
    from valle_jax.config import data_config
    from valle_jax.data.pipeline import make_iterator
    from valle_jax.data.store import Store
    from valle_jax.models import init_model
    from valle_jax.tts import TTS, languages_of

    corpus = tmp_path / "corpus"
    assert make_demo_corpus.build(corpus, voices=2, sentences=2, languages=("en", "de")).finish() == 0
    assert sorted(p.name for p in corpus.iterdir()) == ["de", "en-us"]
    assert "Hund" in (corpus / "de").rglob("*_000.txt").__next__().read_text()
    assert quantize.quantize_dir(corpus, corpus, codec, progress=False).finish() == 0
    assert phonemize.phonemize_dir(corpus, corpus, group_language={"de": "de"}, progress=False).finish() == 0
    german = next((corpus / "de").rglob("*_000.phn.txt")).read_text()
    assert "ʊ" in german or "ç" in german or "ɛ" in german  # German phonemes, not English spelling-as-English

    store_dir = tmp_path / "store"
    assert pack.pack([corpus], store_dir, group_language={"de": "de"}, progress=False).finish() == 0
    store = Store(store_dir)
    assert store.lang_symmap == {"en": 0, "ja": 1, "de": 2}
    by_group = {g: set(store.lang[store.group == i].tolist()) for i, g in enumerate(store.group_names)}
    assert by_group == {"de": {2}, "en-us": {0}}

    cfg = dataclasses.replace(
        data_config(tiny.get_config()), store=str(store_dir), batch_size=4, min_utterances=1, duration_range=(0.1, 30)
    )
    batch = next(make_iterator(store, cfg))
    assert set(batch["lang"][batch["row_valid"]].tolist()) == {0, 2}  # both languages reach the model

    one = ModelConfig(arch="transformer", d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ConfigError, match=r"\['de'\].*--config.model.n_langs=3"):
        runs.check_languages(one, store.lang_symmap, np.unique(store.lang), store_dir)
    three = dataclasses.replace(one, n_langs=3)
    runs.check_languages(three, store.lang_symmap, np.unique(store.lang), store_dir)

    # the map travels: training's run.json, an export, then synthesis looks "de" up there
    runs.write_run(tmp_path / "run", three, store.symmap, {}, store.lang_symmap)
    assert languages_of(tmp_path / "run") == store.lang_symmap
    model = init_model(three, 0)
    save_model(tmp_path / "model", three, params_of(model), store.symmap, langs=store.lang_symmap)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["langs"]["de"] == 2
    tts = TTS(model, three, store.symmap, langs=languages_of(tmp_path / "model"))
    assert tts.language_id("de") == 2 and len(tts.text_ids("Guten Morgen.", "de")) > 5
    with pytest.raises(TextError, match="not supported by this model"):
        tts.language_id("fr-fr")  # espeak speaks it, the model was not trained on it
