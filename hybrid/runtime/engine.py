"""The runtime: apply a Plan to load a GGUF model, prefill in chunks, decode through the KV
cache, sample, stream text. `hybrid.load(...)` returns a Runtime.

Placement is a pass, not a flag in the model: the Runtime asks the solver for a Plan, and
hybrid.runtime.loader.Loader answers the model's requests for weights according to it. The
model class and its KV cache come from the architecture's module in hybrid.models.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from hybrid.gguf_file import GGUFFile
from hybrid.models import get_model_module
from hybrid.models.specs import check_tensors
from hybrid.runtime.loader import DTYPES, Loader, MinimalPlan, TorchLinear
from hybrid.runtime.sampling import Sampler, SamplingParams
from hybrid.runtime.scheduler import TextStream
from placement.solver import PREFILL_CHUNK

log = logging.getLogger(__name__)

__all__ = ["GenerationStats", "MinimalPlan", "Runtime", "TorchLinear", "load"]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0         # prompt tokens reused from the previous sequence
    completion_tokens: int = 0
    finish_reason: str = ""        # "stop" (EOS / stop string) or "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: list = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _solve_plan(path, device, numa, ctx, prefill_chunk, gpu_prefill_tokens=None,
                gpu_prefill_chunk=None, parallel=1):
    """Ask the placement solver where everything goes on this machine (a given GPU-prefill
    threshold goes to it too, so that it reserves the VRAM that needs)."""
    from placement import plan_for_gguf

    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but torch sees no CUDA GPU; "
                         "use device='cpu' (or 'auto')")
    kw = {"ctx": ctx, "numa": numa or "off", "prefill_chunk": prefill_chunk, "batch": parallel}
    if device == "cpu":
        kw["gpus"] = False   # told to stay on the CPU: no CUDA context, not even to look
    if device == "cpu" or not torch.cuda.is_available():
        kw["cpu_only"] = True
        # the native matmul beats an f32 copy at every size measured (2-core AVX2 box, decode
        # of TinyConfig.mid: ~6 ms of ~70 ms per token went to f32 copies of the small
        # linears), and reads 4-7x fewer bytes
        kw["cpu_linear_min_bytes"] = 0
    else:
        kw["gpu_prefill_tokens"] = gpu_prefill_tokens
        kw["gpu_prefill_chunk"] = gpu_prefill_chunk
    plan = plan_for_gguf(path, **kw)
    if device.startswith("cuda") and plan.device == "cpu":
        raise ValueError(f"{path}: device='cuda' asked for, but the placement plan puts nothing "
                         f"on the GPU:\n{plan.to_text()}")
    return plan


def _check_plan_fits(path, plan) -> None:
    """Refuse, before anything is loaded, a plan the solver rejected (e.g. --numa replicate
    whose copy per node does not fit), with the plan's own explanation."""
    if getattr(plan, "fits", True):
        return
    msgs = "; ".join(p.message for p in getattr(plan, "problems", [])) or "see the plan"
    tips = "; ".join(f"{s.message} ({s.cli})" for s in getattr(plan, "suggestions", [])[:3])
    raise ValueError(f"{path}: the model does not fit this machine (numa "
                     f"{getattr(plan, 'numa_mode', 'off')}): {msgs}"
                     + (f". Options: {tips}" if tips else "")
                     + " (hybrid-run MODEL --dry-run prints the full plan)")


