"""The labeling web app: a FastAPI server for one campaign and the plain HTML/JS page in ``static/``.

API (JSON). Every call but ``/api/config`` names the annotator, with the header
``X-Annotator: <name>`` (percent-encoded UTF-8), or ``Authorization: Bearer <token>`` when the server
was started with ``--tokens``:

- ``GET /api/config`` -> ``{"campaign", "auth": "name" | "token", "k"}``
- ``GET /api/whoami`` -> ``{"annotator"}`` (401 for an unknown token)
- ``GET /api/next`` -> ``{"item": {"pair_id", "prompt", "left": {"side", "text"}, "right": ...} | null,
  "progress"}``; the same open item until it is labeled or skipped
- ``POST /api/labels`` ``{"client_id": UUID, "pair_id", "choice": "a"|"b"|"tie"|"both_bad",
  "left_side": "a"|"b", "rationale"?, "elapsed_ms"?}`` -> ``{"status": "stored"|"duplicate",
  "label", "progress"}``. 200 is sent only after COMMIT; a retry with the same ``client_id`` gets
  ``duplicate`` and stores nothing. ``choice`` names the pair's response, not a screen side.
- ``POST /api/skips`` ``{"client_id", "pair_id"}`` -> ``{"status", "progress"}``

Security: model text is data. The API sends it only as JSON, the page puts it in the DOM with
``textContent`` (never as HTML), and a Content-Security-Policy allows scripts from this server's
``/static/`` only, so even an injected ``<script>`` or ``onerror=`` would not run. With ``allowed_hosts``
(loopback serving), requests whose Host header names another site are refused (DNS rebinding).
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
import unicodedata
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import unquote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from rlhf.errors import DataError, UserError

from label.store import Campaign, LabelConflict, UnknownPair

STATIC_DIR = Path(__file__).parent / "static"
MAX_NAME_CHARS = 64
MAX_ELAPSED_MS = 24 * 3600 * 1000
"""Time per label is capped at a day: a tab left open overnight is not a day's work."""
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
MIN_TOKEN_CHARS = 16


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: uuid.UUID
    pair_id: int
    choice: Literal["a", "b", "tie", "both_bad"]
    left_side: Literal["a", "b"]
    rationale: str | None = Field(default=None, max_length=10_000)
    elapsed_ms: int | None = Field(default=None, ge=0)


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: uuid.UUID
    pair_id: int


def check_name(name: str) -> str:
    """An annotator name: 1 to 64 printable characters after trimming; raises ValueError otherwise."""
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"expected a name of 1 to {MAX_NAME_CHARS} characters, found {len(name)}")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ValueError("expected a name without control characters, found one")
    return name


