"""The HTTP server of `hybrid-run MODEL --serve` (FastAPI + uvicorn): many clients share the
model through continuous batching (hybrid.runtime.scheduler), each request in its own KV slot.

Routes: OpenAI GET /v1/models, POST /v1/chat/completions, POST /v1/completions (server-sent
events when streamed); Ollama GET /api/tags, GET /api/version, POST /api/chat, POST
/api/generate (NDJSON when streamed); GET /health, GET /metrics (Prometheus text).
OpenAI routes answer errors as {"error": {"message", "type", "param", "code"}}, Ollama routes
as {"error": "message"}, both with a 4xx status for bad requests.

Nothing is dropped: requests beyond the slots wait in a queue of --max-queue; beyond that a
429 with Retry-After. A body over --max-body is refused (413) from its Content-Length before
it is read (a chunked one is read up to the limit, no further). Prompts are tokenized on a
thread pool of their own, so a huge prompt never delays the engine. With --api-key (or
$HYBRID_API_KEY) every route but /health needs `Authorization: Bearer KEY` (compared in
constant time; 401 otherwise). One access log line per request. A client that goes away
frees its slot at the next step; SIGTERM stops accepting, cancels what runs and exits.
"""

# no `from __future__ import annotations`: FastAPI reads the request models of the
# endpoints (local classes) from their annotations at run time.

import asyncio
import collections
import concurrent.futures
import datetime
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal, Optional, Union

log = logging.getLogger(__name__)

__all__ = ["API_KEY_ENV", "ServeOptions", "add_serve_args", "bind", "create_app", "serve"]

API_KEY_ENV = "HYBRID_API_KEY"
MiB = 1 << 20


# ------------------------------------------------------------------------------------------
# Command line


def add_serve_args(p) -> None:
    """The `server (--serve)` flags of hybrid-run."""
    from placement.cli import number_arg as _number

    srv = p.add_argument_group("server (--serve)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_number(int, 0, hi=65535, what="0..65535"), default=8080,
                     help="port (default 8080; 0 picks a free one)")
    srv.add_argument("--max-queue", type=_number(int, 1, what="at least 1"), default=256, metavar="N",
                     help="requests waiting for a slot before the server answers 429 (default 256)")
    srv.add_argument("--api-key", metavar="KEY",
                     help=f"require 'Authorization: Bearer KEY' on every route but /health "
                          f"(default: ${API_KEY_ENV} when set)")
    srv.add_argument("--max-body", type=_number(float, 0.001, what="> 0"), default=8.0, metavar="MiB",
                     help="largest request body in MiB (default 8; larger: 413)")
    srv.add_argument("--max-tokens-cap", type=_number(int, 1, what="at least 1"), metavar="N",
                     help="largest max_tokens a request may ask for (default: the context)")


class ServeOptions:
    """The server's limits (see add_serve_args)."""

    def __init__(self, *, max_queue: int = 256, api_key: str | None = None,
                 max_body: int = 8 * MiB, max_tokens_cap: int | None = None, prefill_chunk: int = 256,
                 prefix_cache: bool = True, retry_after_s: int = 2, tokenizer_threads: int = 2):
        self.max_queue, self.api_key = max_queue, api_key or None
        self.max_body, self.max_tokens_cap = int(max_body), max_tokens_cap
        self.prefill_chunk, self.prefix_cache = prefill_chunk, prefix_cache
        self.retry_after_s, self.tokenizer_threads = retry_after_s, tokenizer_threads

    @classmethod
    def from_args(cls, a) -> "ServeOptions":
        return cls(max_queue=a.max_queue,
                   api_key=a.api_key or os.environ.get(API_KEY_ENV) or None,
                   max_body=int(a.max_body * MiB), max_tokens_cap=a.max_tokens_cap)


# ------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


