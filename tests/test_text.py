import pytest

from valle_jax.data import text as T

pytestmark = pytest.mark.needs_espeak


def test_reference_symmap_matches_spec():
    m = T.reference_symmap()
    assert len(m) == 229 and max(m.values()) == 228 and min(m.values()) == 1
    assert (m["<s>"], m["</s>"], m[" "], m["."], m["?"], m["p"]) == (1, 2, 3, 4, 7, 7)
    # the golden inputs' text (../shared/golden/README.md): <s> h ə l oː ␠ w ɜː l d ␠ ð ɪ s ␠ t ɛ s t </s>
    phones = ["h", "ə", "l", "oː", " ", "w", "ɜː", "l", "d", " ", "ð", "ɪ", "s", " ", "t", "ɛ", "s", "t"]
    assert T.encode(phones, m) == [1, 38, 34, 18, 53, 3, 30, 71, 18, 13, 3, 41, 21, 46, 3, 24, 20, 46, 24, 2]


def test_tokenize_reference_example_with_one_boundary_token():
    # reference.md §6.3's example; the reference file loader would keep two 3s, we keep one (HDF5 behaviour)
    tokens = T.tokenize("həlˈoʊ wˈɜːld")
    assert tokens == ["h", "ə", "lˈ", "o", "ʊ", " ", "wˈ", "ɜː", "l", "d"]
    assert T.encode(tokens, T.reference_symmap()) == [1, 38, 34, 51, 28, 23, 3, 48, 71, 18, 13, 2]


def test_phonemize_known_sentence_to_known_ids():
    tokens = T.Phonemizer("en").tokens(["Hello, world!"])[0]
    assert tokens == ["h", "ə", "lˈ", "o", "ʊ", ",", " ", "wˈ", "ɜː", "l", "d", "!"]
    assert T.encode(tokens, T.reference_symmap()) == [1, 38, 34, 51, 28, 23, 5, 3, 48, 71, 18, 13, 6, 2]


def test_phn_txt_round_trip_and_reference_layout():
    tokens = ["h", "ə", " ", "w", "."]
    content = T.format_phn_txt(tokens)
    assert content == "h ə   w ."  # a boundary is two empty tokens, as the reference writes it
    assert T.parse_phn_txt(content) == tokens
    assert T.parse_phn_txt("a  b    c\n") == ["a", " ", "b", " ", "c"]


def test_unknown_symbol_error_names_it_and_extension_gives_next_ids():
    m = T.reference_symmap()
    with pytest.raises(T.TextError, match="'ʘ'"):
        T.encode(["h", "ʘ"], m)
    ext = T.extend_symmap(m, ["ʘ", "h", "ǃ"])
    assert ext["ʘ"] == 229 and ext["ǃ"] == 230 and ext["h"] == m["h"]
    with pytest.raises(T.TextError, match="empty"):
        T.encode([], m)


def test_unsupported_language_is_a_clear_error():
    with pytest.raises(T.TextError, match="language 'xx' is not supported by espeak-ng"):
        T.Phonemizer("xx")
