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

The server takes only what it handed out: a label or skip must be for the annotator's open item, with
the ``left_side`` it was shown with (409 otherwise; a retry of a committed one is still ``duplicate``).
Errors answer ``{"detail": "<one line>"}``; a refused body (422) names the field and what was expected
and never repeats the input. ``X-Annotator`` must be ASCII: raw UTF-8 bytes are refused (401).

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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from rlhf.core.errors import DataError, UserError, read_utf8

from rlhf.label.store import Campaign, LabelConflict, UnknownPair

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
MAX_INT = 2**63 - 1
"""SQLite's largest integer: a bigger one in a request would overflow in the query (HTTP 500)."""
MAX_RATIONALE_CHARS = 10_000
# The bidirectional embedding, override and isolate controls reorder the text around them (e.g. the
# `stats` table a name is printed in); other format characters, such as the zero-width joiner in
# emoji like 👩‍💻, are allowed.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Control, surrogate, private-use and unassigned code points, and line and paragraph separators.
REFUSED_IN_NAMES = ("Cc", "Cs", "Co", "Cn", "Zl", "Zp")


# Each field's description says what is expected; validation errors quote it (never the input).
class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: uuid.UUID = Field(description="a UUID made by the page, one per submission")
    pair_id: int = Field(ge=1, le=MAX_INT, description=f"the open item's pair id, an integer from 1 to {MAX_INT}")
    choice: Literal["a", "b", "tie", "both_bad"] = Field(
        description="'a', 'b', 'tie' or 'both_bad' (the pair's own reply, not a screen side)")
    left_side: Literal["a", "b"] = Field(description="'a' or 'b', the reply shown on the left")
    rationale: str | None = Field(default=None, max_length=MAX_RATIONALE_CHARS,
                                  description=f"null or text of at most {MAX_RATIONALE_CHARS} characters")
    elapsed_ms: int | None = Field(default=None, ge=0, le=MAX_INT,
                                   description=f"null or milliseconds, an integer from 0 to {MAX_INT}")


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: uuid.UUID = LabelIn.model_fields["client_id"]
    pair_id: int = LabelIn.model_fields["pair_id"]


BODIES = {"/api/labels": LabelIn, "/api/skips": SkipIn}


def describe(value: object) -> str:
    """What a JSON value is, without repeating it: the input may be huge, or not encodable."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return str(value) if abs(value) <= MAX_INT else f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            return "a string with a lone surrogate (not valid Unicode)"
        return f"a string of {len(value)} characters"
    if isinstance(value, (bytes, bytearray)):
        return "a body that is not JSON"
    return {list: "a list", dict: "an object"}.get(type(value), "something else")


def validation_message(errors: list[dict], model: type[BaseModel] | None) -> str:
    """One short line for a refused request body, naming the field and what was expected.

    FastAPI's default answer echoes the input: a 200 KB rationale came back in full, and a lone
    surrogate could not be encoded at all (HTTP 500, which the page retries forever).
    """
    error = errors[0]
    if model is None:  # every endpoint with a body is in BODIES; this is a safety net
        return f"request: refused ({error['type']})"
    fields = model.model_fields
    loc = [part for part in error["loc"] if part != "body"]
    name = loc[0] if loc and isinstance(loc[0], str) else None
    if error["type"] == "json_invalid":
        message = "request body: expected a JSON object, found invalid JSON"
    elif name is None and error["type"] != "string_unicode":
        message = (f"request body: expected a JSON object with the fields {', '.join(fields)}, "
                   f"found {describe(error.get('input'))}")
    elif name is None or error["type"] == "extra_forbidden" or name not in fields:
        # A field the model lacks (one whose name has a lone surrogate fails before it is compared).
        # Its name came from the client: don't repeat it either.
        message = f"request body: expected only the fields {', '.join(fields)}, found another one"
    elif error["type"] == "missing":
        message = f"field '{name}': expected {fields[name].description}, found nothing"
    else:
        message = f"field '{name}': expected {fields[name].description}, found {describe(error.get('input'))}"
    more = len(errors) - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def check_name(name: str) -> str:
    """An annotator name: 1 to 64 characters after trimming, at least one visible, none of those
    refused above; raises ValueError otherwise."""
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ValueError(f"expected a name of 1 to {MAX_NAME_CHARS} characters, found {len(name)}")
    for ch in name:
        if unicodedata.category(ch) in REFUSED_IN_NAMES or ch in BIDI_CONTROLS:
            raise ValueError(f"expected a name of printable characters, found U+{ord(ch):04X}")
    if all(unicodedata.category(ch) == "Cf" or ch.isspace() for ch in name):
        raise ValueError("expected a name with a visible character, found only invisible ones")
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

    @app.exception_handler(RequestValidationError)
    async def refused_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc.errors(), BODIES.get(request.url.path))},
                            status_code=422)

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
        raw = request.headers.get("x-annotator", "")
        if not raw.isascii():
            # Header bytes arrive as Latin-1: raw UTF-8 "José" would become "JosÃ©".
            raise HTTPException(401, "X-Annotator header: expected ASCII, the name percent-encoded as UTF-8 "
                                "(as the page sends it: José is Jos%C3%A9), found a raw non-ASCII byte")
        try:
            return check_name(unquote(raw, errors="strict"))
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
        lines = read_utf8(path).splitlines()
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