class Gate:
    """ASGI middleware in front of every route: the access log line and request counts,
    the API key, and the body size limit (from Content-Length before anything is read; a
    body without one is kept up to the limit, no further)."""

    DRAIN = 64 * MiB      # bytes of an over-limit chunked body read and dropped before the 413

    def __init__(self, app, *, api_key: str | None, max_body: int, access, counts: collections.Counter,
                 routes: set):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.access, self.counts, self.routes = access, counts, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        sent = [0]

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body":
                sent[0] += len(msg.get("body", b""))
            await send(msg)

        path = scope.get("path", "")
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                return await self._reply(send_logged, path, *refusal)
            if scope["method"] in ("POST", "PUT", "PATCH") and self._length(scope) is None:
                receive = await self._bounded(receive)
                if receive is None:
                    return await self._reply(send_logged, path, *self._too_large())
            await self.app(scope, receive, send_logged)
        finally:
            route = path if path in self.routes else "other"
            self.counts[(route, status[0])] += 1
            client = scope.get("client") or ("-", 0)
            self.access(f'{client[0]} "{scope["method"]} {path}" {status[0] or "-"} {sent[0]}B '
                        f'{time.perf_counter() - t0:.3f}s')

    @staticmethod
    def _header(scope, name: bytes):
        for k, v in scope.get("headers", ()):
            if k.lower() == name:
                return v.decode("latin-1")
        return None

    def _length(self, scope):
        v = self._header(scope, b"content-length")
        try:
            return None if v is None else int(v)
        except ValueError:
            return None

    def _too_large(self):
        return 413, f"the request body is larger than this server's limit of {self.max_body} bytes " \
                    f"(hybrid-run --max-body)", "request_too_large", None

    def _refusal(self, scope):
        """(status, message, code, headers) when the request is refused before its body."""
        if self.api_key and scope["path"] != "/health":
            auth = self._header(scope, b"authorization") or ""
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return (401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key "
                             "the server was started with (--api-key)", "invalid_api_key",
                        {"www-authenticate": "Bearer"})
        n = self._length(scope)
        if n is not None and n > self.max_body:
            return self._too_large()
        return None

    async def _bounded(self, receive):
        """Read a body without Content-Length up to the limit; a receive() that replays it,
        or None when it is larger."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.max_body:
                # let the client finish sending (discarded, up to a bound) so that it reads
                # the 413 rather than a connection reset mid-upload
                while msg.get("more_body") and size <= self.max_body + self.DRAIN:
                    msg = await receive()
                    size += len(msg.get("body", b""))
                return None
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        done = [False]

        async def replay():
            if not done[0]:
                done[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _reply(send, path, status, message, code, headers):
        ollama = path.startswith("/api/")
        body = _json_bytes({"error": message} if ollama else APIError(status, message, code=code).body())
        hs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
              (b"connection", b"close")]
        hs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hs})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------
# Requests (pydantic); unknown fields are accepted and ignored, as OpenAI clients send many


def _models():
    from pydantic import BaseModel, ConfigDict, Field

    class _Base(BaseModel):
        model_config = ConfigDict(extra="allow")

    class ContentPart(_Base):
        type: str
        text: Optional[str] = None

    class Message(_Base):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: Union[str, list[ContentPart], None] = None

    class StreamOptions(_Base):
        include_usage: bool = False

    class Sampling(_Base):
        model: str
        max_tokens: Optional[int] = Field(None, ge=1)
        temperature: Optional[float] = Field(None, ge=0, le=2)
        top_p: Optional[float] = Field(None, gt=0, le=1)
        top_k: Optional[int] = Field(None, ge=0)
        seed: Optional[int] = None
        stop: Union[str, list[str], None] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        n: int = Field(1, ge=1, le=1)
        logprobs: Any = None

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        tools: Optional[list] = None

    class CompletionRequest(Sampling):
        prompt: Union[str, list[str], list[int]]
        echo: bool = False
        suffix: Optional[str] = None

    class OllamaMessage(_Base):
        role: Literal["system", "user", "assistant", "tool"]
        content: str = ""

    class OllamaChat(_Base):
        model: str
        messages: list[OllamaMessage] = Field(min_length=1)
        stream: bool = True
        options: Optional[dict] = None
        tools: Optional[list] = None

    class OllamaGenerate(_Base):
        model: str
        prompt: str = ""
        system: Optional[str] = None
        raw: bool = False
        stream: bool = True
        options: Optional[dict] = None

    return ChatRequest, CompletionRequest, OllamaChat, OllamaGenerate


# ------------------------------------------------------------------------------------------
# The app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
          "/api/tags", "/api/version", "/api/chat", "/api/generate"}


class Job:
    """One request's events, from the scheduler thread to the request's coroutine:
    ("text", piece), ("done", RequestStats), ("error", message)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.checked = time.monotonic()      # when the client was last seen connected

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:          # the loop is closed: the server is shutting down
            self.cancel.set()


