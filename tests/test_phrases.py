"""Tibetan syllables and sampled phrases (lineclip.phrases)."""

import numpy as np
import pytest

from lineclip.phrases import sample_phrase, syllables

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


def test_phrase_is_deterministic_and_short_texts_stay_whole():
    assert sample_phrase(TIB_2, np.random.default_rng(7)) == sample_phrase(TIB_2, np.random.default_rng(7))
    assert sample_phrase("ཀ་ཁ།", np.random.default_rng(0), 3, 8) == "ཀ་ཁ།"  # 2 syllables < 3: the whole text
    assert sample_phrase("ཀ་ཁ་ག", np.random.default_rng(0), 3, 3) == "ཀ་ཁ་ག"
    with pytest.raises(ValueError):
        sample_phrase(TIB_2, np.random.default_rng(0), 3, 2)
