"""Semantic fuzzing: well-formed GGUF files whose metadata disagrees with their tensors.

For a small F32 file of every architecture, one metadata integer is changed (0, 1, +-1, x2,
2^31-1, 2^32-1), or one tensor dropped, retyped in the header (its data left in place, so the
sizes no longer add up) or reshaped. Every variant goes through the checks the CLI makes before
planning (header parse, ModelArgs, tensor specs: hybrid.app.cli.check_model), in process, and
either passes or is refused with one line that names the file and a key or a tensor. A sample
then goes through the real CLI in subprocesses under an address-space limit: no traceback, no
signal, one error line or a generation.
"""

from __future__ import annotations

import os
import random
import re
import resource
import subprocess
import sys

import pytest
from gguf import GGUFValueType

from hybrid.app.cli import UserError, check_model
from hybrid.fixtures.gguf_writer import kv_entries, rewrite_gguf
from hybrid.gguf_file import GGUFFile
from subproc import NEUTRAL_CWD, hybrid_env

ARCHS = ["deepseek2", "qwen3moe", "qwen2moe", "llama", "glm4moe"]
_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
# F16, BF16, Q8_0, Q4_K, Q6_K, Q4_1 (computable, smaller than F32); F64, I64 (larger: the data no
# longer fits); I8, TQ1_0, I32 (not computable; I32 of F32's size). Any change of size breaks
# the back-to-back layout of the data, which the header parser refuses
_RETYPES = [1, 30, 8, 12, 14, 3, 28, 27, 24, 34, 26]
_ERR = re.compile(r"\berror\b", re.I)


@pytest.fixture(scope="module")
def sources(tiny_gguf, gqa_gguf):
    return {arch: tiny_gguf("F32") if arch == "deepseek2" else gqa_gguf(arch, "F32") for arch in ARCHS}


