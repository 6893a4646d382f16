"""lineclip.serve: the search page in-process (Starlette's TestClient) on the run that memorised its 8 lines, bad
input, what the server lets a browser read, and the real command in headless Chromium.

The browser test needs Debian's `chromium` and `chromium-driver`; without them it is skipped, unless
LINECLIP_REQUIRE_BROWSER=1 (set by .ci/run, which installs them) makes a missing browser a failure. With
LINECLIP_SCREENSHOT_DIR=docs it also writes the README's screenshots (docs/serve.png at 1280 px, docs/serve_phone.png
at 390 px); a plain run keeps them in its tmp dir."""

import html
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from usage_support import compose_config, overfit_run, run_capturing_errors

from lineclip import artifacts
from lineclip.search import Hit
from lineclip.serve import Query, Results, highlighted, render_page

starlette = pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")


def test_the_page_escapes_every_string_and_marks_only_the_phrase():
    nasty = '<script>alert("x")</script> བཀྲ་ཤིས་བདེ་ལེགས། ཤིས'
    hit = Hit(1, 0.5, 7, sample_id="<id>", text=nasty, image_path="/x/<y>.jpg", doc_id="d&d", page_id="p", line_id="")
    query = Query(typed='"><typed>', text="བཀྲ་ཤིས", script="tibetan")
    page = render_page("<model>", query, Results(query, [hit], has_next=True))
    for raw in ("<script>", "<id>", "<model>", "<typed>"):
        assert raw not in page, raw
    assert 'value="&quot;&gt;&lt;typed&gt;"' in page
    assert highlighted(nasty, "བཀྲ་ཤིས") == (html.escape('<script>alert("x")</script> ')
                                              + "<mark>བཀྲ་ཤིས</mark>་བདེ་ལེགས། ཤིས")
    assert page.count("<mark>") == 1 and "doc d&amp;d / page p" in page
    assert 'src="/thumb/7"' in page and 'href="/line/7"' in page and "/x/" not in page  # rows, never paths
    assert 'rel="next"' in page and 'rel="prev"' not in page


# ------------------------------------------------------------------------------------- with a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return overfit_run(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(trained):
    from lineclip.serve import LineSearch

    run, _ = trained
    return LineSearch.load(compose_config("serve", [f"run_dir={run}", "page_size=3", "max_upload_bytes=200000",
                                                    "device=cpu"]))


@pytest.fixture(scope="module")
def client(engine):
    from starlette.testclient import TestClient

    from lineclip.serve import build_app

    return TestClient(build_app(engine))


@pytest.fixture(scope="module")
def meta(trained):
    return pd.read_parquet(trained[0] / artifacts.EMBEDDINGS_META)


def _rows(page: str) -> list[tuple[int, int, float]]:
    """(rank, corpus row, score) of each result row of a page."""
    return [(int(rank), int(row), float(score)) for row, rank, score in re.findall(
        r'<tr class="hit" data-row="(\d+)"[^>]*><td class="num">(\d+)</td><td class="num">([-\d.]+)</td>', page)]


def _error(page: str) -> str:
    (message,) = re.findall(r'<p class="error" role="alert">(.*?)</p>', page)
    return html.unescape(message)


def _reference(engine, embedding, k):
    from lineclip.search import lines_for_embedding

    return [(h.rank, h.row, h.score) for h in lines_for_embedding(engine.corpus, embedding, k)]


@pytest.mark.slow
def test_text_query_pages_through_the_ranking_with_the_phrase_marked(client, engine, meta):
    line = meta["text"][5]
    phrase = "་".join(line.split("་")[:2])  # its first two syllables
    reference = _reference(engine, engine.encoder.encode_texts([phrase])[0], 8)
    pages = [client.get("/", params={"q": phrase, "page": n}) for n in (1, 2, 3)]
    assert [p.status_code for p in pages] == [200, 200, 200]
    rows = [_rows(p.text) for p in pages]
    assert [len(r) for r in rows] == [3, 3, 2]
    got = rows[0] + rows[1] + rows[2]
    assert [(rank, row) for rank, row, _ in got] == [(rank, row) for rank, row, _ in reference]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in reference], abs=1e-4)
    assert ('rel="next"' in pages[0].text, 'rel="next"' in pages[2].text) == (True, False)
    # every shown line whose text holds the phrase has it marked, the others nothing
    for page, page_rows in zip(pages, rows, strict=True):
        for _, row, _ in page_rows:
            cell = page.text.split(f'data-row="{row}"')[1].split("</tr>")[0]
            assert ("<mark>" + phrase + "</mark>" in cell) == (phrase in meta["text"][row])
    assert f'<span class="bo" lang="bo" id="searched">{phrase}</span>' in pages[0].text
    assert client.get("/", params={"q": phrase, "page": 4}).status_code == 400  # past the last


