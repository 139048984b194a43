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
