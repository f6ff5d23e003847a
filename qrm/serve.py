"""`qrm serve --model DIR`: an HTTP reward server (FastAPI + uvicorn) with dynamic batching.

Endpoints: `POST /get_reward` (OpenRLHF's remote reward API), `POST /score` ((prompt, response) pairs or
conversations), `GET /health`, OpenAPI docs at `/docs`. Texts are tokenized as `qrm score` tokenizes them; one worker
thread runs every forward pass, merging the texts of concurrent requests into batches (a short wait, a token budget:
`qrm.batching`) and scoring each batch with `qrm.reward_model.score_ids`, the function `qrm score` uses. OpenRLHF's
queries become ids in `qrm.policy_text` (with `--policy-tokenizer`, the policy's special-token texts removed first)."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from .batching import DynamicBatcher
from .errors import ServeError
from .files import dir_kind
from .policy_text import PolicySpecials, openrlhf_inputs

logger = logging.getLogger(__name__)

PROTECTED_PATHS = ("/get_reward", "/score")
DEFAULT_API_KEY_ENV = "QRM_API_KEY"


@dataclass
class ServeSettings:
    """Batching and request limits of the server.

    Args:
        max_batch_size (`int`, *optional*, defaults to `64`): most texts in one forward pass.
        max_batch_tokens (`int`, *optional*, defaults to `16384`): most padded tokens (rows × longest row) in one
            forward pass; a single longer text still runs, alone.
        max_wait_ms (`float`, *optional*, defaults to `5.0`): how long the worker waits for more texts after the
            first one of a batch arrives.
        max_padding (`float`, *optional*, defaults to `0.25`): most padding per batch, as a fraction of its real
            tokens; waiting texts of very different lengths go to separate batches (padding costs attention time).
        max_texts (`int`, *optional*, defaults to `1024`): most texts in one request (413 above).
        max_body_bytes (`int`, *optional*, defaults to `8 MiB`): largest request body (413 above).
        api_key (`str` or `None`, *optional*): when set, `/score` and `/get_reward` answer 401 without it.
    """

    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_padding: float = 0.25
    max_texts: int = 1024
    max_body_bytes: int = 8 * 2**20
    api_key: str | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------- HTTP schema


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward request (openrlhf/utils/agent.py, `_fetch_rewards_via_http`)."""

    query: list[str] = Field(min_length=1, description="prompt + response, decoded with special tokens kept")
    prompts: list[str] | None = Field(default=None, description="the prompt of each query (splits it as training)")
    labels: list[Any] | None = Field(default=None, description="accepted and ignored (reference answers)")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(
        description="per query: qrm_tokens (scored length), qrm_prompt_split (1 if split at its prompt as `qrm score` "
        "does, 0 if scored as one text), qrm_truncated (1 if its start was cut to max_length)"
    )


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(description="system, user or assistant (or any role the model's chat template knows)")
    content: str


