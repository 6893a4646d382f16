"""lineclip.phrases: syllables split at tsheg/shad/space (punctuation is never a syllable), phrases are whole
syllable runs, containment by syllables, seeded sampling."""

import random

import numpy as np
import pytest

from lineclip.phrases import contains_phrase, phrase_matches, sample_phrase, sample_phrases, syllables

# Real transcriptions (Derge Kangyur), as in test_batch.py.
TIB_2 = "རྩོད་པ་དང་། །དགེ་འདུན་དབྱེན་རྣམས་བསྡུས་པ་ཡིན། །རབ་ཏུ་འབྱུང་བའི་གཞིའི་སྤྱི་སྡོམ་ལ།"


def test_syllables_split_on_tsheg_and_skip_punctuation():
    assert syllables("བཀྲ་ཤིས་བདེ་ལེགས། །") == ["བཀྲ", "ཤིས", "བདེ", "ལེགས"]
    assert syllables("༄༅། །ཀ་ཁ༎ ག") == ["ཀ", "ཁ", "ག"]  # yig mgo, shads, spaces are not syllables
    assert syllables("།") == [] and syllables("") == []
    assert len(syllables(TIB_2)) == 18


def test_a_phrase_is_a_run_of_whole_syllables_as_written():
    spans = syllables(TIB_2)
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(300):
        phrase = sample_phrase(TIB_2, rng, 2, 8)
        assert phrase in TIB_2  # kept as written (inner shad and spaces too), so it is a substring
        sylls = syllables(phrase)
        lengths.add(len(sylls))
        start = next(i for i in range(len(spans)) if spans[i : i + len(sylls)] == sylls)
        assert spans[start : start + len(sylls)] == sylls
        assert phrase.startswith(sylls[0]) and phrase.endswith(sylls[-1])  # no stray tsheg/shad at either end
    assert lengths == set(range(2, 9))
    # across a shad: "དང་། །དགེ" keeps the text's own punctuation
    assert any("། །" in sample_phrase(TIB_2, np.random.default_rng(s), 2, 2) for s in range(200))


def test_phrase_is_deterministic_and_short_texts_have_none():
    assert sample_phrase(TIB_2, np.random.default_rng(7)) == sample_phrase(TIB_2, np.random.default_rng(7))
    assert sample_phrase("ཀ་ཁ།", np.random.default_rng(0), 3, 8) is None  # 2 syllables < 3: no phrase
    assert sample_phrase("ཀ་ཁ་ག", np.random.default_rng(0), 3, 3) == "ཀ་ཁ་ག"
    with pytest.raises(ValueError):
        sample_phrase(TIB_2, np.random.default_rng(0), 3, 2)


def test_syllables_skip_tsheg_shad_space_and_yig_mgo():
    assert syllables("༄༅། །བཀྲ་ཤིས་བདེ་ལེགས། ཀ་ཁ།།") == ["བཀྲ", "ཤིས", "བདེ", "ལེགས", "ཀ", "ཁ"]
    # a syllable ends at a shad without a tsheg before it; vowel signs and subjoined letters stay inside
    assert syllables("སྒྲུབ།ཀྱི་") == ["སྒྲུབ", "ཀྱི"]
    assert syllables("ཀ༔ ༡༢༣ ཁ") == ["ཀ", "༡༢༣", "ཁ"]  # gter tsheg is punctuation, digits are a syllable
    assert syllables("། ། ") == [] and syllables("") == []


def test_sample_phrase_is_a_run_of_whole_syllables_and_keeps_inner_punctuation():
    text = "ཀ་ཁ། ག་ང"
    seen = set()
    for seed in range(200):
        phrase = sample_phrase(text, random.Random(seed), 2, 8)
        seen.add(phrase)
        assert contains_phrase(text, phrase)
    # all runs of 2..4 syllables of [ཀ ཁ ག ང]: 3 + 2 + 1
    assert seen == {"ཀ་ཁ", "ཁ། ག", "ག་ང", "ཀ་ཁ། ག", "ཁ། ག་ང", "ཀ་ཁ། ག་ང"}
    assert sample_phrase("ཀ།", random.Random(0), 2, 8) is None  # fewer syllables than min_syl
    assert sample_phrase("ཀ་ཁ་ག", np.random.default_rng(0), 3, 3) == "ཀ་ཁ་ག"  # numpy Generator works too
    with pytest.raises(ValueError):
        sample_phrase("ཀ་ཁ", random.Random(0), 3, 2)


def test_sample_phrases_is_deterministic_per_seed_and_per_line():
    texts = ["ཀ་ཁ་ག་ང་ཅ་ཆ་ཇ་ཉ་ཏ་ཐ", "ད་ན་པ་ཕ་བ་མ་ཙ་ཚ་ཛ་ཝ", "ཞ"]
    a = sample_phrases(texts, seed=3)
    assert a == sample_phrases(texts, seed=3)
    assert a[2] is None
    assert sample_phrases(texts[:2], seed=3) == a[:2]
    assert any(sample_phrases(texts, seed=s) != a for s in range(4, 10))
    for phrase, text in zip(a[:2], texts[:2], strict=True):
        assert 2 <= len(syllables(phrase)) <= 8 and contains_phrase(text, phrase)


def test_containment_is_by_whole_syllables():
    assert contains_phrase("ང་ཀ་ཁ།", "ཀ་ཁ")
    assert contains_phrase("ཀ་ཁ། ག", "ཁ་ག")  # the shad between them does not matter
    assert not contains_phrase("བག་ཁ", "ག་ཁ")  # never half a syllable
    assert not contains_phrase("ཀ་ག་ཁ", "ཀ་ཁ")  # consecutive only
    assert not contains_phrase("ཀ་ཁ", "།")


def test_phrase_matches_finds_every_line_holding_the_phrase():
    texts = ["ཀ་ཁ་ག", "ང་ཀ་ཁ།", "ཅ་ཆ་ཇ་ཉ", "ཀ། ཁ", "བཀ་ཁ"]
    got = phrase_matches(["ཀ་ཁ", "ཇ་ཉ", None, "ཀ་ཏ"], texts)
    assert [g.tolist() for g in got] == [[0, 1, 3], [2], [], []]
