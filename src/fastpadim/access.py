"""Who may use ``fastpadim serve`` on a plant network: an API key, CORS for browser apps on other origins, and the
API's documentation served from the package (a plant network often has no internet: no CDN).

Serving beyond loopback needs a key (``check_exposure``). Clients send it as ``Authorization: Bearer KEY`` (what
Prometheus sends with ``bearer_token``) or ``X-API-Key: KEY``. The page, /health and the docs stay open; the API
and /metrics need the key. Wire the middlewares in this order, so that even a refusal carries CORS headers
(Starlette's last added middleware is the outermost): ``app.add_middleware(ApiKeyMiddleware, api_key=key)``,
then ``install_cors(app, origins)``.
"""

# No ``from __future__ import annotations`` here: FastAPI must resolve the docs route's signature at run time.
import hmac
import ipaddress
import json
import os
import re
from pathlib import Path

from .errors import FastpadimError

API_KEY_ENV = "FASTPADIM_API_KEY"
KEY_HINT = "send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
OPEN_PATHS = ("/", "/health", "/docs", "/docs/static", "/openapi.json", "/favicon.ico")
OPEN_PREFIXES = ("/docs/static/",)  # the docs' script, style sheet and icons
DOCS_STATIC = "/docs/static"
ORIGIN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://(\[[0-9a-fA-F:.]+\]|[^/\s:?#@\[\]]+)(:[0-9]{1,5})?$")


def load_api_key(key_file: Path | None) -> str | None:
    """The key from the file's first line, else from FASTPADIM_API_KEY, else None (no key)."""
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise FastpadimError(f"cannot read the API key file {key_file}: {reason}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise FastpadimError(f"the API key file {key_file} is empty: write the key on its first line")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without a key."""
    if api_key is None and not is_loopback(host):
        raise FastpadimError(f"serving on {host} needs an API key: --api-key-file FILE or {API_KEY_ENV} "
                             f"(clients send 'Authorization: Bearer KEY' or 'X-API-Key')")


def header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ApiKeyMiddleware:
    """Pure ASGI: a request needs the key unless its path is open (exact, or under an open prefix) or it is a
    CORS preflight (the CORS middleware answers it; browsers send no credentials with one)."""

    def __init__(self, app, api_key: str, open_paths=OPEN_PATHS, open_prefixes=OPEN_PREFIXES):
        if not api_key:
            raise FastpadimError("the API key is empty")
        self.app = app
        self.key = api_key.encode("utf-8")
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = tuple(open_prefixes)

    def is_open(self, scope) -> bool:
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in self.open_paths or path.startswith(self.open_prefixes):
            return True
        return (scope["type"] == "http" and scope["method"] == "OPTIONS" and header(scope, b"origin") is not None
                and header(scope, b"access-control-request-method") is not None)

    def authorized(self, scope) -> bool:
        scheme, _, token = (header(scope, b"authorization") or b"").partition(b" ")
        sent = [header(scope, b"x-api-key"), token.strip() if scheme.lower() == b"bearer" else None]
        return any(hmac.compare_digest(key, self.key) for key in sent if key)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.is_open(scope) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": f"missing or wrong API key; {KEY_HINT}"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def check_origins(origins: list[str]) -> None:
    """Each CORS origin is scheme://host[:port] or '*' (checked before the service loads its models)."""
    for origin in origins:
        if origin != "*" and not ORIGIN.match(origin):
            raise FastpadimError(f"a CORS origin must look like scheme://host[:port] (no path, no trailing /) or be "
                                 f"'*', got {origin!r}")


def install_cors(app, origins: list[str]) -> None:
    """Let browser apps on these origins call the API (none: CORS stays off, browsers allow same-origin only)."""
    if not origins:
        return
    check_origins(origins)
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "X-API-Key", "Content-Type"])


def install_offline_docs(app) -> None:
    """/docs from swagger-ui-bundle's files in the package, for an app created with docs_url=None: no CDN, and
    Swagger UI's online validator is off (it would send the API's schema out of the plant)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.requests import Request
    from starlette.responses import HTMLResponse
    from starlette.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    if app.openapi_url is None:
        raise FastpadimError("the API documentation needs the app's OpenAPI schema (openapi_url is None)")
    app.mount(DOCS_STATIC, StaticFiles(directory=swagger_ui_path), name="docs-static")

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy's path prefix, as FastAPI's own
        return get_swagger_ui_html(openapi_url=root + app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
