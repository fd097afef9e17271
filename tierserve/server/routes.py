"""HTTP routes: OpenAI API (/v1/...), health, version, metrics, tokenize / detokenize."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tierserve import __version__
from tierserve.server.app import state
from tierserve.server.chat import create_chat_completion, render_chat
from tierserve.server.completions import create_completion
from tierserve.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest)

router = APIRouter()
_ERR = {400: {"description": "invalid request (the error names the field)"},
        401: {"description": "missing or wrong API key"}, 404: {"description": "unknown model"}}


@router.post("/v1/completions", responses=_ERR, summary="Create a completion (OpenAI legacy completions)")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await create_completion(body, request)


@router.post("/v1/chat/completions", responses=_ERR, summary="Create a chat completion")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await create_chat_completion(body, request)


def _model_card(request: Request) -> dict:
    st = state(request)
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "tierserve",
            "root": str(st.engine.model_path), "max_model_len": st.max_model_len}


@router.get("/v1/models", responses=_ERR)
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/v1/models/{model}", responses=_ERR)
async def get_model(model: str, request: Request) -> dict:
    state(request).check_model(model)
    return _model_card(request)


@router.get("/health")
@router.get("/ping", include_in_schema=False)
async def health(request: Request) -> Response:
    if not state(request).async_engine.is_running:
        return JSONResponse({"status": "engine not running"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    data, ctype = state(request).metrics.render()
    return Response(data, media_type=ctype)


@router.get("/tokenizer_info", responses=_ERR)
async def tokenizer_info(request: Request) -> dict:
    """Special tokens and chat template (what lm_eval's remote tokenizer backend reads)."""
    st = state(request)
    tok = st.tokenizer
    return {"tokenizer_class": "tierserve.loader.tokenizer.Tokenizer", "eos_token": tok.eos_token,
            "bos_token": tok.bos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token,
            "eos_token_ids": list(tok.eos_token_ids), "chat_template": tok.chat_template,
            "vocab_size": tok.vocab_size, "model_max_length": st.max_model_len}


@router.post("/tokenize", responses=_ERR)
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    st = state(request)
    st.check_model(body.model)
    if body.messages is not None:
        ids = render_chat(st, body.messages, body.add_generation_prompt)
    else:
        ids = st.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    out = {"tokens": ids, "count": len(ids), "max_model_len": st.max_model_len}
    if body.return_token_strs:
        out["token_strs"] = st.tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize", responses=_ERR)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    st = state(request)
    st.check_model(body.model)
    vocab = st.engine.model_cfg.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": st.tokenizer.decode(body.tokens, skip_special_tokens=False)}
