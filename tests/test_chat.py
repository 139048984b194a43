"""Terminal chat: <think> splitting, generation stats and cancel, context trimming, commands,
and the real thing in a pseudo-terminal (pexpect): two messages with streamed replies and
stats, /reset, Ctrl-C during a reply, /exit."""

import io
import json
import os
import re
import signal
import sys
import threading
import time

import pytest
from hybrid.runtime.engine import GenerationStats
from subproc import NEUTRAL_CWD, hybrid_env

from hybrid.app.chat import (Chat, Generation, ReplyPrinter, ThinkSplitter, fit_messages,
                         prompt_opens_think, quiet_stderr, stream_in_worker)


# ----------------------------------------------------------------------------- a stand-in runtime




class FakeRuntime:
    """Byte tokens, an R1-like template, and a scripted reply streamed one character per token
    (optionally slowly): enough of Runtime's interface for the chat."""

    def __init__(self, reply="let me think</think>\n\nHello!", ctx=4096, delay=0.0):
        self.reply, self.ctx, self.delay = reply, ctx, delay
        self.tokenizer = self
        self.chat_template = "r1-like"
        self.prompts = []
        self.resets = 0
        self.last_stats = None

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant><think>\n"

    def tokenize(self, text, add_bos=None):
        return list(text.encode())

    def encode_chat(self, messages):
        return self.tokenize(self.apply_chat_template(messages))

    def reset(self):
        self.resets += 1

    def generate_tokens(self, prompt, *, max_tokens=256, **kw):
        self.prompts.append(bytes(prompt).decode())
        st = GenerationStats(prompt_tokens=len(prompt), prefill_s=0.01, finish_reason="length")
        self.last_stats = st
        t0 = time.perf_counter()
        for i, ch in enumerate(self.reply[:max_tokens]):
            if self.delay:
                time.sleep(self.delay)
            st.completion_tokens += 1
            yield i, ch
        if max_tokens > len(self.reply):
            st.finish_reason = "stop"
        st.decode_s = time.perf_counter() - t0 + 1e-6


# ----------------------------------------------------------------------------- <think> splitting


def _split(pieces, think_open):
    sp = ThinkSplitter(think_open)
    out = []
    for p in pieces:
        out += sp.feed(p)
    out += sp.flush()
    merged = {}
    for kind, text in out:
        merged[kind] = merged.get(kind, "") + text
    return merged


@pytest.mark.parametrize("pieces", [
    ["I should greet.</think>\n\nHello!"],
    list("I should greet.</think>\n\nHello!"),                  # one character at a time
    ["I should greet.</th", "ink>", "\n", "\nHel", "lo!"],       # tag split across pieces
])
def test_think_splitter_separates_reasoning_from_answer(pieces):
    assert _split(pieces, think_open=True) == {"think": "I should greet.", "answer": "Hello!"}


def test_think_splitter_when_the_model_opens_the_block_or_never_thinks():
    assert _split(["<thi", "nk>plan</think>done"], think_open=False) == {"think": "plan", "answer": "done"}
    assert _split(["<b>bold</b>"], think_open=False) == {"answer": "<b>bold</b>"}
    assert _split(["never closed </thi"], think_open=True) == {"think": "never closed </thi"}
    # "<" alone is held back until it is known not to start "<think>"
    sp = ThinkSplitter(False)
    assert sp.feed("<") == [] and sp.feed("3 is less") == [("answer", "<3 is less")]


def test_r1_generation_prompt_opens_the_think_block(tiny_q4km):
    from hybrid.runtime.tokenizer import Tokenizer

    tok = Tokenizer(tiny_q4km)
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        tok.close()
    assert prompt_opens_think(text)
    assert not prompt_opens_think("<｜User｜>hi<｜Assistant｜>")


# ----------------------------------------------------------------------------- generation


def test_generation_reports_counts_and_cancel_stops_between_tokens():
    rt = FakeRuntime(reply="x" * 200, delay=0.002)
    g = Generation(rt, [1, 2, 3], max_tokens=500)
    assert "".join(g) == "x" * 200
    assert g.stats.completion_tokens == 200 and g.stats.finish_reason == "stop"
    assert g.stats.prompt_tokens == 3 and g.stats.decode_tok_s == pytest.approx(200 / g.stats.decode_s)

    cancel = threading.Event()
    g = Generation(rt, [1, 2, 3], cancel=cancel, max_tokens=500)
    seen = []
    for piece in g:
        seen.append(piece)
        if len(seen) == 10:
            cancel.set()
    assert len(seen) == 10                 # the worker stops right after the flag is seen
    assert g.stats.finish_reason == "cancelled" and g.stats.completion_tokens == 10
    assert "stopped" in g.stats.line()


