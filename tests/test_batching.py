"""Continuous batching (hybrid.runtime.batch, hybrid.runtime.scheduler) on tiny deepseek2 and
qwen3moe models: a decode step over many slots gives each row exactly the logits it gets
alone; 16 different requests served together return the texts they return alone; the prefix
cache re-prefills only new tokens and reclaims the least recently used slot."""

import threading

import pytest
import torch

import hybrid
from hybrid.runtime.batch import SlotEngine
from hybrid.runtime.sampling import SamplingParams
from hybrid.runtime.scheduler import Request, Scheduler, TextStream

ARCHS = ["deepseek2", "qwen3moe"]


@pytest.fixture(scope="module", params=ARCHS)
def rt(request, tiny_gguf, gqa_gguf):
    path = tiny_gguf("Q4_K_M") if request.param == "deepseek2" else gqa_gguf(request.param)
    r = hybrid.load(path, device="cpu", ctx=128, parallel=16)     # the most a test here uses
    yield r
    r.close()


def _prompts(rt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, rt.n_vocab, (3 + 2 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("batched_attention", [False, True])
def test_a_batched_decode_step_gives_every_row_its_solo_logits(rt, batched_attention):
    eng = SlotEngine(rt, 8)
    eng.batched_attention = batched_attention
    prompts = _prompts(rt, 8)

    def run(together):
        for s in eng.slots:
            s.truncate(0)
        toks = [int(eng.prefill(s, p).argmax()) for s, p in zip(eng.slots, prompts)]
        rows = []
        for _ in range(5):
            if together:
                lg = eng.decode(eng.slots, toks)
            else:
                lg = torch.cat([eng.decode([s], [t]) for s, t in zip(eng.slots, toks)])
            rows.append(lg.clone())
            toks = [int(x) for x in lg.argmax(-1)]
        return torch.stack(rows)

    solo, batched = run(False), run(True)
    # bit for bit: a request's numbers must not depend on who shares its step
    assert torch.equal(solo, batched), float((solo - batched).abs().max())
    # and the slots really hold their own sequences (rows differ from each other)
    assert not torch.equal(batched[:, 0], batched[:, 1])


def test_prompts_prefilled_together_give_their_solo_logits(rt):
    eng = SlotEngine(rt, 4)
    prompts = _prompts(rt, 4, seed=3)

    def run(together):
        for s in eng.slots:
            s.truncate(0)
        if together:
            first = eng.prefill_many(eng.slots, prompts).clone()
        else:
            first = torch.stack([eng.prefill(s, p) for s, p in zip(eng.slots, prompts)])
        # and each slot holds its own prompt: the next step reads it
        nxt = eng.decode(eng.slots, [int(t) for t in first.argmax(-1)]).clone()
        return first, nxt

    (solo, solo_next), (batched, batched_next) = run(False), run(True)
    assert torch.equal(solo, batched), float((solo - batched).abs().max())
    assert torch.equal(solo_next, batched_next)
    assert [s.tokens[:len(p)] for s, p in zip(eng.slots, prompts)] == prompts


def _serve(rt, prompts, n_slots, prefix_cache=True, max_tokens=12, **kw):
    """Run requests through a Scheduler; returns (texts, requests, scheduler). The scheduler's
    prefill forwards are counted in sched.prefill_sizes (chunks per forward)."""
    eng = SlotEngine(rt, n_slots)
    sizes = []
    many = eng.prefill_many
    eng.prefill_many = lambda slots, chunks: sizes.append(len(chunks)) or many(slots, chunks)
    sched = Scheduler(eng, rt.tokenizer, prefill_chunk=kw.pop("prefill_chunk", 4),
                      prefix_cache=prefix_cache)
    sched.prefill_sizes = sizes
    done = [threading.Event() for _ in prompts]
    texts = [""] * len(prompts)
    reqs = []
    for i, p in enumerate(prompts):
        def emit(kind, val, i=i):
            if kind == "text":
                texts[i] += val
            else:
                assert kind == "done", val
                done[i].set()
        reqs.append(Request(ids=p, emit=emit, max_tokens=max_tokens,
                            sampling=SamplingParams(temperature=0.0), stop_at_eos=False, **kw))
    return texts, reqs, sched, done


def _run(sched, reqs, done, together=True):
    sched.start()
    try:
        if together:
            for r in reqs:
                sched.submit(r)
        for r, d in zip(reqs, done):
            if not together:
                sched.submit(r)
            assert d.wait(120), "a request never finished"
    finally:
        sched.stop()


def test_sixteen_requests_served_together_return_their_solo_texts(rt):
    prompts = _prompts(rt, 16, seed=1)
    kw = dict(prefix_cache=False, max_tokens=24, prefill_chunk=64)
    alone = []
    for p in prompts:     # each on a fresh engine: nothing shared with the others
        texts, reqs, sched, done = _serve(rt, [p], 1, **kw)
        _run(sched, reqs, done)
        alone.append(texts[0])
    texts, reqs, sched, done = _serve(rt, prompts, 16, **kw)
    _run(sched, reqs, done)
    assert sched.max_batch == 16                  # they did share the steps
    assert max(sched.prefill_sizes) > 1           # and prompts shared prefill forwards
    assert texts == alone
    assert len(set(texts)) > 1
    assert all(r.stats.completion_tokens == 24 and r.stats.finish_reason == "length" for r in reqs)


def test_a_second_turn_prefills_only_its_new_tokens(rt):
    first = _prompts(rt, 1, seed=2)[0]
    texts, reqs, sched, done = _serve(rt, [first], 2)
    sched.start()
    try:
        sched.submit(reqs[0])
        assert done[0].wait(60)
        held = list(reqs[0].slot.tokens)           # prompt + all but the last reply token
        second = held + [7, 8, 9]
        ev = threading.Event()
        r2 = Request(ids=second, emit=lambda k, v: ev.set() if k == "done" else None, max_tokens=2,
                     sampling=SamplingParams(temperature=0.0))
        before = sched.counts["prefill_tokens"]
        sched.submit(r2)
        assert ev.wait(60)
        assert r2.stats.cached_tokens == len(held)
        assert sched.counts["prefill_tokens"] - before == 3
        assert r2.slot is reqs[0].slot
        # an unrelated prompt takes the other, least recently used, slot and keeps the chat's
        ev3 = threading.Event()
        r3 = Request(ids=[11, 12, 13], emit=lambda k, v: ev3.set() if k == "done" else None,
                     max_tokens=1, sampling=SamplingParams(temperature=0.0))
        sched.submit(r3)
        assert ev3.wait(60)
        assert r3.slot is not r2.slot and r3.stats.cached_tokens == 0
    finally:
        sched.stop()


def test_stop_strings_end_the_text_and_hold_back_a_possible_start():
    class Dec:
        def push(self, t):
            return chr(t)

        def flush(self):
            return ""

    ts = TextStream(Dec(), ["END"])
    out = []
    for ch in "abEN":
        piece, stopped = ts.push(ord(ch))
        out.append(piece)
        assert not stopped
    assert "".join(out) == "ab"                   # "EN" may still become "END"
    piece, stopped = ts.push(ord("D"))
    assert stopped and piece == ""
    ts = TextStream(Dec(), ["END"])
    for ch in "xEN":
        ts.push(ord(ch))
    assert ts.flush() == "EN"
