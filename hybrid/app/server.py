"""OpenAI-compatible HTTP server for `hybrid-run MODEL --serve` (FastAPI + uvicorn).

GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed as server-sent
events or not), GET /health. Errors are OpenAI-style JSON: {"error": {"message", "type",
"param", "code"}} with a 4xx status for bad requests.

One worker thread owns the Runtime (it is not thread-safe, and generation is blocking CPU
work): requests wait in a bounded queue and run one at a time; a full queue answers 503.
Tokens travel from the worker to the request's coroutine through the event loop
(call_soon_threadsafe into an asyncio.Queue). A client that goes away (closes a stream)
cancels its request: the worker stops after the token it is computing.
"""

# no `from __future__ import annotations`: FastAPI reads the request models of the
# endpoints (local classes) from their annotations at run time.

import asyncio
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal, Optional, Union

log = logging.getLogger(__name__)

__all__ = ["bind", "create_app", "serve"]


# ------------------------------------------------------------------------------------------
# The worker


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class Job:
    """One request for the worker. Events to the request: ("start", prompt_tokens),
    ("part", kind, text) with kind "think" | "answer" | "text", ("done", TurnStats),
    ("error", APIError)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, messages=None, prompt=None,
                 params: dict, split_think: bool):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.messages, self.prompt = messages, prompt
        self.params, self.split_think = params, split_think

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:          # the loop is closed: the server is shutting down
            self.cancel.set()


class Worker:
    """Runs jobs one at a time on the runtime, in its own thread."""

    def __init__(self, rt, *, max_queue: int = 16):
        self.rt = rt
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.busy = False
        self.served = 0
        self.current: Job | None = None
        self.stopping = False
        self._thread = threading.Thread(target=self._loop, name="hybrid-server-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel the running and the waiting jobs and wait for the thread, so the runtime can
        be closed safely afterwards."""
        self.stopping = True
        current = self.current
        if current is not None:
            current.cancel.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.max_queue} requests are waiting; "
                                f"retry later", "server_error", code="queue_full") from None

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue
            self.busy = True
            self.current = job
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - a failed request must not stop the server
                log.exception("request failed")
                job.send("error", APIError(500, f"generation failed: {e}", "server_error"))
            finally:
                self.busy = False
                self.current = None
                self.served += 1

    def _run(self, job: Job) -> None:
        from hybrid.app.chat import Generation, ThinkSplitter, prompt_opens_think

        rt = self.rt
        try:
            if job.messages is not None:
                text = rt.apply_chat_template(job.messages)
                ids = rt.tokenize(text)
            elif isinstance(job.prompt, str):
                text = job.prompt
                ids = rt.tokenize(text)
            else:
                text, ids = "", list(job.prompt)
                bad = [t for t in ids if not 0 <= t < rt.n_vocab]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                                        f"(0..{rt.n_vocab - 1})", param="prompt")
        except ValueError as e:      # chat template errors
            job.send("error", APIError(400, str(e), param="messages" if job.messages else "prompt"))
            return
        except APIError as e:
            job.send("error", e)
            return
        if not ids:
            job.send("error", APIError(400, "the prompt is empty", param="prompt"))
            return
        if len(ids) >= rt.ctx:
            job.send("error", APIError(
                400, f"this model's context length is {rt.ctx} tokens, but the prompt has {len(ids)} "
                     f"tokens; shorten it (or start the server with a larger --ctx)",
                param="messages" if job.messages is not None else "prompt",
                code="context_length_exceeded"))
            return
        params = dict(job.params)
        params["max_tokens"] = min(params["max_tokens"], rt.ctx - len(ids))
        splitter = ThinkSplitter(prompt_opens_think(text)) if job.split_think else None
        job.send("start", len(ids))
        gen = Generation(rt, ids, cancel=job.cancel, **params)
        for piece in gen:
            parts = splitter.feed(piece) if splitter else [("text", piece)]
            for kind, t in parts:
                job.send("part", kind, t)
        for kind, t in (splitter.flush() if splitter else []):
            job.send("part", kind, t)
        job.send("done", gen.stats)


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

    return ChatRequest, CompletionRequest