class ScoreRequest(BaseModel):
    """Either `prompts` and `responses` (strings, or message lists), or `conversations` (message lists, each ending
    with the assistant message(s) to score)."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str | list[Message]] | None = Field(default=None, min_length=1)
    responses: list[str | list[Message]] | None = Field(default=None, min_length=1)
    conversations: list[list[Message]] | None = Field(default=None, min_length=1)


class ScoreResponse(BaseModel):
    rewards: list[float]
    tokens: list[int] = Field(description="scored length of each text, special tokens included")


def score_texts(tokenizer: Any, req: ScoreRequest) -> tuple[list[str], list[str]]:
    """(prompts, responses) as text for a /score request, conversations rendered as training rendered them
    (`qrm.reward_model.render_pair`); raises `ServeError` naming the field of a bad item.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the reward model's tokenizer (its chat template renders messages).
        req (`ScoreRequest`): the validated request body.
    """
    from .reward_model import render_pair

    if req.conversations is not None:
        if req.prompts is not None or req.responses is not None:
            raise ServeError(422, "conversations", "give either conversations or prompts and responses, not both")
        name, pairs = "conversations", []
        for conv in req.conversations:  # the trailing assistant messages are the response, the rest the prompt
            msgs = [m.model_dump() for m in conv]
            k = len(msgs)
            while k > 0 and msgs[k - 1]["role"] == "assistant":
                k -= 1
            pairs.append((msgs[:k], msgs[k:]))
    else:
        for name in ("prompts", "responses"):
            if getattr(req, name) is None:
                raise ServeError(422, name, "missing: give prompts and responses, or conversations")
        if len(req.prompts) != len(req.responses):  # type: ignore[arg-type]
            raise ServeError(422, "responses", f"{len(req.responses)} responses for {len(req.prompts)} prompts")  # type: ignore[arg-type]
        name, pairs = "responses", []
        dump = lambda x: x if isinstance(x, str) else [m.model_dump() for m in x]  # noqa: E731
        for p, r in zip(req.prompts, req.responses, strict=True):  # type: ignore[arg-type]
            if not isinstance(p, str) and isinstance(r, str):  # a chat prompt answered by a plain string
                r = [Message(role="assistant", content=r)]
            pairs.append((dump(p), dump(r)))
    prompts, responses = [], []
    for i, (p, r) in enumerate(pairs):
        if not isinstance(p, str) and (not p or p[-1]["role"] != "user" or not r):
            raise ServeError(422, f"{name}[{i}]", "a conversation needs a user turn, then the assistant message(s)")
        try:
            p_text, r_text = render_pair(tokenizer, p, r)
        except Exception as e:  # chat templates raise their own exception types (jinja2, ValueError)
            raise ServeError(422, f"{name}[{i}]", f"cannot render: {e}") from None
        prompts.append(p_text), responses.append(r_text)
    return prompts, responses


def _check_count(field: str, n: int, max_texts: int) -> None:
    if n > max_texts:
        raise ServeError(413, field, f"{n} texts in one request; at most {max_texts} (--max-texts)")


def get_reward_inputs(
    rm: Any, req: GetRewardRequest, max_texts: int, policy: PolicySpecials | None = None
) -> tuple[list[list[int]], dict[str, list]]:
    """Token ids and OpenRLHF `extra_logs` for a /get_reward request (see `openrlhf_inputs`)."""
    _check_count("query", len(req.query), max_texts)
    for name in ("prompts", "labels"):
        value = getattr(req, name)
        if value is not None and len(value) != len(req.query):
            raise ServeError(422, name, f"{len(value)} {name} for {len(req.query)} queries")
    ids, split, cut = openrlhf_inputs(rm.tokenizer, req.query, req.prompts, rm.max_length, policy)
    logs = {
        "qrm_tokens": [float(len(x)) for x in ids],
        "qrm_prompt_split": [float(x) for x in split],
        "qrm_truncated": [float(x) for x in cut],
    }
    return ids, logs


def score_inputs(rm: Any, req: ScoreRequest, max_texts: int, policy: PolicySpecials | None = None) -> list[list[int]]:
    """Token ids for a /score request, as `qrm score` builds them (the policy's special-token texts removed first
    when `policy` is given); a response alone over max_length is a 422."""
    from .reward_model import tokenize_responses

    field = "conversations" if req.conversations is not None else "prompts"
    _check_count(field, len(req.conversations or req.prompts or []), max_texts)
    prompts, responses = score_texts(rm.tokenizer, req)
    if policy is not None:
        prompts, responses = policy(prompts), policy(responses)
    ids = tokenize_responses(rm.tokenizer, prompts, responses, rm.max_length)
    bad = [i for i, x in enumerate(ids) if x is None]
    if bad:
        where = "conversations" if req.conversations is not None else "responses"
        raise ServeError(422, f"{where}[{bad[0]}]", f"the response alone exceeds max_length={rm.max_length} tokens")
    return ids  # type: ignore[return-value]


def _field(loc: Sequence[Any]) -> str:
    """'query[3]' from pydantic's ('body', 'query', 3); union member tags such as 'list[Message]' are left out."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in ("str", "int", "float", "list", "dict"):
            out += ("." if out else "") + part
    return out or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        pos = err["loc"][-1]
        msg = f"body: malformed JSON at character {pos}: {err.get('ctx', {}).get('error', err['msg'])}"
        return JSONResponse({"detail": msg, "field": "body"}, status_code=400)
    name = _field(err.get("loc", ()))
    return JSONResponse({"detail": f"{name}: {err['msg']}", "field": name}, status_code=422)


