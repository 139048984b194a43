"""Terminal chat for `hybrid-run MODEL.gguf`, and the streaming pieces the one-shot mode and
the server share (ThinkSplitter, Generation, TurnStats).

Generation is blocking CPU work and the Runtime is not thread-safe, so a reply runs in one
worker thread that owns the runtime while it runs; the main thread only prints and handles
Ctrl-C, which sets a flag the worker reads between tokens (never interrupting the engine
half-way through a step, where the KV cache or the native expert engine could be left
inconsistent).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

__all__ = ["Chat", "Generation", "ReplyPrinter", "ThinkSplitter", "TurnStats", "fit_messages",
           "make_reader", "quiet_stderr", "stream_in_worker"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# ------------------------------------------------------------------------------------------
# R1's <think> part


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """Split streamed text into ("think", text) and ("answer", text) parts.

    R1's generation prompt ends with "<think>\\n", so its reply starts inside the think block
    (think_open=True) and closes it with "</think>"; other models may open "<think>" as the
    first thing they write. Text that could still be the start of a tag is held back until
    the next feed() or flush(). Whitespace between "</think>" and the answer is dropped.
    """

    def __init__(self, think_open: bool):
        self.state = "think" if think_open else "start"
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf, self.state = s[len(THINK_OPEN):], "think"
                    continue
                if not s or THINK_OPEN.startswith(s):
                    return out                       # may still become "<think>"
                self.state = "answer"
                continue
            if self.state == "think":
                i = self.buf.find(THINK_CLOSE)
                if i >= 0:
                    if i:
                        out.append(("think", self.buf[:i]))
                    self.buf, self.state = self.buf[i + len(THINK_CLOSE):], "answer_lead"
                    continue
                n = len(self.buf) - _partial_suffix(self.buf, THINK_CLOSE)
                if n:
                    out.append(("think", self.buf[:n]))
                self.buf = self.buf[n:]
                return out
            if self.state == "answer_lead":
                s = self.buf.lstrip()
                if not s:
                    self.buf = ""
                    return out
                self.buf, self.state = s, "answer"
                continue
            if self.buf:
                out.append(("answer", self.buf))
            self.buf = ""
            return out

    def flush(self) -> list[tuple[str, str]]:
        text, self.buf = self.buf, ""
        if not text or self.state == "answer_lead":
            return []
        return [("think" if self.state == "think" else "answer", text)]


def prompt_opens_think(prompt_text: str) -> bool:
    """Whether a rendered chat prompt leaves the reply inside a think block (R1's template)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


# ------------------------------------------------------------------------------------------
# One reply with its numbers


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose KV was reused from the previous turn
    prefill_s: float = 0.0
    completion_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float = 0.0           # request to first generated token (tokenize + prefill + sample)
    finish_reason: str = ""       # stop (EOS / stop string) | length | cancelled

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        cached = f", {self.cached_tokens} cached" if self.cached_tokens else ""
        stopped = " | stopped" if self.finish_reason == "cancelled" else ""
        return (f"prompt {self.prompt_tokens} tok{cached}, {self.prefill_tok_s:.1f} tok/s | "
                f"generated {self.completion_tokens} tok, {self.decode_tok_s:.1f} tok/s | "
                f"first token {self.ttft_s:.2f} s{stopped}")


class Generation:
    """Iterate for the text pieces of one reply (in the calling thread); `stats` afterwards.

    `cancel` (a threading.Event) stops the reply after the token being computed; so does
    closing the iterator. The runtime's KV cache stays consistent either way: the engine
    only yields between steps.
    """

    def __init__(self, rt, prompt, *, cancel: threading.Event | None = None, **params):
        self.rt, self.prompt, self.cancel, self.params = rt, prompt, cancel, params
        self.stats = TurnStats()
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        t0 = time.perf_counter()
        gen = self.rt.generate_tokens(self.prompt, **self.params)
        first = last = None
        n = 0
        complete = False
        try:
            for tok, piece in gen:
                last = time.perf_counter()
                if first is None:
                    first = last
                if tok >= 0:
                    n += 1
                if piece:
                    self.text += piece
                    yield piece
                if self.cancel is not None and self.cancel.is_set():
                    break
            else:
                complete = True
        finally:
            gen.close()
            self._finish(t0, first, last, n, complete)

    def _finish(self, t0, first, last, n, complete):
        s = self.stats
        es = getattr(self.rt, "last_stats", None)
        if es is not None:
            s.prompt_tokens, s.cached_tokens, s.prefill_s = es.prompt_tokens, es.cached_tokens, es.prefill_s
        s.ttft_s = (first - t0) if first is not None else 0.0
        if complete and es is not None:
            s.completion_tokens, s.decode_s, s.finish_reason = es.completion_tokens, es.decode_s, es.finish_reason
            if not s.decode_s and first is not None:     # an engine without decode timing
                s.decode_s = last - first
        else:
            # stopped early: the engine has not written its decode time; the first token came
            # from the prefill logits, so the rate is over the tokens after it
            s.completion_tokens = es.completion_tokens if es is not None else n
            s.finish_reason = "cancelled"
            if n > 1:
                s.decode_s = (last - first) * s.completion_tokens / (n - 1)


def stream_in_worker(gen: Generation, cancel: threading.Event, show: Callable[[str], object]) -> BaseException | None:
    """Run `gen` in a worker thread and show its pieces here; Ctrl-C sets `cancel` and waits
    for the worker to stop (after the token it is computing). Returns the worker's error.

    Whatever happens here, this returns or raises only once the worker has stopped, so the
    runtime is never used by two threads."""
    events: queue.Queue = queue.Queue()

    def work():
        try:
            for piece in gen:
                events.put(("piece", piece))
            events.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            events.put(("error", e))

    worker = threading.Thread(target=work, name="hybrid-generate", daemon=True)
    worker.start()
    try:
        while True:
            try:
                kind, val = events.get(timeout=0.1)
            except queue.Empty:
                if not worker.is_alive() and events.empty():
                    return None          # its last event was lost to a Ctrl-C
                continue
            except KeyboardInterrupt:
                cancel.set()
                continue
            if kind == "piece":
                try:
                    show(val)
                except KeyboardInterrupt:
                    cancel.set()
                continue
            return val if kind == "error" else None
    except BaseException:            # a Ctrl-C between the lines above
        cancel.set()
        raise
    finally:
        while worker.is_alive():
            try:
                worker.join(0.1)
            except KeyboardInterrupt:
                cancel.set()


# ------------------------------------------------------------------------------------------
# Conversation bookkeeping


def fit_messages(messages: list[dict], count_tokens: Callable[[list[dict]], int], ctx: int,
                 reserve: int) -> tuple[list[dict], int, int]:
    """Drop the oldest exchanges (never the system message nor the last user message) until
    the prompt leaves `reserve` tokens of the context for the reply.

    Returns (messages kept, how many were dropped, prompt tokens). The caller decides what to
    do when even the last message alone does not fit (prompt tokens >= ctx).
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    n = count_tokens(system + rest)
    while n + reserve > ctx and len(rest) > 1:
        # drop through the next user message, so the history still starts with a user turn
        cut = 1
        while cut < len(rest) - 1 and rest[cut]["role"] != "user":
            cut += 1
        rest = rest[cut:]
        dropped += cut
        n = count_tokens(system + rest)
    return system + rest, dropped, n


# ------------------------------------------------------------------------------------------
# Terminal helpers


@contextlib.contextmanager
def quiet_stderr():
    """Silence what native libraries (llama.cpp) print while loading: Python's sys.stderr and
    file descriptor 2 (where C code writes). Yields a callable returning what was captured
    (also after the block), for error messages."""
    import tempfile

    captured = io.StringIO()
    result: list[str] = []
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    tmp = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    old = sys.stderr
    sys.stderr = captured

    def read() -> str:
        tmp.flush()
        tmp.seek(0)
        return tmp.read().decode("utf-8", "replace") + captured.getvalue()

    def text() -> str:
        return result[0] if result else read()

    try:
        yield text
    finally:
        sys.stderr = old
        os.dup2(saved, 2)
        os.close(saved)
        result.append(read())
        tmp.close()


def use_color(stream) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"

# Model text must not drive the terminal: C0 controls (ESC included) but tab and newline, and
# DEL, are dropped before they reach a TTY.
_CONTROLS = {c: None for c in list(range(0x20)) + [0x7F] if c not in (0x09, 0x0A)}


class ReplyPrinter:
    """Streams a reply's parts to a terminal: thinking dimmed (or hidden), then the answer."""

    def __init__(self, out, *, color: bool, show_think: bool, sanitize: bool | None = None):
        self.out, self.color, self.show_think = out, color, show_think
        self.sanitize = color if sanitize is None else sanitize
        self.cur = None          # kind of the last part shown
        self.answer = ""
        self.think = ""
        self.hint = False        # the "thinking..." line shown while thinking is hidden

    def _w(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def _clean(self, text: str) -> str:
        return text.translate(_CONTROLS) if self.sanitize else text

    def part(self, kind: str, text: str) -> None:
        if kind == "think":
            self.think += text
            if not self.show_think:
                if self.color and not self.hint:
                    self._w(f"{DIM}thinking...{RESET}")
                    self.hint = True
                self.cur = kind
                return
            if self.cur != "think":
                self._w(DIM if self.color else "<think>\n")
            self._w(self._clean(text))
        else:
            self.answer += text
            if self.cur == "think":
                self._end_think()
            self._w(self._clean(text))
        self.cur = kind

    def _end_think(self, last: bool = False) -> None:
        if not self.show_think:
            if self.hint:
                self._w("\r\x1b[K")
                self.hint = False
        elif self.color:
            self._w(RESET if last else f"{RESET}\n{DIM}{'-' * 20}{RESET}\n")
        else:
            self._w("\n</think>" if last else "\n</think>\n\n")

    def end(self) -> None:
        """Close the reply (and its line)."""
        if self.cur == "think":
            self._end_think(last=True)
        elif self.color:
            self._w(RESET)
        if self.cur is not None and not (self.cur == "think" and not self.show_think):
            self._w("\n")


# ------------------------------------------------------------------------------------------
# The chat

HELP = """\
commands:
  /help           this list
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (/system alone shows it; /system - clears it)
  /stats          numbers for the last reply and the session
  /set KEY VALUE  change max_tokens, temperature, top_p, top_k or seed
  /save FILE      write the conversation as JSON
  /exit           leave (also Ctrl-D)
keys: Enter sends; Alt-Enter (or Esc then Enter) starts a new line; Up/Down walk the history;
      Ctrl-C stops a reply (or clears the line); Ctrl-D on an empty line exits."""


@dataclass
class _Session:
    turns: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    completion_tokens: int = 0
    decode_s: float = 0.0
    stopped: int = 0
    trimmed: int = 0
    last: TurnStats | None = None
    history: list = field(default_factory=list)


class Chat:
    """An interactive conversation with a loaded Runtime.

    params: generation keywords for Runtime.generate_tokens (max_tokens, temperature, top_p,
    top_k, seed, stop). read_line() returns the next input line, None to skip (Ctrl-C at
    the prompt), and raises EOFError to end the session.
    """

    def __init__(self, rt, *, params: dict, system: str | None = None, show_think: bool = True,
                 out=None, color: bool | None = None, model_name: str = "model"):
        self.rt = rt
        self.params = dict(params)
        self.system = system or None
        self.show_think = show_think
        self.out = out or sys.stdout
        self.color = use_color(self.out) if color is None else color
        self.model_name = model_name
        self.messages: list[dict] = []
        self.session = _Session()
        self.ctx = int(getattr(rt, "ctx", 4096))

    # -- output --------------------------------------------------------------------------

    def say(self, text: str, dim: bool = True) -> None:
        if self.color and dim:
            text = f"{DIM}{text}{RESET}"
        self.out.write(text + "\n")
        self.out.flush()

    # -- loop ----------------------------------------------------------------------------

    def run(self, read_line: Callable[[], str | None]) -> int:
        self.say(f"chatting with {self.model_name}: /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = read_line()
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                continue
            if line is None:
                continue
            if not line.strip():
                continue
            try:
                if line.lstrip().startswith("/"):
                    if not self.command(line.strip()):
                        return 0
                    continue
                self.send(line)
            except KeyboardInterrupt:          # outside a reply (building the prompt, a command)
                self.say("interrupted")

    def command(self, line: str) -> bool:
        """Run a slash command; False when the session should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP, dim=False)
        elif name == "/reset":
            self.messages = []
            self.rt.reset()
            self.say("conversation cleared")
        elif name == "/system":
            if not arg:
                self.say(f"system prompt: {self.system!r}" if self.system else "no system prompt")
            else:
                self.system = None if arg == "-" else arg
                self.say("system prompt cleared" if self.system is None else "system prompt set")
        elif name == "/stats":
            self.say(self.stats_text(), dim=False)
        elif name == "/save":
            self.save(arg)
        elif name == "/set":
            self.set_param(arg)
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return True

    def stats_text(self) -> str:
        s = self.session
        lines = [f"last reply: {s.last.line()}" if s.last else "last reply: none yet"]
        pre = s.prefill_tokens / s.prefill_s if s.prefill_s > 0 else 0.0
        dec = s.completion_tokens / s.decode_s if s.decode_s > 0 else 0.0
        lines.append(f"session: {s.turns} replies ({s.stopped} stopped); prompt tokens computed "
                     f"{s.prefill_tokens} at {pre:.1f} tok/s; generated {s.completion_tokens} at "
                     f"{dec:.1f} tok/s")
        used = (s.last.prompt_tokens + s.last.completion_tokens) if s.last else 0
        lines.append(f"context: {used} of {self.ctx} tokens used by the last exchange; "
                     f"{len(self.messages)} messages kept"
                     + (f"; {s.trimmed} dropped to fit" if s.trimmed else ""))
        lines.append("sampling: " + ", ".join(f"{k}={v}" for k, v in self.params.items()
                                              if v is not None))
        return "\n".join(lines)

    _SETTABLE = {"max_tokens": (int, 1, None), "temperature": (float, 0.0, None),
                 "top_p": (float, 1e-9, 1.0), "top_k": (int, 0, None), "seed": (int, None, None)}

    def set_param(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        key = key.replace("-", "_")
        if key not in self._SETTABLE or not value.strip():
            self.say(f"usage: /set KEY VALUE with KEY one of {', '.join(self._SETTABLE)}")
            return
        kind, lo, hi = self._SETTABLE[key]
        try:
            v = kind(value.strip())
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ValueError
        except ValueError:
            self.say(f"/set {key}: {value.strip()!r} is not a valid value")
            return
        self.params[key] = v
        self.say(f"{key} = {v}")

    def save(self, path: str) -> None:
        if not path:
            self.say("usage: /save FILE")
            return
        doc = {
            "model": self.model_name,
            "messages": self._with_system(self.messages),
            "params": self.params,
            "replies": [asdict(t) for t in self.session.history],
        }
        try:
            from hybrid.atomic import write_text

            # whole or not at all: a temporary name beside it, then renamed
            write_text(os.path.expanduser(path), json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        except OSError as e:
            self.say(f"/save {path}: {e.strerror or e}")
            return
        self.say(f"saved {len(doc['messages'])} messages to {path}")

    # -- one exchange --------------------------------------------------------------------

    def _with_system(self, messages):
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(messages)

    def _count(self, messages) -> int:
        return len(self.rt.tokenizer.encode_chat(messages))

    def send(self, text: str) -> TurnStats | None:
        history = self._with_system(self.messages + [{"role": "user", "content": text}])
        max_tokens = int(self.params.get("max_tokens") or 1024)
        reserve = min(max_tokens, self.ctx // 4)
        try:
            kept, dropped, n = fit_messages(history, self._count, self.ctx, reserve)
            if n >= self.ctx:
                self.say(f"that message is {n} tokens with the chat template; the context holds "
                         f"{self.ctx} (start with a larger --ctx)")
                return None
            prompt_text = self.rt.apply_chat_template(kept)
            ids = self.rt.tokenize(prompt_text)
        except ValueError as e:  # chat template or tokenizer problems
            self.say(f"cannot build the prompt: {e}")
            return None
        if dropped:
            self.session.trimmed += dropped
            self.say(f"(dropped the {dropped} oldest messages to stay within the context of "
                     f"{self.ctx} tokens)")
        self.messages = [m for m in kept if m["role"] != "system"]

        printer = ReplyPrinter(self.out, color=self.color, show_think=self.show_think)
        splitter = ThinkSplitter(prompt_opens_think(prompt_text))
        cancel = threading.Event()
        gen = Generation(self.rt, ids, cancel=cancel, **self.params)
        error = stream_in_worker(gen, cancel, lambda piece: [printer.part(*p) for p in splitter.feed(piece)])
        for p in splitter.flush():
            printer.part(*p)
        printer.end()
        if not self.show_think and printer.think and not printer.answer:
            self.say("(the reply did not get past its thinking part; run without --no-think to see it)")
        if error is not None:
            self.say(f"generation failed: {error}")
            self.messages.pop()          # the user message stays out of the history
            return None
        st = gen.stats
        reply = {"role": "assistant", "content": printer.answer}
        if printer.think:
            reply["reasoning_content"] = printer.think   # kept for /save; templates ignore it
        self.messages.append(reply)
        self._account(st)
        self.say(f"[{st.line()}]")
        return st

    def _account(self, st: TurnStats) -> None:
        s = self.session
        s.turns += 1
        s.last = st
        s.history.append(st)
        s.prompt_tokens += st.prompt_tokens
        s.prefill_tokens += st.prompt_tokens - st.cached_tokens
        s.prefill_s += st.prefill_s
        s.completion_tokens += st.completion_tokens
        s.decode_s += st.decode_s
        s.stopped += st.finish_reason == "cancelled"


# ------------------------------------------------------------------------------------------
# Input


def _history_path():
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "hybrid", "chat_history")


def make_reader(stdin=None, out=None) -> Callable[[], str | None]:
    """prompt_toolkit on a terminal (history, editing, Alt-Enter for new lines), plain lines
    otherwise (pipes, or prompt_toolkit not installed)."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    tty = False
    try:
        tty = stdin.isatty() and out.isatty()
    except (AttributeError, ValueError):
        pass
    if tty:
        # Ctrl-C stops a reply: also when this process started with SIGINT ignored (a
        # background job of a non-interactive shell inherits that, and Python then never
        # raises KeyboardInterrupt)
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return _prompt_toolkit_reader()
        except ImportError:
            pass

    def read_plain() -> str:
        if tty:
            return input(">>> ")
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read_plain


def _prompt_toolkit_reader() -> Callable[[], str | None]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    try:
        path = _history_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        history = FileHistory(path)
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history, key_bindings=kb, multiline=False,
                            prompt_continuation=lambda width, line_no, wrap: "." * (width - 1) + " ")

    def read() -> str | None:
        try:
            return session.prompt(">>> ")
        except KeyboardInterrupt:
            return None

    return read