# ------------------------------------------------------------------------------------------
# The app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(rt, *, model: str, aliases=(), system: str | None = None, show_think: bool = True,
               max_queue: int = 16, defaults: dict | None = None):
    """The FastAPI app serving `rt` under the model id `model` (also answering to `aliases`).

    defaults: generation values for fields a request leaves out (max_tokens, temperature,
    top_p, top_k, seed). system: a system prompt for chat requests that bring none.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ChatRequest, CompletionRequest = _models()
    d = {"max_tokens": 1024, "temperature": 0.6, "top_p": 1.0, "top_k": 0, "seed": None}
    d.update({k: v for k, v in (defaults or {}).items() if v is not None or k == "seed"})
    worker = Worker(rt, max_queue=max_queue)
    created = int(time.time())
    names = {model, *aliases}

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="hybrid", version=_version(), lifespan=lifespan)
    app.state.worker = worker

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON: "
                                                f"{first.get('ctx', {}).get('error', first.get('msg'))}"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            msg = f"'{param}' is required" if param else "the request body is missing"
        elif param:
            msg = f"{param}: {msg}"
        more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
        return error_response(APIError(400, msg + more, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; this server has /v1/models, " \
                  f"/v1/chat/completions, /v1/completions and /health"
        return error_response(APIError(exc.status_code, msg, type_))

    def model_card():
        return {"id": model, "object": "model", "created": created, "owned_by": "hybrid"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model, "busy": worker.busy,
                "queued": worker.jobs.qsize(), "max_queue": max_queue, "served": worker.served}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in names:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{model}'",
                           param="model", code="model_not_found")
        return model_card()

    def sampling(req) -> dict:
        if req.model not in names:
            raise APIError(404, f"the model '{req.model}' does not exist; this server has '{model}'",
                           param="model", code="model_not_found")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop")
        mt = getattr(req, "max_completion_tokens", None) or req.max_tokens or d["max_tokens"]
        return {"max_tokens": int(mt),
                "temperature": d["temperature"] if req.temperature is None else req.temperature,
                "top_p": d["top_p"] if req.top_p is None else req.top_p,
                "top_k": d["top_k"] if req.top_k is None else req.top_k,
                "seed": d["seed"] if req.seed is None else req.seed,
                "stop": stop or None}

    async def next_event(job: Job, request: Request):
        """The job's next event; a client that went away cancels the job (a queued one is
        skipped, a running one stops after its current token)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    raise APIError(499, "the client closed the request") from None
            except asyncio.CancelledError:
                job.cancel.set()
                raise

    async def start(job: Job, request: Request):
        """Queue the job and wait for its first event: errors found before generation
        (over-long prompt, template) become plain 4xx responses, not broken streams."""
        worker.submit(job)
        ev = await next_event(job, request)
        if ev[0] == "error":
            raise ev[1]
        return ev[1]

    def usage(prompt_tokens, st) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": st.completion_tokens,
                "total_tokens": prompt_tokens + st.completion_tokens}

    def include_usage(req) -> bool:
        return bool(req.stream_options and req.stream_options.include_usage)

    def sse_response(job: Job, first: list, piece, last) -> StreamingResponse:
        """Stream a started job as server-sent events: the `first` chunks, piece(kind, text)
        per generated part (None: nothing to send), the chunks of last(stats) and [DONE] at
        the end; an error after the first bytes ends the stream with its body."""
        async def events():
            try:
                for c in first:
                    yield _sse(c)
                while True:
                    ev = await job.events.get()
                    if ev[0] == "part":
                        c = piece(ev[1], ev[2])
                        if c is not None:
                            yield _sse(c)
                    elif ev[0] == "done":
                        for c in last(ev[1]):
                            yield _sse(c)
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        yield _sse(ev[1].body())
                        return
            finally:
                job.cancel.set()       # the client went away, or we are done

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(job: Job, request: Request):
        """Run a started job to its end: ([(kind, text), ...], stats)."""
        parts = []
        try:
            while True:
                ev = await next_event(job, request)
                if ev[0] == "part":
                    parts.append((ev[1], ev[2]))
                elif ev[0] == "done":
                    return parts, ev[1]
                else:
                    raise ev[1]
        finally:
            job.cancel.set()

    # -- chat --------------------------------------------------------------------------------

    def chat_messages(req) -> list[dict]:
        msgs = []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list):
                kinds = {p.type for p in m.content} - {"text"}
                if kinds:
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, "
                                        f"got {', '.join(sorted(kinds))}", param=f"messages.{i}.content")
                content = "".join(p.text or "" for p in m.content)
            else:
                content = m.content
            if content is None and m.role != "assistant":
                raise APIError(400, f"messages[{i}].content is required", param=f"messages.{i}.content")
            role = "system" if m.role == "developer" else m.role
            msgs.append({"role": role, "content": content or ""})
        if system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        params = sampling(req)
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        msgs = chat_messages(req)
        job = Job(asyncio.get_running_loop(), messages=msgs, params=params, split_think=True)
        n_prompt = await start(job, request)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            def piece(kind, text):
                if kind == "think":
                    return chunk({"reasoning_content": text}) if show_think else None
                return chunk({"content": text})

            def last(st):
                out = [chunk({}, st.finish_reason or "stop")]
                if include_usage(req):
                    out.append({"id": cid, "object": "chat.completion.chunk", "created": now,
                                "model": model, "choices": [], "usage": usage(n_prompt, st)})
                return out

            return sse_response(job, [chunk({"role": "assistant", "content": ""})], piece, last)

        parts, st = await collect(job, request)
        think = "".join(text for kind, text in parts if kind == "think")
        message = {"role": "assistant", "content": "".join(text for kind, text in parts if kind != "think")}
        if show_think and think:
            message["reasoning_content"] = think
        return {"id": cid, "object": "chat.completion", "created": now, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": st.finish_reason or "stop"}],
                "usage": usage(n_prompt, st)}

    # -- completions ---------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params = sampling(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt (batches are not supported)", param="prompt")
            prompt = prompt[0]
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        job = Job(asyncio.get_running_loop(), prompt=prompt, params=params, split_think=False)
        n_prompt = await start(job, request)
        cid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        echo = prompt if req.echo and isinstance(prompt, str) else ""

        def body(text, finish=None):
            return {"id": cid, "object": "text_completion", "created": now, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            def last(st):
                out = [body("", st.finish_reason or "stop")]
                if include_usage(req):
                    out.append({"id": cid, "object": "text_completion", "created": now,
                                "model": model, "choices": [], "usage": usage(n_prompt, st)})
                return out

            return sse_response(job, [body(echo)] if echo else [], lambda kind, text: body(text), last)

        parts, st = await collect(job, request)
        out = body(echo + "".join(text for _, text in parts), st.finish_reason or "stop")
        out["usage"] = usage(n_prompt, st)
        return out

    return app


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
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(rt, sock: socket.socket, *, model: str, system: str | None = None, show_think: bool = True,
          max_queue: int = 16, defaults: dict | None = None, out=None) -> int:
    """Serve until Ctrl-C / SIGTERM. Prints the address (with the real port when 0 was asked)."""
    import sys

    import uvicorn

    out = out or sys.stdout
    app = create_app(rt, model=model, system=system, show_think=show_think, max_queue=max_queue,
                     defaults=defaults)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model} at http://{shown}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)",
          file=out, flush=True)
    if not ipaddress.ip_address(host).is_loopback:
        print(f"note: listening on {host}: the API has no authentication; anyone who can reach "
              f"this port can use the model", file=out, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:   # uvicorn shuts down gracefully, then re-raises the signal
        pass
    print("server stopped", file=out, flush=True)
    return 0
