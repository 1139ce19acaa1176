"""``wadi serve`` over plain HTTP: the page, the info and a generation from a live server."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

from wadi.serve.app import make_server, serve_in_thread, url_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base_url(engine):
    server = make_server(engine, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        yield url_of(server)
    finally:
        server.shutdown()
        server.server_close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_page_is_self_contained_html(base_url):
    status, headers, body = _get(base_url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode("utf-8")
    for element in ('id="prompt"', 'id="seed"', 'id="compare"', 'id="student-img"'):
        assert element in page
    assert "http://" not in page and "https://" not in page, "the page must load nothing external"
    assert "default-src 'none'" in headers["Content-Security-Policy"]


def test_info_names_the_models(base_url, serve_models):
    status, _, body = _get(base_url + "api/info")
    info = json.loads(body)
    assert status == 200
    assert info["student"] == str(serve_models["pipeline"])
    assert info["teacher"] == str(serve_models["teacher"]) and info["teacher_steps"] == 3


def test_generation_returns_the_engines_png(base_url, engine):
    status, _, body = _get(base_url + "api/generate?prompt=a+photo+of+a+cat&seed=11")
    assert status == 200
    data = json.loads(body)
    png = base64.b64decode(data["png"])
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.size == (data["width"], data["height"])
    assert data["steps"] == 1 and data["ms"] > 0
    assert png == engine.generate("a photo of a cat", 11).png


def test_teacher_and_raw_png(base_url):
    status, _, body = _get(base_url + "api/generate?prompt=cat&seed=1&model=teacher")
    assert status == 200 and json.loads(body)["nfe"] == 6
    status, headers, png = _get(base_url + "api/generate?prompt=cat&seed=1&format=png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert png.startswith(PNG_SIGNATURE) and float(headers["X-Wadi-Ms"]) > 0


@pytest.mark.parametrize(
    "query,message",
    [("seed=abc", "seed must be a whole number"), ("model=other", "model must be one of")],
)
def test_bad_requests_get_400_with_the_reason(base_url, query, message):
    status, headers, body = _get(base_url + "api/generate?prompt=cat&" + query)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert message in json.loads(body)["error"]


def test_unknown_path_is_404(base_url):
    status, _, body = _get(base_url + "nothing-here")
    assert status == 404 and "open /" in json.loads(body)["error"]


def test_port_in_use_and_bad_port_are_one_line(base_url, engine):
    port = int(base_url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use; .*--port 0"):
        make_server(engine, "127.0.0.1", port)
    with pytest.raises(ValueError, match="--port must be 0-65535"):
        make_server(engine, "127.0.0.1", 70000)


def test_cli_reports_a_bad_pipeline_in_one_line(tmp_path, capsys):
    from wadi.cli import main

    assert main(["serve", "--pipeline", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("wadi serve: error:") and "is not a folder" in err
