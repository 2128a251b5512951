"""How every API handler reads a request and answers bad input: a 4xx with one line that says what to fix.

Bad input never becomes an HTTP 500: ``handler`` turns the errors bad values raise (UserError and the built-in
ones: a missing key, a wrong type, a number too large) into 400. Request values are read through the helpers
here, which bound what one request can cost: a JSON body is at most ``MAX_JSON_BYTES`` and must be an object, a
string holds no NUL byte (it could not become a file name or a command argument), and numbers must be finite and
inside a stated range.
"""

from __future__ import annotations

import json
import math

from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..errors import UserError

MAX_JSON_BYTES = 1_000_000


class TooLarge(UserError):
    """A request body over its limit (answered 413)."""


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def handler(fn):
    """Wrap an API handler ``fn(request, ui)``: bad input -> 4xx with its one-line reason, never 500."""
    async def wrapped(request: Request):
        try:
            return await fn(request, request.app.state.ui)
        except TooLarge as e:
            return error(str(e), 413)
        except UserError as e:
            return error(str(e))
        except MultiPartException as e:
            return error(f"bad upload: {e}")
        except ClientDisconnect:
            return error("the request was cut off")
        except (KeyError, IndexError) as e:
            return error(f"bad request: missing {e}")
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            return error(f"bad request: {type(e).__name__}: {str(e)[:300]}")
        except OSError as e:  # a path the file system refuses (name too long, not a folder, ...)
            return error(f"the file system refused: {e.strerror or e}", 409)
    return wrapped


def _check_strings(value, where: str = "body", depth: int = 0):
    if depth > 20:
        raise UserError("request nested more than 20 levels deep")
    if isinstance(value, str) and "\x00" in value:
        raise UserError(f"{where}: NUL characters are not allowed")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: numbers must be finite")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, where, depth + 1)
            _check_strings(v, f"{where}.{k}" if where != "body" else k, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, where, depth + 1)


async def json_body(request: Request, keys: tuple[str, ...] | None = None) -> dict:
    """The request's JSON object, read while counting bytes (refused past ``MAX_JSON_BYTES``); with ``keys``,
    a key not among them is refused (named), never silently ignored."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise TooLarge(f"request body over {MAX_JSON_BYTES // 1000} kB")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=lambda c: float(c))
    except (ValueError, RecursionError) as e:  # not JSON, bad UTF-8, an integer of >4300 digits
        raise UserError(f"the request body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise UserError(f"the request body must be a JSON object, not {type(body).__name__}")
    _check_strings(body)
    unknown = sorted(set(body) - set(keys)) if keys is not None else []
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r}; this request takes {', '.join(keys)}")
    return body


def text(b: dict, key: str, default: str | None = None, max_len: int = 10_000) -> str:
    """A string value of ``b`` (required unless ``default`` is given)."""
    value = b.get(key, default) if default is not None else b[key]
    if value is None:
        value = default if default is not None else ""
    if not isinstance(value, str):
        raise UserError(f"'{key}' must be a string, not {type(value).__name__}")
    if len(value) > max_len:
        raise UserError(f"'{key}' is {len(value)} characters long; the limit is {max_len}")
    return value


def number(source, key: str, default, lo: float, hi: float, kind=int):
    """A number from a JSON body or query string, within [lo, hi]; 4xx naming the range otherwise."""
    raw = source.get(key, default)
    if raw in (None, ""):
        raw = default
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = kind(raw) if not isinstance(raw, str) or kind is float else int(raw.strip(), 10)
        if isinstance(raw, float) and kind is int and raw != int(raw):
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        raise UserError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {str(raw)[:40]!r}") \
            from None
    if not (lo <= value <= hi) or (kind is float and not math.isfinite(value)):
        raise UserError(f"'{key}' = {str(raw)[:40]} is out of range; use {lo:g} to {hi:g}")
    return value
