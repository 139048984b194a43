"""Inventories from real GGUF headers: a 400 GB sparse file shaped like DeepSeek-R1 Q4_K_M
(planned in < 2 s reading < 10 MB), split sets, tiny fixtures, and the RSS prediction."""

import dataclasses
import os
import time

import psutil
import pytest
from gguf import GGUFValueType as VT

from hybrid.fixtures import TinyConfig, encode_kv, split_gguf, write_gguf
from placement import hardware, quant_rules
from placement.inventory import from_gguf
from placement.presets import build_preset, deepseek2_tensors, preset_config
from placement.solver import Policy, Workload, predict_cpu_rss_growth, solve


def _r1_header_file(path):
    """DeepSeek-R1 Q4_K_M as llama.cpp wrote it: its metadata (vocabulary and merges included,
    ~4.6 MB) and 1025 tensor infos; the data region is a hole (sparse file of 404 GB)."""
    cfg, _, mix = preset_config("deepseek-r1-q4_k_m")
    hp = cfg["hparams"]
    kv = [encode_kv("general.architecture", VT.STRING, "deepseek2"),
          encode_kv("general.name", VT.STRING, "DeepSeek R1 (sparse test file)"),
          encode_kv("general.file_type", VT.UINT32, 15)]
    for k, v in hp.items():
        key = "deepseek2." + k
        if isinstance(v, bool):
            kv.append(encode_kv(key, VT.BOOL, v))
        elif isinstance(v, int):
            kv.append(encode_kv(key, VT.UINT32, v))
        else:
            kv.append(encode_kv(key, VT.FLOAT32, v))
    n_vocab = hp["vocab_size"]
    kv += [encode_kv("tokenizer.ggml.model", VT.STRING, "gpt2"),
           encode_kv("tokenizer.ggml.tokens", VT.ARRAY, [f"tok{i}" for i in range(n_vocab)], VT.STRING),
           encode_kv("tokenizer.ggml.token_type", VT.ARRAY, [1] * n_vocab, VT.INT32),
           encode_kv("tokenizer.ggml.merges", VT.ARRAY, [f"t {i}" for i in range(127741)], VT.STRING)]
    tensors = [(name, quant_rules.tensor_type(name, ne, mix, n_layer=61, n_expert=256), ne)
               for name, ne in deepseek2_tensors(hp)]
    return write_gguf(path, b"".join(kv), len(kv), tensors, None)


@pytest.fixture(scope="module")
def sparse_r1(tmp_path_factory):
    return _r1_header_file(tmp_path_factory.mktemp("sparse") / "DeepSeek-R1-Q4_K_M.gguf")


def test_sparse_400gb_header_planned_fast_reading_little(sparse_r1):
    st = os.stat(sparse_r1)
    assert st.st_size > 400e9 and st.st_blocks * 512 < 64 << 20      # really sparse
    hw = hardware.from_profile("2x256g-48g")
    proc = psutil.Process()
    read0 = proc.io_counters().read_chars
    t0 = time.perf_counter()
    inv = from_gguf(sparse_r1)
    plan = solve(inv, hw, Workload(), Policy(numa="interleave"))
    dt = time.perf_counter() - t0
    read = proc.io_counters().read_chars - read0
    assert dt < 2.0, f"planning took {dt:.2f} s"
    assert read < 10e6, f"read {read / 1e6:.1f} MB"
    assert plan.fits and len(inv) == 1025
    # the header and the preset describe the same file, byte for byte
    preset = build_preset("deepseek-r1-q4_k_m")
    assert inv.total_bytes == preset.total_bytes and inv.count_by_type() == preset.count_by_type()
    assert inv.model == dataclasses.replace(preset.model, name=inv.model.name)
    assert inv.quantization == "Q4_K_M" and inv.file_bytes == st.st_size