@pytest.mark.slow
def test_wylie_toggle_searches_the_converted_tibetan(client, meta):
    import pyewts

    line = meta["text"][5]
    wylie = pyewts.pyewts().toWylie(line)  # la 'jug pa yin pa'i phyi: a-chung apostrophes in a URL and a page
    by_wylie = client.get("/", params={"q": wylie, "script": "wylie"})
    by_text = client.get("/", params={"q": line})
    assert by_wylie.status_code == 200 and _rows(by_wylie.text) == _rows(by_text.text)
    assert f'id="searched">{line}</span> <span class="meta">(Wylie: {html.escape(wylie)})' in by_wylie.text
    assert _rows(by_wylie.text)[0][1] == 5  # the memorised line first
    assert 'value="wylie" checked' in by_wylie.text


@pytest.mark.slow
def test_line_images_are_served_by_row_from_the_corpus_paths_only(client, engine, meta):
    for row in (0, 7):
        with Image.open(meta["image_path"][row]) as original:
            size = original.size
        thumb = client.get(f"/thumb/{row}")
        full = client.get(f"/line/{row}")
        assert thumb.headers["content-type"] == "image/jpeg" and full.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(full.content)) as image:
            assert image.size == size
        with Image.open(io.BytesIO(thumb.content)) as image:
            assert image.height == min(size[1], engine.cfg.thumb_height)
    for url in ("/thumb/8", "/line/99999", "/line/-1", "/line/..%2F..%2Fetc%2Fpasswd", "/thumb/0?path=/etc/passwd",
                "/etc/passwd", "/static/../../etc/passwd"):
        response = client.get(url)
        assert (response.status_code, url) == (404 if url != "/thumb/0?path=/etc/passwd" else 200, url)
        assert b"root:" not in response.content
    # the only route with a free-form parameter looks up uploads in memory
    from starlette.routing import Route

    params = {r.path: set(r.param_convertors) for r in client.app.routes if isinstance(r, Route)}
    assert params == {"/": set(), "/image": set(), "/thumb/{row}": {"row"}, "/line/{row}": {"row"},
                      "/upload/{key:str}": {"key"}, "/font/tibetan.ttf": set(), "/favicon.svg": set(),
                      "/favicon.ico": set()}
    assert client.get("/font/tibetan.ttf").content[:4] == b"\x00\x01\x00\x00"  # the bundled TrueType font
    for url in ("/favicon.svg", "/favicon.ico"):  # the page's icon, and what a browser asks for by default: no 404
        icon = client.get(url)
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml", url
        assert icon.content.startswith(b"<svg") and icon.content.endswith(b"</svg>")
    assert '<link rel="icon" href="/favicon.svg"' in client.get("/").text


@pytest.mark.slow
def test_an_uploaded_line_finds_itself_and_pages(client, engine, meta):
    row = 4
    data = open(meta["image_path"][row], "rb").read()
    response = client.post("/image", files={"image": ("line.jpg", data, "image/jpeg")})
    assert response.status_code == 200 and response.history[0].status_code == 303  # post, then redirect
    rows = _rows(response.text)
    reference = _reference(engine, engine.encoder.encode_images([meta["image_path"][row]])[0], 3)
    assert [r[:2] for r in rows] == [r[:2] for r in reference] and rows[0][1] == row
    assert rows[0][2] == pytest.approx(1.0, abs=1e-4)
    key = re.search(r"upload=([0-9a-f]{64})", str(response.url))[1]
    assert client.get(f"/upload/{key}").headers["content-type"] == "image/jpeg"
    second = client.get("/", params={"upload": key, "page": 2})
    assert [r[0] for r in _rows(second.text)] == [4, 5, 6]
    assert "<mark>" not in response.text