def create_app(rt, *, model: str, aliases=(), system: str | None = None, show_think: bool = True,
               options: ServeOptions | None = None, defaults: dict | None = None, engine=None,
               access=None):
    """The FastAPI app serving `rt` under the model id `model` (also answering to `aliases`).

    defaults: generation values for fields a request leaves out (max_tokens, temperature,
    top_p, top_k, seed). system: a system prompt for chat requests that bring none.
    engine: the SlotEngine to run on (default: one over rt's KV slots, the plan's kv_slots:
    hybrid.load(parallel=N), hybrid-run --parallel N).
    access: callable(line) for the access log (default: this module's logger at INFO).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from hybrid.app.chat import ThinkSplitter, prompt_opens_think
    from hybrid.runtime.batch import SlotEngine
    from hybrid.runtime.sampling import SamplingParams
    from hybrid.runtime.scheduler import TTFT_BUCKETS, QueueFull, Request as EngineRequest, Scheduler
    from hybrid.runtime.scheduler import name_os_thread

    opt = options or ServeOptions()
    ChatRequest, CompletionRequest, OllamaChat, OllamaGenerate = _models()
    d = {"max_tokens": 1024, "temperature": 0.6, "top_p": 1.0, "top_k": 0, "seed": None}
    d.update({k: v for k, v in (defaults or {}).items() if v is not None or k == "seed"})
    if engine is None:
        engine = SlotEngine(rt)
    tokenizer = rt.tokenizer          # made here: the tokenizer threads share it
    chunk = min(opt.prefill_chunk, getattr(rt, "prefill_chunk", opt.prefill_chunk))
    sched = Scheduler(engine, tokenizer, max_queue=opt.max_queue, prefill_chunk=chunk,
                      prefix_cache=opt.prefix_cache)
    tok_pool = concurrent.futures.ThreadPoolExecutor(opt.tokenizer_threads, "hybrid-tokenize",
                                                     initializer=name_os_thread, initargs=("hybrid-tokenize",))
    ctx = engine.ctx
    cap = min(opt.max_tokens_cap or ctx, ctx)
    created = int(time.time())
    names = {model, *aliases}
    http_counts: collections.Counter = collections.Counter()
    pending = [0]        # requests being tokenized (they count against the queue too)

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, sched.stop)
            tok_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hybrid", version=_version(), lifespan=lifespan)
    app.state.scheduler = sched
    app.add_middleware(Gate, api_key=opt.api_key, max_body=opt.max_body,
                       access=access or log.info, counts=http_counts, routes=ROUTES)

    def error_response(e: APIError, request=None) -> JSONResponse:
        if request is not None and request.url.path.startswith("/api/"):
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON: "
                                                f"{first.get('ctx', {}).get('error', first.get('msg'))}"),
                                  request)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            msg = f"'{param}' is required" if param else "the request body is missing"
        elif param:
            msg = f"{param}: {msg}"
        more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
        return error_response(APIError(400, msg + more, param=param), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; this server has " \
                  f"{', '.join(sorted(ROUTES))}"
        return error_response(APIError(exc.status_code, msg, type_), request)

    # -- running a request -------------------------------------------------------------------

    def check_model(name: str, ollama: bool = False) -> None:
        if name in names or (ollama and name.removesuffix(":latest") in names):
            return
        raise APIError(404, f"the model '{name}' does not exist; this server has '{model}'",
                       param="model", code="model_not_found")

    def sampling(*, max_tokens, temperature, top_p, top_k, seed, stop) -> dict:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop")
        mt = int(max_tokens or d["max_tokens"])
        if max_tokens is not None and mt > cap:
            raise APIError(400, f"max_tokens: {mt} is more than this server allows ({cap}; "
                                f"hybrid-run --max-tokens-cap, --ctx)", param="max_tokens")
        return {"max_tokens": min(mt, cap),
                "temperature": d["temperature"] if temperature is None else temperature,
                "top_p": d["top_p"] if top_p is None else top_p,
                "top_k": d["top_k"] if top_k is None else top_k,
                "seed": d["seed"] if seed is None else seed,
                "stop": stop}

    def check_room() -> None:
        if pending[0] + sched.queue_depth >= opt.max_queue:
            raise APIError(429, f"the server is busy: {opt.max_queue} requests are waiting; retry "
                                f"after {opt.retry_after_s} s", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(opt.retry_after_s)})

    def tokenize(messages, prompt, param):
        """(prompt text, token ids) on a tokenizer thread."""
        try:
            if messages is not None:
                text = rt.apply_chat_template(messages)
                return text, rt.tokenize(text)
            if isinstance(prompt, str):
                return prompt, rt.tokenize(prompt)
        except ValueError as e:      # chat template errors
            raise APIError(400, str(e), param=param) from None
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < rt.n_vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                                f"(0..{rt.n_vocab - 1})", param="prompt")
        return "", ids

    async def start(*, messages=None, prompt=None, params: dict) -> tuple:
        """Tokenize (off the engine thread) and queue a request: (job, prompt text, ids).
        Errors before generation (full queue, over-long prompt, template) are plain 4xx."""
        check_room()
        param = "messages" if messages is not None else "prompt"
        pending[0] += 1
        try:
            text, ids = await asyncio.get_running_loop().run_in_executor(
                tok_pool, tokenize, messages, prompt, param)
        finally:
            pending[0] -= 1
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= ctx:
            raise APIError(400, f"this model's context length is {ctx} tokens, but the prompt has "
                                f"{len(ids)} tokens; shorten it (or start the server with a larger "
                                f"--ctx)", param=param, code="context_length_exceeded")
        job = Job(asyncio.get_running_loop())
        p = params
        req = EngineRequest(ids=ids, emit=job.emit, max_tokens=min(p["max_tokens"], ctx - len(ids)),
                            sampling=SamplingParams(temperature=p["temperature"], top_p=p["top_p"],
                                                    top_k=p["top_k"], seed=p["seed"]),
                            stop=p["stop"], cancel=job.cancel)
        try:
            sched.submit(req)
        except QueueFull:
            check_room()
            raise
        except RuntimeError as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        return job, text, ids

    def cancel(job: Job) -> None:
        if not job.cancel.is_set():
            job.cancel.set()
            sched.wake()

    async def next_event(job: Job, request: Request):
        """The job's next event; a client that went away (looked at twice a second) cancels
        the job (a queued one is dropped, a running one frees its slot at the next step)."""
        while True:
            now = time.monotonic()
            if now - job.checked > 0.5:
                job.checked = now
                if await request.is_disconnected():
                    cancel(job)
                    raise APIError(499, "the client closed the request")
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            except asyncio.CancelledError:
                cancel(job)
                raise

    def parts(job: Job, split_think: bool, text: str):
        """An async iterator of ("think" | "answer" | "text", piece), then ("done", stats);
        an engine failure raises APIError(500)."""
        splitter = ThinkSplitter(prompt_opens_think(text)) if split_think else None

        async def gen(request):
            while True:
                ev = await next_event(job, request)
                if ev[0] == "text":
                    for part in (splitter.feed(ev[1]) if splitter else [("text", ev[1])]):
                        yield part
                elif ev[0] == "done":
                    for part in (splitter.flush() if splitter else []):
                        yield part
                    yield "done", ev[1]
                    return
                else:
                    raise APIError(500, ev[1], "server_error")

        return gen

    def streaming(job: Job, lines, media_type: str) -> StreamingResponse:
        async def body():
            try:
                async for line in lines:
                    yield line
            finally:
                cancel(job)   # the client went away, or we are done
        return StreamingResponse(body(), media_type=media_type,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(job: Job, request, split_think: bool, text: str):
        """Run a started job to its end: ({kind: text}, stats)."""
        out = collections.defaultdict(str)
        try:
            async for kind, piece in parts(job, split_think, text)(request):
                if kind == "done":
                    return out, piece
                out[kind] += piece
        finally:
            cancel(job)

    # -- service routes ----------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model, "slots": sched.n_slots, "busy": sched.busy_slots,
                "queued": sched.queue_depth, "max_queue": opt.max_queue,
                "served": sched.counts["stop"] + sched.counts["length"]}

    @app.get("/metrics")
    async def metrics():
        c = sched.counts
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP hybrid_{name} {help_}")
            out.append(f"# TYPE hybrid_{name} {kind}")
            for labels, v in samples:
                out.append(f"hybrid_{name}{labels} {v}")

        metric("http_requests_total", "counter", "HTTP requests answered, by route and status.",
               [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(http_counts.items())])
        metric("requests_total", "counter", "Generation requests, by outcome.",
               [(f'{{outcome="{k}"}}', c[k]) for k in ("stop", "length", "cancelled", "errors")])
        metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", sched.queue_depth)])
        metric("slots_active", "gauge", "KV slots serving a request.", [("", sched.busy_slots)])
        metric("slots_total", "gauge", "KV slots (--parallel).", [("", sched.n_slots)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
               [("", c["prompt_tokens"])])
        metric("prompt_tokens_cached_total", "counter",
               "Prompt tokens found in a slot's cache (not prefilled again).", [("", c["cached_tokens"])])
        metric("prefill_tokens_total", "counter", "Prompt tokens prefilled.", [("", c["prefill_tokens"])])
        metric("generated_tokens_total", "counter", "Tokens generated.", [("", c["generated_tokens"])])
        metric("generated_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
               [("", f"{sched.tokens_per_s():.3f}")])
        metric("decode_steps_total", "counter", "Batched decode steps.", [("", sched.steps)])
        metric("scheduler_seconds_total", "counter",
               "Seconds of the engine thread by part: prefill and decode forwards, sampling, text "
               "(detokenize, stop strings, hand-off to the clients).",
               [(f'{{part="{k}"}}', f"{v:.6f}") for k, v in sched.busy_s.items()])
        cum, samples = 0, []
        for b, n in zip(list(TTFT_BUCKETS) + ["+Inf"], sched.ttft_buckets):
            cum += n
            samples.append((f'_bucket{{le="{b}"}}', cum))
        samples += [("_sum", f"{sched.ttft_sum:.6f}"), ("_count", cum)]
        metric("time_to_first_token_seconds", "histogram",
               "Seconds from a request's arrival in the queue to its first token.", samples)
        return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")

    # -- OpenAI ------------------------------------------------------------------------------

    def model_card():
        return {"id": model, "object": "model", "created": created, "owned_by": "hybrid"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return model_card()

    def openai_sampling(req) -> dict:
        check_model(req.model)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        mt = getattr(req, "max_completion_tokens", None) or req.max_tokens
        return sampling(max_tokens=mt, temperature=req.temperature, top_p=req.top_p,
                        top_k=req.top_k, seed=req.seed, stop=req.stop)

    def usage(st) -> dict:
        return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
                "total_tokens": st.prompt_tokens + st.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": st.cached_tokens}}

    def include_usage(req) -> bool:
        return bool(req.stream_options and req.stream_options.include_usage)

    def chat_messages(msgs_in) -> list[dict]:
        msgs = []
        for i, m in enumerate(msgs_in):
            content = m.content
            if isinstance(content, list):
                kinds = {p.type for p in content} - {"text"}
                if kinds:
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, "
                                        f"got {', '.join(sorted(kinds))}", param=f"messages.{i}.content")
                content = "".join(p.text or "" for p in content)
            if content is None and m.role != "assistant":
                raise APIError(400, f"messages[{i}].content is required", param=f"messages.{i}.content")
            role = "system" if m.role == "developer" else m.role
            msgs.append({"role": role, "content": content or ""})
        if system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        params = openai_sampling(req)
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        job, text, _ = await start(messages=chat_messages(req.messages), params=params)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def lines():
                yield _sse(chunk({"role": "assistant", "content": ""}))
                try:
                    async for kind, piece in parts(job, True, text)(request):
                        if kind == "done":
                            yield _sse(chunk({}, piece.finish_reason))
                            if include_usage(req):
                                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": now,
                                            "model": model, "choices": [], "usage": usage(piece)})
                            yield "data: [DONE]\n\n"
                        elif kind == "think":
                            if show_think:
                                yield _sse(chunk({"reasoning_content": piece}))
                        else:
                            yield _sse(chunk({"content": piece}))
                except APIError as e:
                    yield _sse(e.body())
            return streaming(job, lines(), "text/event-stream")

        out, st = await collect(job, request, True, text)
        message = {"role": "assistant", "content": out["answer"] + out["text"]}
        if show_think and out["think"]:
            message["reasoning_content"] = out["think"]
        return {"id": cid, "object": "chat.completion", "created": now, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": st.finish_reason}],
                "usage": usage(st)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params = openai_sampling(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt (batches are not supported)", param="prompt")
            prompt = prompt[0]
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        job, text, _ = await start(prompt=prompt, params=params)
        cid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        echo = prompt if req.echo and isinstance(prompt, str) else ""

        def body(piece, finish=None):
            return {"id": cid, "object": "text_completion", "created": now, "model": model,
                    "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def lines():
                if echo:
                    yield _sse(body(echo))
                try:
                    async for kind, piece in parts(job, False, text)(request):
                        if kind == "done":
                            yield _sse(body("", piece.finish_reason))
                            if include_usage(req):
                                yield _sse({"id": cid, "object": "text_completion", "created": now,
                                            "model": model, "choices": [], "usage": usage(piece)})
                            yield "data: [DONE]\n\n"
                        else:
                            yield _sse(body(piece))
                except APIError as e:
                    yield _sse(e.body())
            return streaming(job, lines(), "text/event-stream")

        out, st = await collect(job, request, False, text)
        res = body(echo + out["text"], st.finish_reason)
        res["usage"] = usage(st)
        return res

    # -- Ollama ------------------------------------------------------------------------------

    def iso_now() -> str:
        return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")

    @app.get("/api/version")
    async def ollama_version():
        return {"version": _version()}

    @app.get("/api/tags")
    async def ollama_tags():
        size = os.path.getsize(rt.path) if getattr(rt, "path", None) and os.path.exists(rt.path) else 0
        modified = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat()
        return {"models": [{"name": model, "model": model, "modified_at": modified, "size": size,
                            "digest": "", "details": {"format": "gguf", "family": _arch(rt),
                                                      "families": [_arch(rt)]}}]}

    def ollama_sampling(req) -> dict:
        check_model(req.model, ollama=True)
        o = req.options or {}
        try:
            return sampling(max_tokens=o.get("num_predict") if (o.get("num_predict") or 0) > 0 else None,
                            temperature=o.get("temperature"), top_p=o.get("top_p"),
                            top_k=o.get("top_k"), seed=o.get("seed"), stop=o.get("stop"))
        except APIError as e:
            e.message = e.message.replace("max_tokens", "options.num_predict")
            raise

    def ollama_final(st, extra: dict) -> dict:
        return {"model": model, "created_at": iso_now(), **extra, "done": True,
                "done_reason": st.finish_reason, "total_duration": int((st.ttft_s + st.decode_s) * 1e9),
                "load_duration": 0, "prompt_eval_count": st.prompt_tokens,
                "prompt_eval_duration": int(st.prefill_s * 1e9), "eval_count": st.completion_tokens,
                "eval_duration": int(st.decode_s * 1e9)}

    async def ollama_reply(request, job, text, split_think: bool, stream: bool, piece_body, final_body):
        if stream:
            async def lines():
                try:
                    async for kind, piece in parts(job, split_think, text)(request):
                        if kind == "done":
                            yield _ndjson(ollama_final(piece, final_body({})))
                        elif kind != "think" or show_think:
                            yield _ndjson({"model": model, "created_at": iso_now(),
                                           **piece_body(kind, piece), "done": False})
                except APIError as e:
                    yield _ndjson({"error": e.message})
            return streaming(job, lines(), "application/x-ndjson")
        out, st = await collect(job, request, split_think, text)
        return ollama_final(st, final_body(out))

    @app.post("/api/chat")
    async def ollama_chat(req: OllamaChat, request: Request):
        params = ollama_sampling(req)
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        job, text, _ = await start(messages=chat_messages(req.messages), params=params)

        def message(kind, piece):
            m = {"role": "assistant", "content": "" if kind == "think" else piece}
            if kind == "think":
                m["thinking"] = piece
            return {"message": m}

        def final(out):
            m = {"role": "assistant", "content": out.get("answer", "") + out.get("text", "")}
            if show_think and out.get("think"):
                m["thinking"] = out["think"]
            return {"message": m}

        return await ollama_reply(request, job, text, True, req.stream, message, final)

    @app.post("/api/generate")
    async def ollama_generate(req: OllamaGenerate, request: Request):
        params = ollama_sampling(req)
        if not req.prompt:        # Ollama clients load a model this way: nothing to generate
            return {"model": model, "created_at": iso_now(), "response": "", "done": True,
                    "done_reason": "load"}
        if req.raw:
            job, text, _ = await start(prompt=req.prompt, params=params)
        else:
            msgs = ([{"role": "system", "content": req.system or system}] if (req.system or system) else [])
            job, text, _ = await start(messages=msgs + [{"role": "user", "content": req.prompt}],
                                       params=params)
        split = not req.raw

        def piece_body(kind, piece):
            return {"response": "", "thinking": piece} if kind == "think" else {"response": piece}

        def final(out):
            body = {"response": out.get("answer", "") + out.get("text", "")}
            if show_think and out.get("think"):
                body["thinking"] = out["think"]
            return body

        return await ollama_reply(request, job, text, split, req.stream, piece_body, final)

    return app


def _arch(rt) -> str:
    try:
        return str(rt.gguf.architecture)
    except AttributeError:
        return ""


def _version() -> str:
    from hybrid import __version__

    return __version__


# ------------------------------------------------------------------------------------------
# Running


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), made before the model loads so that a busy
    port fails fast."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)     # a crowd arriving at once waits in the backlog, not refused
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(rt, sock: socket.socket, *, model: str, system: str | None = None, show_think: bool = True,
          options: ServeOptions | None = None, defaults: dict | None = None, out=None) -> int:
    """Serve until Ctrl-C / SIGTERM (both stop accepting, cancel what runs and return 0).
    Prints the address (with the real port when 0 was asked)."""
    import sys

    import uvicorn

    out = out or sys.stdout
    opt = options or ServeOptions()

    def say(line):
        print(line, file=out, flush=True)

    from hybrid.app.cli import UserError

    try:
        app = create_app(rt, model=model, system=system, show_think=show_think, options=opt,
                         defaults=defaults, access=say)
    except ValueError as e:              # --parallel beyond what the runtime takes
        raise UserError(str(e)) from None
    sched = app.state.scheduler
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    say(f"serving {model} at http://{shown}:{port}/v1 (OpenAI-compatible; Ollama at /api; "
        f"{sched.n_slots} slots of {sched.engine.ctx} tokens, queue {opt.max_queue}; Ctrl-C stops)")
    if not ipaddress.ip_address(host).is_loopback and not opt.api_key:
        say(f"warning: listening on {host} without an API key: anyone who can reach this port can "
            f"use the model (--api-key KEY or ${API_KEY_ENV})")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, backlog=1024)
    server = uvicorn.Server(config)

    class Stopped(Exception):
        pass

    def stopped(signum, frame):
        raise Stopped

    # uvicorn shuts down gracefully (stops accepting, gives open requests 5 s, then the
    # scheduler cancels the rest), then re-raises the signal to the handler it found: ours
    # turns SIGTERM into a normal return, as Ctrl-C's KeyboardInterrupt is
    import signal

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stopped) if main else None
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, Stopped):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    say("server stopped")
    return 0
