"""Tokenizer (llama.cpp vocab-only) and sandboxed chat templates."""

import pytest

from hybrid.fixtures import BOS, DEEPSEEK_R1_CHAT_TEMPLATE, EOS, split_gguf
from hybrid.runtime.tokenizer import ChatTemplateError, Tokenizer, render_chat

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]


# ----------------------------------------------------------------------------- templates


def test_r1_template_renders_with_think_prompt():
    text = render_chat(DEEPSEEK_R1_CHAT_TEMPLATE, MESSAGES, bos_token=BOS, eos_token=EOS)
    assert text == (
        f"{BOS}You are terse.<｜User｜>What is 2+2?<｜Assistant｜>\n\n4{EOS}"
        "<｜User｜>And 3+3?<｜Assistant｜><think>\n"
    )  # the earlier turn's reasoning is dropped; the new turn opens "<think>\n" (R1)


def test_r1_template_without_generation_prompt():
    text = render_chat(DEEPSEEK_R1_CHAT_TEMPLATE, MESSAGES[:2], bos_token=BOS,
                       add_generation_prompt=False)
    assert text.endswith("<｜User｜>What is 2+2?")


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{% set _ = messages.append({'role': 'x'}) %}ok",
])
def test_template_sandbox_blocks_python_internals(evil):
    with pytest.raises(ChatTemplateError, match="sandbox|unsafe|failed"):
        render_chat(evil, MESSAGES)


@pytest.mark.parametrize("evil", ["{{ ''.format.__self__ }}", "{{ cycler.__init__ }}",
                                  "{{ messages.__len__ }}"])
def test_template_sandbox_leaks_nothing(evil):
    # a lone unsafe attribute renders as undefined (empty) instead of raising: either way
    # no Python object reaches the output
    try:
        out = render_chat(evil, MESSAGES)
    except ChatTemplateError:
        return
    assert "<" not in out and "method" not in out and "function" not in out, out


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", MESSAGES, source="m.gguf")
    with pytest.raises(ChatTemplateError, match="chat template raised: nope"):
        render_chat("{{ raise_exception('nope') }}", MESSAGES)


# ----------------------------------------------------------------------------- llama.cpp vocab


@pytest.fixture(scope="module")
def tok(tiny_gguf):
    import llama_cpp  # noqa: F401
    t = Tokenizer(tiny_gguf("Q8_0"))
    yield t
    t.close()


def test_encode_matches_llama_cpp(tok, tiny_gguf):
    import llama_cpp

    text = "The quick brown fox, 42 times!\nHello <think>x</think>"
    llm = llama_cpp.Llama(model_path=str(tiny_gguf("Q8_0")), vocab_only=True, verbose=False)
    try:
        want = llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()
    ids = tok.encode(text)
    assert ids == want
    assert ids[0] == tok.bos_id and tok.add_bos  # fixture metadata: add_bos_token = true
    assert tok.encode(text, add_bos=False) == want[1:]
    assert tok.decode(ids) == text  # BOS is a control token: decodes to nothing


def test_think_is_one_token_and_chat_prompt_ends_in_think(tok):
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # template's BOS, not doubled
    think = tok.encode("<think>", add_bos=False)
    assert len(think) == 1
    assert ids[-2:] == think + tok.encode("\n", add_bos=False)


def test_stream_decoder_never_breaks_utf8(tok):
    text = "héllo wörld — 世界 🙂 ok"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text.encode()) // 4  # byte-level pieces: multibyte chars split
    dec = tok.stream_decoder()
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_eos_is_end_of_generation(tok):
    assert tok.is_eog(tok.eos_id)
    assert not tok.is_eog(tok.encode("a", add_bos=False)[0])


def test_missing_template_is_a_clear_error(tok):
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(ChatTemplateError, match="no tokenizer.chat_template.*plain text"):
            tok.apply_chat_template(MESSAGES)
    finally:
        tok.chat_template = saved


def test_split_file_tokenizer(tok, tiny_gguf, tmp_path):
    parts = split_gguf(tiny_gguf("Q8_0"), tmp_path / "m", 3)
    t2 = Tokenizer(parts[0])
    try:
        text = "What is the capital of France?"
        assert t2.encode(text) == tok.encode(text)
        assert t2.chat_template == tok.chat_template
    finally:
        t2.close()