def test_stream_in_worker_turns_ctrl_c_into_a_cancel():
    """KeyboardInterrupt raised in the thread that shows the pieces stops the worker cleanly."""
    rt = FakeRuntime(reply="y" * 1000, delay=0.002)
    cancel = threading.Event()
    g = Generation(rt, [1], cancel=cancel, max_tokens=1000)
    shown = []

    def show(piece):
        shown.append(piece)
        if len(shown) == 5:
            raise KeyboardInterrupt

    assert stream_in_worker(g, cancel, show) is None
    assert cancel.is_set() and g.stats.finish_reason == "cancelled"
    assert 5 <= g.stats.completion_tokens < 1000


def test_generation_on_the_tiny_model_matches_the_engine(tiny_q4km):
    import hybrid

    rt = hybrid.load(tiny_q4km, device="cpu", ctx=256)
    try:
        ids = rt.tokenize("The quick brown fox")
        ref = "".join(rt.generate(ids, max_tokens=6, temperature=0.0))
        g = Generation(rt, ids, max_tokens=6, temperature=0.0)
        assert "".join(g) == ref
        assert g.stats.completion_tokens == 6 and g.stats.prompt_tokens == len(ids)
        assert g.stats.ttft_s > 0 and g.stats.decode_s > 0
    finally:
        rt.close()


# ----------------------------------------------------------------------------- printing


def test_reply_printer_plain_and_color():
    out = io.StringIO()
    p = ReplyPrinter(out, color=False, show_think=True)
    for part in [("think", "hmm"), ("answer", "Hi")]:
        p.part(*part)
    p.end()
    assert out.getvalue() == "<think>\nhmm\n</think>\n\nHi\n"

    out = io.StringIO()
    p = ReplyPrinter(out, color=True, show_think=True)
    p.part("think", "hmm\x1b[31m")                      # model text cannot send escapes
    p.part("answer", "Hi\x07")
    p.end()
    s = out.getvalue()
    assert s.startswith("\x1b[2mhmm[31m") and "Hi" in s and "\x07" not in s

    out = io.StringIO()
    p = ReplyPrinter(out, color=False, show_think=False)
    p.part("think", "secret")
    p.part("answer", "visible")
    p.end()
    assert out.getvalue() == "visible\n" and p.think == "secret"


def test_quiet_stderr_captures_python_and_fd_output(capfd):
    with quiet_stderr() as captured:
        print("py side", file=sys.stderr)
        os.write(2, b"native side\n")             # what C code such as llama.cpp does
    assert "py side" in captured() and "native side" in captured()
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert "side" not in err and "after" in err


# ----------------------------------------------------------------------------- the conversation


def _run_chat(rt, lines, **kw):
    out = io.StringIO()
    chat = Chat(rt, params={"max_tokens": 64, "temperature": 0.0}, out=out, color=False,
                model_name="fake", **kw)
    it = iter(lines)

    def read():
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    rc = chat.run(read)
    return rc, out.getvalue(), chat