def create_app(campaign: Campaign, k: int | None = None, tokens: dict[str, str] | None = None,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app for one campaign.

    Args:
        k: labels wanted per pair (different annotators); None = the campaign's stored value.
        tokens: token -> annotator name. When given, annotators sign in with a token, not a name.
        allowed_hosts: Host header values to accept (None = any); ``serve`` passes the loopback
            names when it binds a loopback address.
    """
    k = campaign.k if k is None else k
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def annotator(request: Request) -> str:
        if tokens is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HTTPException(401, "expected an 'Authorization: Bearer <token>' header")
            # Compare against every token in constant time, so timing says nothing about a token.
            given = token.strip().encode()
            names = [name for known, name in tokens.items() if hmac.compare_digest(known.encode(), given)]
            if not names:
                raise HTTPException(401, "unknown token")
            return names[0]
        try:
            return check_name(unquote(request.headers.get("x-annotator", ""), errors="strict"))
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPException(401, f"X-Annotator header: {e}")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/config")
    def config() -> dict:
        return {"campaign": campaign.path.name, "auth": "token" if tokens is not None else "name", "k": k}

    @app.get("/api/whoami")
    def whoami(who: str = Depends(annotator)) -> dict:
        return {"annotator": who}

    @app.get("/api/next")
    def next_item(who: str = Depends(annotator)) -> dict:
        item = campaign.next_item(who, k)
        return {"item": item, "progress": campaign.progress(k, who)}

    @app.post("/api/labels")
    def submit_label(body: LabelIn, who: str = Depends(annotator)) -> dict:
        rationale = (body.rationale or "").strip() or None
        elapsed = None if body.elapsed_ms is None else min(body.elapsed_ms, MAX_ELAPSED_MS)
        try:
            label, duplicate = campaign.submit_label(
                str(body.client_id), who, body.pair_id, body.choice, body.left_side, rationale, elapsed)
        except UnknownPair as e:
            raise HTTPException(404, str(e))
        except LabelConflict as e:
            raise HTTPException(409, str(e))
        return {"status": "duplicate" if duplicate else "stored", "label": label,
                "progress": campaign.progress(k, who)}

    @app.post("/api/skips")
    def submit_skip(body: SkipIn, who: str = Depends(annotator)) -> dict:
        try:
            duplicate = campaign.submit_skip(str(body.client_id), who, body.pair_id)
        except UnknownPair as e:
            raise HTTPException(404, str(e))
        except LabelConflict as e:
            raise HTTPException(409, str(e))
        return {"status": "duplicate" if duplicate else "stored", "progress": campaign.progress(k, who)}

    return app


@contextmanager
def running_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread (port 0 = any free port); yields the base URL.

    For the browser test, the screenshot script and notebooks; ``rlhf label serve`` runs uvicorn in
    the foreground instead.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the labeling server did not start on {host}:{port}")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ----------------------------------------------------------------------------------------------
# Serving (``rlhf label serve``)
# ----------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_tokens(path: str) -> dict[str, str]:
    """Read ``name:token`` lines (blank lines and ``#`` comments ignored); returns token -> name.

    The token is what follows the last ``:``, so names may contain colons. Errors never echo a token.
    """
    tokens: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the tokens file ({e.strerror})")
    for line_no, line in enumerate(lines, start=1):
        where = f"{path}:{line_no}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, token = line.rpartition(":")
        token = token.strip()
        if not colon:
            raise DataError(where, None, "a 'name:token' line", "<a line without ':'>")
        try:
            name = check_name(name)
        except ValueError as e:
            raise UserError(f"{where}: field 'name': {e}")
        if len(token) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in token):
            raise DataError(where, "token", f"at least {MIN_TOKEN_CHARS} characters without spaces "
                            "(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`)",
                            f"<{len(token)} characters>")
        if token in tokens:
            raise DataError(where, "token", "a token no other annotator has", "<a repeated token>")
        if name in tokens.values():
            raise DataError(where, "name", "each annotator once", name)
        tokens[token] = name
    if not tokens:
        raise UserError(f"{path}: expected at least one 'name:token' line, found none")
    return tokens


def serve(campaign: Campaign, host: str = "127.0.0.1", port: int = 8000, k: int | None = None,
          tokens_path: str | None = None) -> None:
    """Run the labeling server in the foreground until Ctrl-C."""
    import uvicorn

    loopback = is_loopback(host)
    if not loopback and tokens_path is None:
        raise UserError(
            f"--host {host}: expected a loopback address (127.0.0.1, localhost, ::1) or --tokens FILE; "
            "a server reachable from other machines needs one 'name:token' line per annotator"
        )
    tokens = read_tokens(tokens_path) if tokens_path else None
    if k is not None:
        campaign.set_k(k)
    progress = campaign.progress(campaign.k)
    if progress["pairs"] == 0:
        raise UserError(f"{campaign.path}: expected pairs to label, found none; add some with "
                        "`rlhf label import` or `rlhf label generate`")
    app = create_app(campaign, tokens=tokens, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"labeling {campaign.path} at http://{shown_host}:{port}/ ({progress['labeled']}/{progress['target']} "
          f"labels, {progress['pairs']} pairs, k={progress['k']}); sign in with "
          f"{'a token' if tokens else 'a name'}; Ctrl-C to stop", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