async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=exc.status)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("qrm serve: %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}", "field": None}, status_code=500)


async def _send_json(send: Callable, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware for the scoring paths: API key (401) and body size (413) before the body is parsed, and the
    count of requests in flight.

    Args:
        app (`ASGIApp`): the wrapped application.
        api_key (`str` or `None`): required as `Authorization: Bearer <key>` or `X-API-Key: <key>` when set.
        max_body_bytes (`int`): largest accepted request body.
        stats (`dict`): receives `in_flight` and `requests`.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, stats: dict[str, int]):
        self.app, self.max_body_bytes, self.stats = app, max_body_bytes, stats
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.api_key)  # type: ignore[arg-type]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in PROTECTED_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and not self._authorized(headers):
            msg = "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            return await _send_json(
                send, 401, {"detail": msg, "field": "Authorization"}, [(b"www-authenticate", b"Bearer")]
            )
        too_big = {
            "detail": f"body: request body exceeds {self.max_body_bytes} bytes (--max-body-bytes)",
            "field": "body",
        }
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_json(send, 413, too_big)
        body, more = b"", True
        while more:  # read it all here (chunked bodies carry no length) so the limit holds for every client
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _send_json(send, 413, too_big)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        self.stats["in_flight"] += 1
        self.stats["requests"] += 1
        try:
            await self.app(scope, replay, send)
        finally:
            self.stats["in_flight"] -= 1


# ----------------------------------------------------------------------------------------------- application


