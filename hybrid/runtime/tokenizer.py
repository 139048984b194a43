"""GGUF tokenizer (llama.cpp's, loaded vocab-only) and sandboxed chat-template rendering.

Why llama.cpp's tokenizer: it is the one the oracle uses, it reads every GGUF vocabulary
type (DeepSeek's byte-level BPE with its `deepseek-v3` pre-tokenizer included) and it opens
split files. The chat template comes from `tokenizer.chat_template` and is rendered with
jinja2's immutable sandbox: a GGUF is untrusted input and its template must not reach Python
internals (attribute access like `__class__` raises inside the sandbox).
"""

from __future__ import annotations

import codecs
import datetime
import os
from typing import Iterable, Sequence

__all__ = ["ChatTemplateError", "StreamDecoder", "Tokenizer", "TokenizerError", "render_chat"]


class TokenizerError(ValueError):
    """The tokenizer could not be loaded from a GGUF file."""


class ChatTemplateError(ValueError):
    """A chat template is missing, malformed, or tried something the sandbox forbids."""


def _raise_exception(message):
    raise ChatTemplateError(f"chat template raised: {message}")


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # trim_blocks / lstrip_blocks as in transformers' apply_chat_template, so templates
        # written for HF render the same text here.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            keep_trailing_newline=False)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        _ENV = env
    return _ENV


def render_chat(template: str, messages: Sequence[dict], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, source: str = "template",
                **extra) -> str:
    """Render a chat template (jinja2 text) for `messages` in a sandbox."""
    import jinja2
    from jinja2.sandbox import SecurityError

    try:
        tmpl = _env().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: chat template does not parse: {e}") from None
    try:
        return tmpl.render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=add_generation_prompt, **extra)
    except SecurityError as e:
        raise ChatTemplateError(f"{source}: chat template tried an unsafe operation and was "
                                f"stopped by the sandbox: {e}") from None
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{source}: chat template failed to render: {e}") from None


class StreamDecoder:
    """Token ids -> text pieces without breaking UTF-8 sequences split across tokens."""

    def __init__(self, tokenizer: "Tokenizer"):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class Tokenizer:
    """llama.cpp's tokenizer for a GGUF model (single file or first part of a split set)."""

    def __init__(self, path, metadata: dict | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise TokenizerError(
                "llama-cpp-python is needed for the tokenizer: pip install llama-cpp-python") from None
        self.path = os.fspath(path)
        try:
            self._llama = llama_cpp.Llama(model_path=self.path, vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: llama.cpp could not load the vocabulary: {e}") from None
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        if metadata is None:
            from hybrid.gguf_file import GGUFFile

            with GGUFFile(self.path) as g:
                metadata = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
        self.n_vocab = int(self._llama.n_vocab())
        self.bos_id = int(self._llama.token_bos())
        self.eos_id = int(self._llama.token_eos())
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.chat_template = metadata.get("tokenizer.chat_template")
        self._piece_cache: dict[int, bytes] = {}
        tokens = metadata.get("tokenizer.ggml.tokens")
        self.bos_token = tokens[self.bos_id] if tokens is not None and 0 <= self.bos_id < len(tokens) else ""
        self.eos_token = tokens[self.eos_id] if tokens is not None and 0 <= self.eos_id < len(tokens) else ""

    # -- ids <-> text ------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Tokenize; BOS is added when the vocabulary asks for it (add_bos=None) or forced."""
        add = self.add_bos if add_bos is None else add_bos
        ids = self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if add and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's piece (control tokens render as nothing)."""
        b = self._piece_cache.get(token)
        if b is None:
            b = self._llama.detokenize([token], special=False)
            self._piece_cache[token] = b
        return b

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(int(t)) for t in ids).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other end tokens llama.cpp knows."""
        return bool(self._lib.llama_vocab_is_eog(self._vocab, int(token)))

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            template: str | None = None, **extra) -> str:
        tmpl = template if template is not None else self.chat_template
        if not tmpl:
            raise ChatTemplateError(
                f"{self.path}: the GGUF has no tokenizer.chat_template; pass a plain text prompt "
                f"instead of messages, or give a template (chat_template=...)")
        return render_chat(tmpl, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           add_generation_prompt=add_generation_prompt, source=self.path, **extra)

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    template: str | None = None, **extra) -> list[int]:
        """Render the chat template and tokenize it; the template places BOS itself (added
        only if the vocabulary wants one and the template left it out)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        template=template, **extra)
        ids = self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def close(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is not None:
            self._llama = None
            try:
                llama.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