def _variants(src):
    """(label, rewrite_gguf keyword arguments) of every damaged copy of src."""
    with GGUFFile(src) as g:
        meta, tensors = dict(g.metadata), dict(g.tensors)
    out = []
    for key, vt, _ in kv_entries(src):
        if vt not in _INT_TYPES or key.startswith("general."):
            continue
        v = int(meta[key])
        for new in sorted(_mutations(v)):
            out.append((f"{key}={new}", {"metadata": {key: new}}))
    # I32: F32's size, so the layout holds and only the type check can refuse it
    out.append(("retype output_norm.weight 26", {"retype": {"output_norm.weight": 26}}))
    rng = random.Random(17)
    for name, t in tensors.items():
        out.append((f"drop {name}", {"drop": [name]}))
        for gt in rng.sample(_RETYPES, 3):
            out.append((f"retype {name} {gt}", {"retype": {name: gt}}))
        ne = tuple(t.ne)
        if len(ne) >= 2 and ne[0] != ne[1]:
            out.append((f"reshape {name} swapped", {"reshape": {name: (ne[1], ne[0]) + ne[2:]}}))
        if ne[0] % 2 == 0 and ne[0] > 32:
            out.append((f"reshape {name} halved", {"reshape": {name: (ne[0] // 2, 2 * ne[1] if len(ne) > 1 else 2) + ne[2:]}}))
    return out, set(meta), set(tensors)


def _names_a_key_or_tensor(msg: str, keys, tensors) -> bool:
    """A metadata key of the file, or a tensor (of the file, or one the model expects)."""
    return (any(k in msg for k in keys) or re.search(r"metadata [a-z0-9_]+\.[a-z_.]+ ", msg)
            or re.search(r"tensor '[a-z0-9_.]+'", msg))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_passes_or_is_refused_in_one_line(sources, arch, tmp_path):
    src = sources[arch]
    variants, keys, tensors = _variants(src)
    assert len(variants) >= 250, len(variants)
    refused, passed = [], []
    for i, (label, kw) in enumerate(variants):
        path = tmp_path / f"v{i}.gguf"
        rewrite_gguf(src, path, data=False, **kw)
        try:
            assert check_model(str(path)) == arch
            passed.append(label)
        except UserError as e:      # any other exception fails the test with its traceback
            msg = str(e)
            assert "\n" not in msg and msg.startswith(str(path)), (label, msg)
            assert _names_a_key_or_tensor(msg, keys, tensors), (label, msg)
            refused.append(label)
        path.unlink()
    print(f"{arch}: {len(variants)} variants, {len(refused)} refused, {len(passed)} passed")
    # the dangerous ones are among the refused
    with GGUFFile(src) as g:
        meta = dict(g.metadata)
    for must in _must_refuse(arch, meta):
        assert must in refused, must
    assert len(refused) > len(variants) // 2


def _must_refuse(arch, meta):
    """Variants the checks must refuse: those that crash or misbehave further on."""
    p = arch + "."
    out = ["drop token_embd.weight", "retype output_norm.weight 26"]
    v = meta[p + "block_count"]
    out += [f"{p}block_count={n}" for n in (0, v - 1, v + 1, 2**32 - 1)]
    out += [f"{p}embedding_length={2**32 - 1}", f"{p}context_length=0", f"{p}context_length={2**32 - 1}",
            f"tokenizer.ggml.eos_token_id={2**31 - 1}"]
    E = meta.get(p + "expert_count", 0)
    if E > 1:
        out += [f"{p}expert_used_count={n}" for n in (0, 2**32 - 1) if n != meta[p + "expert_used_count"]]
        out += [f"{p}expert_used_count={E + 1}"] if E + 1 in _mutations(meta[p + "expert_used_count"]) else []
    G = meta.get(p + "expert_group_count", 0)
    if G > 1 and G in _mutations(meta[p + "expert_group_used_count"]):
        out.append(f"{p}expert_group_used_count={G}")
    if p + "rope.dimension_count" in meta:
        out.append(f"{p}rope.dimension_count={meta[p + 'rope.dimension_count'] + 1}")
    return out


def _mutations(v: int) -> set:
    return {n for n in (0, 1, v - 1, v + 1, 2 * v, 2**31 - 1, 2**32 - 1) if n >= 0 and n != v}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


# (arch, label, rewrite_gguf keywords): refused ones and ones that must run
CLI_CASES = [
    ("deepseek2", "block_count 2^32-1", {"metadata": {"deepseek2.block_count": 2**32 - 1}}),
    ("deepseek2", "value_length_mla 63", {"metadata": {"deepseek2.attention.value_length": 63}}),
    ("deepseek2", "rope dims 33", {"metadata": {"deepseek2.rope.dimension_count": 33}}),
    ("deepseek2", "kv_lora_rank 255", {"metadata": {"deepseek2.attention.kv_lora_rank": 255}}),
    ("deepseek2", "bos id 2^31-1", {"metadata": {"tokenizer.ggml.bos_token_id": 2**31 - 1}}),
    ("deepseek2", "retyped F64", {"retype": {"blk.0.attn_kv_a_mqa.weight": 28}}),
    ("deepseek2", "head_count_kv (unused)", {"metadata": {"deepseek2.attention.head_count_kv": 1}}),
    ("deepseek2", "8 groups of 2 experts", {"metadata": {"deepseek2.expert_group_count": 8}}),
    ("deepseek2", "no shared expert", {"metadata": {"deepseek2.expert_shared_count": 0}}),
    ("glm4moe", "MTP block run", {"metadata": {"glm4moe.nextn_predict_layers": 0}}),
    ("qwen3moe", "expert_used_count 2^32-1", {"metadata": {"qwen3moe.expert_used_count": 2**32 - 1}}),
    ("qwen3moe", "dropped k norm", {"drop": ["blk.1.attn_k_norm.weight"]}),
    ("qwen2moe", "context_length 0", {"metadata": {"qwen2moe.context_length": 0}}),
    ("llama", "head_count 2^31-1", {"metadata": {"llama.attention.head_count": 2**31 - 1}}),
    ("llama", "retyped F16", {"retype": {"blk.0.ffn_down_exps.weight": 1}}),
    ("qwen2moe", "norm retyped Q8_0", {"retype": {"blk.1.attn_norm.weight": 8}}),
    ("glm4moe", "leading dense 2^32-1", {"metadata": {"glm4moe.leading_dense_block_count": 2**32 - 1}}),
    ("glm4moe", "rope dims 2x", {"metadata": {"glm4moe.rope.dimension_count": 64}}),
]


@pytest.mark.parametrize("arch,label,kw", CLI_CASES, ids=[f"{a}-{l}" for a, l, _ in CLI_CASES])
def test_real_cli_never_crashes(sources, arch, label, kw, tmp_path):
    src = sources[arch]
    path = tmp_path / "m.gguf"
    try:
        rewrite_gguf(src, path, **kw)
    except KeyError:
        pytest.fail(f"{label}: the fixture has no such key: {kw}")
    r = subprocess.run([sys.executable, "-m", "hybrid.app.cli", str(path), "-p", "hi", "--max-tokens", "2",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120, env=hybrid_env(),
                       cwd=NEUTRAL_CWD, preexec_fn=_limit_memory)
    assert r.returncode >= 0, f"{label}: killed by signal {-r.returncode}"
    assert "Traceback" not in r.stderr, f"{label}:\n{r.stderr[-3000:]}"
    if r.returncode:
        errors = [ln for ln in r.stderr.splitlines() if _ERR.search(ln)]
        assert len(errors) == 1 and str(path) in errors[0], f"{label}: {r.stderr[-2000:]}"
    else:
        assert r.stdout.strip(), label


DRY_RUN_CASES = [("deepseek2", {"deepseek2.attention.kv_lora_rank": 255}),
                 ("deepseek2", {"deepseek2.block_count": 2**32 - 1}),
                 ("glm4moe", {"glm4moe.expert_group_count": 3}),
                 ("qwen3moe", {"tokenizer.ggml.eos_token_id": 2**31 - 1})]


def test_dry_run_refuses_with_the_loaders_line_without_torch(sources, tmp_path):
    """The plan of an inconsistent file is refused (exit 2) with the line the loader's checks
    give, and the dry-run still never imports torch."""
    for i, (arch, meta) in enumerate(DRY_RUN_CASES):
        path = tmp_path / f"bad{i}.gguf"
        rewrite_gguf(sources[arch], path, metadata=meta, data=False)
        with pytest.raises(UserError) as e:
            check_model(str(path))
        code = ("import sys; from placement.cli import main; rc = main([sys.argv[1]]); "
                "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, (meta, r.returncode, r.stderr)
        assert r.stderr.strip().splitlines() == [f"hybrid-run --dry-run: error: {e.value}"], r.stderr
    good = sources["glm4moe"]
    r = subprocess.run([sys.executable, "-m", "placement.cli", str(good)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_checked_types_are_the_computed_ones():
    from hybrid.backends import dequant
    from hybrid.models.specs import COMPUTABLE_TYPES

    assert COMPUTABLE_TYPES == dequant.SUPPORTED_TYPES


def test_a_type_that_disagrees_with_the_data_is_refused_by_the_parser(sources, tmp_path):
    """Tensors lie back to back (llama.cpp's rule): retyped to a bigger type, a tensor would
    read into the next one's bytes; to a smaller one, it leaves a gap."""
    src = sources["qwen3moe"]
    for gtype, name in ((28, "F64"), (1, "F16")):
        path = rewrite_gguf(src, tmp_path / f"{name}.gguf", retype={"blk.0.attn_q.weight": gtype}, data=False)
        with pytest.raises(UserError, match=rf"tensor 'blk.0.attn_k.weight' has data offset \d+, expected \d+ "
                                            rf"after tensor 'blk.0.attn_q.weight' \({name}, ne=.*disagrees"):
            check_model(str(path))