@pytest.mark.slow
def test_bad_input_gets_the_page_a_message_and_a_4xx(client):
    def post(data, name="line.jpg", **kwargs):
        return client.post("/image", files={"image": (name, data, "image/jpeg")}, **kwargs)

    cases = [
        (client.get("/", params={"q": "  "}), 400, "the query is empty"),
        (client.get("/", params={"q": "bkra shis"}), 400, "no Tibetan script"),
        (client.get("/", params={"q": "bkra shis Q", "script": "wylie"}), 400, 'Unexpected character "Q"'),
        (client.get("/", params={"q": "ཀ", "script": "latin"}), 400, "script='latin' is not one of"),
        (client.get("/", params={"q": "ཀ" * 2001}), 400, "the limit is 2000"),
        (client.get("/", params={"q": "ཀ", "page": "x"}), 400, "is not a page number"),
        (client.get("/", params={"upload": "../../etc"}), 400, "not an uploaded line's key"),
        (client.get("/", params={"upload": "0" * 64}), 404, "upload it again"),
        (post(b"GIF89a not really"), 400, "line.jpg cannot be read as an image: not an image"),
        (post(b"\xff\xd8\xff\xe0 truncated"), 400, "cannot be read as an image"),
        (post(b""), 400, "line.jpg is empty"),
        (post(b"", name=""), 400, "choose a line image file"),
        (post(b"x" * 200_001), 413, "larger than 200,000 bytes (max_upload_bytes)"),
        (client.post("/image", content=(b"x" * 50_000 for _ in range(5)),  # chunked: no Content-Length
                     headers={"content-type": "multipart/form-data; boundary=b"}), 413, "larger than 200,000"),
        (client.post("/image", content=b"--b\r\nbroken", headers={"content-type": "multipart/form-data; boundary=b"}),
         400, "choose a line image file"),
        (client.get("/nowhere"), 404, "404: Not Found"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.status_code)
        assert message in _error(response.text), (message, _error(response.text))
        assert "Traceback" not in response.text and '<form id="text-search"' in response.text
    # the typed query comes back in the box, so it can be corrected
    assert 'value="bkra shis"' in client.get("/", params={"q": "bkra shis"}).text


def test_missing_extra_is_one_line_naming_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from lineclip.serve import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    status, messages = run_capturing_errors(serve, compose_config("serve", [f"run_dir={tmp_path}"]))
    assert status == 2 and messages == ["lineclip.serve needs the serve extra (uvicorn missing): "
                                        "pip install -e '.[serve]'"]


def test_defaults_bind_loopback_and_bad_options_stop(tmp_path):
    from lineclip.serve import is_loopback, serve

    cfg = compose_config("serve", [])
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and is_loopback(cfg.host)
    assert not is_loopback("0.0.0.0") and is_loopback("::1")
    for overrides, reason in ((["page_size=0"], "page_size=0: must be >= 1"), (["port=70000"], "port must be in"),
                              ([], "run_dir=... is required")):
        status, messages = run_capturing_errors(serve, compose_config("serve", [f"run_dir={tmp_path}", *overrides]
                                                                       if overrides else []))
        assert status == 2 and len(messages) == 1 and reason in messages[0], messages
    with socket.socket() as taken:  # a port in use stops before the model is loaded (run_dir is no run here)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, messages = run_capturing_errors(serve, compose_config("serve", [f"run_dir={tmp_path}", f"port={port}"]))
    assert status == 2 and messages == [f"cannot serve on host=127.0.0.1 port={port}: Address already in use"]


# ------------------------------------------------------------------------------------------ in a browser


def _browser() -> tuple[str, str] | None:
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(trained, tmp_path):
    """`python -m lineclip.serve` on a free port of 127.0.0.1, as a user starts it; its URL once it answers."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lineclip.serve", f"run_dir={trained[0]}", f"port={port}",
                             "page_size=5", "device=cpu"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"lineclip.serve did not come up: {(tmp_path / 'serve.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_search_page_in_headless_chromium(server, meta, tmp_path):
    found = _browser()
    if found is None:
        reason = "headless Chromium not found (apt-get install chromium chromium-driver)"
        if os.environ.get("LINECLIP_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " but LINECLIP_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    try:
        driver.get(server)
        phrase = "་".join(meta["text"][5].split("་")[:2])
        box = driver.find_element(By.NAME, "q")
        box.send_keys(phrase)
        box.submit()
        WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.ID, "results")))
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.hit")
        assert len(rows) == 5
        images = driver.find_elements(By.CSS_SELECTOR, "tr.hit img")
        WebDriverWait(driver, 30).until(lambda d: all(d.execute_script("return arguments[0].complete", i)
                                                      for i in images))
        widths = [driver.execute_script("return arguments[0].naturalWidth", i) for i in images]
        assert len(widths) == 5 and min(widths) > 0  # every thumbnail loaded
        marks = driver.find_elements(By.TAG_NAME, "mark")
        assert marks and {m.text for m in marks} == {phrase}
        assert sum(phrase in meta["text"][int(r.get_attribute("data-row"))] for r in rows) == len(marks)
        assert driver.find_element(By.ID, "searched").text == phrase
        driver.save_screenshot(str(tmp_path / "serve.png"))
        assert (tmp_path / "serve.png").stat().st_size > 10_000

        driver.find_element(By.CSS_SELECTOR, 'a[rel="next"]').click()  # the last 3 of the 8 lines
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.hit")) == 3)
        ranks = [r.find_element(By.CSS_SELECTOR, "td").text for r in driver.find_elements(By.CSS_SELECTOR, "tr.hit")]
        assert ranks == ["6", "7", "8"]

        shots = Path(os.environ.get("LINECLIP_SCREENSHOT_DIR") or tmp_path)
        for width, height, name in ((1280, 1000, "serve.png"), (390, 844, "serve_phone.png")):
            _check_layout(driver, server + "?q=" + urllib.parse.quote(phrase), width, height, shots / name)
    finally:
        driver.quit()


# Where each part of the result page lies, in CSS px of the viewport (getBoundingClientRect).
_LAYOUT_JS = """
const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top,
                                                                 bottom: r.bottom, width: r.width, height: r.height}; };
