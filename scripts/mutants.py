"""Planted bugs that the test suite must notice: a curated list of mutants.

Each mutant is one small text replacement in one file (MUTANTS below: name, file, old, new,
tests). For each, this script brings a scratch copy of the working tree up to date (the files
git tracks or would track, plus the compiled hybrid/_native*.so), applies the replacement, runs
the named tests there (PYTHONPATH = the copy), restores the file, and reports `caught` (some test failed) or `survived` (all passed: a hole in
the suite). Mutants of native/ or CMakeLists.txt rebuild the extension in their copy first
(a scratch tree kept between runs, so only the mutated file recompiles).

    python scripts/mutants.py                  # every mutant; exit 0 when all were caught
    python scripts/mutants.py --list           # names, files, tests
    python scripts/mutants.py rope-sign-flip 'router-*'    # some, by name or glob
    python scripts/mutants.py --baseline       # the same tests on the unmutated copy: must pass

Not part of the README's test command (~10 minutes for the list, ~40 s per native mutant). Fixtures come from
HYBRID_FIXTURE_CACHE (default /tmp/fixture-cache), shared with the dev test command, so they
are built once.

To add a mutant: append a Mutant(name, file, old, new, tests, why) to MUTANTS. `old` must occur
exactly once in `file` (else the mutant is reported `stale`); `tests` are pytest arguments
(node ids, or a file followed by "-k", "expression").
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # path relative to the repository root
    old: str  # text that must occur exactly once in file
    new: str  # its replacement
    tests: tuple[str, ...]  # pytest arguments run in the mutated copy
    why: str = ""  # the bug it stands for, or the issue case it guards

    @property
    def native(self) -> bool:
        return self.file.startswith("native/") or self.file == "CMakeLists.txt"


T_DS2 = "tests/test_deepseek2.py"
T_GPU = "tests/test_gpu_path.py"
T_NAT = "tests/test_native_decode.py"
T_GQA = "tests/test_gqa_models.py"
T_GQE = "tests/test_gqa_engine_paths.py"
T_NGQA = "tests/test_native_gqa.py"
T_DEMO = "tests/test_demo_smollm2.py"
T_PLA = "tests/test_placement_archs.py"
T_FUZZ = "tests/test_fuzz_models.py"
T_ATOM = "tests/test_atomic_files.py"

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ engine / model skeleton
    Mutant("blocks-bypassed", "hybrid/models/transformer.py",
           "        x = x + self.attn(x, pos0, cache, rope, attn_mode)\n"
           "        return x + self.ffn(self.ffn_norm(x))",
           "        return x",
           (f"{T_DS2}::test_greedy_32_tokens_equal_llama_cpp",),
           "issue 20 case 1: every block returns its input; the greedy test must notice"),
    Mutant("attention-zeroed", "hybrid/models/transformer.py",
           "        x = x + self.attn(x, pos0, cache, rope, attn_mode)\n",
           "        x = x + 0 * self.attn(x, pos0, cache, rope, attn_mode)\n",
           (f"{T_DS2}::test_top1_equals_references_where_the_blocks_decide",),
           "issue 20 case 1: the top-1 checks must notice attention computing nothing"),
    Mutant("final-norm-skipped", "hybrid/models/transformer.py",
           "        return self.lm_head(self.norm(x))                                  # [T, B]",
           "        return self.lm_head(x)                                             # [T, B]",
           (f"{T_DS2}::test_matches_float64_reference",),
           "final RMSNorm skipped"),
    Mutant("prefill-chunk-drops-last-token", "hybrid/runtime/engine.py",
           "            chunk = tokens[c0:c0 + step]\n",
           "            chunk = tokens[c0:c0 + step]\n"
           "            chunk = chunk if chunk.numel() == 1 or c0 + step < n else chunk[:-1]\n",
           (f"{T_DS2}::test_chunked_prefill_equals_one_shot", f"{T_DS2}::test_matches_float64_reference"),
           "the last token of a prompt is never run"),
    Mutant("kv-cache-append-off-by-one", "hybrid/runtime/kv_cache.py",
           "        rows[pos0:end, :C] = latent\n        rows[pos0:end, C:] = k_pe\n        return rows[:end]",
           "        rows[pos0:end, :C] = latent\n        rows[pos0:end, C:] = k_pe\n"
           "        return rows[:end - 1] if end > 1 else rows[:end]",
           (f"{T_DS2}::test_cached_decode_equals_full_sequence", f"{T_DS2}::test_matches_float64_reference"),
           "a KV-cache slice one row short: each token misses itself"),
    Mutant("kv-cache-write-at-wrong-rows", "hybrid/runtime/kv_cache.py",
           "        rows.index_copy_(0, pos, torch.cat((latent, k_pe), dim=-1).to(rows.dtype))",
           "        rows.index_copy_(0, (pos + 1).clamp(max=rows.shape[0] - 1), "
           "torch.cat((latent, k_pe), dim=-1).to(rows.dtype))",
           (f"{T_GPU}::test_segmented_static_decode_equals_eager",),
           "the fixed-shape (CUDA-graph) step writes the cache one row late"),
    # ------------------------------------------------------------------ MLA attention
    Mutant("rope-sign-flip", "hybrid/models/layers.py",
           "            y = torch.view_as_real(xc * f).flatten(-2).to(x.dtype)",
           "            y = torch.view_as_real(xc * f.conj()).flatten(-2).to(x.dtype)",
           (T_DS2, "-k", "exactly_on_f32 and default"),
           "RoPE rotates the wrong way (normal pair layout)"),
    Mutant("rope-table-sign-flip", "hybrid/models/layers.py",
           "        self.freqs = torch.polar(torch.full_like(theta, mscale), theta).to(torch.complex64)",
           "        self.freqs = torch.polar(torch.full_like(theta, mscale), -theta).to(torch.complex64)",
           (T_DS2, "-k", "test_matches_llama_cpp and not exactly and not cuda and Q8_0 and default"),
           "the shared cos/sin table (native attention reads it too) rotates the wrong way"),
    Mutant("kq-scale-without-mscale", "hybrid/models/args.py",
           "        return mscale * mscale / math.sqrt(self.qk_head_dim)",
           "        return mscale / math.sqrt(self.qk_head_dim)",
           (f"{T_DS2}::test_model_args_from_fixture",),
           "YaRN's mscale applied once instead of squared"),
    Mutant("mla-kv-b-split-swapped", "hybrid/models/deepseek2.py",
           "            wk, wv = kv_b[:, :N], kv_b[:, N:]",
           "            wk, wv = kv_b[:, V:], kv_b[:, :V]",
           (T_DS2, "-k", "float64_reference and default"),
           "attn_kv_b split with the value part first (same sizes in the fixture)"),
    Mutant("mla-rotated-head", "hybrid/backends/native.py",
           "        self._rows = np.ascontiguousarray(q).reshape(H, N, -1)         # [H, out, row bytes]",
           "        self._rows = np.ascontiguousarray(np.roll(q.reshape(H, N, -1), 1, axis=0))",
           (T_NAT, "-k", "fused_attention_equals_the_float64_reference"),
           "issue 20 case 4: the native head matrices rotated by one head"),
    Mutant("mla-decompress-mask-strict", "hybrid/models/layers.py",
           "    return torch.arange(S, device=device)[None, :] <= i",
           "    return torch.arange(S, device=device)[None, :] < i + (i == 0)",
           (T_DS2, "-k", "float64_reference and default"),
           "causal mask hides each token from itself"),
    # ------------------------------------------------------------------ routing
    Mutant("router-wrong-group", "hybrid/models/moe.py",
           "            keep = g_score.topk(a.n_group_used, dim=-1).indices            # [T, n_group_used]",
           "            keep = (-g_score).topk(a.n_group_used, dim=-1).indices         # [T, n_group_used]",
           (T_NAT, "-k", "native_router_selects_as_the_torch_router"),
           "group-limited routing keeps the worst groups"),
    Mutant("router-group-score-top1", "hybrid/models/moe.py",
           "            g_score = groups.topk(2, dim=-1).values.sum(-1)                # [T, G]",
           "            g_score = groups.topk(1, dim=-1).values.sum(-1)                # [T, G]",
           (T_NAT, "-k", "native_router_selects_as_the_torch_router"),
           "group score from the best expert only (llama.cpp sums the top 2)"),
    Mutant("router-weights-not-normalized", "hybrid/models/moe.py",
           "        if a.expert_weights_norm:\n            weights = weights / weights.sum(-1, keepdim=True)",
           "        if False:\n            weights = weights / weights.sum(-1, keepdim=True)",
           (T_NAT, "-k", "native_router_selects_as_the_torch_router"),
           "expert_weights_norm ignored"),
    Mutant("router-bias-in-weights", "hybrid/models/moe.py",
           "        weights = probs.gather(1, ids)                                     # [T, K]",
           "        weights = sel.gather(1, ids)                                       # [T, K]",
           (T_NAT, "-k", "native_router_selects_as_the_torch_router"),
           "the selection bias leaks into the expert weights"),
    Mutant("shared-expert-missing", "hybrid/models/moe.py",
           "        y = self.experts(h, ids, weights)\n        if self.shared is not None:\n"
           "            y = y + self.shared(h)",
           "        y = self.experts(h, ids, weights)",
           (T_DS2, "-k", "exactly_on_f32 and default"),
           "the shared expert is dropped (torch path)"),
    Mutant("shared-expert-absorbed-but-not-run", "hybrid/backends/experts.py",
           "        self.shared_layer = inner.layer\n        return True",
           "        return True",
           (f"{T_NAT}::test_shared_experts_ride_along_in_the_routed_call",),
           "the native routed call claims the shared expert and never computes it"),
    Mutant("native-router-k-minus-one", "hybrid/backends/native.py",
           "        T, K = logits.shape[0], a.n_expert_used\n",
           "        T, K = logits.shape[0], a.n_expert_used\n"
           "        logits = logits.clone()\n        logits[:, 0] = -1e30\n",
           (T_NAT, "-k", "native_router_selects_as_the_torch_router"),
           "an expert can never be chosen by the native router"),
    Mutant("engine-second-submit-accepted", "hybrid/backends/experts.py",
           "        if self._pending is not None:\n"
           "            raise RuntimeError(\"ExpertEngine: the previous forward was not waited for\")",
           "        if False:\n"
           "            raise RuntimeError(\"ExpertEngine: the previous forward was not waited for\")",
           ("tests/test_moe.py", "-k", "asynchronous"),
           "issue 20 case 5: a second submit overwrites the staged inputs of one in flight (the "
           "test kept its behaviour checks when its timing check went)"),
    # ------------------------------------------------------------------ GPU stand-in paths
    Mutant("hot-expert-dropped", "hybrid/runtime/loader.py",
           "            lut[torch.tensor(hot, dtype=torch.long)] = torch.arange(len(hot))",
           "            lut[torch.tensor(hot[:-1], dtype=torch.long)] = torch.arange(len(hot) - 1)",
           (f"{T_GPU}::test_plan_hot_experts_run_in_torch_and_the_engine_skips_them",),
           "issue 20 case 2: the last hot expert is computed neither on the CPU nor in torch"),
    Mutant("gpu-prefill-expert-dropped", "hybrid/backends/gpu.py",
           "            return expert_ffn(h, g, u, d)\n",
           "            return expert_ffn(h, g, u, d * (e != 3))\n",
           (T_GPU, "-k", "gpu_prefill_threshold"),
           "issue 20 case 2: one expert is never computed on the device prefill path"),
    Mutant("overlap-shared-before-submit", "hybrid/models/moe.py",
           "            self.experts.submit(h, ids, weights)\n"
           "            s = self.shared(h) if self.shared is not None else 0\n",
           "            s = self.shared(h) if self.shared is not None else 0\n"
           "            self.experts.submit(h, ids, weights)\n",
           (f"{T_GPU}::test_routed_experts_are_submitted_before_the_shared_expert",),
           "the shared expert no longer overlaps the routed experts"),
    Mutant("dequant-q6k-offset", "hybrid/backends/dequant.py",
           "    q = (lo | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32",
           "    q = (lo | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 31",
           (T_GPU, "-k", "jit_dequant_linear and Q6_K"),
           "issue 20 case 6: the torch Q6_K decoder off by one step (the JIT test used to "
           "compare against this same decoder)"),
    Mutant("jit-dequant-float16", "hybrid/backends/gpu.py",
           "    xs = x.to(dtype)\n",
           "    xs = x.half()\n",
           (T_GPU, "-k", "jit_dequant_linear"),
           "the JIT-dequantized linear computes in float16, not its dtype"),
    Mutant("stats-expert-0-not-counted", "hybrid/runtime/stats.py",
           "        ones = self._ones.expand(flat.numel()) * (flat >= 0)",
           "        ones = self._ones.expand(flat.numel()) * (flat > 0)",
           (T_GPU, "-k", "expert_stats"),
           "issue 20 case 6: routing statistics miss expert 0 (the CLI test checked 'not empty')"),
    # ------------------------------------------------------------------ memory / placement
    Mutant("hidden-copy-of-expert-bytes", "hybrid/runtime/loader.py",
           "        cpu = self._placed_experts(D, K).add_layer(layer)\n",
           "        cpu = self._placed_experts(D, K).add_layer(layer)\n"
           "        _n = sum(self.g.view(n).size for n in names) // 10\n"
           "        self.__dict__.setdefault('_hidden', []).append(self.g.view(names[2]).reshape(-1)[:_n].copy())\n",
           ("tests/test_runtime_memory.py",),
           "issue 20 case 3: a hidden copy of 10% of the expert bytes the Plan does not count"),
    Mutant("plan-file-pages-not-counted", "placement/solver.py",
           '            host["file_pages"] = host.get("file_pages", 0) + t.n_bytes',
           '            host["file_pages"] = host.get("file_pages", 0)',
           ("tests/test_placement_gguf.py", "-k", "predicted_cpu_rss_growth"),
           "issue 20 case 3: the pages read to copy small linears are left out of the CPU budget"),
    Mutant("plan-replicate-copy-not-counted", "placement/solver.py",
           '    copies = n_nodes if (numa_mode == "replicate" and n_nodes > 1) else 1',
           '    copies = 1',
           ("tests/test_placement_solver.py", "-k", "replicate"),
           "numa replicate's extra copy of the experts is not counted"),
    Mutant("dry-run-always-fits", "placement/cli.py",
           "EXIT_FITS if plan.fits else EXIT_NO_FIT)",
           "EXIT_FITS)",
           ("tests/test_placement_cli.py",),
           "--dry-run exits 0 when the model does not fit"),
    # ------------------------------------------------------------------ README claims
    Mutant("omp-wait-policy-not-set", "hybrid/__init__.py",
           'os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")',
           'pass',
           ("tests/test_readme_claims.py", "-k", "omp_wait_policy"),
           "README: importing hybrid sets OMP_WAIT_POLICY=PASSIVE"),
    Mutant("hugepages-always-requested", "hybrid/backends/numa.py",
           "        buf = _native.NumaBuffer(nbytes, policy, target, self.hugepages)",
           "        buf = _native.NumaBuffer(nbytes, policy, target, True)",
           ("tests/test_readme_claims.py", "-k", "hugepages"),
           "README: --no-hugepages drops the transparent-huge-page request"),
    Mutant("linears-on-their-own-pool", "hybrid/backends/native.py",
           "        if e is not None and not e.busy:",
           "        if False:",
           ("tests/test_readme_claims.py", "-k", "workers"),
           "README: native ops run on the expert engine's workers"),
    Mutant("decode-spin-not-raised", "hybrid/runtime/engine.py",
           "            eng.spin_us = self.decode_spin_us if decode else self._default_spin_us",
           "            eng.spin_us = self._default_spin_us",
           ("tests/test_readme_claims.py", "-k", "spinning"),
           "README: during decode the workers spin 2 ms"),
    # ------------------------------------------------------------------ server / CLI
    Mutant("server-binds-all-interfaces", "hybrid/app/server.py",
           '    srv.add_argument("--host", default="127.0.0.1",',
           '    srv.add_argument("--host", default="0.0.0.0",',
           ("tests/test_server.py", "-k", "loopback"),
           "README: the server binds 127.0.0.1 by default"),
    # ------------------------------------------------------------------ GQA family (issue 13)
    Mutant("llama-rope-neox", "hybrid/models/args.py",
           "rope_neox=False", "rope_neox=True",
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[mixtral]",),
           "llama rotates NEOX pairs instead of adjacent ones"),
    Mutant("gqa-q-bias-dropped", "hybrid/models/attention.py",
           "            q = q + self.bq", "            q = q",
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[qwen2moe]",),
           "qwen2moe / glm4moe query bias ignored"),
    Mutant("gqa-k-norm-skipped", "hybrid/models/attention.py",
           "        if self.k_norm is not None:", "        if False:",
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[qwen3moe]",),
           "qwen3moe's per-head key norm skipped"),
    Mutant("gqa-partial-rope-ignored", "hybrid/models/args.py",
           'key("rope.dimension_count", head_k),\n', "head_k,\n",
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[glm4moe]",),
           "glm4moe rotates the whole head instead of its first half"),
    Mutant("gqa-kv-heads-swapped", "hybrid/models/layers.py",
           "        ob = F.scaled_dot_product_attention(qb, kb.unsqueeze(0),",
           "        ob = F.scaled_dot_product_attention(qb, kb.flip(0).unsqueeze(0),",
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[qwen3moe]",),
           "query heads read another group's keys"),
    Mutant("gqa-static-mask-strict", "hybrid/models/attention.py",
           "mask = torch.arange(S, device=x.device)[None, :] <= pos[:, None]",
           "mask = torch.arange(S, device=x.device)[None, :] < pos[:, None]",
           (T_GQE, "-k", "static"),
           "the captured-shape decode step hides each token from itself"),
    Mutant("gqa-decode-rope-off-by-one", "hybrid/models/attention.py",
           "q, k = rope(q, pos0), rope(k, pos0)",
           "q, k = rope(q, max(pos0 - 1, 0)), rope(k, max(pos0 - 1, 0))",
           (f"{T_GQA}::test_prefill_then_decode_equals_full_sequence[glm4moe-F32]",),
           "chunks after the first are rotated one position early"),
    Mutant("qwen2moe-shared-gate-ignored", "hybrid/models/moe.py",
           "return self.ffn(h) * torch.sigmoid(h.float() @ self.gate.t())", "return self.ffn(h)",
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[qwen2moe]",),
           "qwen2moe's shared expert added without its sigmoid gate"),
    Mutant("glm4moe-mtp-block-run", "hybrid/models/args.py",
           "    return total - n_nextn, n_nextn",
           "    return total, n_nextn",
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[glm4moe]",),
           "the trailing MTP (nextn) block is run as a layer"),
    Mutant("glm4moe-ffn-norm-name", "hybrid/models/args.py",
           'FFN_NORM = "post_attention_norm"', 'FFN_NORM = "ffn_norm"',
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[glm4moe]",),
           "glm4moe reads the FFN norm under the name other architectures use"),
    Mutant("gqa-yarn-ignored", "hybrid/models/args.py",
           'ext = 1.0 if self.rope_scaling_type == "yarn" else 0.0\n        return Rope(',
           'ext = 0.0\n        return Rope(',
           (f"{T_GQA}::test_f32_matches_llama_cpp_exactly[qwen3moe_yarn]",),
           "YaRN rope scaling keys ignored"),
    Mutant("gqa-hot-expert-dropped", "hybrid/runtime/loader.py",
           "            lut[torch.tensor(hot, dtype=torch.long)] = torch.arange(len(hot))\n",
           "            lut[torch.tensor(hot, dtype=torch.long)] = torch.arange(len(hot))\n"
           "            lut[hot[-1]] = -1\n",
           (T_GQE, "-k", "hot and qwen3moe"),
           "a hot expert computed by neither the engine nor torch, on a GQA model"),
    Mutant("shape-check-skipped", "hybrid/models/specs.py",
           "        if len(want) != len(got) or any(", "        if False and (",
           ("tests/test_model_specs.py",),
           "a tensor whose shape disagrees with the metadata is loaded anyway"),
    Mutant("upcycle-weights-not-normalized", "hybrid/models/args.py",
           "expert_weights_norm=True, fixup=mixtral", "expert_weights_norm=False, fixup=mixtral",
           (f"{T_DEMO}::test_upcycled_moe_computes_the_dense_model",),
           "Mixtral's top-k weights not renormalized: the upcycled MoE is no longer the dense model"),
    Mutant("placement-gqa-kv-bytes", "placement/inventory.py",
           "        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v)",
           "        return self.n_layer * self.n_head_kv * self.head_dim_k",
           (T_PLA, "-k", "kv_bytes"),
           "GQA KV cache counted without its V half"),
    Mutant("placement-shexp-not-shared", "placement/inventory.py",
           '    if s.endswith("_shexp"):\n        return "shared_expert"',
           '    if s.endswith("_shexp"):\n        return "routed_experts"',
           (T_PLA, "-k", "tiny_header_inventory"),
           "shared experts planned as routed experts (left in host RAM)"),
    Mutant("native-gqa-wrong-kv-head", "native/gqa.cpp",
           "j.k->attn_scores(j.q + (t * H + g * G) * Dk, G, j.k_rows + r * KW + g * Dk, KW, cn, Dk, sc);",
           "j.k->attn_scores(j.q + (t * H + g * G) * Dk, G, j.k_rows + r * KW + ((g + 1) % Hkv) * Dk, KW, cn, Dk, sc);",
           (T_NGQA, "-k", "vs_float64 and scalar"),
           "native GQA: a query group scores another kv head's keys"),
    # ------------------------------------------------------------------ native kernels (rebuild)
    Mutant("native-q4k-scalar-dot-min-sign", "native/quants.cpp",
           "    return y->d * (d * (float)sumi - dmin * (float)summ);",
           "    return y->d * (d * (float)sumi + dmin * (float)summ);",
           ("tests/test_kernels.py", "-k", "matmul_vs_float64 and scalar and Q4_K"),
           "scalar reference dot adds the Q4_K block minimum instead of subtracting it"),
    Mutant("native-isa-refusal-removed", "native/dispatch.cpp",
           "        if (!t.have_avx512)\n            throw",
           "        if (false)\n            throw",
           ("tests/test_kernels.py", "-k", "isa"),
           "issue 20 case 6: HYBRID_ISA=avx512 accepted on a CPU without AVX-512 (caught on "
           "CPUs without AVX-512; the test skips itself, visibly, on CPUs with it)"),
    Mutant("native-mla-kv-slice-off-by-one", "native/mla.cpp",
           "S = j.pos0 + t + 1;",
           "S = j.pos0 + t + (j.pos0 + t == 0);",
           (T_NAT, "-k", "fused_attention_equals_the_float64_reference"),
           "native attention reads one cached row too few (each token misses itself)"),
    Mutant("native-router-group-score-top1", "native/ops.cpp",
           "                gscore[g] = per_group > 1 ? a + b : a;",
           "                gscore[g] = a;",
           (T_NAT, "-k", "native_router_selects_as_the_torch_router"),
           "native group score from the best expert only (llama.cpp sums the top 2)"),
    # ------------------------------------------------------------------ issue 18: the GPU half,
    # on the CPU stand-in (Plan = allocation, the smaller defects)
    Mutant("hot-experts-planned-at-gguf-size", "placement/solver.py",
           '    return elems // n * DTYPE_BYTES["bf16"]',
           "    return inv.expert_bytes(layer)",
           ("tests/test_plan_allocation.py",),
           "issue 18 defect 1: the hot-expert cache sized in GGUF bytes, loaded as bf16 (~3x)"),
    Mutant("hot-experts-loaded-as-f32", "hybrid/runtime/loader.py",
           "                gpu = TorchExperts.from_gguf(self.g, layer, dtype=torch.bfloat16,",
           "                gpu = TorchExperts.from_gguf(self.g, layer, dtype=torch.float32,",
           ("tests/test_plan_allocation.py",),
           "the runtime allocates hot experts at another size than the Plan counts"),
    Mutant("quantized-gpu-weights-dequantized-at-load", "hybrid/runtime/loader.py",
           "        elif jit:\n",
           "        elif False:\n",
           ("tests/test_plan_allocation.py",),
           "gpu_weight_format quantized planned, bf16 copies placed"),
    Mutant("prefill-staging-three-slots", "hybrid/backends/gpu.py",
           "        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]",
           "        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(3)]",
           ("tests/test_plan_allocation.py",),
           "GPU prefill staging larger than the Plan's 2 slots"),
    Mutant("host-register-on-a-cpu-device", "hybrid/backends/experts.py",
           '        if device.type != "cuda" or self._pinned:',
           "        if self._pinned:",
           (T_GPU, "-k", "registers_no_host_memory"),
           "issue 18 item 5: cudaHostRegister (a CUDA context) for a device='cpu' engine"),
    Mutant("host-unregister-under-a-copy", "hybrid/backends/experts.py",
           "            torch.cuda.synchronize(self._pinned_device)\n",
           "",
           (T_GPU, "-k", "registers_no_host_memory"),
           "issue 18 item 5: unregistering y while a non_blocking copy out of it may run"),
    Mutant("copier-close-without-stream-sync", "hybrid/backends/gpu.py",
           "            self.stream.synchronize()\n        self.slots = []",
           "            pass\n        self.slots = []",
           (T_GPU, "-k", "copier_close_waits"),
           "issue 18 item 5: _Copier.close frees the slots under the copy stream's writes"),
    Mutant("static-hot-experts-unbounded-gather", "hybrid/backends/torch_experts.py",
           "        tb = max(1, min(T, self.static_gather_bytes // max(per_token, 1)))",
           "        tb = T",
           (T_GPU, "-k", "static_hot_experts_bound"),
           "issue 18 item 5: TorchExperts.static gathers [T, F, D] copies for every slot"),
    Mutant("static-hot-experts-block-drops-tail", "hybrid/backends/torch_experts.py",
           "            t1 = min(T, t0 + tb)",
           "            t1 = min(T - 1, t0 + tb)",
           (T_GPU, "-k", "static_hot_experts_bound"),
           "the token blocks of static() miss the last token"),
    Mutant("dequant-linear-whole-matrix", "hybrid/backends/gpu.py",
           "    if rows_per_block >= N:\n",
           "    if True:\n",
           (T_GPU, "-k", "row_blocks_within"),
           "issue 18 defect 3: DequantLinear dequantizes the whole matrix on every call"),
    Mutant("dequant-linear-last-row-unwritten", "hybrid/backends/gpu.py",
           "        r1 = min(N, r0 + rows_per_block)\n",
           "        r1 = min(N - 1, r0 + rows_per_block)\n",
           (T_GPU, "-k", "row_blocks_within"),
           "the row blocks stop one row short (an uninitialized output)"),
    Mutant("dequant-workspace-not-planned", "placement/solver.py",
           '        if gpu_fmt == "quantized":\n            breakdown["dequant_workspace"]',
           '        if False:\n            breakdown["dequant_workspace"]',
           (T_GPU, "-k", "dequant_workspace"),
           "the Plan does not count the quantized linears' dequant workspace"),
    # ------------------------------------------------------ issue 17: untrusted model files
    Mutant("issue17-block-count-vs-blocks-unchecked", "hybrid/models/args.py",
           "    if present != total:\n", "    if False:\n",
           (T_FUZZ, "-k", "every_variant"),
           "block_count one below the blocks present runs a truncated model without a word"),
    Mutant("issue17-expert-used-unchecked", "hybrid/models/args.py",
           "    if a.n_expert > 1:\n", "    if False:\n",
           (T_FUZZ, "-k", "every_variant"),
           "expert_used_count above expert_count reaches the router's top-k (a traceback)"),
    Mutant("issue17-group-used-equal-groups", "hybrid/models/args.py",
           "a.n_group_used, 1, G - 1,", "a.n_group_used, 1, G,",
           (T_FUZZ, "-k", "every_variant and deepseek2"),
           "expert_group_used_count = expert_group_count accepted (llama.cpp refuses it)"),
    Mutant("issue17-context-unbounded", "hybrid/models/args.py",
           '    return _int(source, p + "context_length", v, 1, MAX_CONTEXT)',
           "    return int(v)",
           (T_FUZZ, "-k", "every_variant"),
           "a context_length of 0 or 2^32-1 reaches the plan's KV cache sizing"),
    Mutant("issue17-token-ids-unchecked", "hybrid/models/args.py",
           "            _int(source, k, v, 0, n_vocab - 1,", "            (source, k, v, 0, n_vocab - 1,",
           (T_FUZZ, "-k", "every_variant or dry_run"),
           "a special token id outside the vocabulary reaches the tokenizer"),
    Mutant("issue17-tensor-type-unchecked", "hybrid/models/specs.py",
           "        if gtype is not None and gtype not in allowed:", "        if False:",
           (T_FUZZ, "-k", "every_variant"),
           "a tensor of a type nothing computes is found only when it is first used"),
    Mutant("issue17-tensor-layout-unchecked", "hybrid/gguf_file.py",
           "            if rel != expect:", "            if False:",
           (T_FUZZ, "-k", "disagrees_with_the_data"),
           "a retyped tensor reads into its neighbour's bytes, or leaves a gap"),
    # ------------------------------------------------------------------ attention in query blocks
    Mutant("issue18-attend-one-block", "hybrid/models/layers.py",
           "    return [(t0, min(T, t0 + block)) for t0 in range(0, T, block)]",
           "    return [(0, T)] if T else []",
           ("tests/test_attention_blocks.py",),
           "issue 18 defect 2: attention builds [H, T, S] scores for a whole chunk, past the Plan's block"),
    Mutant("issue18-attend-sees-later-keys", "hybrid/models/layers.py",
           "            s = min(S, pos0 + t1)                      # keys beyond the block's last query: unseen",
           "            s = S",
           ("tests/test_attention_blocks.py", "-k", "float64"),
           "a one-query block reads keys after its position (its mask is skipped)"),
    Mutant("issue18-mla-absorbed-unblocked", "hybrid/models/deepseek2.py",
           "        for t0, t1 in query_blocks(T, self.query_block):",
           "        for t0, t1 in query_blocks(T, T):",
           ("tests/test_attention_blocks.py", "-k", "mla"),
           "the absorbed MLA path scores a whole chunk at once"),
    Mutant("issue18-mla-expansion-not-planned", "placement/solver.py",
           "            \"logits\": logits, \"total\": activations + scores + expanded + logits,",
           "            \"logits\": logits, \"total\": activations + scores + logits,",
           ("tests/test_placement_solver.py", "-k", "explicit_reserves"),
           "the MLA K/V expansion of a long chunk is left out of the GPU workspace"),
    Mutant("issue17-kv-cache-unchecked", "hybrid/runtime/engine.py",
           "    if tokens * per_token > budget:",
           "    if tokens * per_token > 2 * budget:",
           ("tests/test_model_specs.py", "-k", "kv_cache_beyond"),
           "a KV cache larger than the Plan counted is allocated (a metadata value read two ways)"),
    Mutant("issue17-plan-for-another-file", "hybrid/runtime/engine.py",
           "        if (n, plan.weights_bytes) != have:",
           "        if False:",
           ("tests/test_model_specs.py", "-k", "another_file"),
           "a plan made for another file is loaded as if it fitted this one"),
    Mutant("issue17-dry-run-unchecked", "placement/inventory.py",
           "    header_args(arch, meta, g.tensors, path)", "    pass",
           (T_FUZZ, "-k", "dry_run"),
           "the dry-run plans an inconsistent file instead of refusing it"),
    Mutant("issue17-stale-temporaries-kept", "hybrid/atomic.py",
           "        if pid != os.getpid() and (old or not _alive(pid)):", "        if False:",
           (T_ATOM,),
           "a killed --demo build leaves its temporary GGUF in the cache for ever"),
    Mutant("issue17-chat-save-in-place", "hybrid/app/chat.py",
           '            write_text(os.path.expanduser(path), json.dumps(doc, ensure_ascii=False, indent=2) + "\\n")',
           '            open(os.path.expanduser(path), "w").write(json.dumps(doc))',
           (T_ATOM, "-k", "chat_save"),
           "/save writes the file in place: a failure leaves half of it"),
    Mutant("issue16-router-logits-by-blas", "hybrid/models/moe.py",
           "            return self.select(self.select.logits(h, self.gate_inp))",
           "            return self.select(h.float() @ self.gate_inp.t())",
           ("tests/test_batching.py", "-k", "solo_logits"),
           "a request's routing depends on which requests share its decode step (BLAS takes "
           "another path for one row than for 16)"),
    Mutant("issue16-mla-rows-on-one-slot", "hybrid/runtime/batch.py",
           "        kv_all = cache.append(attn.il, pos[i], latent[i:i + 1], k_pe[i:i + 1])",
           "        kv_all = caches[0].append(attn.il, pos[i], latent[i:i + 1], k_pe[i:i + 1])",
           ("tests/test_batching.py", "-k", "solo_logits and deepseek2 and True"),
           "batched MLA rows attend against one shared cache instead of their own slots"),
    Mutant("issue16-gqa-rows-at-one-position", "hybrid/runtime/batch.py",
           "    q, k = rope.at(q, where), rope.at(k, where)",
           "    q, k = rope.at(q, where[:1].expand(T)), rope.at(k, where[:1].expand(T))",
           ("tests/test_batching.py", "-k", "solo_logits and qwen3moe and True"),
           "batched GQA rows are roped at the first row's position"),
    Mutant("issue16-rows-on-one-slot", "hybrid/runtime/batch.py",
           "    rows = [attn(x[i:i + 1], p, c, rope) for i, (p, c) in enumerate(zip(pos, caches))]",
           "    rows = [attn(x[i:i + 1], p, caches[0], rope) for i, (p, c) in enumerate(zip(pos, caches))]",
           ("tests/test_batching.py", "-k", "solo_logits and False or solo_texts"),
           "per-row attention (the CPU default) of a batched step reads one shared cache"),
    Mutant("issue16-prefix-cache-ignores-cached", "hybrid/runtime/scheduler.py",
           "                common = slot.common_prefix(r.ids[:-1])",
           "                common = 0",
           ("tests/test_batching.py", "-k", "second_turn"),
           "a second chat turn prefills its whole history again"),
    Mutant("issue16-api-key-not-checked", "hybrid/app/server.py",
           "            if not hmac.compare_digest(given.encode(), self.api_key.encode()):",
           "            if given is None:",
           ("tests/test_server.py", "-k", "api_key"),
           "--api-key set, and requests without it are served"),
    Mutant("issue16-body-read-before-its-size", "hybrid/app/server.py",
           "        if n is not None and n > self.max_body:\n            return self._too_large()",
           "        if False:\n            return self._too_large()",
           ("tests/test_server.py", "-k", "body_over_the_limit"),
           "a 200 MB body is read whole before it is refused"),
    Mutant("issue16-no-429", "hybrid/app/server.py",
           "        if pending[0] + sched.queue_depth >= opt.max_queue:",
           "        if False:",
           ("tests/test_server.py", "-k", "full_queue_answers_429"),
           "a full queue answers with a server error instead of 429 + Retry-After"),
    Mutant("issue16-tokenize-on-the-loop", "hybrid/app/server.py",
           "            text, ids = await asyncio.get_running_loop().run_in_executor(\n"
           "                tok_pool, tokenize, messages, prompt, param)",
           "            text, ids = tokenize(messages, prompt, param)",
           ("tests/test_server.py", "-k", "off_the_engine_thread"),
           "a huge prompt is tokenized on the event loop, stalling every other request"),
    Mutant("issue16-disconnect-keeps-the-slot", "hybrid/app/server.py",
           "                if await request.is_disconnected():\n                    cancel(job)\n"
           "                    raise APIError(499, \"the client closed the request\")",
           "                if False:\n                    pass",
           ("tests/test_server.py", "-k", "gives_up"),
           "a client that gave up keeps its slot busy until max_tokens"),
    Mutant("issue16-sigterm-kills", "hybrid/app/server.py",
           "    previous = signal.signal(signal.SIGTERM, stopped) if main else None",
           "    previous = None",
           ("tests/test_server_load.py", "-k", "sigterm"),
           "SIGTERM kills the server (status -15, no 'server stopped', the runtime never closed)"),
    # ------------------------------------------------------------------ issue 15: prefill tiles
    Mutant("issue15-avx2-rows32-tile-first-token-scale", "native/arch/x86/x86_avx2_kernels.h",
           "            const typename B::act& y0 = ys[r][b];",
           "            const typename B::act& y0 = ys[0][b];",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and Q4_0"),
           "every token of an 8-token group of a 32-block type (Q4_0, Q5_0, Q4_1, Q5_1, IQ4_NL; Q8_0 "
           "has its row groups) computed with the first token's activations"),
    Mutant("issue15-tile-tail-token-dropped", "native/arch/x86/gemm_tile.h",
           "        case 1: tile_tokens<1, KERNEL>(n, w, w_stride, R, a, o, r_stride, t_stride); break;",
           "        case 1: break;",
           ("tests/test_gemm.py", "-k", "avx2 and T5"),
           "the last token of a tile of 4k + 1 tokens is never computed"),
    Mutant("issue15-tile-output-token-stride", "native/arch/x86/gemm_tile.h",
           "out[r * r_stride + i * t_stride] = o[i];", "out[r * r_stride + i] = o[i];",
           ("tests/test_gemm.py", "-k", "avx2 and (T7 or strided)"),
           "a token group's results written as if tokens were adjacent in the output"),
    Mutant("issue15-matmul-tile-output-origin", "native/matmul.cpp",
           "y + t0 * a.y_stride + r0, 1, a.y_stride);", "y + r0, 1, a.y_stride);",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and T513"),
           "every 64-token tile of the matmul writes over the first one"),
    Mutant("issue15-expert-up-tile-reads-gate", "native/moe.cpp",
           "gemm_up(D, sl.up.row(e, f0), sl.up.row_stride", "gemm_up(D, sl.gate.row(e, f0), sl.up.row_stride",
           ("tests/test_gemm.py", "-k", "expert_prefill and avx2 and T7-K2"),
           "prefill multiplies silu(gate) by gate instead of up"),
    Mutant("issue15-expert-down-tile-short", "native/moe.cpp",
           "gemm_down(F, sl.down.row(e, d0), sl.down.row_stride, d1 - d0,",
           "gemm_down(F, sl.down.row(e, d0), sl.down.row_stride, d1 - d0 - 1,",
           ("tests/test_gemm.py", "-k", "expert_prefill and avx2 and T64-K6"),
           "the last down row of every work item is left out of prefill"),
    Mutant("issue15-avx512-k4-tile-first-token-mins", "native/arch/x86/gemm_avx512.cpp",
           "_mm_hadd_epi16(_mm_loadu_si128((const __m128i*)y.bsums),",
           "_mm_hadd_epi16(_mm_loadu_si128((const __m128i*)ys[0][b].bsums),",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q4_K/Q5_K tile subtracts the first token's mins from every token"),
    Mutant("issue15-avx512-k4x16-scales-shifted", "native/arch/x86/gemm_avx512.cpp",
           "_mm512_srli_epi32(_mm512_load_si512((const void*)x->sc[j]), 16)",
           "_mm512_srli_epi32(_mm512_load_si512((const void*)x->sc[j]), 15)",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q4_K/Q5_K row groups read their int16 scale pairs as doubled int32 scales"),
    Mutant("issue15-avx512-k4x16-other-sub-block-activations", "native/arch/x86/gemm_avx512.cpp",
           "bcast4(ys[t][b].qs + 32 * j + 4 * k)", "bcast4(ys[t][b].qs + 32 * (j ^ 1) + 4 * k)",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q4_K/Q5_K row groups multiply sub-block 2c by sub-block 2c+1's activations"),
    Mutant("issue15-avx512-k4x16-last-min-pair-dropped", "native/arch/x86/gemm_avx512.cpp",
           "for (int i = 0; i < 4; i++)\n                mi = _mm512_dpwssd_epi32",
           "for (int i = 0; i < 3; i++)\n                mi = _mm512_dpwssd_epi32",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q4_K/Q5_K row groups leave sub-blocks 6 and 7's mins out"),
    Mutant("issue15-avx512-q6x16-even-scales-unsigned", "native/arch/x86/gemm_avx512.cpp",
           "_mm512_srai_epi32(_mm512_slli_epi32(scp, 16), 16)", "_mm512_srli_epi32(_mm512_slli_epi32(scp, 16), 16)",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q6_K row groups zero-extend the even sub-blocks' scales: a negative scale becomes 65536 - |sc|"),
    Mutant("issue15-avx512-q6x16-odd-scales-unsigned", "native/arch/x86/gemm_avx512.cpp",
           "_mm512_srai_epi32(scp, 16)}", "_mm512_srli_epi32(scp, 16)}",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q6_K row groups zero-extend the odd sub-blocks' scales"),
    Mutant("issue15-avx512-q6x16-offset-halved", "native/arch/x86/gemm_avx512.cpp",
           "_mm512_sub_epi32(S[t], _mm512_slli_epi32(o, 5))", "_mm512_sub_epi32(S[t], _mm512_slli_epi32(o, 4))",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q6_K row groups take 16 instead of 32 times the scaled activation sums off"),
    Mutant("issue15-avx512-q8x16-bias-kept", "native/arch/x86/gemm_avx512.cpp",
           "_mm512_set1_epi32(-128 * ys[t][b].sum)", "_mm512_setzero_si512()",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q8_0 row groups leave 128 x the activation sum in (the quants' +128)"),
    Mutant("issue15-avx512-q8x16-pack-unbiased", "native/arch/x86/gemm_rowgroups.h",
           "BIAS ? _mm256_xor_si256(t[k], bias) : t[k]", "t[k]",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the Q8_0 rewrite for VNNI keeps the signed quants that vpdpbusd reads as unsigned"),
    Mutant("issue15-rowgroups-16-rows-over-8", "native/arch/x86/gemm_rowgroups.h",
           "uint8_t* dst = x.qs[c][k] + 32 * h8;", "uint8_t* dst = x.qs[c][k];",
           ("tests/test_kernels.py", "-k", "emulation"),
           "a 16-row Q4_K/Q5_K group writes rows 8-15 over rows 0-7"),
    Mutant("issue15-q8-dot-last-block-dropped", "native/arch/x86/x86_avx2_kernels.h",
           "            if (b + c < nb) {\n                const b32_unpacked<B> x(w + (b + c) * B::bytes);",
           "            if (b + c < nb - 1) {\n                const b32_unpacked<B> x(w + (b + c) * B::bytes);",
           ("tests/test_gemm.py", "-k", "odd_block_counts and avx2 and Q8_0"),
           "the Q8_0 dot leaves the row's last block out"),
    Mutant("issue15-q8-lanes-two-chains", "native/arch/x86/x86_avx2_kernels.h",
           "acc[(b / 2) % 2] = _mm256_fmadd_ps(sc, f, acc[(b / 2) % 2]);", "acc[0] = _mm256_fmadd_ps(sc, f, acc[0]);",
           ("tests/test_gemm.py", "-k", "prefill_equals_decode and avx2 and Q8_0 and T2"),
           "Q8_0's short tiles add blocks 4k + 2 and 4k + 3 into the chains of 4k and 4k + 1: last "
           "bits differ from the decode dot"),
    Mutant("issue15-q8x8-sum-of-chains-in-order", "native/arch/x86/gemm_avx2.cpp",
           "_mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]), _mm256_add_ps(acc[2][t], acc[3][t]))",
           "_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]), acc[2][t]), acc[3][t])",
           ("tests/test_gemm.py", "-k", "avx2 and Q8_0"),
           "the AVX2 Q8_0 row groups add the four chains in another order than the decode dot"),
    Mutant("issue15-q8x16-two-chains", "native/arch/x86/gemm_avx512.cpp",
           "for (int64_t b = 0; b < nb; b++) block(b, acc[b % 4]);", "for (int64_t b = 0; b < nb; b++) block(b, acc[b % 2]);",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q8_0 row groups keep two chains of blocks where the decode dot keeps four"),
    Mutant("issue15-tiles-never-selected", "native/gemm.cpp",
           'if (std::strcmp(k.isa, "avx2") == 0) {', 'if (std::strcmp(k.isa, "avx-2") == 0) {',
           ("tests/test_gemm.py", "-k", "in_use"),
           "the AVX2 tile kernels are never picked: every equality test would pass on the old path"),
    Mutant("issue15-avx2-k4-pair-scales-swapped", "native/arch/x86/x86_avx2_kernels.h",
           "_mm256_madd_epi16(hl, s0), _mm256_madd_epi16(hh, s1)",
           "_mm256_madd_epi16(hl, s1), _mm256_madd_epi16(hh, s0)",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and Q4_K and T7"),
           "a token pair's sub-blocks 2c and 2c+1 take each other's scales (the lone token's do not)"),
    Mutant("issue15-avx2-k4-pair-one-token-scale", "native/arch/x86/x86_avx2_kernels.h",
           "_mm_setr_ps(y0.d, y1.d, y0.d, y1.d)", "_mm_setr_ps(y0.d, y0.d, y0.d, y0.d)",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and Q4_K and T7"),
           "the second token of a pair takes the first token's activation scale"),
    Mutant("issue15-avx2-k4-lone-token-halves", "native/arch/x86/x86_avx2_kernels.h",
           "v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));   // S S M M",
           "v = _mm_add_epi32(v, v);",
           ("tests/test_kernels.py", "-k", "Q4_K"),
           "the lone token's S and M keep half their lanes (each half counted twice)"),
    Mutant("issue15-rows32-pair-lanes-swapped", "native/arch/x86/x86_avx2_kernels.h",
           "_mm_shuffle_ps(_mm_set_ss(s0), _mm_set_ss(s1), 0)", "_mm_shuffle_ps(_mm_set_ss(s1), _mm_set_ss(s0), 0)",
           ("tests/test_gemm.py", "-k", "odd_block_counts and avx2 and Q4_0"),
           "the two blocks of a pair of a 32-block type (Q8_0 has its own dot since its row groups) "
           "take each other's scales, in the dot and the tiles alike"),
    Mutant("issue15-rows32-prepared-scales-of-first-token", "native/arch/x86/x86_avx2_kernels.h",
           "_mm256_loadu_ps(da + (b / 2 * N + r) * 8)", "_mm256_loadu_ps(da + (b / 2 * N) * 8)",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and IQ4_NL and T7"),
           "every token of a tile group takes the first token's prepared activation scales"),
    Mutant("issue15-rows32-lone-block-dropped", "native/arch/x86/x86_avx2_kernels.h",
           "    if (b < nb) {\n        const b32_unpacked<B> x(w + b * B::bytes);\n        for (int r = 0; r < N; r++) {\n            const typename B::act& y",
           "    if (false) {\n        const b32_unpacked<B> x(w + b * B::bytes);\n        for (int r = 0; r < N; r++) {\n            const typename B::act& y",
           ("tests/test_gemm.py", "-k", "odd_block_counts and avx2 and Q4_0"),
           "a row of an odd number of 32-blocks loses its last block"),
    Mutant("issue15-k4-prepared-bsums-tokens-swapped", "native/arch/x86/x86_avx2_kernels.h",
           "buf[b * P + p] = {k4_pair_bsums(y0, y1),", "buf[b * P + p] = {k4_pair_bsums(y1, y0),",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and Q5_K and T5"),
           "a token pair's min terms come from each other's activation sums in prefill"),
    Mutant("issue15-k4-pair-mins-layout", "native/arch/x86/x86_avx2_kernels.h",
           "_mm_unpackhi_epi64(k.sm, k.sm))), 0x50)", "_mm_unpackhi_epi64(k.sm, k.sm))), 0x44)",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and Q4_K and T2"),
           "a pair's mins meet the wrong sub-blocks' activation sums (the lone token's do not)"),
    Mutant("issue15-isa-kernels-external-linkage", "native/arch/x86/x86_avx2_kernels.h",
           "namespace x86 {\nnamespace {\n", "namespace x86 {\ninline namespace shared {\n",
           ("tests/test_kernels.py", "-k", "share_no_code"),
           "the ISA files' kernel classes get external linkage again: the linker keeps one copy of "
           "each for the AVX2 and the AVX-512 tables"),
    Mutant("issue15-silu-tail-by-libm", "native/arch/x86/x86_avx2_kernels.h",
           "        for (int64_t j = i; j < n; j++) out[j] = ot[j - i];",
           "        for (int64_t j = i; j < n; j++) out[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];",
           ("tests/test_kernels.py", "-k", "silu and avx2"),
           "the last n % 8 gates take libm's exp: an element's value depends on its position, so a "
           "token's decode and prefill differ"),
    Mutant("issue15-silu-skips-last-element", "native/moe.cpp",
           "k.silu_mul((f1 - f0) * ns, tile, up, tile);", "k.silu_mul((f1 - f0) * ns - 1, tile, up, tile);",
           ("tests/test_moe.py", "-k", "forward_vs_float64"),
           "the last gate value of every work item is passed on without silu(gate) * up"),
    Mutant("issue15-k4x8-q5-int16-overflow", "native/arch/x86/gemm_avx2.cpp",
           "for (int k0 = 0; k0 < 8; k0 += QH ? 4 : 8) {", "for (int k0 = 0; k0 < 8; k0 += 8) {",
           ("tests/test_gemm.py", "-k", "int16_limits and avx2"),
           "the Q5_K row-group tile adds a whole sub-block's maddubs sums in int16: they overflow at "
           "large quants and activations"),
    Mutant("issue15-k4x8-tail-of-two-dropped", "native/arch/x86/gemm_rowgroups.h",
           "if (left == N) G::template rows<N>", "if (left == N && N != 2) G::template rows<N>",
           ("tests/test_gemm.py", "-k", "row_groups and avx2"),
           "a row-group tile of 4k + 2 tokens leaves its last two tokens unwritten"),
    Mutant("issue15-k4x8-mins-of-wrong-pair", "native/arch/x86/gemm_avx2.cpp",
           "_mm256_shuffle_epi32(bs2, 0x55)", "_mm256_shuffle_epi32(bs2, 0x00)",
           ("tests/test_gemm.py", "-k", "row_groups and avx2"),
           "sub-blocks 2 and 3's mins meet the activation sums of sub-blocks 0 and 1 in the row-group tiles"),
    Mutant("issue15-k4x8-leftover-rows-dropped", "native/arch/x86/gemm_rowgroups.h",
           "    if (RG < R)\n        tile<8, typename G::fallback>(", "    if (false)\n        tile<8, typename G::fallback>(",
           ("tests/test_gemm.py", "-k", "row_groups and avx2"),
           "the last R % 8 rows of a row-group tile (Q4_K / Q5_K / Q6_K) are never computed"),
    Mutant("issue15-q8x8-last-group-dropped", "native/arch/x86/gemm_avx2.cpp",
           "        for (int k = 0; k < 8; k++) {\n            const __m256i q = _mm256_load_si256((const __m256i*)x[b].q[k]);",
           "        for (int k = 0; k < 7; k++) {\n            const __m256i q = _mm256_load_si256((const __m256i*)x[b].q[k]);",
           ("tests/test_gemm.py", "-k", "avx2 and Q8_0"),
           "the Q8_0 row groups leave the last 4 quants of every block out"),
    Mutant("issue15-q8x8-signs-ignored", "native/arch/x86/gemm_avx2.cpp",
           "_mm256_maddubs_epi16(u, _mm256_sign_epi8(_mm256_set1_epi32(a4), q))",
           "_mm256_maddubs_epi16(u, _mm256_set1_epi32(a4))",
           ("tests/test_gemm.py", "-k", "avx2 and Q8_0"),
           "the Q8_0 row groups multiply |q| without moving the quants' signs onto the activations"),
    Mutant("issue15-q8x8-scale-of-first-token", "native/arch/x86/gemm_avx2.cpp",
           "_mm256_mul_ps(d, _mm256_set1_ps(ys[t][b].d)), _mm256_cvtepi32_ps(S[t])",
           "_mm256_mul_ps(d, _mm256_set1_ps(ys[0][b].d)), _mm256_cvtepi32_ps(S[t])",
           ("tests/test_gemm.py", "-k", "avx2 and Q8_0"),
           "every token of a Q8_0 row-group step takes the first token's activation scale"),
    Mutant("issue15-q8-dot-blocks-2-3-swapped", "native/arch/x86/x86_avx2_kernels.h",
           "_mm256_hadd_epi32(p[2], p[3])", "_mm256_hadd_epi32(p[3], p[2])",
           ("tests/test_kernels.py", "-k", "avx2 and Q8_0"),
           "the AVX2 Q8_0 dot scales blocks 4k + 2 and 4k + 3 by each other's scales"),
    Mutant("issue15-q8-lanes-second-block-first-acts", "native/arch/x86/x86_avx2_kernels.h",
           "pb[t] = two ? x1.template dot<DOT>(ys[t][b + 1]) : _mm256_setzero_si256();",
           "pb[t] = two ? x1.template dot<DOT>(ys[t][b]) : _mm256_setzero_si256();",
           ("tests/test_gemm.py", "-k", "avx2 and Q8_0"),
           "Q8_0's short tiles (2-4 tokens) multiply every odd block by the even block's activations"),
    Mutant("issue15-q8-lanes-tokens-5-to-8-dropped", "native/arch/x86/x86_avx2_kernels.h",
           "r1 = N > 4 ? _mm256_hadd_epi32(q[2], q[3]) : z;", "r1 = z;",
           ("tests/test_gemm.py", "-k", "avx2 and Q8_0"),
           "Q8_0's 8-token short tiles give tokens 5-8 zero integer sums"),
    Mutant("issue15-q8-lanes-first-token-scale", "native/arch/x86/x86_avx2_kernels.h",
           "buf[b * 8 + t] = t < N ? ys[t][b].d : 0.f;", "buf[b * 8 + t] = ys[0][b].d;",
           ("tests/test_gemm.py", "-k", "avx2 and Q8_0"),
           "Q8_0's short tiles scale every token by the first token's activation scales"),
    Mutant("issue15-q6x8-offset-halved", "native/arch/x86/gemm_avx2.cpp",
           "_mm256_sub_epi32(s32[t], _mm256_slli_epi32(o, 5))", "_mm256_sub_epi32(s32[t], _mm256_slli_epi32(o, 4))",
           ("tests/test_gemm.py", "-k", "row_groups and avx2 and Q6_K"),
           "the Q6_K row groups take 16 instead of 32 off every unsigned quant"),
    Mutant("issue15-q6x8-int16-overflow", "native/arch/x86/gemm_avx2.cpp",
           "    constexpr int run = 2;", "    constexpr int run = 4;",
           ("tests/test_gemm.py", "-k", "int16_limits and avx2 and Q6_K"),
           "the Q6_K row groups add a whole sub-block's unsigned maddubs sums in int16: they overflow "
           "at quants 63 and activations +-127"),
    Mutant("issue15-q6x8-odd-sub-blocks-even-scale", "native/arch/x86/gemm_avx2.cpp",
           "(const __m256i*)k_dup_words[k0 / 4]", "(const __m256i*)k_dup_words[0]",
           ("tests/test_gemm.py", "-k", "row_groups and avx2 and Q6_K"),
           "the Q6_K row groups scale each odd sub-block by its even neighbour's scale"),
    Mutant("issue15-q6x8-scales-of-other-half", "native/arch/x86/gemm_rowgroups.h",
           "scale_pairs_of_8_rows<true>(hi, sc[8], 16);", "scale_pairs_of_8_rows<true>(lo, sc[8], 16);",
           ("tests/test_gemm.py", "-k", "row_groups and avx2 and Q6_K"),
           "the Q6_K row groups scale the second half's sub-blocks by the first half's scales"),
    Mutant("issue15-q6x8-scales-unsigned", "native/arch/x86/gemm_rowgroups.h",
           "SIGNED ? _mm256_cvtepi8_epi16(dup) : _mm256_cvtepu8_epi16(dup)", "_mm256_cvtepu8_epi16(dup)",
           ("tests/test_gemm.py", "-k", "row_groups and avx2 and Q6_K"),
           "the Q6_K row groups widen their int8 scales as unsigned: a negative scale becomes 128..255"),
    Mutant("issue15-q6-step-half-reduced", "native/arch/x86/x86_avx2_kernels.h",
           "    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));\n    return _mm_fmadd_ss",
           "    return _mm_fmadd_ss",
           ("tests/test_kernels.py", "-k", "avx2 and Q6_K"),
           "the Q6_K dots' per-block integer sum leaves out half of the block's lanes"),
    Mutant("issue15-k4x8-odd-scales-swapped", "native/arch/x86/gemm_rowgroups.h",
           "j % 2 ? _mm_unpackhi_epi8(s8[j / 2], s8[j / 2]) : _mm_unpacklo_epi8(s8[j / 2], s8[j / 2])",
           "j % 2 ? _mm_unpacklo_epi8(s8[j / 2], s8[j / 2]) : _mm_unpackhi_epi8(s8[j / 2], s8[j / 2])",
           ("tests/test_gemm.py", "-k", "row_groups and avx2"),
           "the rewritten row groups give each even sub-block its odd neighbour's scales and back"),
    Mutant("issue15-k4x8-fifth-bit-of-wrong-sub-block", "native/arch/x86/gemm_rowgroups.h",
           "_mm256_srli_epi16(hb[k], 2 * c + 1)", "_mm256_srli_epi16(hb[k], 2 * c)",
           ("tests/test_gemm.py", "-k", "row_groups and avx2 and Q5_K"),
           "Q5_K row groups take the odd sub-blocks' fifth bits from the even sub-block's bit"),
    Mutant("issue15-avx2-q6k-scale-pairs-swapped", "native/arch/x86/x86_avx2_kernels.h",
           "{HYBRID_P(0, 2), HYBRID_P(0, 2), HYBRID_P(0, 2), HYBRID_P(0, 2), HYBRID_P(1, 3)",
           "{HYBRID_P(2, 0), HYBRID_P(2, 0), HYBRID_P(2, 0), HYBRID_P(2, 0), HYBRID_P(1, 3)",
           ("tests/test_gemm.py", "-k", "avx2 and Q6_K and T64"),
           "the first two Q6_K quarters of a half take each other's sub-block scales in prefill"),
    Mutant("issue14-expert-types-unchecked", "hybrid/runtime/loader.py",
           "            check_native_expert_types(gguf, mod.supported_types())", "            pass",
           ("tests/test_quant_types.py", "-k", "refused_not_dequantized"),
           "routed experts the engine cannot run silently become float copies the plan never counted"),
    Mutant("issue14-torch-experts-uncounted", "hybrid/runtime/loader.py",
           "                self._record_tensor(name, self.compute_plan_device(), f\"weights.{_FMT_OF[dt]}\", w)",
           "                pass",
           ("tests/test_quant_types.py", "-k", "counted"),
           "experts chosen dequantized take memory the placed-bytes accounting does not show"),
    Mutant("issue14-q3k-avx2-offset", "native/arch/x86/x86_avx2_kernels.h",
           "sumi[r] = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(off, 2));",
           "sumi[r] = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(off, 1));",
           ("tests/test_quant_types.py", "-k", "expert_engine"),
           "Q3_K's AVX2 dot takes back the wrong multiple of its +4 offset"),
    Mutant("issue14-q8-1-sum-unrounded", "native/quants.cpp",
           "        y[b].s = round_to_fp16(d * (float)sum);", "        y[b].s = d * (float)sum;",
           ("tests/test_kernels.py", "-k", "activation_quantization"),
           "Q4_1 / Q5_1 activations keep a float32 sum term where llama.cpp rounds it to fp16"),
    Mutant("issue14-q2k-avx512-half-scales", "native/arch/x86/avx512.cpp",
           "_mm_cvtepu8_epi16(h ? _mm_srli_si128(sc, 8) : sc)", "_mm_cvtepu8_epi16(sc)",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 Q2_K dot uses the first half's scales for the second half"),
    Mutant("issue14-q2k-dequant-min-nibble", "native/quants.cpp",
           "ml = dmin * (x[b].scales[i] >> 4);", "ml = dmin * (x[b].scales[i] & 0xF);",
           ("tests/test_quant_types.py", "-k", "llama_cpp_blocks"),
           "Q2_K dequantization takes the scale's nibble for the min"),
    Mutant("issue14-iq4xs-avx2-scale", "native/arch/x86/x86_avx2_kernels.h",
           "const __m256i s1 = _mm256_set1_epi16((short)iq4_xs_scale(x[b], 2 * c + 1));",
           "const __m256i s1 = _mm256_set1_epi16((short)iq4_xs_scale(x[b], 2 * c));",
           ("tests/test_kernels.py", "-k", "matmul_vs_float64 and IQ4_XS"),
           "IQ4_XS's AVX2 dot scales the odd sub-blocks with the even ones' scale"),
    Mutant("issue14-iq4xs-avx512-sign", "native/arch/x86/avx512.cpp",
           "_mm512_mask_sub_epi8(av, _mm512_movepi8_mask(wv),", "_mm512_mask_sub_epi8(av, _mm512_movepi8_mask(av),",
           ("tests/test_kernels.py", "-k", "emulation"),
           "IQ4_XS's AVX-512 dot moves the wrong operand's sign"),
    Mutant("issue14-iq4xs-torch-scale-bits", "hybrid/backends/dequant.py",
           "    scales = (lo.to(torch.int32) | (hi << 4)) - 32", "    scales = (lo.to(torch.int32) | (hi << 3)) - 32",
           ("tests/test_dequant.py", "-k", "IQ4_XS"),
           "the GPU dequantizer places IQ4_XS's high scale bits wrong"),
    Mutant("issue14-iq1s-avx2-delta-sign", "native/arch/x86/x86_avx2_kernels.h",
           "const __m128i sls = _mm_sign_epi16(ls, _mm_or_si128(qh, _mm_set1_epi16(1)));",
           "const __m128i sls = ls;",
           ("tests/test_quant_types.py", "-k", "lattice_expert and IQ1_S"),
           "IQ1_S's AVX2 dot ignores the sign of the +-1/8 shift: the whole model drifts from llama.cpp"),
    Mutant("issue14-iq3s-avx2-high-bit", "native/arch/x86/x86_avx2_kernels.h",
           "const __m256i set = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit), _mm256_set1_epi8(1));",
           "const __m256i set = _mm256_setzero_si256();",
           ("tests/test_quant_types.py", "-k", "grid_entry"),
           "IQ3_S's AVX2 dot drops the 9th index bit: half the grid is never reached"),
    Mutant("issue14-iq2xxs-torch-scale", "hybrid/backends/dequant.py",
           "    db = d * (0.5 + scale) * 0.25", "    db = d * scale * 0.25",
           ("tests/test_dequant.py", "-k", "IQ2_XXS"),
           "the GPU dequantizer drops IQ2_XXS's half-step scale offset"),
    Mutant("issue14-iq1m-avx2-lane-scales", "native/arch/x86/x86_avx2_kernels.h",
           "const __m256i ls = pick_scales(sc, 2 * ib, 2 * ib + 1);", "const __m256i ls = pick_scales(sc, 2 * ib, 2 * ib);",
           ("tests/test_quant_types.py", "-k", "grid_entry and IQ1_M"),
           "IQ1_M's AVX2 dot scales the second 16 values of a sub-block with the first one's scale"),
    Mutant("issue14-iq2s-scalar-qh", "native/quants.cpp",
           "kIQ2SGrid[x.qs[4 * ib + l] | (((x.qh[ib] >> (2 * l)) & 3) << 8)]", "kIQ2SGrid[x.qs[4 * ib + l] | ((x.qh[ib] & 3) << 8)]",
           ("tests/test_quant_types.py", "-k", "grid_entry and IQ2_S"),
           "IQ2_S's reference takes every group's high index bits from the first group"),
    Mutant("issue14-iq-tables-stale", "native/iq_tables.h",
           "0x2b2b082b08080808, 0x2b2b190808192b08, 0x2b2b2b0819190808, 0x2b2b2b1908081908,",
           "0x2b2b082b08080808, 0x2b2b190808192b08, 0x2b2b2b0819190808, 0x2b2b2b1908082b08,",
           ("tests/test_quant_types.py", "-k", "grid_entry and IQ2_XXS"),
           "a grid entry of the generated tables differs from ggml's"),
    Mutant("issue14-recipe-layers-ignored", "placement/quant_rules.py",
           "            if not lo <= _layer_of(name) < hi:", "            if False:",
           ("tests/test_presets_lowbit.py",),
           "a dynamic mix's higher-bit down_proj layers spread to every layer: the preset's size is off"),
    Mutant("issue14-iq1s-torch-delta-sign", "hybrid/backends/dequant.py",
           "    delta = torch.where((qh & 0x8000) == 0, 0.125, -0.125).float().reshape(n, 8, 1, 1)",
           "    delta = torch.where((qh & 0x8000) == 0, 0.125, 0.125).float().reshape(n, 8, 1, 1)",
           ("tests/test_quant_types.py", "-k", "gpu_prefill"),
           "GPU prefill dequantizes IQ1_S experts with the shift's sign ignored"),
    # ------------------------------------------------------------------ issue 19: dry-run advice
    Mutant("issue19-replan-not-as-the-command-line", "placement/advice.py",
           "        hw = apply_overrides(hw, **{k: v for k, v in hw_kw.items() if v is not None})",
           "        hw = apply_overrides(hw.base or hw, **{k: v for k, v in hw_kw.items() if v is not None})",
           ("tests/test_placement_advice.py", "-k", "ram_advice or every_fitting"),
           "issue 19 case 1: a suggestion re-planned on another machine than its command line "
           "describes (--ram 621GiB [fits] with --bind-node 0, then does not)"),
    Mutant("issue19-fits-without-replan", "placement/advice.py",
           "                                  p.fits, changes=dict(changes)",
           "                                  True, changes=dict(changes)",
           ("tests/test_placement_advice.py", "-k", "every_fitting"),
           "issue 19 case 1: a suggestion marked [fits] that its re-plan says does not"),
    Mutant("issue19-auto-first-rule", "placement/solver.py",
           "    if len(fmts) * len(modes) == 1:", "    if True:",
           ("tests/test_placement_advice.py", "-k", "auto_is_the_fastest"),
           "issue 19 case 3: auto takes bf16 / interleave where the planner estimates another faster"),
    Mutant("issue19-threads-above-cpus", "hybrid/app/cli.py",
           "    if asked and asked > n:", "    if False:",
           ("tests/test_cli.py", "-k", "threads_never"),
           "issue 19 case 5: --threads 4 on 2 allowed cpus (decode 660 -> 11 tok/s), no word"),
    Mutant("issue19-size-without-unit", "placement/units.py",
           "    if m and not m.group(2) and float(m.group(1)) != 0:", "    if False:",
           ("tests/test_placement_advice.py", "-k", "sizes_need_a_unit"),
           "issue 19 case 6: --gpu-mem 48 means 48 bytes"),
    Mutant("issue19-ctx-beyond-trained", "placement/solver.py",
           "        if trained and int(wl.context) > trained and not wl.allow_long_context:",
           "        if False:",
           ("tests/test_placement_advice.py", "-k", "too_long_context"),
           "issue 19 case 6: --ctx 500000 on a 163840-token model FITS"),
    Mutant("issue19-broken-pipe-traceback", "placement/cli.py",
           "    except BrokenPipeError:", "    except ZeroDivisionError:",
           ("tests/test_cli.py", "-k", "broken_pipe"),
           "issue 19 case 6: `| head -1` prints a BrokenPipeError traceback and loses the exit status"),
    Mutant("issue19-dry-run-flags-in-the-run", "hybrid/app/cli.py",
           "    if hypothetical:", "    if False:",
           ("tests/test_cli.py", "-k", "one_parser"),
           "issue 19 case 2: the run silently ignores --ram / --preset / --json (the dry-run's flags)"),
    Mutant("issue19-smallest-quantization", "placement/advice.py",
           "        for name, inv2 in reversed(same_model_presets(inv)):",
           "        for name, inv2 in same_model_presets(inv):",
           ("tests/test_placement_advice.py", "-k", "smaller_quantization"),
           "issue 19: the advice names Q2_K where Q4_K_M of the same model fits"),
    Mutant("issue19-estimate-assumed-here", "placement/solver.py",
           "            if measure:", "            if False:",
           ("tests/test_estimate.py", "-k", "this_machine_is_measured"),
           "issue 19 case 4: this machine's estimates from assumed bandwidths (100 GB/s 'assumed')"),
    Mutant("issue19-probe-not-cached", "placement/probe.py",
           "                return cached\n", "                pass\n",
           ("tests/test_estimate.py", "-k", "probe_measures_once"),
           "issue 19 case 4: every plan measures the machine again (a second each)"),
    Mutant("issue19-dry-run-plans-another-run", "placement/solver.py",
           "        pol = replace(pol, cpu_linear_min_bytes=MiB if (pol.use_gpu and hw.gpus) else 0)",
           "        pol = replace(pol, cpu_linear_min_bytes=MiB)",
           ("tests/test_cli.py", "-k", "plans_what_the_dry_run"),
           "issue 19 case 4: the dry-run's estimate (134 tok/s) is not the run header's (176)"),
    # ------------------------------------------------------------------ issue 16: the Plan's KV slots
    Mutant("issue16-slots-not-accounted", "placement/solver.py",
           "    kv_tokens = wl.context * wl.batch\n",
           "    kv_tokens = wl.context\n",
           ("tests/test_serve_slots.py", "-k", "dry_run_shows"),
           "the plan counts one KV cache whatever --parallel says: the server's other slots are "
           "allocated outside its budget"),
    Mutant("issue16-runtime-allocates-one-slot", "hybrid/runtime/engine.py",
           "                            for _ in range(int(getattr(plan, \"kv_slots\", 1)))]",
           "                            for _ in range(1)]",
           ("tests/test_serve_slots.py", "-k", "n_caches"),
           "the runtime allocates one cache for a plan of N slots: the server runs one request at a time"),
    Mutant("issue16-slot-engine-allocates-its-own", "hybrid/runtime/batch.py",
           "        self.slots = [Slot(i, c) for i, c in enumerate(rt.slot_caches[:n_slots])]",
           "        self.slots = [Slot(i, rt.model.new_cache(self.ctx, device=rt.device)) for i in range(n_slots)]",
           ("tests/test_serve_slots.py", "-k", "n_caches"),
           "the server allocates KV caches beside the plan's (twice the memory the plan counted)"),
    Mutant("issue16-default-slots-ignore-memory", "placement/solver.py",
           "        n = most_slots(inv, hw, wl, pol, cap)",
           "        n = cap",
           ("tests/test_serve_slots.py", "-k", "follows_the_memory"),
           "--serve without --parallel takes 8 slots on any machine, and does not fit a smaller one"),
    Mutant("issue16-parallel-too-large-unexplained", "placement/solver.py",
           "            _explain_slots(plan, most_slots(inv, hw, wl, pol, wl.batch - 1))",
           "            pass",
           ("tests/test_serve_slots.py", "-k", "too_large"),
           "--parallel 512 is refused as 'does not fit' without naming the flag or the most that fits"),
    Mutant("issue16-stop-string-start-not-held", "hybrid/runtime/scheduler.py",
           "        safe = len(self.text) - self.hold\n",
           "        safe = len(self.text)\n",
           ("tests/test_engine.py", "-k", "stop_string"),
           "the one stop-string logic (TextStream, Runtime.generate's too) emits the start of a "
           "stop string before it knows"),
    Mutant("issue16-prompts-prefilled-one-by-one", "hybrid/runtime/scheduler.py",
           "            if budget <= 0:\n                break\n            chunk = r.ids[r.pos:r.pos + budget]",
           "            if budget <= 0 or batch:\n                break\n            chunk = r.ids[r.pos:r.pos + budget]",
           ("tests/test_batching.py", "-k", "solo_texts"),
           "new requests' prompts are prefilled one forward each: the experts are read once per prompt"),
    Mutant("issue16-prefill-many-one-slot", "hybrid/runtime/batch.py",
           "                x = x + torch.cat([blk.attn(x[a:b], p, c, m.rope, m.attn_mode)",
           "                x = x + torch.cat([blk.attn(x[a:b], p, segs[0][2], m.rope, m.attn_mode)",
           ("tests/test_batching.py", "-k", "prefilled_together"),
           "prompts prefilled together attend against the first prompt's slot"),
    Mutant("issue14b-linear-type-missing", "placement/solver.py",
           "16, 17, 22, 18, 21, 19, 29})", "16, 17, 22, 18, 21, 19})",
           ("tests/test_native_linear_types.py", "-k", "IQ1_M and (llama or solver)"),
           "issue 14: IQ1_M CPU linears become f32 copies (8x the file's bytes) the plan counts "
           "or not, instead of running natively in their blocks"),
    Mutant("issue14b-prefill-dots-one-token", "native/matmul.cpp",
           "for (; t < t1; t++) y[t * a.y_stride + r] = dot(a.K, wr, acts + t * j.act_bytes);",
           "for (; t < t1; t++) y[t * a.y_stride + r] = dot(a.K, wr, acts + t0 * j.act_bytes);",
           ("tests/test_native_linear_types.py", "-k", "llama and IQ2_XXS"),
           "issue 14: prefill (T > 1) of a type without tile kernels reads one token's activations"),
    Mutant("issue14b-avx512-foreign-dot4", "native/arch/x86/avx512.cpp",
           "        if (t->dot[i] != avx2_level.dot[i]) t->dot4[i] = nullptr;",
           "        if (false) t->dot4[i] = nullptr;",
           ("tests/test_kernels.py", "-k", "emulation"),
           "issue 14: AVX-512 keeps AVX2 4-row dots beside its own single dots: prefill and "
           "decode of a Q2_K / Q4_K model disagree in the last bits"),
    Mutant("issue14b-lattice-dot4-row-mixup", "native/arch/x86/x86_avx2_kernels.h",
           "const __m256i q8 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 32 * ib)), u.s);",
           "const __m256i q8 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(ys[0][b].qs + 32 * ib)), u.s);",
           ("tests/test_kernels.py", "-k", "batched_tokens and IQ2"),
           "issue 14: the lattice types' 4-token dot reads the first token's activations for all four"),
    Mutant("issue14b-iq2xxs-scale-words", "native/arch/x86/x86_avx2_kernels.h",
           "                                                           _mm256_loadu_si256((const __m256i*)(p + 32)), 0xAA),",
           "                                                           _mm256_slli_epi64(_mm256_loadu_si256((const __m256i*)(p + 32)), 32), 0xAA),",
           ("tests/test_quant_types.py", "-k", "grid_entry and IQ2_XXS"),
           "issue 14: IQ2_XXS's per-block scales read the index words of sub-blocks 4-7 for their scales"),
    Mutant("issue14c-iq4xs-dot4-first-row-scale", "native/arch/x86/x86_avx2_kernels.h",
           "acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * ys[r][b].d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);",
           "acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * ys[0][b].d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);",
           ("tests/test_gemm.py", "-k", "every_other and avx2 and IQ4_XS"),
           "IQ4_XS prefill (dot4) scales every token's sums by the first token's activation scale"),
    Mutant("issue19c-probe-keeps-other-cpu-count", "placement/probe.py",
           "            if cached.get(\"threads\") == threads:", "            if True:",
           ("tests/test_estimate.py", "-k", "another_cpu_count"),
           "cached figures of 1 cpu used under a 2-cpu key: every estimate after it halved"),
    Mutant("issue19c-probe-caches-other-cpu-count", "placement/probe.py",
           "    if figures.get(\"threads\") == threads:", "    if figures:",
           ("tests/test_estimate.py", "-k", "another_cpu_count"),
           "a child bound to other cpus than its parent caches its figures under the parent's key"),
    Mutant("issue19c-kernel-efficiency-assumed", "placement/solver.py",
           '    if src == "measured" and hw.ram_kernel_efficiency:', "    if False:",
           ("tests/test_estimate.py", "-k", "kernel_efficiency or hypothetical_one"),
           "the measured kernel efficiency ignored: this machine's decode estimates 0.7x (62.7 tok/s measured, 42 estimated)"),
    Mutant("issue14c-lattice-tile-grid-scale", "native/arch/x86/gemm_tile.h",
           "x86::lattice_kernel<block_iq2_xs, 8, x86::iq2_xs_unpack>", "x86::lattice_kernel<block_iq2_xs, 4, x86::iq2_xs_unpack>",
           ("tests/test_gemm.py", "-k", "matmul_prefill_equals_decode and avx2 and IQ2_XS"),
           "IQ2_XS prefill tiles divide by the IQ3 grids' scale: every prompt token's product doubled"),
    Mutant("chat-ctrl-c-ignored-in-background-jobs", "hybrid/app/chat.py",
           "        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:", "        if False:",
           ("tests/test_chat.py", "-k", "pty"),
           "a chat started with SIGINT ignored (a CI runner's background job) cannot stop a reply: all 4000 tokens"),
    # ------------------------------------------------------------------ issue 18: hot experts in
    # their GGUF blocks, the fused Triton kernel (tests/interp_qmatvec.py under the interpreter)
    Mutant("issue18b-q4k-high-scales-from-the-wrong-byte", "hybrid/backends/qmatvec.py",
           "sc = tl.where(low, a & 63, (e & 15) | ((c >> 6) << 4))",
           "sc = tl.where(low, a & 63, (e & 15) | ((a >> 6) << 4))",
           ("tests/test_qmatvec.py", "-k", "interpreter"),
           "Q4_K/Q5_K sub-blocks 4-7 take their scale's top bits from their own byte, not sub - 4's"),
    Mutant("issue18b-q5k-fifth-bit-weight", "hybrid/backends/qmatvec.py",
           "q = q | (((hb >> sub[None, :, None]) & 1) << 4)",
           "q = q | (((hb >> sub[None, :, None]) & 1) << 3)",
           ("tests/test_qmatvec.py", "-k", "interpreter"),
           "Q5_K's fifth bit worth 8 instead of 16"),
    Mutant("issue18b-q6k-high-bits-shift", "hybrid/backends/qmatvec.py",
           ">> ((w // 32) * 2)[None, :, :]) & 3",
           ">> ((w // 64) * 2)[None, :, :]) & 3",
           ("tests/test_qmatvec.py", "-k", "interpreter"),
           "Q6_K's high 2-bit pairs of the wrong quarter"),
    Mutant("issue18b-q8-tail-blocks-unmasked", "hybrid/backends/qmatvec.py",
           "bvalid = blk * 32 < D", "bvalid = blk * 32 < D + 256",
           ("tests/test_qmatvec.py", "-k", "interpreter"),
           "Q8_0 rows not a whole 256: the last tile reads the next row's blocks"),
    Mutant("issue18b-slot-without-expert-reads-expert-0", "hybrid/backends/qmatvec.py",
           "rmask = rows < tl.where(e >= 0, N, 0)", "rmask = rows < N",
           ("tests/test_qmatvec.py", "-k", "interpreter"),
           "a slot whose expert is not hot computes expert 0 (and reads its bytes)"),
    Mutant("issue18b-static-slots-to-the-wrong-token", "hybrid/backends/gpu.py",
           "tok = torch.arange(T * K, device=x.device, dtype=torch.int32) // K",
           "tok = torch.arange(T * K, device=x.device, dtype=torch.int32) % T",
           ("tests/test_qmatvec.py", "-k", "interpreter"),
           "the fused static step multiplies slot s with token s % T instead of s // K"),
    Mutant("issue18b-linears-never-fused", "hybrid/backends/gpu.py",
           "if self.fused and x.numel() <= FUSED_MAX_TOKENS * self.in_features:",
           "if self.fused and x.numel() <= FUSED_MAX_TOKENS:",
           ("tests/test_qmatvec.py", "-k", "interpreter"),
           "DequantLinear's threshold in elements, not tokens: decode never takes the fused kernel"),
    Mutant("issue18b-unfused-static-adds-cold-slots", "hybrid/backends/gpu.py",
           "        w = torch.where(ids >= 0, weights.float(), 0.0)                          # [T, K]\n"
           "        return (w.unsqueeze(-1)",
           "        w = weights.float()\n        return (w.unsqueeze(-1)",
           ("tests/test_qmatvec.py", "-k", "without_the_fused"),
           "the slot-by-slot static step adds expert 0's output for slots whose expert is not hot"),
    Mutant("issue18b-no-triton-warned-every-call", "hybrid/backends/gpu.py",
           '        _warned_no_triton.add("cuda")\n', "",
           ("tests/test_qmatvec.py", "-k", "chosen_by_type"),
           "a CUDA machine without Triton logs the same warning for every quantized matrix"),
    Mutant("issue18b-fused-kernel-trusted-unchecked", "hybrid/backends/gpu.py",
           "        _fused_checked[key] = _check_fused(ggml_type, device)",
           "        _fused_checked[key] = True",
           ("tests/test_qmatvec.py", "-k", "failing_its_check"),
           "a Triton that miscompiles the kernel on this GPU corrupts every quantized product"),
    Mutant("issue18b-hot-experts-always-bf16", "placement/solver.py",
           '    return "quantized" if types and types <= FUSED_GPU_TYPES else "bf16"',
           '    return "bf16"',
           ("tests/test_placement_solver.py", "-k", "hot_experts or leftover"),
           "auto keeps hot Q4_K experts as bf16 copies: ~3.3x fewer fit"),
    Mutant("issue18b-hot-blocks-without-workspace", "placement/solver.py",
           'hot_ws = dequant_workspace_bytes() if hot_fmt == "quantized" and gpu_fmt != "quantized" else 0',
           "hot_ws = 0",
           ("tests/test_plan_allocation.py", "tests/test_gpu_path.py", "-k", "placed_bytes or dequant_workspace"),
           "quantized hot experts beside bf16 weights: the row-block workspace of long chunks unplanned"),
    Mutant("issue18b-hot-blocks-loaded-as-bf16", "hybrid/runtime/loader.py",
           'if getattr(self.plan, "hot_expert_format", "bf16") == "quantized":',
           "if False:",
           ("tests/test_plan_allocation.py",),
           "the Plan counts hot experts at their blocks' bytes, the loader places bf16 copies"),
    # ------------------------------------------------------------------ issue 14: low-bit bench models
    Mutant("issue14c-lowbit-experts-unscaled", "hybrid/fixtures/deepseek2.py",
           "np.frombuffer(np.float16(rms / unit_rms).tobytes(), np.uint8)",
           "np.frombuffer(np.float16(rms).tobytes(), np.uint8)",
           ("tests/test_fixtures.py", "-k", "low_bit"),
           "the random lattice experts keep d = the RMS itself: weights ~15x too large, a model nobody runs"),
    Mutant("issue14c-lowbit-router-of-the-few", "hybrid/fixtures/deepseek2.py",
           "kept = {name for name, ne in shapes if name in g.tensors and tuple(g.tensors[name].ne) == ne}",
           "kept = {name for name, ne in shapes if name in g.tensors}",
           ("tests/test_fixtures.py", "-k", "low_bit"),
           "the few-expert build's router copied into the many-expert model"),
    Mutant("issue15-probe-cache-outlives-the-build", "placement/probe.py",
           '{mem}|{_native_id()}".encode()', '{mem}".encode()',
           ("tests/test_estimate.py", "-k", "rebuilt"),
           "faster kernels after a rebuild, estimates still from the old build's cached figures"),
    Mutant("issue19-probe-six-types", "placement/probe.py",
           "    for t in sorted(CPU_NATIVE_TYPES):", "    for t in (2, 6, 8, 12, 13, 14):",
           ("tests/test_estimate.py", "-k", "probe_measures_once"),
           "issue 19: the probe times Q4_0..Q6_K only; an IQ model's estimate takes Q4_K's speed "
           "(2-5x optimistic)"),
    Mutant("issue19-decode-rate-per-type-ignored", "placement/solver.py",
           "    return lambda ggml_type: min(eff_bw, compute.get(ggml_type, eff_bw))",
           "    return lambda ggml_type: eff_bw",
           ("tests/test_estimate.py", "-k", "own_speed"),
           "issue 19: decode reads every type at the RAM bandwidth; IQ2/IQ3/IQ1 experts compute "
           "at 0.13-0.25 of it"),
    Mutant("issue19-cpu-linears-decode-at-bandwidth", "placement/solver.py",
           "        elif gpu is None and groups", "        elif False and groups",
           ("tests/test_estimate.py", "-k", "own_speed and attention"),
           "issue 19: a CPU-only plan's native non-expert linears decode at the RAM bandwidth "
           "whatever their type"),
    Mutant("issue19-prefill-flops-per-type-ignored", "placement/solver.py",
           "    return lambda ggml_type: by_type.get(ggml_type, flops)",
           "    return lambda ggml_type: flops",
           ("tests/test_estimate.py", "-k", "own_speed"),
           "issue 19: prefill computes every type at Q4_K's FLOP/s"),
    # issue 15: the native causal attention of prompt chunks (native/flash.h)
    Mutant("issue15-flash-mask-one-key-late", "native/arch/x86/flash_x86.h",
           "first + 1 - j0", "first + 2 - j0",
           ("tests/test_flash.py", "-k", "float64 and avx2"),
           "the causal mask lets a query row see the key one position ahead of it"),
    Mutant("issue15-flash-outputs-not-rescaled", "native/arch/x86/flash_x86.h",
           "acc[r][c] = V::mul(V::load(o + r * dv + c * V::W), s);", "acc[r][c] = V::load(o + r * dv + c * V::W);",
           ("tests/test_flash.py", "-k", "float64 and avx2"),
           "a key block that raises a row's max does not rescale what the row summed before"),
    Mutant("issue15-flash-sums-not-rescaled", "native/arch/x86/flash_x86.h",
           "V::fma(V::load(l + v * W), scale, sum)", "V::add(V::load(l + v * W), sum)",
           ("tests/test_flash.py", "-k", "float64 and avx2"),
           "the softmax denominators keep the old max's exponentials"),
    Mutant("issue15-flash-key-tail-dropped", "native/arch/x86/flash_x86.h",
           "for (; j < nk; j++) flash_scores<V, 1, NV>", "for (; j < nk && false; j++) flash_scores<V, 1, NV>",
           ("tests/test_flash.py", "-k", "float64 and avx2"),
           "the keys past the last whole tile of a block keep the previous block's scores"),
    Mutant("issue15-flash-rope-part-ignored", "native/arch/x86/flash_x86.h",
           "    for (int p = 0; p < 2; p++)\n        for (int64_t d = 0; d < dk[p]; d++, qt += kFlashRows) {",
           "    for (int p = 0; p < 1; p++)\n        for (int64_t d = 0; d < dk[p]; d++, qt += kFlashRows) {",
           ("tests/test_flash.py", "-k", "float64 and avx2"),
           "the scores leave out the second key part (MLA's rope dims)"),
    Mutant("issue15-flash-query-heads-interleaved", "native/arch/x86/flash_x86.h",
           "const int64_t r = r0 + std::min(i, n - 1), t = r / G, h = g * G + r % G;",
           "const int64_t r = r0 + std::min(i, n - 1), t = r / G, h = g + r % G * a.Hkv;",
           ("tests/test_flash.py", "-k", "float64 and avx2"),
           "kv head g serves query heads g, g + Hkv, ... instead of g * G .. g * G + G - 1 (ggml's order)"),
    Mutant("issue15-flash-tail-columns-not-rescaled", "native/arch/x86/flash_x86.h",
           "float acc = ob[r * dv + c0] * al[r];", "float acc = ob[r * dv + c0];",
           ("tests/test_flash.py", "-k", "float64 and avx2"),
           "value dims past the last whole vector miss the online softmax's rescale"),
    Mutant("issue15-flash-avx512-mask-one-key-early", "native/arch/x86/avx512.cpp",
           "_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)", "_mm512_cmp_ps_mask(a, b, _CMP_LE_OQ)",
           ("tests/test_kernels.py", "-k", "emulation"),
           "the AVX-512 mask hides the key at the query's own position (checked under SIMDe)"),
    Mutant("issue15-flash-last-row-dropped", "native/flash.cpp",
           "std::min(rows, (b + 1) * kFlashRows)", "std::min(rows - 1, (b + 1) * kFlashRows)",
           ("tests/test_flash.py", "-k", "float64 and scalar"),
           "the work items leave out the chunk's last query row"),
    Mutant("issue15-flash-reference-sees-a-key-ahead", "native/quants.cpp",
           "n = std::min(a.pos0 + t + 1, a.S);", "n = std::min(a.pos0 + t + 2, a.S);",
           ("tests/test_flash.py", "-k", "float64 and scalar"),
           "the scalar reference attends to the key after the query's position"),
    Mutant("issue15-mla-flash-rope-keys-shifted", "hybrid/models/deepseek2.py",
           "q_pe[:, h0:h1],\n                            kv_all[:, C:].unsqueeze(0),",
           "q_pe[:, h0:h1],\n                            kv_all[:, C - 1:-1].unsqueeze(0),",
           ("tests/test_flash.py", "-k", "models and mla"),
           "MLA hands the native attention the wrong columns of the latent cache as its rope keys"),
    Mutant("issue15-mla-flash-head-groups-overlap", "hybrid/models/deepseek2.py",
           "self.causal(q_nope[:, h0:h1], k_nope,", "self.causal(q_nope[:, h0:h0 + 1].expand(-1, h1 - h0, -1), k_nope,",
           ("tests/test_flash.py", "-k", "models and mla"),
           "every head of an expansion group attends with the group's first head's queries"),
    Mutant("issue15-mla-torch-head-groups-overlap", "hybrid/models/deepseek2.py",
           "q = torch.cat((q_nope[:, h0:h1], q_pe[:, h0:h1]), dim=-1)", "q = torch.cat((q_nope[:, :h1 - h0], q_pe[:, :h1 - h0]), dim=-1)",
           ("tests/test_flash.py", "-k", "models and mla"),
           "the torch path's head groups all read the first group's queries"),
    Mutant("issue15-plan-expansion-of-every-head", "placement/inventory.py",
           "return mla_expand_heads(self.n_head) * (", "return self.n_head * (",
           ("tests/test_placement_solver.py", "-k", "reserves"),
           "the Plan sizes a decompressed chunk's K / V expansion for every head at once"),
    Mutant("issue15-runtime-expands-every-head", "hybrid/models/deepseek2.py",
           "step = mla_expand_heads(H)", "step = H",
           ("tests/test_flash.py", "-k", "expand"),
           "the runtime expands every head's K and V at once, beyond the Plan's workspace"),
    Mutant("issue15-gqa-flash-position-lost", "hybrid/models/attention.py",
           "v_all.transpose(0, 1), self.scale, pos0)", "v_all.transpose(0, 1), self.scale, 0)",
           ("tests/test_flash.py", "-k", "models and gqa"),
           "GQA tells the native attention every chunk starts at position 0"),
    Mutant("issue15-estimate-engine-rate-linear-in-tokens", "placement/solver.py",
           "f0 + (f1 - f0) * math.log(n / n0) / math.log(n1 / n0)", "f0 + (f1 - f0) * (n - n0) / (n1 - n0)",
           ("tests/test_estimate.py", "-k", "engines"),
           "the engine's rate between two measured token counts interpolated linearly, not in log(tokens)"),
    Mutant("issue15-estimate-engine-rate-clamped-high", "placement/solver.py",
           "n = min(max(tokens_per_expert, measured[0][0]), measured[-1][0])", "n = measured[-1][0]",
           ("tests/test_estimate.py", "-k", "engines"),
           "every chunk priced at the engine's rate with the most tokens per expert"),
    Mutant("issue15-estimate-engine-rate-every-type-as-q4_K", "placement/solver.py",
           "return lambda ggml_type: q4_engine * flops_of(ggml_type) / flops_of(Q4_K)", "return lambda ggml_type: q4_engine",
           ("tests/test_estimate.py", "-k", "engines"),
           "every expert type at the Q4_K engine's rate, whatever its own matmul's speed"),
    Mutant("issue15-estimate-tokens-per-expert-without-k", "placement/solver.py",
           "flops_of = _expert_flops_of(hw, _flops_of(hw, pol.threads), C * K / E, pol.threads)",
           "flops_of = _expert_flops_of(hw, _flops_of(hw, pol.threads), C / E, pol.threads)",
           ("tests/test_estimate.py", "-k", "engines"),
           "tokens per expert counted as chunk / experts, each token's K experts forgotten"),
    Mutant("issue15-estimate-engine-rate-of-every-cpu", "placement/solver.py",
           "measured = sorted(_on_cpus_used(hw, hw.moe_prefill_flops, threads).items())",
           "measured = sorted((int(k), v) for k, v in hw.moe_prefill_flops.items())",
           ("tests/test_estimate.py", "-k", "cpus_used"),
           "a plan for fewer threads prices the experts at the engine's rate on every cpu"),
    Mutant("issue15-probe-engine-failure-loses-every-figure", "placement/probe.py",
           "except (RuntimeError, ValueError, OSError, MemoryError) as e:", "except () as e:",
           ("tests/test_estimate.py", "-k", "cannot_run"),
           "the engine's timing failing takes the probe's other figures down with it"),
    Mutant("issue15-estimate-engine-not-measured", "placement/hardware.py",
           "hw.moe_prefill_flops = dict(m.get(\"moe_prefill_flops\", {}))", "hw.moe_prefill_flops = {}",
           ("tests/test_estimate.py", "-k", "probe_measures or this_machine"),
           "the probe's engine figures never reach the machine the Plan prices"),
    Mutant("issue15-estimate-chunk-past-the-engines", "placement/solver.py",
           "    C = _engine_chunk(wl)\n", "    C = max(1, wl.prefill_chunk)\n",
           ("tests/test_estimate.py", "-k", "measured_rate_for"),
           "a 4096-token prefill chunk priced at 256 tokens per expert; the engine runs 2048 at a time"),
    Mutant("issue15-engine-scratch-max-k-slots", "native/moe.cpp",
           "const int64_t slots = std::min(max_k_, L->E);", "const int64_t slots = max_k_;",
           ("tests/test_moe.py", "-k", "buffer_bytes"),
           "a one-expert layer (a dense FFN) sizes its h rows for K slots a token: 8x R1's need"),
    Mutant("issue15-engine-k-over-e-accepted", "native/moe.cpp",
           "    if (K > L.E) bad(", "    if (false) bad(",
           ("tests/test_moe.py", "-k", "bad_input"),
           "a call with more experts per token than the layer has overruns the h rows"),
    Mutant("issue15-plan-engine-chunk-512", "placement/solver.py",
           "ENGINE_TOKEN_CHUNK = 2048", "ENGINE_TOKEN_CHUNK = 512",
           ("tests/test_plan_allocation.py", "-k", "engine_buffers"),
           "the Plan sizes the engine's scratch for another chunk than the engine's"),
    Mutant("issue15-plan-engine-without-ffn-layers", "placement/solver.py",
           "inv, wl, cpu_ffns=gpu is None and pol.cpu_weight_format == \"quantized\")",
           "inv, wl, cpu_ffns=False)",
           ("tests/test_placement_archs.py", "-k", "expert_engines_buffers"),
           "the CPU-only Plan forgets the dense FFNs and shared experts the engine holds"),
    Mutant("issue15-plan-engine-scratch-as-load", "placement/plan.py",
           'skip.update(("workspace", "tile_scratch", "expert_scratch"))', 'skip.update(("workspace", "tile_scratch"))',
           ("tests/test_placement_gguf.py", "-k", "rss_growth"),
           "the engine's first-forward scratch predicted as resident right after loading"),
    Mutant("issue15-act-row-q8-k-without-sums", "placement/ggml.py",
           "n // 256 * 292", "n // 256 * 260",
           ("tests/test_placement_gguf.py", "-k", "act_row"),
           "the Plan's q8_K activation rows without their 16 sums"),
    Mutant("issue15-auto-chunk-without-fit-check", "placement/solver.py",
           "    if longer.fits:\n        longer.kv_slots_reason", "    if True:\n        longer.kv_slots_reason",
           ("tests/test_placement_archs.py", "-k", "long_prefill_chunk"),
           "no --prefill-chunk: a CPU-only plan takes 2048 tokens even where their buffers do not fit"),
    Mutant("issue15-auto-chunk-before-slots", "placement/solver.py",
           "        n = most_slots(inv, hw, wl, pol, cap)",
           "        n = most_slots(inv, hw, replace(wl, prefill_chunk=CPU_PREFILL_CHUNK) if auto_chunk else wl, pol, cap)",
           ("tests/test_placement_archs.py", "-k", "long_prefill_chunk"),
           "the KV slots counted with the long chunk's buffers: a slot fewer for it"),
    Mutant("issue15-auto-chunk-on-gpu-plans", "placement/solver.py",
           'if not plan.fits or plan.device != "cpu" or chunk <= wl.prefill_chunk:',
           "if not plan.fits or chunk <= wl.prefill_chunk:",
           ("tests/test_placement_archs.py", "-k", "long_prefill_chunk"),
           "a GPU plan's prefill chunk grows with no room counted in its attention workspace"),
    Mutant("issue15-runtime-ignores-the-plans-chunk", "hybrid/runtime/engine.py",
           "self.prefill_chunk = int(planned or PREFILL_CHUNK)", "self.prefill_chunk = PREFILL_CHUNK",
           ("tests/test_plan_allocation.py", "-k", "engine_buffers"),
           "the runtime runs 512-token chunks where the plan counted (and chose) 2048"),
]


# ------------------------------------------------------------------------------------------ runner


# A failure for one of these is the tree being broken (e.g. mid-edit by someone else), not a
# test noticing the planted bug: reported as an error, never as caught.
BROKEN_TREE = ("ImportError", "ModuleNotFoundError", "SyntaxError", "IndentationError")


def _tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    files = [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    return files + [p.relative_to(ROOT).as_posix() for p in (ROOT / "hybrid").glob("_native*.so")]


def _sync(dst: pathlib.Path, files: list[str], skip_so: bool) -> None:
    """Make dst hold the current content of files (copying only what differs) and nothing
    else, apart from the native build (build/, the .so it writes) and caches."""
    keep = set(files)
    for p in list(dst.rglob("*")):
        rel = p.relative_to(dst).as_posix()
        if (p.is_file() and rel not in keep and not rel.startswith("build/") and rel != "build.log"
                and "__pycache__" not in rel and not (skip_so and rel.startswith("hybrid/_native"))):
            p.unlink()
    for f in files:
        if skip_so and f.startswith("hybrid/_native"):
            continue
        src, out = ROOT / f, dst / f
        data = src.read_bytes()
        if out.is_file() and out.read_bytes() == data:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        shutil.copymode(src, out)


def _scratch(kind: str) -> pathlib.Path:
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
    d = pathlib.Path(tempfile.gettempdir()) / f"hybrid-mutants-{tag}" / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pybind11_cmakedir() -> str | None:
    """pybind11's CMake dir: $PYBIND11_DIR, else from this interpreter or the first python3
    on PATH that has pybind11 (the venv may not: scikit-build-core installs it per build)."""
    if os.environ.get("PYBIND11_DIR"):
        return os.environ["PYBIND11_DIR"]
    for py in (sys.executable, shutil.which("python3")):
        if py:
            r = subprocess.run([py, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip()
    return None


def _build_native(tree: pathlib.Path, log) -> bool:
    py = sys.executable
    cmakedir = _pybind11_cmakedir()
    if cmakedir is None:
        log.write("pybind11 not found: pip install pybind11, or set PYBIND11_DIR\n")
        return False
    cfg = ["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DHYBRID_INPLACE=ON",
           f"-DPython_EXECUTABLE={py}", f"-Dpybind11_DIR={cmakedir}", "-DCMAKE_BUILD_TYPE=Release"]
    for cmd in (cfg, ["cmake", "--build", str(tree / "build"), "-j2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        log.write(r.stdout + r.stderr)
        if r.returncode != 0:
            return False
    return True


def run_one(m: Mutant | None, tests: tuple[str, ...], *, timeout: int, verbose: bool,
            native: bool) -> tuple[str, float, str]:
    """(result, seconds, pytest output tail). m None: the unmutated baseline."""
    t0 = time.time()
    tree = _scratch("native" if native else "python")
    _sync(tree, _tree_files(), skip_so=native)
    target = tree / m.file if m else None
    original = target.read_text() if m else None
    try:
        if m:
            n = original.count(m.old)
            if n != 1:
                return "stale", time.time() - t0, f"`old` occurs {n} times in {m.file}"
            target.write_text(original.replace(m.old, m.new))
        if native:
            with open(tree / "build.log", "w") as log:
                if not _build_native(tree, log):
                    return ("build-failed" if m is None else "caught (build)"), time.time() - t0, \
                        (tree / "build.log").read_text()[-3000:]
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1",
                   HYBRID_FIXTURE_CACHE=os.environ.get("HYBRID_FIXTURE_CACHE", "/tmp/fixture-cache"))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        try:
            r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return "timeout", time.time() - t0, out[-3000:]
        out = r.stdout + r.stderr
        if r.returncode == 0:
            result = "passed" if m is None else "survived"
        elif r.returncode == 1 and any(e in out for e in BROKEN_TREE):
            result = "error (the copy does not import: see the output)"
        elif r.returncode == 1:
            result = "failed" if m is None else "caught"
        else:   # 2 interrupted (collection error), 4 usage, 5 nothing collected
            result = f"error (pytest exit {r.returncode})"
        return result, time.time() - t0, out[-3000:]
    finally:
        if m:
            target.write_text(original)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutants to run (names or globs; default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--baseline", action="store_true",
                    help="run the selected mutants' tests on the unmutated copy (must pass)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant's tests")
    ap.add_argument("-v", "--verbose", action="store_true", help="show pytest's output tail")
    a = ap.parse_args(argv)

    chosen = [m for m in MUTANTS if not a.names or any(fnmatch.fnmatch(m.name, p) for p in a.names)]
    names = [m.name for m in MUTANTS]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        print(f"duplicate mutant names: {sorted(dup)}", file=sys.stderr)
        return 2
    if not chosen:
        print(f"no mutant matches {a.names}; --list shows them", file=sys.stderr)
        return 2
    if a.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file}\n{'':40s} tests: {' '.join(m.tests)}\n{'':40s} {m.why}")
        print(f"{len(chosen)} mutants")
        return 0

    if a.baseline:
        groups: dict[tuple, bool] = {}
        for m in chosen:
            groups.setdefault(m.tests, False)
            groups[m.tests] |= m.native
        bad = 0
        for tests, nat in groups.items():
            res, secs, out = run_one(None, tests, timeout=a.timeout, verbose=a.verbose, native=nat)
            print(f"{res:10s} {secs:6.0f}s  {' '.join(tests)}", flush=True)
            if res != "passed":
                bad += 1
                print(out)
        print(f"baseline: {len(groups) - bad} of {len(groups)} test sets pass unmutated")
        return 1 if bad else 0

    results = []
    for m in chosen:
        res, secs, out = run_one(m, m.tests, timeout=a.timeout, verbose=a.verbose, native=m.native)
        results.append((m, res))
        print(f"{res:16s} {secs:6.0f}s  {m.name}", flush=True)
        if a.verbose or not res.startswith("caught"):
            print("    " + "\n    ".join(out.strip().splitlines()[-25:]))
    caught = sum(r.startswith("caught") for _, r in results)
    survived = [m.name for m, r in results if r == "survived"]
    other = [f"{m.name} ({r})" for m, r in results if not r.startswith("caught") and r != "survived"]
    print(f"\n{len(results)} mutants: {caught} caught, {len(survived)} survived, {len(other)} other"
          + (f"; survived: {', '.join(survived)}" if survived else "")
          + (f"; other: {', '.join(other)}" if other else ""))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
