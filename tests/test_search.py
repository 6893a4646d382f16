"""lineclip.index + lineclip.search: corpora (the training run's own and built ones, exact and approximate), text ->
lines and line -> texts / lines on a run that memorised its lines, the HTML page, and bad input."""

import html
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from usage_support import overfit_run, run_cli, run_in_process, snapshot

from lineclip import artifacts
from lineclip.search import Hit, render_html

OPTS = SimpleNamespace(thumbnails=True, thumb_width=1200, thumb_height=64)


def test_html_escapes_every_string_from_the_data(tmp_path):
    nasty = '<script>alert("x")</script> & ཀུན'
    hit = Hit(1, 0.5, 0, sample_id="<id>", text=nasty, image_path=str(tmp_path / "<missing>.jpg"), doc_id="d&d")
    page = render_html({"text": nasty, "image": None}, [("text → lines", [hit], True)], {"model": "<m>"}, OPTS)
    assert "<script>" not in page and "<id>" not in page and "<m>" not in page
    assert html.escape(nasty) in page and "d&amp;d" in page and "image not readable" in page
    assert page.startswith("<!doctype html>") and '<meta charset="utf-8">' in page


# ------------------------------------------------------------------------------------- with a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return overfit_run(tmp_path_factory)


@pytest.fixture(scope="module")
def encoder(trained):
    from lineclip import load_encoder

    return load_encoder(trained[0], device="cpu")