return {inner: window.innerWidth, scroll: document.documentElement.scrollWidth,
        query: box(document.querySelector('input[name=q]')),
        rows: [...document.querySelectorAll('tr.hit')].map(tr => {
          const line = tr.querySelector('.bo');
          return {thumb: box(tr.querySelector('img')), line: box(line),
                  lineHeight: parseFloat(getComputedStyle(line).lineHeight),
                  marks: [...tr.querySelectorAll('mark')].map(box), nums: [...tr.querySelectorAll('td.num')].map(box)};
        })};
"""


def _check_layout(driver, url: str, width: int, height: int, screenshot: Path) -> None:
    """The result page in a viewport `width` px wide (a phone's when < 600: its viewport meta tag applies): no
    horizontal scrolling, the query box (with its clear button) inside the page, on a phone each thumbnail as wide
    as the page less its margins with rank and score above it, and each phrase mark inside its own text line,
    below the thumbnail (the Tibetan font's tall inline boxes once covered the thumbnail above)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.fonts.status === 'loaded' && [...document.images].every(i => i.complete && i.naturalWidth)"))
    page = driver.execute_script(_LAYOUT_JS)
    # a page wider than the phone makes the browser widen its layout viewport: innerWidth says so too
    assert (page["inner"], page["scroll"] <= width) == (width, True), (width, page["inner"], page["scroll"])
    assert 0 <= page["query"]["left"] and page["query"]["right"] <= width, page["query"]
    assert len(page["rows"]) == 5
    for row in page["rows"]:
        thumb = row["thumb"]
        assert 0 <= thumb["left"] and thumb["right"] <= width, thumb
        if width < 600:
            assert thumb["width"] >= width - 2 * 12, thumb  # the page's and the cell's margins, <= 12 px a side
            assert all(num["bottom"] <= thumb["top"] for num in row["nums"]), row  # rank and score above it
        for mark in row["marks"]:
            assert mark["top"] >= thumb["bottom"] - 0.5, (mark, thumb)  # not over the thumbnail
            assert row["line"]["top"] - 0.5 <= mark["top"] and mark["bottom"] <= row["line"]["bottom"] + 0.5, row
            assert mark["height"] <= row["lineHeight"] + 0.5, row  # no taller than a line of the text
    assert sum(len(row["marks"]) for row in page["rows"]) >= 1  # the memorised line holds the phrase
    driver.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        assert shot.size == (width, height)
