"""Every failure as OpenAI shapes it: {"error": {"message", "type", "param", "code"}} with a fitting status.

Client mistakes are 4xx with `param` naming the field; only our own bugs are 500. FastAPI's 422 for a body
that fails validation becomes OpenAI's 400 invalid_request_error.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import ContextLengthError, GptchatError, InvalidParameterError

log = logging.getLogger("gptchat.server")

# SamplingParams' names for what the API calls otherwise
API_PARAM = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An error to send as it is."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_exception(e: BaseException, prompt_param: str = "messages") -> APIError:
    """The APIError for anything generation or validation raised."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, InvalidParameterError):
        return APIError(400, str(e), param=API_PARAM.get(e.param, e.param), code="invalid_value")
    if isinstance(e, GptchatError):
        return APIError(400, str(e))
    log.exception("internal error", exc_info=e)
    return APIError(500, "The server had an error while processing your request.", type="server_error")


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _is_tag(part) -> bool:
    """A union member's name that pydantic puts in error locations (`str`, `list[str]`, `constrained-float`)."""
    return isinstance(part, str) and (part in TYPE_TAGS or "[" in part or "-" in part)


def param_of(loc) -> str | None:
    """pydantic's error location ("body", "messages", 0, "role") as OpenAI writes it: "messages[0].role"."""
    out = ""
    for p in loc:
        if p == "body" or _is_tag(p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    err = errs[0]
    if err.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                        "using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
    param = param_of(err.get("loc", ()))
    # a value that fits no member of a union fails once per member: the last (the list form) says most
    err = [e for e in errs if param_of(e.get("loc", ())) == param][-1]
    if err.get("type") == "missing" and param is None:
        return APIError(400, "The request needs a JSON body.")
    msg = err.get("msg", "invalid value")
    if param is None:
        return APIError(400, f"The request body must be a JSON object ({msg}).")
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if "input" in err:
        msg += f" (got {err['input']!r})"
    return APIError(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    """Route every error through the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), param=None, code=code).response()

    @app.exception_handler(GptchatError)
    async def _gptchat(request: Request, exc: GptchatError):
        return from_exception(exc).response()