@pytest.fixture(scope="module")
def eval_index(trained):
    """The 12-line eval manifest indexed through the CLI, into its default place in the run dir."""
    run, data = trained
    proc = run_cli("index", f"run_dir={run}", f"manifest={data['eval']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "index_eval_lines"


def _train_meta(run):
    return pd.read_parquet(run / artifacts.EMBEDDINGS_META)


@pytest.mark.slow
def test_the_training_corpus_loads_without_reencoding_and_finds_every_line(trained, encoder):
    from lineclip.corpus import Corpus
    from lineclip.search import lines_for_embedding, texts_for_embedding

    run, _ = trained
    corpus = Corpus.load(run)
    corpus.check_model(encoder)
    np.testing.assert_array_equal(corpus.image_embeddings, np.load(run / artifacts.EMBEDDINGS))
    assert corpus.text_embeddings is None and len(corpus) == 8
    meta = _train_meta(run)
    queries = encoder.encode_texts(meta["text"].tolist())
    images = encoder.encode_images(meta["image_path"].tolist())
    for i, sample_id in enumerate(meta["sample_id"]):
        assert lines_for_embedding(corpus, queries[i], 3)[0].sample_id == sample_id  # text -> its line
        best_text = texts_for_embedding(corpus, encoder, images[i], 3)[0]
        assert best_text.text == meta["text"][i] and best_text.rows == [i]  # line -> its text


@pytest.mark.slow
def test_an_index_dir_has_the_corpus_files_and_finds_every_line(trained, encoder, eval_index):
    from lineclip.corpus import Corpus
    from lineclip.search import lines_for_embedding, texts_for_embedding

    run, data = trained
    assert {p.name for p in eval_index.iterdir()} == {
        "corpus.json", "faiss_embeddings.npy", "faiss_embeddings_meta.parquet", "text_embeddings.npy"}
    info = json.loads((eval_index / "corpus.json").read_text())
    assert info["kind"] == "flat" and info["n_lines"] == 12 and info["fingerprint"] == encoder.fingerprint()
    corpus = Corpus.load(eval_index)
    assert list(corpus.meta.columns) == list(artifacts.META_COLUMNS) and corpus.text_embeddings.shape == (12, 64)
    meta = _train_meta(run)
    images = encoder.encode_images(meta["image_path"].tolist())
    for i, (sample_id, text) in enumerate(zip(meta["sample_id"], meta["text"], strict=True)):
        assert lines_for_embedding(corpus, encoder.encode_texts([text])[0], 5)[0].sample_id == sample_id
        best = texts_for_embedding(corpus, encoder, images[i], 5)[0]
        assert best.text == text
        # lines 0 and 1 share their text with an eval line: one text hit lists both lines
        assert len(best.rows) == (2 if i in (0, 1) else 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_round_trip(trained, encoder, tmp_path, kind):
    from lineclip.corpus import Corpus, CorpusError, IndexParams, write_corpus
    from lineclip.manifest import read_manifest
    from lineclip.search import lines_for_embedding

    run, data = trained
    records, _ = read_manifest(data["eval"])
    out = write_corpus(tmp_path / kind, encoder, records, IndexParams(kind=kind, nlist=2, nprobe=2),
                       with_texts=False)
    assert (out / "index.faiss").exists() and not (out / "text_embeddings.npy").exists()
    corpus = Corpus.load(out)
    for record in records[:8]:
        assert lines_for_embedding(corpus, encoder.encode_texts([record.text])[0], 3)[0].sample_id == record.sample_id
    with pytest.raises(CorpusError, match="already exists"):
        write_corpus(out, encoder, records, IndexParams(kind=kind))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind


@pytest.mark.slow
def test_search_by_text_prints_a_table_and_writes_a_page(trained, tmp_path):
    run, _ = trained
    meta = _train_meta(run)
    text, sample_id = meta["text"][3] + " " + meta["text"][3], meta["sample_id"][3]  # 121 bytes
    before = set(run.glob("search_*.html"))
    proc = run_cli("search", f"run_dir={run}", f"query='{text}'", "top_k=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.iterdir())
    # longer than the model's 64 bytes: a warning, then it is searched truncated (as training truncates)
    assert re.search(r"WARNING.*query is \d+ bytes, longer than the model's text_max_length=64", proc.stderr)
    table = proc.stdout.splitlines()
    assert table[0].startswith("text → lines (run, 8 lines)") and "rank" in table[1]
    assert table[2].split()[:1] == ["1"] and table[2].split()[2] == sample_id and len(table) == 5

    (page,) = set(run.glob("search_*.html")) - before
    content = page.read_text(encoding="utf-8")
    ids = re.findall(r'<tr data-sample-id="([^"]+)">', content)
    assert len(ids) == 3 and ids[0] == sample_id and set(ids) <= set(meta["sample_id"])
    assert content.count('src="data:image/jpeg;base64,') == 3
    for sid in ids:
        row = meta[meta["sample_id"] == sid].iloc[0]
        assert html.escape(row["text"]) in content and html.escape(row["image_path"]) in content
    page.unlink()  # the run dir is shared by other tests


@pytest.mark.slow
def test_search_by_line_image_finds_its_text_and_itself(trained, eval_index, tmp_path):
    run, data = trained
    meta = pd.read_parquet(eval_index / artifacts.EMBEDDINGS_META)
    query = meta["image_path"][5]
    out = tmp_path / "page.html"
    proc = run_cli("search", f"run_dir={run}", f"query_image={query}", f"corpus={eval_index}", "top_k=4",
                   f"search.output={out}", "search.thumbnails=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = proc.stdout.split("line → similar lines")
    assert sections[0].startswith("line → texts (index_eval_lines, 12 lines)")
    first_text_row, first_line_row = sections[0].splitlines()[2], sections[1].splitlines()[2]
    assert first_text_row.split()[2] == meta["sample_id"][5] and first_line_row.split()[2] == meta["sample_id"][5]
    assert float(first_line_row.split()[1]) == pytest.approx(1.0, abs=1e-4)  # the line itself
    content = out.read_text(encoding="utf-8")
    assert "line → texts" in content and "line → similar lines" in content
    assert f'src="file://{query}"' in content and content.count('<img src="file://') == 1 + 4  # query + lines


@pytest.mark.slow
def test_bad_input_is_one_error_line_and_writes_nothing(trained, tmp_path):
    from lineclip.index import build
    from lineclip.search import search

    run, data = trained
    # a copy of the run without the final text head, whose checkpoint still has one: not one prefix
    mixed = shutil.copytree(run, tmp_path / "mixed", ignore=shutil.ignore_patterns("index_*", "*.html", "eval_*"))
    (mixed / artifacts.TEXT_HEAD).unlink()
    partial = shutil.copytree(mixed, tmp_path / "partial", ignore=shutil.ignore_patterns("checkpoint_*"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    text = _train_meta(run)["text"][0]
    search_cases = [
        ([f"run_dir={tmp_path / 'no_such_run'}", "query=ཀ"], "does not exist"),
        ([f"run_dir={partial}", "query=ཀ"], "incomplete bundle at"),
        ([f"run_dir={mixed}", "query=ཀ"], "must share one prefix"),
        ([f"run_dir={run}", f"query_image={broken}"], "cannot be read as an image"),
        ([f"run_dir={run}", f"query_image={tmp_path / 'nope.jpg'}"], "does not exist"),
        ([f"run_dir={run}"], "give exactly one of"),
        ([f"run_dir={run}", "query=ཀ", f"query_image={broken}"], "give exactly one of"),
        ([f"run_dir={run}", "query=ཀ", f"corpus={tmp_path}"], "is not a corpus"),
        ([f"run_dir={run}/checkpoint_step_0000030_", f"query='{text}'"], "embedded by another model"),
    ]
    index_cases = [
        ([f"run_dir={run}", f"manifest={empty}"], "has no usable rows"),
        ([f"run_dir={partial}", f"manifest={data['train']}"], "incomplete bundle at"),
        ([f"run_dir={run}", f"manifest={data['train']}", "index.kind=lsh"], "index.kind='lsh' is not one of"),
        ([f"run_dir={run}", f"manifest={data['train']}", f"index.output={tmp_path}"], "already exists"),
    ]
    watched = [run, tmp_path]
    before = [snapshot(d) for d in watched]
    for fn, name, cases in ((search, "search", search_cases), (build, "index", index_cases)):
        for overrides, reason in cases:
            status, message = run_in_process(fn, name, overrides)
            assert status == 2 and reason in message, (overrides, message)
    assert [snapshot(d) for d in watched] == before

    proc = run_cli("search", f"run_dir={run}", f"query_image={broken}", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "cannot be read as an image" in errors[0], proc.stderr
    assert [snapshot(d) for d in watched] == before

