"""Queries as people type them: free text and non-ASCII values on the command line (lineclip.cli.quote_overrides,
used by every command through hydra_command), Wylie / EWTS queries (pyewts), and the phrase spans the search page
highlights."""

import html
import random
import subprocess
import sys

import pandas as pd
import pytest
from omegaconf import OmegaConf
from usage_support import overfit_run, run_in_process

from lineclip import artifacts
from lineclip.cli import hydra_quote, quote_overrides
from lineclip.phrases import contains_phrase, phrase_spans
from lineclip.search import tibetan_from_wylie

FREE = {"query", "query_wylie"}


def hydra_reads(override: str):
    """The value Hydra's own override parser and OmegaConf make of one `key=value` argument."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(override)
    return OmegaConf.create({"v": parsed.value()}).v


@pytest.mark.parametrize(("typed", "meant"), [
    ("query=བཀྲ་ཤིས་བདེ་ལེགས", "བཀྲ་ཤིས་བདེ་ལེགས"),  # Hydra's lexer alone stops at the first Tibetan letter
    ("query=སངས་རྒྱས། ཆོས།", "སངས་རྒྱས། ཆོས།"),  # the shell's quotes are gone: a space and shad inside
    ('query="བཀྲ་ཤིས་བདེ་ལེགས།"', "བཀྲ་ཤིས་བདེ་ལེགས།"),  # the form Hydra itself needs stays as it is
    ("query='ཀ་ཁ'", "ཀ་ཁ"),
    ("query_wylie='jam dpal", "'jam dpal"),  # Wylie's a-chung is an apostrophe
    ("query_wylie=pad+me hUM", "pad+me hUM"),
    ("query=ཀ,ཁ", "ཀ,ཁ"),  # a comma is text, not a sweep
    ("query=[ཀ]", "[ཀ]"),
    ("query=${oops}", "${oops}"),  # not an interpolation
    ("query=a\\'b\\", "a\\'b\\"),
    ("+query=ཀ ཁ", "ཀ ཁ"),
])
def test_a_free_text_value_reads_back_exactly_as_typed(typed, meant):
    (quoted,) = quote_overrides([typed], FREE)
    assert hydra_reads(quoted) == meant


def test_quoting_round_trips_any_text():
    """Seeded random strings over Hydra's and OmegaConf's special characters, Tibetan and whitespace."""
    alphabet = ["a", " ", "'", '"', "\\", "$", "{", "}", "[", "]", ",", "=", "(", ")", "བ", "ཀྲ", "་", "།", "é",
                "\t", ":", "%", "#", "*", "~", "+"]
    rng = random.Random(0)
    for _ in range(800):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        assert hydra_reads("query=" + hydra_quote(text)) == text, text
        (quoted,) = quote_overrides([f"query={text}"], FREE)
        already_quoted = len(text) > 1 and text[0] == text[-1] and text[0] in "'\""
        if text != "null" and not already_quoted:
            assert hydra_reads(quoted) == text, text


def test_other_values_are_quoted_only_when_hydra_cannot_read_them():
    args = ["-m", "--cfg", "job", "manifest=/data/བོད/lines.jsonl", "data.batch_size=16,32", "name=plain",
            "tags=[a,b]", "~logger", "query=null", "hydra.run.dir=outputs/ཆོས"]
    out = quote_overrides(args, FREE)
    assert out[:3] == ["-m", "--cfg", "job"] and out[4:9] == args[4:9]  # options, sweeps, lists, deletes, null
    assert hydra_reads(out[3]) == "/data/བོད/lines.jsonl" and hydra_reads(out[9]) == "outputs/ཆོས"


def test_wylie_converts_with_pyewts_and_reports_what_does_not():
    assert tibetan_from_wylie("bkra shis bde legs") == ("བཀྲ་ཤིས་བདེ་ལེགས", [])
    assert tibetan_from_wylie("  'jam dpal  dbyangs ") == ("འཇམ་དཔལ་དབྱངས", [])  # whitespace as queries are
    assert tibetan_from_wylie("sangs rgyas/ chos/") == ("སངས་རྒྱས། ཆོས།", [])
    text, warnings = tibetan_from_wylie("bkra shis Q")
    assert warnings and any('"Q"' in w for w in warnings)
    assert tibetan_from_wylie("བཀྲ་ཤིས")[1] == ["this is Tibetan script, not Wylie: search it as Tibetan"]
    assert tibetan_from_wylie("   ")[0] == ""


def test_phrase_spans_are_whole_syllable_runs_whatever_the_punctuation():
    text = "༄༅། །བཀྲ་ཤིས་བདེ་ལེགས། བཀྲ་ཤིས། བག་ཁ"
    assert [text[a:b] for a, b in phrase_spans(text, "བཀྲ་ཤིས")] == ["བཀྲ་ཤིས", "བཀྲ་ཤིས"]
    assert [text[a:b] for a, b in phrase_spans(text, "ལེགས་བཀྲ")] == ["ལེགས། བཀྲ"]  # across a shad, as in search
    assert phrase_spans(text, "ག་ཁ") == [] and phrase_spans(text, "།") == []  # never half a syllable
    for phrase in ("བཀྲ་ཤིས", "བདེ་ལེགས།", "ཤིས་བག", "ཁ"):
        assert bool(phrase_spans(text, phrase)) == contains_phrase(text, phrase)


# ------------------------------------------------------------------------------------ the real command line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return overfit_run(tmp_path_factory)


def _search(run, *args, cwd):
    return subprocess.run([sys.executable, "-m", "lineclip.search", f"run_dir={run}", *args, "top_k=3",
                           "progress=false"], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_each_typed_form_searches_the_text_as_typed(trained, tmp_path):
    """Through `python -m lineclip.search`, as a shell passes each form; the page shows the query the command
    searched and its first hit is the line an in-process search of that exact text ranks first."""
    from lineclip import load_encoder
    from lineclip.corpus import Corpus
    from lineclip.search import lines_for_embedding

    run, _ = trained
    line = pd.read_parquet(run / artifacts.EMBEDDINGS_META)["text"][2]  # 20 characters, no spaces
    phrase = line[:9]
    spaced = f"{line[:6]}། {line[6:12]}"
    forms = [  # (argument as the shell hands it over, the text searched)
        (f"query={line}", line),
        (f"query={spaced}", spaced),  # typed as query='...' in a shell
        (f'query="{phrase}"', phrase),  # typed as 'query="..."'
    ]
    encoder, corpus = load_encoder(run, device="cpu"), Corpus.load(run)
    for i, (argument, searched) in enumerate(forms):
        page = tmp_path / f"page{i}.html"
        proc = _search(run, argument, f"search.output={page}", cwd=tmp_path)
        assert proc.returncode == 0, (argument, proc.stderr[-2000:])
        assert f'<p class="bo" lang="bo">{html.escape(searched)}</p>' in page.read_text(encoding="utf-8")
        expected = lines_for_embedding(corpus, encoder.encode_texts([searched])[0], 1)[0].sample_id
        assert proc.stdout.splitlines()[2].split()[2] == expected, argument


@pytest.mark.slow
def test_wylie_query_through_the_command_line(trained, tmp_path):
    import pyewts

    from lineclip import load_encoder
    from lineclip.corpus import Corpus
    from lineclip.search import lines_for_embedding, search

    run, _ = trained
    line = pd.read_parquet(run / artifacts.EMBEDDINGS_META)["text"][4]
    wylie = pyewts.pyewts().toWylie(line)
    assert tibetan_from_wylie(wylie) == (line, []), wylie  # the independent check: it round-trips
    proc = _search(run, f"query_wylie={wylie}", "search.html=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == f"query_wylie {wylie!r} searched as {line}"
    encoder = load_encoder(run, device="cpu")
    expected = [h.sample_id for h in lines_for_embedding(Corpus.load(run), encoder.encode_texts([line])[0], 3)]
    assert [row.split()[2] for row in proc.stdout.splitlines()[3:6]] == expected  # the Tibetan's ranking

    status, message = run_in_process(search, "search", [f"run_dir={run}", "query_wylie='bkra shis Q'"])
    assert status == 2 and "does not convert cleanly" in message and 'Unexpected character "Q"' in message


@pytest.mark.slow
@pytest.mark.parametrize(("command", "override", "key"), [
    ("train", "data.train_manifest=/data/བོད ཡིག/lines.jsonl", "train_manifest"),
    ("evaluate", "manifest=/data/བོད/lines.jsonl", "manifest"),
    ("index", "manifest=/data/བོད/lines.jsonl", "manifest"),
    ("search", "query=སངས་རྒྱས། ཆོས།", "query"),
    ("serve", "corpus=/data/བོད/index", "corpus"),
    ("synth", "font=/fonts/བོད.ttf", "font"),
])
def test_every_command_reads_tibetan_values(command, override, key, tmp_path):
    """`--cfg job` prints the composed config without running: each command's entry point quotes the value."""
    proc = subprocess.run([sys.executable, "-m", f"lineclip.{command}", override, "--cfg", "job"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value = override.split("=", 1)[1]
    assert any(line.strip() == f"{key}: {value}" for line in proc.stdout.splitlines()), proc.stdout