def test_tiny_fixture_inventory(tiny_f32):
    cfg = TinyConfig()
    inv = from_gguf(tiny_f32)
    m = inv.model
    assert (m.n_layer, m.n_dense_lead, m.n_embd, m.n_expert, m.n_expert_used) == \
        (cfg.n_layer, cfg.n_dense, cfg.n_embd, cfg.n_expert, cfg.n_expert_used)
    assert (m.kv_lora_rank, m.qk_rope_dim, m.qk_nope_dim, m.v_head_dim) == \
        (cfg.kv_lora_rank, cfg.qk_rope, cfg.qk_nope, cfg.v_head)
    assert m.kv_bytes_per_token == cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope) * 2
    assert inv.moe_layers() == list(range(cfg.n_dense, cfg.n_layer))
    assert inv.count_by_type() == {"F32": len(inv)}
    assert inv.total_bytes < inv.file_bytes < inv.total_bytes + (1 << 20)
    e = inv.expert_bytes(cfg.n_dense)
    assert e == 3 * cfg.n_embd * cfg.expert_ffn * 4


def test_mla_split_layout(tiny_gguf):
    inv = from_gguf(tiny_gguf("F32", mla_split=True))
    cfg = TinyConfig()
    groups = {t.name: t.group for t in inv.tensors}
    assert groups["blk.0.attn_k_b.weight"] == "attention.kv_b"
    # newer converters: key_length_mla / value_length_mla give the decompressed head sizes
    assert (inv.model.qk_nope_dim, inv.model.v_head_dim) == (cfg.qk_nope, cfg.v_head)


def test_split_set_inventory(tiny_f32, tmp_path):
    parts = split_gguf(tiny_f32, tmp_path / "tiny", 3)
    whole, split = from_gguf(tiny_f32), from_gguf(parts[0])
    assert [(t.name, t.n_bytes, t.ggml_type) for t in whole.tensors] == \
        [(t.name, t.n_bytes, t.ggml_type) for t in split.tensors]
    assert split.files == [str(p) for p in parts]
    assert split.file_bytes == sum(os.path.getsize(p) for p in parts)


def test_unsupported_architecture(tmp_path):
    kv = [encode_kv("general.architecture", VT.STRING, "gemma3"), encode_kv("gemma3.block_count", VT.UINT32, 1)]
    p = write_gguf(tmp_path / "gemma3.gguf", b"".join(kv), len(kv), [("token_embd.weight", 0, (32, 8))], None)
    with pytest.raises(ValueError, match="'gemma3' is not supported; supported: deepseek2, glm4moe, llama, qwen2moe, "
                                         "qwen3moe"):
        from_gguf(p)


def test_missing_metadata_names_the_key(tmp_path):
    kv = [encode_kv("general.architecture", VT.STRING, "deepseek2"),
          encode_kv("deepseek2.rope.dimension_count", VT.UINT32, 16)]
    p = write_gguf(tmp_path / "half.gguf", b"".join(kv), len(kv), [("token_embd.weight", 0, (32, 8))], None)
    with pytest.raises(ValueError, match="'deepseek2.block_count' is missing"):
        from_gguf(p)
    kv += [encode_kv(f"deepseek2.{k}", VT.UINT32, 8)
           for k in ("block_count", "embedding_length", "attention.head_count")]
    p = write_gguf(tmp_path / "half2.gguf", b"".join(kv), len(kv), [("token_embd.weight", 0, (32, 8))], None)
    with pytest.raises(ValueError, match="'deepseek2.attention.key_length' is missing"):
        from_gguf(p)