def create_app(
    rm: Any, settings: ServeSettings | None = None, name: str | None = None, policy: PolicySpecials | None = None
) -> FastAPI:
    """The FastAPI application serving `rm`; its model worker starts and stops with the app's lifespan.

    Args:
        rm (`qrm.RewardModel`): the loaded reward model.
        settings (`ServeSettings`, *optional*): batching, limits and API key; defaults to `ServeSettings()`.
        name (`str`, *optional*): model name reported by /health (defaults to the model's class name).
        policy (`PolicySpecials`, *optional*): the policy tokenizer's special-token texts, removed from every text
            before it is tokenized (`--policy-tokenizer`).
    """
    from .reward_model import score_ids

    s = settings or ServeSettings()
    pad = rm.tokenizer.pad_token_id if rm.tokenizer.pad_token_id is not None else rm.tokenizer.eos_token_id
    batcher = DynamicBatcher(
        lambda seqs: score_ids(rm.model, seqs, pad, batch_size=len(seqs)),
        s.max_batch_size,
        s.max_batch_tokens,
        s.max_wait_ms,
        s.max_padding,
    )
    stats = {"in_flight": 0, "requests": 0}
    device = str(next(rm.model.parameters()).device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)  # uvicorn has drained the requests: flush and stop

    app = FastAPI(
        title="qrm reward server",
        description="Rewards from a qrm reward model, tokenized as `qrm score` tokenizes them, batched dynamically.",
        lifespan=lifespan,
    )
    app.add_middleware(Guard, api_key=s.api_key, max_body_bytes=s.max_body_bytes, stats=stats)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(Exception, _internal_error)
    # Declared for the OpenAPI docs ("Authorize"); Guard enforces the key before the body is read.
    auth = [Security(HTTPBearer(auto_error=False)), Security(APIKeyHeader(name="X-API-Key", auto_error=False))]
    deps = auth if s.api_key else []

    @app.post("/get_reward", response_model=GetRewardResponse, dependencies=deps)
    async def get_reward(req: GetRewardRequest) -> dict[str, Any]:
        """OpenRLHF remote reward (`--reward.remote_url http://HOST:PORT/get_reward`)."""
        ids, logs = await asyncio.to_thread(get_reward_inputs, rm, req, s.max_texts, policy)
        rewards = await batcher.score(ids)
        return {"rewards": rewards, "scores": rewards, "extra_logs": logs}

    @app.post("/score", response_model=ScoreResponse, dependencies=deps)
    async def score(req: ScoreRequest) -> dict[str, Any]:
        """Rewards of (prompt, response) pairs or conversations, exactly as `qrm score` computes them."""
        ids = await asyncio.to_thread(score_inputs, rm, req, s.max_texts, policy)
        return {"rewards": await batcher.score(ids), "tokens": [len(x) for x in ids]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the model, and batching counters."""
        return {
            "status": "ok",
            "model": name or type(rm.model).__name__,
            "device": device,
            "max_length": rm.max_length,
            "policy_special_tokens": policy.texts if policy is not None else [],
            **stats,
            **batcher.stats,
        }

    return app


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments of `qrm serve`."""
    d = ServeSettings()
    ap = argparse.ArgumentParser(
        prog="qrm serve",
        description="HTTP reward server: POST /get_reward (OpenRLHF), POST /score, GET /health, docs at /docs.",
    )
    ap.add_argument("--model", required=True, help="Export dir (qrm merge) or adapter dir (qrm train).")
    ap.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    ap.add_argument("--port", type=int, default=8000, help="Port (0: any free port; the startup line names it).")
    ap.add_argument("--device", default=None, help="Exports: cuda, cpu, ... (default: the GPU when there is one).")
    ap.add_argument("--dtype", default="auto", help="Exports: float32, bfloat16, ... (default: as stored).")
    ap.add_argument("--max-length", type=int, default=None, help="Default: the training recipe's max_length.")
    ap.add_argument(
        "--policy-tokenizer",
        default=None,
        help="Dir (or Hub id) of the policy's tokenizer when it is not the reward model's: its special-token texts "
        "(<s>, </s>, <|im_end|>, ...) in OpenRLHF's decoded queries are removed before scoring.",
    )
    ap.add_argument(
        "--api-key-env",
        default=None,
        help=f"Environment variable holding the API key (default {DEFAULT_API_KEY_ENV}, used when set; a name given here must be set).",
    )
    ap.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="Most texts per forward pass.")
    ap.add_argument(
        "--max-batch-tokens", type=int, default=d.max_batch_tokens, help="Most padded tokens per forward pass."
    )
    ap.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms, help="Wait for more texts after the first of a batch."
    )
    ap.add_argument(
        "--max-padding", type=float, default=d.max_padding, help="Most padding per batch, as a fraction of real tokens."
    )
    ap.add_argument("--max-texts", type=int, default=d.max_texts, help="Most texts per request (413 above).")
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="Largest request body (413 above).")
    ap.add_argument("--log-level", default="warning", help="uvicorn log level (info adds one access line per request).")
    return ap.parse_args(argv)


