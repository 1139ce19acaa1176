"""The HTTP side of ``wadi serve``: the standard library's threaded server and one page.

Routes: ``/`` the page (:mod:`wadi.serve.page`), ``/api/info`` what is loaded (JSON),
``/api/generate?prompt=...&seed=...&model=student|teacher`` one image as JSON
(``png``: base64, ``ms``, ``steps``, ``nfe``, ``width``, ``height``) or, with
``format=png``, the PNG itself (its time in the ``X-Wadi-Ms`` header).  Bad input gets a
400 with ``{"error": "..."}``.  Nothing on the page loads from elsewhere.
"""

from __future__ import annotations

import base64
import errno
import json
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .engine import Engine
from .page import PAGE

__all__ = ["make_server", "serve_in_thread", "Handler"]

# the page has no external resource; the policy makes sure of it in the browser too
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


class Handler(BaseHTTPRequestHandler):
    """One request; ``server.engine`` generates."""

    server_version = "wadi-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        if getattr(self.server, "verbose", False):
            sys.stderr.write(f"wadi serve: {self.address_string()} {format % args}\n")

    def do_GET(self):  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self._json(HTTPStatus.OK, self.server.engine.info())
        elif url.path == "/api/generate":
            self._generate(parse_qs(url.query, keep_blank_values=True))
        elif url.path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}; open /"})

    def _generate(self, query: dict) -> None:
        def one(name, default):
            values = query.get(name)
            return values[-1] if values else default

        try:
            image = self.server.engine.generate(
                one("prompt", ""), one("seed", "0"), one("model", "student")
            )
        except ValueError as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        except Exception as err:  # noqa: BLE001 - the page shows one line, the log the rest
            sys.stderr.write(f"wadi serve: generation failed: {type(err).__name__}: {err}\n")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"generation failed: {err}"})
            return
        if one("format", "json") == "png":
            headers = {"X-Wadi-Ms": f"{image.ms:.3f}", "X-Wadi-Steps": str(image.steps)}
            self._send(HTTPStatus.OK, image.png, "image/png", headers)
            return
        self._json(
            HTTPStatus.OK,
            {
                "png": base64.b64encode(image.png).decode("ascii"),
                "ms": image.ms,
                "steps": image.steps,
                "nfe": image.nfe,
                "width": image.width,
                "height": image.height,
            },
        )

    def _json(self, status, data) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _send(self, status, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine: Engine, verbose: bool = False):
        self.engine, self.verbose = engine, verbose
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 7860, *, verbose=False):
    """A bound, not yet serving, server (``port`` 0: a free one; see ``server_address``)."""
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"--port must be 0-65535 (0: any free port), got {port}")
    try:
        return _Server((host, int(port)), engine, verbose)
    except socket.gaierror:
        raise ValueError(f"--host {host!r} is not a known address; use 127.0.0.1") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is in use; pass another --port, or --port 0 for a free one"
            ) from None
        if err.errno in (errno.EACCES, errno.EPERM):
            raise ValueError(
                f"no permission to listen on {host}:{port}; use a --port above 1023"
            ) from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise ValueError(
                f"--host {host} is not an address of this machine; use 127.0.0.1"
            ) from None
        raise


def serve_in_thread(server) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread (stop: ``server.shutdown()``)."""
    thread = threading.Thread(target=server.serve_forever, name="wadi-serve", daemon=True)
    thread.start()
    return thread


def url_of(server) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"