def _check_plan_budget(path, plan, gguf, model, args, kv_dtype) -> None:
    """The allocations the metadata sizes, against the Plan's budget, before any is made.

    Weights are as large as the file's tensors; what metadata alone sizes is the KV cache
    (layers x positions x widths; the positions are the Plan's) and what follows from the
    tensor shapes the loader has already checked. A plan made for another file, or a metadata
    value read differently by the solver and the model, is refused here with the figures, not
    met later as an out-of-memory kill. (MinimalPlan, a caller's forced layout, has no budget.)"""
    from placement.units import fmt_bytes

    n = getattr(plan, "n_tensors", None)
    if n is not None:
        have = (len(gguf.tensors), sum(int(t.n_bytes) for t in gguf.tensors.values()))
        if (n, plan.weights_bytes) != have:
            raise ValueError(f"{path}: the plan was made for a model of {n} tensors "
                             f"({fmt_bytes(plan.weights_bytes)}), this file has {have[0]} "
                             f"({fmt_bytes(have[1])}): plan again for this file (load without plan=)")
    tokens, slots = int(plan.kv_cache_tokens), int(getattr(plan, "kv_slots", 1))
    if slots < 1 or tokens % slots:
        raise ValueError(f"{path}: the plan's KV cache of {tokens} tokens does not split into {slots} "
                         f"slots of equal length: plan again (--parallel, --ctx)")
    budget = getattr(plan, "kv_cache_bytes", None)
    if budget is None:
        return
    per_token = model.cache_bytes_per_token(args, kv_dtype)
    if tokens * per_token > budget:
        raise ValueError(f"{path}: the KV cache for {tokens} tokens needs {fmt_bytes(tokens * per_token)} "
                         f"({per_token} B a token over {args.n_layer} layers, {slots} slot(s)), the plan counted "
                         f"{fmt_bytes(budget)} ({plan.kv_bytes_per_token} B a token): the plan does not "
                         f"match this file's metadata; plan again for this file")


