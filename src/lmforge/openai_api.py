"""The OpenAI API's wire format for `lmforge serve`: errors in OpenAI's shape, the API-key check, the request
bodies (pydantic: validation errors become 400s that name the field), and the pieces of responses (log-probs,
server-sent events). No engine and no routes here: serve.py puts them together."""

from __future__ import annotations

import hmac
import json
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.tokenizer import Tokenizer

# ---- errors ----

class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BearerAuth:
    """ASGI middleware: /v1 requests need `Authorization: Bearer KEY` (constant-time comparison)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = "Incorrect API key provided." if auth else "You didn't provide an API key (Authorization: Bearer KEY)."
                return await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
        await self.app(scope, receive, send)


# ---- request bodies ----

class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class SamplingRequest(BaseModel):
    """Fields common to chat and text completions (unknown OpenAI fields are accepted and ignored)."""
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension: 0 = off
    n: int = Field(1, ge=1, le=32)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings are allowed", param="stop")
        return [s for s in stops if s]


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)


async def parse_body(request: Request, cls: type[BaseModel]):
    """The JSON body as `cls` (whatever the Content-Type says, as curl -d sends it); errors are 400s."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, f"{param or 'body'}: {err['msg']}", param=param) from None


# ---- response pieces ----

def chat_logprobs(tok: Tokenizer, pairs: list[tuple[int, float]]) -> dict:
    def entry(t, lp):
        b = tok.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b), "top_logprobs": []}
    return {"content": [entry(t, lp) for t, lp in pairs]}


def text_logprobs(tok: Tokenizer, pairs: list[tuple[int, float]], offset: int = 0) -> dict:
    tokens = [tok.token_bytes(t).decode("utf-8", errors="replace") for t, _ in pairs]
    offsets = [offset + sum(len(s) for s in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp in pairs], "top_logprobs": None, "text_offset": offsets}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