def test_predicted_cpu_rss_growth(tiny_f32):
    """The prediction the runtime's end-to-end memory check compares against (CPU only):
    weights as the runtime holds them, the KV cache, the workspace; no fixed overheads."""
    inv = from_gguf(tiny_f32)
    plan = solve(inv, hardware.detect(), Workload(context=1024, prefill_chunk=64), Policy(use_gpu=False))
    cpu = plan.devices["cpu"].breakdown
    got = predict_cpu_rss_growth(tiny_f32, context=1024, prefill_chunk=64)
    assert got == plan.predicted_cpu_rss_growth()
    # independently of the Plan's arithmetic, from the file (hybrid's own header parser) and
    # the fixture's shape: every tensor as stored (F32), plus the file pages read once to copy
    # the non-expert tensors other than the embedding (gathered from the mmap per call), plus
    # the latent KV cache, plus the workspace
    from hybrid.gguf_file import GGUFFile

    with GGUFFile(tiny_f32) as g:
        sizes = {n: t.n_bytes for n, t in g.tensors.items()}
        longest_row = max(t.ne[0] for t in g.tensors.values() if len(t.ne) >= 2)
    stored = sum(sizes.values())
    copied = sum(b for n, b in sizes.items() if "_exps." not in n and n != "token_embd.weight")
    cfg = TinyConfig()
    kv = 1024 * cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope) * 4
    # each CPU worker's prefill-tile scratch for the longest row (a rewritten Q5_K 16-row group
    # of the AVX-512 tiles per 256 weights: per row a byte per quant, 8 scale and 4 min pairs of
    # int16, d and dmin as floats; and prepared activation scales, 4 B per weight): the expert
    # engine's and the linears' pool's workers, one per allowed cpu each
    group_block = 16 * (256 + 8 * 2 * 2 + 4 * 2 * 2 + 2 * 4)
    scratch = 2 * len(os.sched_getaffinity(0)) * (-(-longest_row // 256) * group_block + 4 * longest_row)
    assert cpu["tile_scratch"] == scratch
    # the expert engine's buffers: x and y (64 tokens x D fp32), ids and weights (K + 1 a token);
    # at the first forward a chunk's scratch: the F32 experts' activation rows in fp32 for gate
    # and up, K h rows a token and their fp32 copies for down, the slot lists, per-expert counts
    # (the dense FFN and the shared expert are F32: torch linears, not engine layers)
    D, F, E, K = cfg.n_embd, cfg.expert_ffn, cfg.n_expert, cfg.n_expert_used
    io = 2 * 64 * D * 4 + 2 * 64 * (K + 1) * 4
    engine = 64 * (4 * D + 4 * D + 4 * K * F + 4 * K * F + 4 * K) + 4 * (E + 1) + 8 * E + 8 * (E + 1)
    assert (cpu["expert_io"], cpu["expert_scratch"]) == (io, engine)
    assert got == stored + copied + kv + cpu["workspace"] + scratch + io + engine
    assert 0 < cpu["workspace"] < 8 << 20
    assert plan.predicted_cpu_rss_growth(include_workspace=False) == got - cpu["workspace"] - scratch - engine


def test_quantized_small_linears_become_f32_copies_on_cpu(tiny_q4km):
    inv = from_gguf(tiny_q4km)
    plan = solve(inv, hardware.detect(), Workload(context=512), Policy(use_gpu=False, cpu_linear_min_bytes=1 << 20))
    cpu = plan.devices["cpu"].breakdown
    lin = [t for t in inv.tensors if t.role == "attention"]
    # the tiny model's linears are all < 1 MiB: held as f32, their file pages read once
    assert cpu["attention"] == sum(t.n_elements * 4 for t in lin)
    # without a GPU the default is the run's (hybrid.load): every quantized linear native, in place
    native = solve(inv, hardware.detect(), Workload(context=512), Policy(use_gpu=False))
    assert native.cpu_linear_min_bytes == 0
    from placement.solver import CPU_NATIVE_TYPES

    # (kv_b is split and absorbed at load: f32 on the CPU whatever its size)
    assert native.devices["cpu"].breakdown["attention"] == sum(
        t.n_bytes if t.ggml_type in CPU_NATIVE_TYPES and t.group != "attention.kv_b" else t.n_elements * 4
        for t in lin) < cpu["attention"]
    assert cpu["file_pages"] > 0
    assert cpu["routed_experts"] == inv.bytes_by_role()["routed_experts"]


def test_act_row_bytes_are_the_native_activation_rows():
    """The Plan's size of the activation row a CPU dot reads, for every type the native code
    computes, is the length of the row hybrid._native quantizes (its own act_row_bytes)."""
    import numpy as np

    from hybrid import _native
    from placement.ggml import act_row_bytes

    x = np.linspace(-1, 1, 2048, dtype=np.float32)
    types = _native.supported_types()
    assert {8, 3, 12, 0} <= set(types)   # q8_32, q8_1, q8_K and float rows among them
    for t in types:
        assert act_row_bytes(t, x.size) == _native.quantize_activations(x, t).size, t