class Runtime:
    """A loaded model. Not thread-safe: one sequence at a time."""

    def __init__(self, path, *, device="auto", threads=None, numa="off", ctx=4096, plan=None,
                 prefill_chunk=None, experts="native", cpu_linears="native", progress=None,
                 numa_partitions=None, hugepages=True, copy_progress=None, gpu_paths="auto",
                 decode_graphs="auto", record_expert_stats=False, gpu_prefill_tokens=None,
                 gpu_prefill_chunk=8192, measure_gpu_idle=False, parallel=1):
        self.path = os.fspath(path)
        self.threads_given = threads is not None
        self.threads = int(threads) if threads else _default_threads()
        torch.set_num_threads(self.threads)
        self._torch_threads = self.threads
        self._default_spin_us = None
        # None: the plan's (the solver's choice, whose buffers it counted)
        self.prefill_chunk = None if prefill_chunk is None else int(prefill_chunk)
        self.gguf = GGUFFile(self.path)
        self._tokenizer = None
        self.model = self.loader = self.cache = self.decoder = None
        self.slot_caches: list = []
        self.expert_stats = self.gpu_timer = None
        self.gpu_prefill_tokens = gpu_prefill_tokens
        self.gpu_prefill_chunk = int(gpu_prefill_chunk)
        gpu_opts = dict(gpu_paths=gpu_paths, decode_graphs=decode_graphs,
                        record_expert_stats=record_expert_stats,
                        gpu_prefill_tokens=gpu_prefill_tokens, measure_gpu_idle=measure_gpu_idle)
        try:
            self._load(device, numa, int(ctx), plan, experts, cpu_linears, progress,
                       numa_partitions, hugepages, copy_progress, gpu_opts, parallel)
        except BaseException:
            self.close()
            raise
        self._seq: list[int] = []  # tokens whose K/V are in the cache, in order
        self.last_stats: GenerationStats | None = None

    def _expert_threads(self, numa: str) -> int | None:
        """Workers of the expert engine. Given threads: that many. Otherwise, CPU-only with
        numa off: every allowed CPU (torch and the experts take turns, nothing else runs);
        else node_groups' default, each node's physical cores minus one (that core drives
        the GPU or the other nodes' memory traffic)."""
        if self.threads_given:
            return self.threads
        if numa == "off" and self.device.type == "cpu":
            return self.threads
        return None

    def _load(self, device, numa, ctx, plan, experts, cpu_linears, progress, numa_partitions,
              hugepages, copy_progress, gpu_opts, parallel):
        arch = self.gguf.architecture
        mod = get_model_module(arch, source=self.path)
        if plan is None:
            given = gpu_opts["gpu_prefill_tokens"]
            plan = _solve_plan(self.path, device, numa, ctx, self.prefill_chunk,
                               given if isinstance(given, int) and not isinstance(given, bool) else None,
                               self.gpu_prefill_chunk, parallel)
        _check_plan_fits(self.path, plan)
        self.plan = plan
        if self.prefill_chunk is None:
            planned = (getattr(plan, "workload", None) or {}).get("prefill_chunk")
            self.prefill_chunk = int(planned or PREFILL_CHUNK)
        self.numa = getattr(plan, "numa_mode", None) or numa or "off"
        from hybrid.backends.numa import MODES

        if self.numa not in MODES:
            raise ValueError(f"numa={self.numa!r}: use one of {', '.join(MODES)}")
        if experts != "native" and self.numa != "off":
            log.warning("numa=%s applies to the native expert engine; experts=%r ignores it",
                        self.numa, experts)
        self.device = torch.device(plan.device)
        self.args = mod.ModelArgs.from_gguf(self.gguf.metadata, self.gguf.tensors, self.path)
        # every tensor's shape against the metadata, before any weight is read or sized
        check_tensors(mod.Model.tensor_specs(self.args), self.gguf.tensors, self.path, arch)
        kv_dtype = DTYPES[getattr(plan, "kv_cache_dtype", "f32")]
        _check_plan_budget(self.path, plan, self.gguf, mod.Model, self.args, kv_dtype)
        # one sequence's context: a KV slot's share of the plan's cache
        self.ctx = int(plan.kv_cache_tokens) // int(getattr(plan, "kv_slots", 1))
        t0 = time.perf_counter()
        if copy_progress is None:
            # the caller's progress callback covers loading; a bar of its own otherwise
            copy_progress = progress is None and sys.stderr.isatty()
        gpu_paths = gpu_opts["gpu_paths"]
        self.gpu_paths = self.device.type == "cuda" if gpu_paths == "auto" else bool(gpu_paths)
        a = self.args
        moe_layers = list(range(a.n_dense_lead, a.n_layer)) if a.n_expert > 1 else []
        if gpu_opts["record_expert_stats"]:
            from hybrid.runtime.stats import ExpertStats

            self.expert_stats = ExpertStats(a.n_layer, a.n_expert, moe_layers,
                                            n_expert_used=a.n_expert_used, device=self.device,
                                            model=str(self.gguf.metadata.get("general.name", "")))
        if gpu_opts["measure_gpu_idle"] and self.gpu_paths:
            from hybrid.backends.gpu import GpuIdleTimer

            self.gpu_timer = GpuIdleTimer(len(moe_layers), self.device)
        given = gpu_opts["gpu_prefill_tokens"]
        if given is not None and (isinstance(given, bool) or not hasattr(given, "__index__") or given < 0):
            raise ValueError(f"gpu_prefill_tokens={given!r}: a whole number of tokens >= 0 (0: off; "
                             f"None: the plan's threshold)")
        if given is not None and not self.gpu_paths:
            log.warning("gpu_prefill_tokens applies to the GPU path; this runtime has none")
        # None: the plan's threshold (the solver reserved VRAM for it); an int overrides, 0 is off
        planned = int(getattr(plan, "gpu_prefill_tokens", 0) or 0)
        if given and not planned and self.device.type == "cuda":
            log.warning("gpu_prefill_tokens=%d: the plan reserved no GPU memory for the prefill staging "
                        "buffers (two MoE layers of routed experts); loading may run out of it", given)
        self.gpu_prefill_tokens = (int(given) if given is not None else planned) if self.gpu_paths else 0
        self.loader = Loader(self.gguf, plan, self.threads, experts=experts,
                              cpu_linears=cpu_linears, max_tokens=self.prefill_chunk,
                              numa=self.numa, numa_partitions=numa_partitions,
                              expert_threads=self._expert_threads(self.numa),
                              hugepages=hugepages, copy_progress=copy_progress,
                              gpu_paths=self.gpu_paths, expert_stats=self.expert_stats,
                              gpu_prefill_tokens=self.gpu_prefill_tokens or None,
                              gpu_idle_timer=self.gpu_timer)
        with torch.inference_mode():
            self.model = mod.Model(self.args, self.loader, max_pos=self.ctx,
                                   rope_device=self.device, progress=progress)
        self.loader.finish()
        self.load_s = time.perf_counter() - t0
        # the plan's KV slots, each a cache of ctx tokens; generate() runs in the first, a
        # server (hybrid.runtime.batch.SlotEngine) in all of them
        self.slot_caches = [self.model.new_cache(self.ctx, dtype=kv_dtype, device=self.device)
                            for _ in range(int(getattr(plan, "kv_slots", 1)))]
        self.cache = self.slot_caches[0]
        self.loader.record(self.loader.compute_plan_device(), "kv_cache",      # placed_bytes
                           sum(c.nbytes for c in self.slot_caches))
        self._setup_decoder(gpu_opts["decode_graphs"])

    def _setup_decoder(self, mode):
        """decode_graphs: "auto" (CUDA graphs on the GPU path with CUDA), True / "graphs",
        "static" (the same segmented fixed-shape step without capture), False / "off"."""
        if mode == "auto":
            mode = "graphs" if (self.gpu_paths and self.device.type == "cuda") else "off"
        elif mode is True:
            mode = "graphs"
        elif mode in (False, None):
            mode = "off"
        if mode not in ("graphs", "static", "off"):
            raise ValueError(f"decode_graphs={mode!r}: use 'auto', 'graphs', 'static' or 'off'")
        if mode == "off":
            return
        from hybrid.backends.gpu import DecodeGraphs, OverlappedExperts

        experts = {}
        for il, blk in enumerate(self.model.blocks):
            ex = getattr(blk.ffn, "experts", None)
            if ex is None:
                continue
            if not isinstance(ex, OverlappedExperts):
                log.warning("decode_graphs=%s needs the GPU path's experts (gpu_paths=True, "
                            "native experts); decoding eagerly", mode)
                return
            experts[il] = ex
        self.decoder = DecodeGraphs(self.model, self.cache, experts, self.loader.bridge
                                    if self.loader.bridge is not None else None, self.device,
                                    mode=mode, stats=self.expert_stats)

    # -- tokenizer --------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from hybrid.runtime.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.path, self.gguf.metadata)
        return self._tokenizer

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)

    # -- forward ----------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    def _check_tokens(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(list(tokens) if not isinstance(tokens, (torch.Tensor, np.ndarray)) else tokens,
                            dtype=torch.long).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.args.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.args.n_vocab}); got "
                             f"{int(t.min())}..{int(t.max())}")
        return t

    def _forward(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Run tokens after the cached sequence; returns logits float32 on the device."""
        T = tokens.numel()
        self.cache.check_room(T)
        self._set_threads_for(T)
        pos0 = self.cache.length
        timer = self.gpu_timer if T == 1 else None
        if timer is not None:
            timer.begin_step()
        if self.decoder is not None and T == self.decoder.T and last_only:
            # the decoder's logits are its static output buffer: the caller gets a copy
            logits = self.decoder(self.model.embed(tokens), pos0).clone()   # rows from the mmap
        else:
            logits = self.model(tokens.to(self.device), pos0, self.cache, last_only=last_only)
        if timer is not None:
            timer.end_step()
        self.cache.advance(T)
        self._seq.extend(tokens.tolist())
        return logits

    # A decode step's torch ops are tiny: on more threads each one pays the OpenMP wake-up
    # (passive waiting, see hybrid/__init__.py) for no gain; measured on TinyConfig.mid, 2
    # cores: 70 ms per step with 1 torch thread, 83 ms with 2. Longer inputs use them all.
    _single_thread_tokens = 4
    # Decode issues a native job every few hundred microseconds: the engine's workers spin
    # through the gaps rather than sleep and pay a futex wake-up per job (TinyConfig.mid,
    # 2 cores: ~37 -> ~33 ms a step with 2 ms instead of 100 us). Prefill's gaps are long
    # and torch's threads need the cores: the default applies there.
    decode_spin_us = 2000

    def _set_threads_for(self, T: int) -> None:
        """Torch's thread count and the engine workers' spin for a call of T tokens."""
        decode = T <= self._single_thread_tokens
        n = 1 if decode else self.threads
        if n != self._torch_threads:
            torch.set_num_threads(n)
            self._torch_threads = n
        eng = self.loader.workers.engine if self.loader is not None else None
        if eng is not None:
            if self._default_spin_us is None:
                self._default_spin_us = eng.spin_us
            eng.spin_us = self.decode_spin_us if decode else self._default_spin_us

    def _prefill(self, tokens: torch.Tensor, all_logits: bool, out=None):
        """Prefill in chunks; returns the last token's logits [B] (or fills out [T, B])."""
        last = None
        n = tokens.numel()
        step = self.prefill_chunk
        offload = self.loader.offload if self.loader is not None else None
        if offload is not None and n >= offload.min_tokens:
            # the routed experts stream to the GPU once per chunk: long chunks amortize it
            step = max(step, self.gpu_prefill_chunk, offload.min_tokens)
        for c0 in range(0, n, step):
            chunk = tokens[c0:c0 + step]
            if offload is not None:
                offload.expect_more = c0 + step < n and n - (c0 + step) >= offload.min_tokens
            lg = self._forward(chunk, last_only=not all_logits)
            if all_logits:
                out[c0:c0 + chunk.numel()] = lg.float().cpu().numpy()
            last = lg[-1]
        return last

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.cache.reset()
        self._seq = []

    @torch.inference_mode()
    def logits(self, tokens) -> np.ndarray:
        """Logits of a fresh sequence at every position: float32 [T, n_vocab]."""
        t = self._check_tokens(tokens)
        self.reset()
        out = np.empty((t.numel(), self.args.n_vocab), dtype=np.float32)
        if t.numel():
            self._prefill(t, all_logits=True, out=out)
        return out

    @torch.inference_mode()
    def decode_logits(self, tokens) -> np.ndarray:
        """Like logits(), but one token at a time through the cache (consistency checks)."""
        t = self._check_tokens(tokens)
        self.reset()
        out = np.empty((t.numel(), self.args.n_vocab), dtype=np.float32)
        for i in range(t.numel()):
            out[i] = self._forward(t[i:i + 1], last_only=True)[-1].float().cpu().numpy()
        return out

    # -- generation -------------------------------------------------------------------------

    def _prompt_ids(self, prompt, add_bos, chat_template=None, **template_kw) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_bos=add_bos)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt, template=chat_template, **template_kw)
        if isinstance(prompt, (list, tuple, np.ndarray, torch.Tensor)):
            return [int(x) for x in prompt]
        raise ValueError("prompt must be a string, a list of chat messages "
                         "({'role': ..., 'content': ...}) or a list of token ids")

    @torch.inference_mode()
    def generate_tokens(self, prompt, *, max_tokens: int = 256, temperature: float = 0.6,
                        top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                        seed: int | None = None, stop: Sequence[str] | str | None = None,
                        add_bos: bool | None = None, stop_at_eos: bool = True,
                        chat_template: str | None = None, detokenize: bool = True,
                        **template_kw) -> Iterator[tuple[int, str]]:
        """Yield (token id, text piece) per generated token; see generate(). detokenize=False
        yields empty pieces and, for token-id prompts without stop strings or stop_at_eos,
        needs no tokenizer (benchmarks on a machine without llama-cpp-python)."""
        if stop and not detokenize:
            raise ValueError("stop strings are matched in the text: they need detokenize=True")
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                         repetition_penalty=repetition_penalty, seed=seed))
        ids = self._prompt_ids(prompt, add_bos, chat_template, **template_kw)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if len(ids) + max_tokens > self.ctx:
            max_tokens = max(0, self.ctx - len(ids))
            if max_tokens == 0:
                raise ValueError(f"prompt of {len(ids)} tokens fills the context of {self.ctx}; "
                                 f"load with a larger ctx=")
        stats = GenerationStats(prompt_tokens=len(ids))
        self.last_stats = stats
        # reuse the cached prefix of the previous sequence (chat turns share their history)
        common = 0
        for a, b in zip(self._seq, ids[:-1]):
            if a != b:
                break
            common += 1
        self.cache.truncate(common)
        self._seq = self._seq[:common]
        stats.cached_tokens = common
        t0 = time.perf_counter()
        logits = self._prefill(torch.tensor(ids[common:], dtype=torch.long), all_logits=False)
        stats.prefill_s = time.perf_counter() - t0
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        history = list(ids)
        text = TextStream(self.tokenizer.stream_decoder(), stops) if detokenize else None
        t0 = time.perf_counter()
        stats.finish_reason = "length"
        for i in range(max_tokens):
            tok = sampler(logits, history)
            history.append(tok)
            stats.tokens.append(tok)
            stats.completion_tokens += 1
            if stop_at_eos and self.tokenizer.is_eog(tok):
                stats.finish_reason = "stop"
                break
            piece, stopped = text.push(tok) if text is not None else ("", False)
            if stopped:
                if piece:
                    yield tok, piece
                stats.finish_reason = "stop"
                break
            yield tok, piece
            if i + 1 < max_tokens:
                logits = self._forward(torch.tensor([tok]), last_only=True)[-1]
        if stats.finish_reason == "length" and text is not None:
            tail = text.flush()
            if tail:
                yield -1, tail
        stats.decode_s = time.perf_counter() - t0

    def generate(self, prompt, **kw) -> Iterator[str]:
        """Stream text for a prompt string, chat messages or token ids.

        Keywords: max_tokens=256, temperature=0.6 (0 = greedy), top_k=0, top_p=1.0,
        repetition_penalty=1.0, seed=None, stop=None (strings), add_bos=None (per the
        vocabulary), stop_at_eos=True, chat_template=None (override), and extra template
        variables. After the iterator ends, `last_stats` holds token counts, the finish
        reason and timings.
        """
        for _, piece in self.generate_tokens(prompt, **kw):
            if piece:
                yield piece

    # -- statistics -------------------------------------------------------------------------

    def save_expert_stats(self, path) -> None:
        """Write the routing counts of this runtime's forwards (load with
        record_expert_stats=True) in the format placement's --expert-stats reads."""
        if self.expert_stats is None:
            raise ValueError("routing statistics were not recorded: load with "
                             "record_expert_stats=True (hybrid-run --save-expert-stats FILE)")
        self.expert_stats.save(path)

    def gpu_idle(self) -> dict:
        """GPU idle time per decoded token (load with measure_gpu_idle=True, CUDA only)."""
        return self.gpu_timer.summary() if self.gpu_timer is not None else {"tokens": 0}

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()
            self._tokenizer = None
        self.model = self.decoder = None
        if self.loader is not None:
            self.loader.close()
            self.loader = None
        self.cache = None
        self.slot_caches = []
        if self.gguf is not None:
            self.gguf.close()
            self.gguf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path, device="auto", threads=None, numa="off", ctx=4096, **kw) -> Runtime:
    """Load a GGUF model and return a Runtime.

    device: "auto" (GPU when torch sees one), "cpu" or "cuda"; the placement solver turns it
    into a Plan unless plan= is given (a placement.plan.Plan or an engine.MinimalPlan).
    threads: CPU threads for torch and the native engine (default: all allowed CPUs).
    numa: off | interleave | distribute | replicate (passed to the solver; the plan's
    numa_mode decides how the routed experts are placed, see hybrid.backends.numa). ctx: tokens of
    KV cache per sequence. parallel: KV slots of ctx tokens each, for a server's requests
    (hybrid.runtime.batch.SlotEngine; default 1; None: the most that fit, see
    placement.solver.most_slots); with plan= the plan's kv_slots. Extra keywords: plan,
    prefill_chunk (prompt tokens per forward; None: the plan's, which the solver picks when
    planning here: 2048 for a CPU-only plan where that fits, else 512), experts ("native" / "torch"),
    cpu_linears ("native" / "torch"), progress (callback(done_layers, n_layers) while loading),
    numa_partitions (split each node's CPUs into that many worker groups: the per-node
    placement on a one-node machine), hugepages (True), copy_progress (a bar while the
    placed expert bytes are copied; default: when stderr is a terminal and no progress=).
    A plan that does not fit (plan.fits False) is refused before loading (ValueError).

    GPU path (hybrid/backends/gpu.py): gpu_paths ("auto": when the plan puts compute on the GPU; True
    runs the same code with the CPU as the device, for tests), decode_graphs ("auto": CUDA
    graphs per KV bucket on CUDA; "static": the segmented fixed-shape step without capture;
    "off"), record_expert_stats (count routing for save_expert_stats), gpu_prefill_tokens
    (chunks of at least this many tokens compute routed experts on the GPU, streaming the
    weights; None: the plan's gpu_prefill_tokens, which the solver derives from PCIe and CPU
    speed and reserves VRAM for; 0: off; a threshold the plan did not reserve for may run
    out of GPU memory) with gpu_prefill_chunk (8192), measure_gpu_idle (CUDA events).
    """
    return Runtime(path, device=device, threads=threads, numa=numa, ctx=ctx, **kw)
