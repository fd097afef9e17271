"""FastAPI application: shared state, lifespan (the engine loop), OpenAI-style errors, API-key auth."""
from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierserve import __version__
from tierserve.engine.async_engine import AsyncEngine, EngineDeadError
from tierserve.engine.engine import Engine
from tierserve.server.metrics import ServerMetrics
from tierserve.server.protocol import APIError

log = logging.getLogger("tierserve.server")

# Paths that stay open when --api-key is set.
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs", "/redoc",
                        "/docs/oauth2-redirect"})


@dataclass
class ServerState:
    engine: Engine
    model_name: str
    async_engine: AsyncEngine
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           status=404, param="model", code="model_not_found")

    def check_length(self, ids: list[int], max_tokens: int | None, param: str = "prompt") -> None:
        n, cap = len(ids), self.max_model_len
        if n >= cap:
            raise APIError(f"{param}: the prompt has {n} tokens; max_model_len is {cap} (the prompt must leave "
                           "room for at least one new token)", param=param)
        if max_tokens is not None and n + max_tokens > cap:
            raise APIError(f"max_tokens: the prompt has {n} tokens and max_tokens is {max_tokens}; together "
                           f"{n + max_tokens} > max_model_len {cap}", param="max_tokens")

    def token_text(self, tid: int) -> str:
        """Text of one token as it appears in output (special tokens kept), cached."""
        t = self._token_text.get(tid)
        if t is None:
            t = self._token_text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return t


def state(request: Request) -> ServerState:
    return request.app.state.server


# ---- errors -------------------------------------------------------------------------------------
_TYPE_NAMES = {"str", "int", "float", "bool", "TextPart", "ChatMessage", "StreamOptions", "dict", "list"}
_UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
           "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


def _clean_loc(loc) -> list[str]:
    """Drop 'body' and the union-member tags pydantic adds ('str', 'list[int]', ...)."""
    return [str(x) for x in loc[1:] if not (isinstance(x, str) and ("[" in x or x in _TYPE_NAMES))]


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError("invalid request body")
    e = errors[0]
    msg = str(e.get("msg", "invalid value"))
    if e.get("type") == "json_invalid":
        return APIError(f"malformed JSON body: {e.get('ctx', {}).get('error', msg)}")
    loc = _clean_loc(e.get("loc", ()))
    if msg.startswith("Value error, "):           # our model validators: "field: message"
        msg = msg[len("Value error, "):]
        return APIError(msg, param=msg.split(":", 1)[0] if ":" in msg else None)
    if not loc:
        if e.get("type") == "missing":
            return APIError("request body is required (a JSON object)")
        return APIError(f"request body must be a JSON object: {msg}")
    param = ".".join(loc)
    same = [x for x in errors if _clean_loc(x.get("loc", ())) == loc]
    if len(same) > 1 and loc[-1] in _UNIONS:
        return APIError(f"{param}: must be {_UNIONS[loc[-1]]}", param=param)
    return APIError(f"{param}: {msg}", param=param)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError):
        return _error_response(APIError(str(exc), status=503, type="service_unavailable"))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(f"internal error: {type(exc).__name__}", status=500, type="server_error"))


# ---- auth ---------------------------------------------------------------------------------------
class APIKeyMiddleware:
    """Pure ASGI (streaming responses pass through untouched): ``Authorization: Bearer KEY`` on all but
    OPEN_PATHS."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        got = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if secrets.compare_digest(got, self.expected):
            return await self.app(scope, receive, send)
        err = APIError("missing or invalid API key: send 'Authorization: Bearer <key>'", status=401,
                       type="authentication_error", code="invalid_api_key")
        resp = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


# ---- the app ------------------------------------------------------------------------------------
def build_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app around one engine. The engine loop runs for the app's lifespan."""
    from tierserve.server.routes import router

    metrics = ServerMetrics(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        st: ServerState = app.state.server
        st.async_engine.start()
        log.info("serving %s (max_model_len %d)", model_name, engine.max_model_len)
        try:
            yield
        finally:
            await st.async_engine.shutdown()

    app = FastAPI(title="tierserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of the tierserve inference engine.")
    app.state.server = ServerState(engine, model_name, AsyncEngine(engine, metrics), metrics)
    _install_error_handlers(app)
    app.include_router(router)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