def test_chat_keeps_history_commands_and_saves_json(tmp_path):
    rt = FakeRuntime()
    save = tmp_path / "conv.json"
    rc, out, chat = _run_chat(rt, ["hello", "/system be brief", "again", "/stats",
                                   f"/save {save}", "/nope", "/reset", "fresh", "/exit", "never"])
    assert rc == 0
    assert out.count("Hello!") == 3 and out.count("<think>\nlet me think\n</think>") == 3
    assert len(re.findall(r"\[prompt \d+ tok.*generated 28 tok, [\d.]+ tok/s \| first token", out)) == 3
    # the second prompt carries the first exchange (answer only) and the system prompt
    assert rt.prompts[1] == ("<system>be brief<user>hello<assistant>Hello!<user>again"
                             "<assistant><think>\n")
    assert "session: 2 replies" in out and "unknown command /nope" in out
    doc = json.loads(save.read_text())
    assert [m["role"] for m in doc["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert doc["messages"][2]["content"] == "Hello!"
    assert doc["messages"][2]["reasoning_content"] == "let me think"
    # /reset forgets the conversation but keeps the system prompt; /exit ends the loop
    assert rt.resets == 1 and rt.prompts[2] == "<system>be brief<user>fresh<assistant><think>\n"
    assert len(rt.prompts) == 3


def test_chat_trims_old_messages_to_fit_the_context():
    # byte tokens: each exchange is ~80 tokens; the reply reserve is min(max_tokens 64, ctx / 4)
    rt = FakeRuntime(reply="ok", ctx=260)
    rc, out, chat = _run_chat(rt, ["a" * 60, "b" * 60, "c" * 60])
    assert out.count("dropped the 2 oldest messages") == 1
    assert rt.prompts[1].startswith("<user>" + "a" * 60)
    assert rt.prompts[2].startswith("<user>" + "b" * 60)      # the first exchange is gone
    assert len(rt.prompts[2].encode()) + 64 <= 260
    rc, out, chat = _run_chat(FakeRuntime(ctx=100), ["z" * 150])
    assert "the context holds 100" in out and chat.session.turns == 0


def test_fit_messages_keeps_system_and_starts_with_a_user_turn():
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": r, "content": str(i)} for i, r in enumerate(["user", "assistant"] * 3 + ["user"])]
    kept, dropped, n = fit_messages(msgs, len, ctx=5, reserve=1)
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user"
    assert dropped == 4 and n == len(kept) == 4


# ----------------------------------------------------------------------------- in a real terminal


def test_interactive_chat_in_a_pty(tiny_q4km, tmp_path):
    import pexpect
    import prompt_toolkit  # noqa: F401
    env = hybrid_env(PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm",
               HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("NO_COLOR", None)
    # started with SIGINT ignored, as a background job of a non-interactive shell is (a CI
    # runner, `cmd &` in a script): Ctrl-C in the terminal must still stop a reply
    child = pexpect.spawn(sys.executable, ["-m", "hybrid.app.cli", str(tiny_q4km), "--device", "cpu",
                                           "--ctx", "4096", "--max-tokens", "12", "--temperature", "0"],
                          env=env, cwd=NEUTRAL_CWD, encoding="utf-8", timeout=120, dimensions=(50, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = io.StringIO()
    child.logfile_read = log
    stats = r"\[prompt (\d+) tok[^\]]*generated (\d+) tok, [\d.]+ tok/s \| first token [\d.]+ s([^\]]*)\]"
    released = r"\x1b\[\?2004l"      # prompt_toolkit hands the terminal back: the line was taken
    try:
        child.expect("Ctrl-D to leave")
        prompts = []
        for msg in ("hello there", "and now?"):
            child.expect(">>>")
            child.sendline(msg)
            child.expect(released)
            # the reply streams (dimmed thinking), then the stats line
            child.expect(r"\x1b\[2m")
            child.expect(stats)
            assert int(child.match.group(2)) == 12 and "stopped" not in child.match.group(3)
            prompts.append((int(child.match.group(1)), child.match.group(0)))
        # the second prompt holds the first exchange, whose tokens were reused from the cache
        assert prompts[1][0] > prompts[0][0] and "cached" in prompts[1][1]
        child.expect(">>>")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect(">>>")
        child.sendline("/set max_tokens 4000")
        child.expect("max_tokens = 4000")
        child.expect(">>>")
        child.sendline("hello there")
        child.expect(released)
        # Ctrl-C as soon as the reply streams: the fixture never plants EOS as the greedy
        # winner, so the reply would run to max_tokens (4000), seconds of margin
        child.expect(r"\x1b\[2m")
        child.sendintr()
        child.expect(stats)
        # after /reset the same first message makes the same prompt, with nothing cached
        assert int(child.match.group(1)) == prompts[0][0] and "cached" not in child.match.group(0)
        assert "stopped" in child.match.group(3) and int(child.match.group(2)) < 4000
        child.expect(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, log.getvalue()[-2000:]
    except pexpect.TIMEOUT:
        pytest.fail(f"the chat did not answer in time; its output:\n{log.getvalue()[-3000:]}")
    finally:
        if child.isalive():
            child.terminate(force=True)
