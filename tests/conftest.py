"""Shared fixtures: tiny deepseek2 and GQA-family GGUF models, built once per test session.

Set HYBRID_FIXTURE_CACHE=/some/dir to keep the built files across sessions (they are named by a
hash of the config, the quantization type and the builder version, so stale files are never
reused).

    def test_something(tiny_gguf):
        path = tiny_gguf("Q8_0", mla_split=True, n_group=0)   # any TinyConfig field
    def test_other(tiny_q4km): ...                            # default config, Q4_K_M
"""

import os
import pathlib

import pytest

from hybrid.fixtures import TinyConfig, build


@pytest.fixture(scope="session")
def fixture_cache(tmp_path_factory) -> pathlib.Path:
    env = os.environ.get("HYBRID_FIXTURE_CACHE")
    if env:
        path = pathlib.Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("gguf-fixtures")


@pytest.fixture(scope="session")
def tiny_gguf(fixture_cache):
    """Factory: tiny_gguf(ftype="Q4_K_M", **TinyConfig fields) -> path of the built GGUF."""

    def make(ftype: str = "Q4_K_M", **cfg_kwargs) -> pathlib.Path:
        if ftype.upper() != "F32":
            import llama_cpp  # noqa: F401  (a dependency: its absence must fail, not skip)
        return build(TinyConfig(**cfg_kwargs), ftype, fixture_cache)

    return make


@pytest.fixture(scope="session")
def tiny_f32(tiny_gguf) -> pathlib.Path:
    return tiny_gguf("F32")


@pytest.fixture(scope="session")
def tiny_q4km(tiny_gguf) -> pathlib.Path:
    return tiny_gguf("Q4_K_M")


@pytest.fixture(scope="session")
def tiny_q8(tiny_gguf) -> pathlib.Path:
    return tiny_gguf("Q8_0")


@pytest.fixture(scope="session")
def gqa_gguf(fixture_cache):
    """Factory: gqa_gguf(arch, ftype="Q4_K_M", **GQAConfig fields) -> path of a tiny model of
    a GQA-family architecture (qwen3moe, qwen2moe, llama, glm4moe; GQAConfig.of's layout)."""
    from hybrid.fixtures import GQAConfig

    def make(arch: str, ftype: str = "Q4_K_M", **cfg_kwargs) -> pathlib.Path:
        if ftype.upper() != "F32":
            import llama_cpp  # noqa: F401  (a dependency: its absence must fail, not skip)
        return build(GQAConfig.of(arch, **cfg_kwargs), ftype, fixture_cache)

    return make