def _fail(message: str) -> int:
    print(f"qrm serve: error: {message}", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(problem, API key): everything that can be refused before the model loads."""
    path = Path(args.model)
    if not path.is_dir():
        return f"--model {args.model}: no such directory", None
    if dir_kind(path) is None:
        return (
            f"--model {args.model}: holds neither config.json (qrm merge export) nor adapter_config.json (qrm train output)",
            None,
        )
    policy = args.policy_tokenizer
    if policy and not Path(policy).is_dir() and (Path(policy).exists() or policy.startswith((".", "/", "~"))):
        return f"--policy-tokenizer {policy}: no such directory (a tokenizer dir or a Hub id)", None
    for flag in ("max_batch_size", "max_batch_tokens", "max_texts", "max_body_bytes"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1", None
    if args.max_wait_ms < 0 or args.max_padding < 0:
        return "--max-wait-ms and --max-padding must be >= 0", None
    key = os.environ.get(args.api_key_env or DEFAULT_API_KEY_ENV) or None
    if args.api_key_env and key is None:
        return f"--api-key-env {args.api_key_env}: that environment variable is not set or empty", None
    return None, key


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening (port 0: any free port), for `uvicorn.Server.run(sockets=)`."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """`qrm serve`: load the model, bind, print one line (URL, model, device), serve until SIGTERM/SIGINT, exit 0."""
    args = parse_args(argv)
    problem, key = _check(args)
    if problem:
        return _fail(problem)
    import uvicorn

    try:  # bound and listening before the model loads: a taken port fails at once, early clients wait in backlog
        sock = listen(args.host, args.port)
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e}")
    from transformers.utils import logging as hf_logging

    from .reward_model import RewardModel, score_ids

    hf_logging.disable_progress_bar()  # one startup line, not a weight-loading bar
    policy_tok = None
    if args.policy_tokenizer:  # before the model: a bad path fails in a second, not after loading
        from transformers import AutoTokenizer

        try:
            policy_tok = AutoTokenizer.from_pretrained(args.policy_tokenizer)
        except (OSError, ValueError) as e:
            return _fail(
                f"--policy-tokenizer {args.policy_tokenizer}: cannot load a tokenizer: {str(e).splitlines()[0]}"
            )
    rm = RewardModel.from_pretrained(args.model, device=args.device, max_length=args.max_length, dtype=args.dtype)
    settings = ServeSettings(
        args.max_batch_size,
        args.max_batch_tokens,
        args.max_wait_ms,
        args.max_padding,
        args.max_texts,
        args.max_body_bytes,
        key,
    )
    policy = PolicySpecials(policy_tok, rm.tokenizer) if policy_tok is not None else None
    app = create_app(rm, settings, name=Path(args.model).resolve().name, policy=policy)
    # Warm up before announcing: the first tokenization imports qrm.data (and TRL), the first forward pass
    # initializes kernels; otherwise the first requests wait for both.
    score_ids(rm.model, openrlhf_inputs(rm.tokenizer, ["warm-up"], None, rm.max_length)[0], rm.tokenizer.pad_token_id)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        lifespan="on",
        access_log=args.log_level in ("info", "debug", "trace"),
        timeout_keep_alive=30,  # RL clients pause between rollouts; uvicorn's 5 s drops their pooled connections
    )
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    device = next(rm.model.parameters()).device
    print(
        f"qrm serve: http://{host}:{port} model {args.model} ({type(rm.model).__name__}, {device}, max_length {rm.max_length}); "
        f"batches of <= {settings.max_batch_size} texts / {settings.max_batch_tokens} tokens, wait {settings.max_wait_ms:g} ms; "
        f"API key {'required' if key else 'off'}; "
        f"policy special tokens removed: {policy.texts if policy is not None else 'none'}; docs at /docs",
        file=sys.stderr,
        flush=True,
    )
    if key is None and host not in ("127.0.0.1", "[::1]"):
        print(
            f"qrm serve: warning: listening on {host} without an API key (set {DEFAULT_API_KEY_ENV})", file=sys.stderr
        )
    signals: list[int] = []
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the handler it found
    # (uvicorn/server.py, capture_signals): record it instead, so a drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, _f: signals.append(n))
    uvicorn.Server(config).run(sockets=[sock])
    print(f"qrm serve: stopped{' by ' + signal.Signals(signals[0]).name if signals else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
