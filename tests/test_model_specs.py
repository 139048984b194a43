"""Every architecture declares the shape of each tensor it reads (Model.tensor_specs); a file
whose tensors disagree with its metadata, or that lacks one, is refused before loading with
one line naming the file, the tensor, the expected and the found shape."""

import pytest

import hybrid
from hybrid.fixtures.gguf_writer import rewrite_gguf
from hybrid.gguf_file import GGUFFile
from hybrid.models import get_model_module
from hybrid.models.layers import ModelConfigError
from hybrid.models.specs import check_tensors

from test_cli import assert_one_line_error, hybrid_run


def _specs_of(path):
    with GGUFFile(path) as g:
        mod = get_model_module(g.architecture)
        args = mod.ModelArgs.from_gguf(g.metadata, g.tensors, str(path))
        return mod.Model.tensor_specs(args), dict(g.tensors)


def test_specs_cover_every_tensor_of_the_fixture(tiny_f32):
    specs, tensors = _specs_of(tiny_f32)
    check_tensors(specs, tensors, str(tiny_f32), "deepseek2")         # a good file passes
    declared = {s.name for s in specs}
    assert set(tensors) <= declared, sorted(set(tensors) - declared)  # nothing read undeclared
    assert all(s.name in tensors for s in specs if s.required)


def test_a_missing_tensor_is_named(tiny_f32, tmp_path):
    bad = rewrite_gguf(tiny_f32, tmp_path / "missing.gguf", drop=["blk.1.attn_kv_a_norm.weight"])
    with pytest.raises(ModelConfigError, match=r"missing.gguf: tensor 'blk.1.attn_kv_a_norm.weight' "
                                               r"is missing \(expected shape \[64\]\)"):
        hybrid.load(bad, device="cpu", threads=1, ctx=64)


def test_a_tensor_whose_shape_disagrees_is_named(tiny_f32, tmp_path):
    # the same bytes as [D, H*Vd] instead of [H*Vd, D]: only the shape check can tell
    bad = rewrite_gguf(tiny_f32, tmp_path / "shape.gguf", reshape={"blk.2.attn_output.weight": (256, 128)})
    with pytest.raises(ModelConfigError, match=r"shape.gguf: tensor 'blk.2.attn_output.weight' has "
                                               r"shape \[256, 128\], expected \[128, 256\] from "):
        hybrid.load(bad, device="cpu", threads=1, ctx=64)


def test_the_cli_says_it_in_one_line(tiny_f32, tmp_path):
    bad = rewrite_gguf(tiny_f32, tmp_path / "shape.gguf", reshape={"blk.2.attn_output.weight": (256, 128)})
    r = hybrid_run(bad, "--device", "cpu", "-p", "hi", "--max-tokens", "2")
    assert_one_line_error(r, "shape.gguf", "'blk.2.attn_output.weight'", "[256, 128]", "expected [128, 256]")


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama", "glm4moe"])
def test_gqa_specs_cover_every_tensor_the_model_runs(gqa_gguf, arch):
    path = gqa_gguf(arch, "F32")
    specs, tensors = _specs_of(path)
    check_tensors(specs, tensors, str(path), arch)
    with GGUFFile(path) as g:
        n_run = get_model_module(arch).ModelArgs.from_gguf(g.metadata, g.tensors, str(path)).n_layer
    run = {n for n in tensors if not n.startswith("blk.") or int(n.split(".")[1]) < n_run}
    declared = {s.name for s in specs}
    assert run <= declared, sorted(run - declared)       # the MTP block is the only thing left out
    assert all(s.name in tensors for s in specs if s.required)


def test_a_gqa_head_count_that_disagrees_is_named(gqa_gguf, tmp_path):
    path = gqa_gguf("qwen3moe", "F32")
    with GGUFFile(path) as g:
        ne = g.tensors["blk.0.attn_k.weight"].ne
    bad = rewrite_gguf(path, tmp_path / "k.gguf", reshape={"blk.0.attn_k.weight": (ne[0] * 2, ne[1] // 2)})
    with pytest.raises(ModelConfigError, match=r"k.gguf: tensor 'blk.0.attn_k.weight' has shape "
                                               r"\[%d, %d\], expected \[%d, %d\]" % (ne[0] * 2, ne[1] // 2, *ne)):
        hybrid.load(bad, device="cpu", threads=1, ctx=64)


# --- allocations the metadata sizes are checked against the Plan first (issue 17) ---------------

def _no_loading(monkeypatch):
    """Fail the test if the loader starts: the refusal must come before any weight is placed."""
    import hybrid.runtime.engine as engine

    def refuse(*a, **k):
        raise AssertionError("the loader started before the plan's budget was checked")

    monkeypatch.setattr(engine, "Loader", refuse)


def test_a_plan_for_another_file_is_refused_before_loading(tiny_gguf, tiny_f32, monkeypatch):
    from placement import plan_for_gguf

    other = plan_for_gguf(str(tiny_gguf("F32", n_layer=4)), ctx=128, cpu_only=True)
    _no_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"the plan was made for a model of \d+ tensors .* plan again"):
        hybrid.load(tiny_f32, device="cpu", ctx=128, plan=other)


@pytest.mark.parametrize("arch", ["deepseek2", "qwen3moe"])
def test_a_kv_cache_beyond_the_plans_budget_is_refused_before_loading(tiny_f32, gqa_gguf, monkeypatch,
                                                                      arch):
    from placement import plan_for_gguf

    path = tiny_f32 if arch == "deepseek2" else gqa_gguf(arch, "F32")
    plan = plan_for_gguf(str(path), ctx=128, cpu_only=True)
    assert plan.kv_cache_bytes == 128 * plan.kv_bytes_per_token
    # the solver and the model agree to the byte: a plan one byte a token short is refused
    plan.kv_cache_bytes -= 128
    _no_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"the KV cache for 128 tokens needs .* the plan counted"):
        hybrid.load(path, device="cpu", ctx=128, plan=plan)
