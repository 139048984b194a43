// pybind11 wrappers only: argument checking and GIL handling, no kernel logic.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>

#include "dispatch.h"
#include "gemm.h"
#include "gqa.h"
#include "matmul.h"
#include "membench.h"
#include "flash.h"
#include "mla.h"
#include "moe.h"
#include "numa.h"
#include "ops.h"
#include "pool.h"
#include "quants.h"

namespace py = pybind11;
using namespace hybrid;

namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

// A C-contiguous-rows 2-D view of a buffer: rows may be strided, elements may not.
struct view2d {
    const uint8_t* data;
    int64_t rows, cols, row_stride_bytes, itemsize;
    char kind;  // 'f' float32, 'u' uint8, 'h' 16-bit
    bool writable;
};

view2d as_2d(const py::buffer& obj, const std::string& arg) {
    py::buffer_info bi = obj.request();
    view2d v;
    v.data = (const uint8_t*)bi.ptr;
    v.itemsize = bi.itemsize;
    v.writable = !bi.readonly;
    const std::string& f = bi.format;
    if (f == "f" && bi.itemsize == 4)
        v.kind = 'f';
    else if ((f == "B" || f == "b" || f == "c") && bi.itemsize == 1)
        v.kind = 'u';
    else if ((f == "H" || f == "h" || f == "e") && bi.itemsize == 2)
        v.kind = 'h';
    else
        bad(arg + ": unsupported dtype (format '" + f + "')");
    if (bi.ndim == 1) {
        v.rows = 1;
        v.cols = bi.shape[0];
        if (bi.strides[0] != bi.itemsize) bad(arg + ": must be contiguous");
        v.row_stride_bytes = v.cols * bi.itemsize;
    } else if (bi.ndim == 2) {
        v.rows = bi.shape[0];
        v.cols = bi.shape[1];
        if (v.cols > 1 && bi.strides[1] != bi.itemsize)
            bad(arg + ": rows must be contiguous (inner stride " + std::to_string(bi.strides[1]) + ")");
        v.row_stride_bytes = v.rows > 1 ? bi.strides[0] : v.cols * bi.itemsize;
        if (v.row_stride_bytes < 0 || v.row_stride_bytes % bi.itemsize)
            bad(arg + ": unsupported row stride");
    } else {
        bad(arg + ": expected a 1-D or 2-D array, got " + std::to_string(bi.ndim) + "-D");
    }
    return v;
}

std::mutex g_pool_mutex;
std::unique_ptr<ThreadPool> g_pool;

int default_threads() {
    const int n = (int)allowed_cpus().size();
    return n > 0 ? n : 1;
}

// The process-wide pool for stand-alone matmuls; resized when a call asks for another size.
ThreadPool& shared_pool(int threads) {
    if (threads <= 0) threads = default_threads();
    if (!g_pool || g_pool->size() != threads) {
        g_pool.reset();
        g_pool = std::make_unique<ThreadPool>(threads, std::vector<int>{});
    }
    return *g_pool;
}

py::array_t<float> py_dequantize(py::buffer src, int type, int64_t n) {
    const type_info& ti = get_type_info(type);
    if (!ti.name) bad("dequantize: GGML type " + std::to_string(type) + " is not supported");
    if (n < 0 || n % ti.block) bad("dequantize: n=" + std::to_string(n) + " is not a multiple of the " + ti.name + " block size");
    py::buffer_info bi = src.request();
    const int64_t have = bi.size * bi.itemsize;
    if (row_bytes(type, n) > have)
        bad("dequantize: " + std::to_string(n) + " elements of " + ti.name + " need " +
            std::to_string(row_bytes(type, n)) + " bytes, the buffer has " + std::to_string(have));
    py::array_t<float> out(n);
    float* y = out.mutable_data();
    const void* p = bi.ptr;
    const dequant_fn fn = kernels().dequant[type];
    {
        py::gil_scoped_release release;
        fn(p, y, n);
    }
    return out;
}

// A batch of 2-D views: a 3-D buffer [B, rows, cols] (contiguous rows), or a 2-D / 1-D one as
// a batch of one with batch stride 0.
struct view3d {
    view2d m;
    int64_t batch, batch_stride_bytes;
    int ndim;
};

view3d as_3d(const py::buffer& obj, const std::string& arg) {
    py::buffer_info bi = obj.request();
    if (bi.ndim != 3) return {as_2d(obj, arg), 1, 0, (int)bi.ndim};
    // the 2-D view of the first matrix, with the batch stride on top
    view3d v{as_2d(py::memoryview::from_buffer((const void*)bi.ptr, bi.itemsize, bi.format.c_str(),
                                                {bi.shape[1], bi.shape[2]}, {bi.strides[1], bi.strides[2]}),
                   arg),
             bi.shape[0], bi.strides[0], 3};
    v.m.writable = !bi.readonly;
    if (v.batch > 1 && (v.batch_stride_bytes < 0 || v.batch_stride_bytes % bi.itemsize))
        bad(arg + ": unsupported batch stride");
    return v;
}

// A float32 3-D view with any strides but a contiguous last dim (element strides).
struct f32_3d {
    float* p;
    int64_t n[3], s[3];
};

f32_3d as_f32_3d(const py::buffer& obj, const std::string& arg, bool writable) {
    py::buffer_info bi = obj.request();  // read-only buffers too, so that the check below names them
    if (bi.ndim != 3 || bi.itemsize != 4 || py::format_descriptor<float>::format() != bi.format)
        bad(arg + ": expected a 3-D float32 array");
    if (writable && bi.readonly) bad(arg + ": must be writable");
    f32_3d v{(float*)bi.ptr, {bi.shape[0], bi.shape[1], bi.shape[2]}, {0, 0, 0}};
    for (int i = 0; i < 3; i++) {
        if (bi.strides[i] % 4) bad(arg + ": unaligned stride");
        v.s[i] = bi.strides[i] / 4;
    }
    if (v.n[2] > 1 && v.s[2] != 1) bad(arg + ": its last dim must be contiguous");
    return v;
}

// Y[T,N] = X[T,K] @ W[N,K]^T, or batched: W [B,N,K] with X [B,T,K] (or one X [T,K] for all)
// into Y [B,T,N]. On the engine's workers when one is given, else on the shared pool.
py::object py_matmul(py::buffer w, int type, py::buffer x, py::object out, int threads, py::object engine) {
    view3d w3 = as_3d(w, "w");
    const view2d& wv = w3.m;
    if (wv.kind != 'u') bad("w: must be the uint8 bytes of the GGUF tensor, shape [N, row_bytes] or [B, N, row_bytes]");
    view3d x3 = as_3d(x, "x");
    const view2d& xv = x3.m;
    if (xv.kind == 'u') bad("x: must be float32, or uint16 holding bfloat16");
    if (x3.ndim == 3 && x3.batch != w3.batch)
        bad("x: batch of " + std::to_string(x3.batch) + " for " + std::to_string(w3.batch) + " weight matrices");
    const type_info& ti = get_type_info(type);
    if (!ti.name) bad("w: GGML type " + std::to_string(type) + " is not supported");
    matmul_args a;
    a.w = wv.data;
    a.w_type = type;
    a.N = wv.rows;
    a.K = xv.cols;
    a.w_stride = wv.row_stride_bytes;
    if (row_bytes(type, a.K) != wv.cols)
        bad("w: rows hold " + std::to_string(wv.cols) + " bytes but K=" + std::to_string(a.K) + " elements of " +
            ti.name + " take " + std::to_string(row_bytes(type, a.K)) + " (x has the wrong width?)");
    a.x = xv.data;
    a.x_bf16 = xv.kind == 'h';
    a.T = xv.rows;
    a.x_stride = xv.row_stride_bytes / xv.itemsize;
    a.batch = w3.batch;
    a.w_bstride = w3.batch_stride_bytes;
    a.x_bstride = x3.ndim == 3 ? x3.batch_stride_bytes / xv.itemsize : 0;
    const bool batched = w3.ndim == 3;
    py::array_t<float> y;
    if (out.is_none()) {
        y = batched ? py::array_t<float>({(py::ssize_t)a.batch, (py::ssize_t)a.T, (py::ssize_t)a.N})
                    : py::array_t<float>({(py::ssize_t)a.T, (py::ssize_t)a.N});
    } else {
        if (!py::isinstance<py::array_t<float>>(out)) bad("out: must be a float32 numpy array");
        y = py::reinterpret_borrow<py::array_t<float>>(out);
    }
    const std::string want = (batched ? "[B, T, N] = [" + std::to_string(a.batch) + ", " : "[T, N] = [") +
                             std::to_string(a.T) + ", " + std::to_string(a.N) + "]";
    py::buffer_info yb = y.request(true);
    const int lead = batched ? 1 : 0;
    if (yb.ndim != lead + 2 || (batched && yb.shape[0] != a.batch) || yb.shape[lead] != a.T ||
        yb.shape[lead + 1] != a.N || yb.strides[lead + 1] != 4 || yb.strides[lead] % 4 || (batched && yb.strides[0] % 4))
        bad("out: must be float32 " + want + " with contiguous rows");
    a.y = (float*)yb.ptr;
    a.y_stride = yb.strides[lead] / 4;
    a.y_bstride = batched ? yb.strides[0] / 4 : 0;
    matmul_check(a);
    if (!engine.is_none()) {
        MoEEngine& e = engine.cast<MoEEngine&>();
        if (e.busy()) throw std::runtime_error("matmul: the expert engine is busy with a forward; wait() first");
        py::gil_scoped_release release;
        matmul(e.pool(), a);
    } else {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(g_pool_mutex);
        matmul(shared_pool(threads), a);
    }
    return std::move(y);
}

// All experts of one projection as a contiguous uint8 buffer ([E * rows, row_bytes] or any
// shape with that many bytes), e.g. GGUFFile.view("blk.3.ffn_gate_exps.weight").
expert_matrix as_experts(const py::buffer& obj, const std::string& arg, int type, int64_t E, int64_t cols,
                         int64_t first_row) {
    py::buffer_info bi = obj.request();
    const type_info& ti = get_type_info(type);
    if (!ti.name) bad(arg + ": GGML type " + std::to_string(type) + " is not supported");
    if (bi.itemsize != 1) bad(arg + ": must be the uint8 bytes of the GGUF tensor");
    int64_t expect = 1;
    for (int i = bi.ndim - 1; i >= 0; i--) {
        if (bi.shape[i] > 1 && bi.strides[i] != expect) bad(arg + ": must be C-contiguous");
        expect *= bi.shape[i];
    }
    if (cols % ti.block) bad(arg + ": row length " + std::to_string(cols) + " is not a multiple of the " + ti.name + " block");
    const int64_t rb = row_bytes(type, cols);
    const int64_t total = bi.size;
    if (total % (E * rb)) bad(arg + ": " + std::to_string(total) + " bytes is not E=" + std::to_string(E) + " experts of rows of " + std::to_string(rb) + " bytes");
    expert_matrix m;
    m.data = (const uint8_t*)bi.ptr;
    m.type = type;
    m.cols = cols;
    m.rows = total / (E * rb);
    m.row_stride = rb;
    m.expert_stride = rb * m.rows;
    m.first_row = first_row;
    return m;
}

template <class T>
py::array_t<T> engine_buffer(py::object self, T* ptr, int64_t rows, int64_t cols) {
    return py::array_t<T>({(py::ssize_t)rows, (py::ssize_t)cols}, {(py::ssize_t)(cols * sizeof(T)), (py::ssize_t)sizeof(T)}, ptr, self);
}

// One layer's MLA weights for mla_decode, keeping the Python buffers they point into alive.
struct py_mla {
    mla_layer L;
    std::vector<py::object> keep;
};

const float* f32_vector(py::object obj, int64_t n, const std::string& arg, std::vector<py::object>& keep) {
    auto a = py::array_t<float, py::array::c_style>::ensure(obj);
    if (!a || a.ndim() != 1 || a.shape(0) != n) bad(arg + ": expected float32 [" + std::to_string(n) + "]");
    keep.push_back(a);
    return a.data();
}

qlinear as_qlinear(py::object obj, int64_t rows, int64_t cols, const std::string& arg, std::vector<py::object>& keep) {
    auto t = obj.cast<py::tuple>();
    if (t.size() != 2) bad(arg + ": expected (uint8 [rows, row_bytes], ggml_type)");
    view2d v = as_2d(t[0].cast<py::buffer>(), arg);
    qlinear q;
    q.type = t[1].cast<int>();
    const type_info& ti = get_type_info(q.type);
    if (!ti.name) bad(arg + ": GGML type " + std::to_string(q.type) + " is not supported");
    if (v.kind != 'u' || v.rows != rows || v.cols != row_bytes(q.type, cols))
        bad(arg + ": expected " + std::to_string(rows) + " rows of " + std::to_string(cols) + " " + ti.name +
            " elements (" + std::to_string(row_bytes(q.type, cols)) + " bytes)");
    q.w = v.data;
    q.rows = rows;
    q.cols = cols;
    q.stride = v.row_stride_bytes;
    keep.push_back(t[0]);
    return q;
}

const uint8_t* q8_heads(py::object obj, int64_t H, int64_t rows, int64_t cols, const std::string& arg,
                        std::vector<py::object>& keep) {
    auto a = py::array_t<uint8_t, py::array::c_style>::ensure(obj);
    const int64_t rb = row_bytes(GGML_Q8_0, cols);
    if (!a || a.ndim() != 3 || a.shape(0) != H || a.shape(1) != rows || a.shape(2) != rb)
        bad(arg + ": expected Q8_0 rows uint8 [" + std::to_string(H) + ", " + std::to_string(rows) + ", " +
            std::to_string(rb) + "]");
    keep.push_back(a);
    return a.data();
}

// One layer's GQA weights for gqa_decode, keeping the Python buffers they point into alive.
struct py_gqa {
    gqa_layer L;
    std::vector<py::object> keep;
};

// A GQA linear: as_qlinear plus what the matmul needs of it, checked now rather than per call.
qlinear gqa_linear(py::dict d, const char* key, int64_t rows, int64_t cols, std::vector<py::object>& keep) {
    const std::string arg = std::string("GQA: ") + key;
    qlinear q = as_qlinear(d[key], rows, cols, arg, keep);
    const type_info& ti = get_type_info(q.type);
    if (q.type == GGML_Q8_K) bad(arg + ": Q8_K is an activation format, not a weight type the matmul reads");
    if (cols % ti.block)
        bad(arg + ": rows of " + std::to_string(cols) + " elements are not whole " + ti.name + " blocks of " +
            std::to_string(ti.block));
    return q;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "hybrid native kernels: GGML block formats, quantized matmul, expert engine";
    // Resolve HYBRID_ISA now: a bad value fails the import with its message, not a later call.
    kernels();

    m.def("isa", &current_isa, "ISA path in use: scalar, avx2 or avx512");
    m.def("set_isa", &set_isa, py::arg("isa"), "Force an ISA path; ValueError if this CPU cannot run it");
    m.def("available_isas", &available_isas);
    m.def("set_prefill_tiles", &set_gemm_tiles, py::arg("on"),
          "Prefill with the rows x tokens tile kernels (default) or, off, with the per-row dot loops");
    m.def("prefill_tiles", &gemm_tiles);
    m.def("prefill_tile_types", [] {
        std::vector<int> v;
        for (int t = 0; t < GGML_TYPE_LIMIT; t++)
            if (gemm_tile_for(kernels(), t)) v.push_back(t);
        return v;
    }, "GGML types the active ISA prefills with tile kernels (others: per-row dot loops)");
    m.def("cpu_features", &cpu_features);
    m.def("allowed_cpus", &allowed_cpus);
    m.def("supported_types", [] {
        std::vector<int> v;
        for (int t = 0; t < GGML_TYPE_LIMIT; t++)
            if (type_supported(t)) v.push_back(t);
        return v;
    });
    m.def("row_bytes", [](int type, int64_t n) {
        if (!type_supported(type)) bad("row_bytes: GGML type " + std::to_string(type) + " is not supported");
        return row_bytes(type, n);
    });
    m.def("dequantize", &py_dequantize, py::arg("src"), py::arg("ggml_type"), py::arg("n"),
          "Dequantize n elements of GGML blocks to float32 with the active ISA path");
    m.def(
        "quantize_activations",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> x, int weight_type) {
            const type_info& ti = get_type_info(weight_type);
            if (!ti.name) bad("quantize_activations: GGML type " + std::to_string(weight_type) + " is not supported");
            const int64_t n = x.size();
            if (n % ti.block) bad("quantize_activations: length is not a multiple of the " + std::string(ti.name) + " block");
            py::array_t<uint8_t> out(act_row_bytes(ti.act, n));
            kernels().quant_act[ti.act](x.data(), out.mutable_data(), n);
            return out;
        },
        py::arg("x"), py::arg("weight_type"),
        "The activation row a dot with `weight_type` weights consumes (block_q8_K / q8_32 / f32 bytes)");
    m.def("matmul", &py_matmul, py::arg("w"), py::arg("ggml_type"), py::arg("x"), py::arg("out") = py::none(),
          py::arg("threads") = 0, py::arg("engine") = py::none(),
          "Y[T,N] = X[T,K] @ W[N,K]^T; w: uint8 [N, row_bytes] GGUF bytes; x: float32 or bf16 (uint16) [T,K].\n"
          "Batched: w [B, N, row_bytes], x [B, T, K] or one [T, K] for all, out [B, T, N].\n"
          "engine: run on that MoEEngine's workers (all of them; threads is ignored) instead of\n"
          "the shared pool, so one set of spinning workers serves experts and linears alike.");

    m.def(
        "rms_norm",
        [](py::buffer x, py::array_t<float, py::array::c_style> w, float eps, py::buffer out) {
            view2d xv = as_2d(x, "x"), yv = as_2d(out, "out");
            if (xv.kind != 'f') bad("x: must be float32");
            if (yv.kind != 'f' || !yv.writable) bad("out: must be a writable float32 array");
            if (w.ndim() != 1 || w.shape(0) != xv.cols)
                bad("w: expected " + std::to_string(xv.cols) + " floats, got " + std::to_string(w.size()));
            if (yv.rows != xv.rows || yv.cols != xv.cols) bad("out: must have the shape of x");
            const float* wp = w.data();
            py::gil_scoped_release release;
            rms_norm((const float*)xv.data, xv.row_stride_bytes / 4, wp, (float*)yv.data, yv.row_stride_bytes / 4,
                     xv.rows, xv.cols, eps);
        },
        py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("out"),
        "out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, as llama.cpp's rms_norm + mul (rows may be strided)");

    m.def(
        "flash_attention",
        [](py::buffer q, py::buffer k, py::buffer v, py::buffer out, float scale, int64_t pos0, py::object q_rope,
           py::object k_rope, int threads, py::object engine) {
            flash_args a;
            const f32_3d qv = as_f32_3d(q, "q", false), kv = as_f32_3d(k, "k", false), vv = as_f32_3d(v, "v", false),
                         ov = as_f32_3d(out, "out", true);
            a.T = qv.n[0], a.H = qv.n[1], a.dk[0] = qv.n[2];
            a.Hkv = vv.n[0], a.S = vv.n[1], a.dv = vv.n[2];
            a.pos0 = pos0;
            a.scale = scale;
            const std::string want_k = "[" + std::to_string(a.Hkv) + " or 1, " + std::to_string(a.S) + ", ";
            if (kv.n[1] != a.S || (kv.n[0] != a.Hkv && kv.n[0] != 1) || kv.n[2] != a.dk[0])
                bad("k: expected float32 " + want_k + std::to_string(a.dk[0]) + "] (kv heads, keys, q's dims)");
            if (ov.n[0] != a.T || ov.n[1] != a.H || ov.n[2] != a.dv)
                bad("out: expected float32 [" + std::to_string(a.T) + ", " + std::to_string(a.H) + ", " +
                    std::to_string(a.dv) + "]");
            if (q_rope.is_none() != k_rope.is_none()) bad("q_rope and k_rope come together");
            a.q[0] = qv.p, a.q_t[0] = qv.s[0], a.q_h[0] = qv.s[1];
            a.k[0] = kv.p, a.k_h[0] = kv.n[0] == 1 ? 0 : kv.s[0], a.k_s[0] = kv.s[1];
            a.v = vv.p, a.v_h = vv.s[0], a.v_s = vv.s[1];
            a.o = ov.p, a.o_t = ov.s[0], a.o_h = ov.s[1];
            if (!q_rope.is_none()) {
                const f32_3d qr = as_f32_3d(q_rope.cast<py::buffer>(), "q_rope", false),
                             kr = as_f32_3d(k_rope.cast<py::buffer>(), "k_rope", false);
                if (qr.n[0] != a.T || qr.n[1] != a.H)
                    bad("q_rope: expected float32 [" + std::to_string(a.T) + ", " + std::to_string(a.H) + ", R]");
                a.dk[1] = qr.n[2];
                if (kr.n[1] != a.S || (kr.n[0] != a.Hkv && kr.n[0] != 1) || kr.n[2] != a.dk[1])
                    bad("k_rope: expected float32 " + want_k + std::to_string(a.dk[1]) + "]");
                a.q[1] = qr.p, a.q_t[1] = qr.s[0], a.q_h[1] = qr.s[1];
                a.k[1] = kr.p, a.k_h[1] = kr.n[0] == 1 ? 0 : kr.s[0], a.k_s[1] = kr.s[1];
            }
            if (!engine.is_none()) {  // flash_attention checks the heads, dims and keys
                MoEEngine& e = engine.cast<MoEEngine&>();
                if (e.busy()) throw std::runtime_error("flash_attention: the expert engine is busy; wait() first");
                py::gil_scoped_release release;
                flash_attention(e.pool(), a);
            } else {
                py::gil_scoped_release release;
                std::lock_guard<std::mutex> lock(g_pool_mutex);
                flash_attention(shared_pool(threads), a);
            }
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("scale"), py::arg("pos0"),
        py::arg("q_rope") = py::none(), py::arg("k_rope") = py::none(), py::arg("threads") = 0,
        py::arg("engine") = py::none(),
        "Causal softmax attention of a prompt chunk (flash.h): q [T, H, Dk] at positions pos0.., k [Hkv, S, Dk]\n"
        "(or [1, S, Dk]: one for all heads), v [Hkv, S, Dv], into out [T, H, Dv]; query head h reads kv head\n"
        "h // (H / Hkv). Optional second key part q_rope [T, H, R] / k_rope [Hkv or 1, S, R] (MLA's rope dims).\n"
        "Any strides with contiguous last dims (cache views need no copy). On the engine's workers when given.");

    m.def(
        "attention_kernels",
        [](py::array_t<float, py::array::c_style> q, py::array_t<float, py::array::c_style> rows, int64_t C) {
            // the active ISA's attention kernels on their own (tests): softmax-free, as mla uses them
            if (q.ndim() != 2 || rows.ndim() != 2 || q.shape(1) != rows.shape(1) || C < 0 || C > rows.shape(1))
                bad("attention_kernels: q [nq, W], rows [S, W], C <= W");
            const int64_t nq = q.shape(0), S = rows.shape(0), W = rows.shape(1);
            py::array_t<float> scores({(py::ssize_t)nq, (py::ssize_t)S}), values({(py::ssize_t)nq, (py::ssize_t)C});
            kernels().attn_scores(q.data(), nq, rows.data(), W, S, W, scores.mutable_data());
            kernels().attn_values(scores.data(), nq, rows.data(), W, S, C, values.mutable_data());
            return py::make_tuple(scores, values);
        },
        py::arg("q"), py::arg("rows"), py::arg("C"),
        "(scores = q @ rows^T, values = scores @ rows[:, :C]) with the kernels MLA attention uses");

    m.def(
        "exp_sum",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> x, float sub) {
            py::array_t<float> y(x.size());
            std::copy_n(x.data(), x.size(), y.mutable_data());
            const float s = kernels().exp_sum(y.mutable_data(), y.size(), sub);
            return py::make_tuple(y, s);
        },
        py::arg("x"), py::arg("sub"), "(exp(x - sub), its sum) with the active ISA's kernel (attention's softmax)");

    m.def(
        "silu_mul",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> g,
           py::array_t<float, py::array::c_style | py::array::forcecast> u) {
            if (g.size() != u.size()) bad("silu_mul: g and u differ in size");
            py::array_t<float> out(g.size());
            kernels().silu_mul(g.size(), g.data(), u.data(), out.mutable_data());
            return out;
        },
        py::arg("g"), py::arg("u"), "silu(g) * u with the active ISA's kernel (the routed experts' gate)");

    m.def(
        "moe_route",
        [](py::array_t<float, py::array::c_style> logits, py::object bias, int gating, int64_t n_group,
           int64_t n_group_used, int64_t k, bool norm, float scale,
           py::array_t<int64_t, py::array::c_style> ids, py::array_t<float, py::array::c_style> weights) {
            if (logits.ndim() != 2) bad("logits: expected float32 [T, E]");
            const int64_t T = logits.shape(0), E = logits.shape(1);
            if (gating != 1 && gating != 2) bad("gating: 1 (softmax) or 2 (sigmoid), got " + std::to_string(gating));
            if (k < 1 || k > E) bad("k: " + std::to_string(k) + " experts of " + std::to_string(E));
            if (n_group > 1 && (E % n_group || n_group_used < 1 || n_group_used > n_group || k > n_group_used * (E / n_group)))
                bad("groups: " + std::to_string(n_group) + " groups, " + std::to_string(n_group_used) +
                    " used, do not fit E=" + std::to_string(E) + " and k=" + std::to_string(k));
            if (ids.ndim() != 2 || ids.shape(0) != T || ids.shape(1) != k) bad("ids: expected int64 [T, k]");
            if (weights.ndim() != 2 || weights.shape(0) != T || weights.shape(1) != k) bad("weights: expected float32 [T, k]");
            py::array_t<float, py::array::c_style> b;
            if (!bias.is_none()) {
                b = py::array_t<float, py::array::c_style>::ensure(bias);
                if (!b || b.ndim() != 1 || b.shape(0) != E) bad("bias: expected float32 [" + std::to_string(E) + "]");
            }
            const route_params p{gating, n_group, n_group_used, k, norm, scale};
            moe_route(logits.data(), T, E, bias.is_none() ? nullptr : b.data(), p, ids.mutable_data(),
                      weights.mutable_data());
        },
        py::arg("logits"), py::arg("bias"), py::arg("gating"), py::arg("n_group"), py::arg("n_group_used"), py::arg("k"),
        py::arg("norm"), py::arg("scale"), py::arg("ids").noconvert(), py::arg("weights").noconvert(),
        "Expert ids [T, k] (best first) and weights for router logits [T, E], as llama.cpp's deepseek2 routing");

    m.def("file_resident_bytes", &file_resident_bytes, py::arg("path"), "Bytes of a file in the page cache (mincore)");
    py::enum_<mem_policy>(m, "MemPolicy")
        .value("none", mem_policy::none)
        .value("interleave", mem_policy::interleave)
        .value("bind", mem_policy::bind);
    py::class_<NumaBuffer>(m, "NumaBuffer", py::buffer_protocol())
        .def(py::init<int64_t, mem_policy, const std::vector<int>&, bool>(), py::arg("nbytes"), py::arg("policy"),
             py::arg("nodes"), py::arg("hugepages") = true)
        .def_buffer([](NumaBuffer& b) {
            return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1, {(py::ssize_t)b.size()}, {1});
        })
        .def_property_readonly("nbytes", &NumaBuffer::size)
        .def_property_readonly("address", [](NumaBuffer& b) { return (uintptr_t)b.data(); })
        .def_property_readonly("policy_error", &NumaBuffer::policy_error)
        .def_property_readonly("hugepage_error", &NumaBuffer::hugepage_error);

    m.def("stream_read", [](py::buffer buf, int threads) {
        py::buffer_info bi = buf.request();
        const uint8_t* p = (const uint8_t*)bi.ptr;
        const int64_t n = bi.size * bi.itemsize;
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(g_pool_mutex);
        return stream_read(shared_pool(threads), p, n);
    }, py::arg("buffer"), py::arg("threads") = 0, "Read a buffer once on `threads` workers (bandwidth probe)");

    py::class_<MoEEngine>(m, "MoEEngine")
        .def(py::init<const std::vector<std::vector<int>>&, int64_t, int64_t, int64_t>(), py::arg("partition_cpus"),
             py::arg("max_tokens"), py::arg("max_k"), py::arg("d_model"),
             "partition_cpus[p]: CPUs of partition p's workers (-1 = not pinned), one worker each")
        .def(
            "add_layer",
            [](MoEEngine& e, int64_t E, int64_t F, const std::vector<py::tuple>& slices) {
                // slice: (gate, gate_type, up, up_type, down, down_type, f0, f1, d0, d1, first_f, first_d)
                std::vector<moe_slice> parts;
                for (size_t p = 0; p < slices.size(); p++) {
                    const py::tuple& t = slices[p];
                    if (t.size() != 12) bad("add_layer: each slice is a 12-tuple");
                    const std::string tag = slices.size() > 1 ? " (partition " + std::to_string(p) + ")" : "";
                    moe_slice s;
                    s.f0 = t[6].cast<int64_t>();
                    s.f1 = t[7].cast<int64_t>();
                    s.d0 = t[8].cast<int64_t>();
                    s.d1 = t[9].cast<int64_t>();
                    const int64_t first_f = t[10].cast<int64_t>(), first_d = t[11].cast<int64_t>();
                    s.gate = as_experts(t[0].cast<py::buffer>(), "gate" + tag, t[1].cast<int>(), E, e.d_model(), first_f);
                    s.up = as_experts(t[2].cast<py::buffer>(), "up" + tag, t[3].cast<int>(), E, e.d_model(), first_f);
                    s.down = as_experts(t[4].cast<py::buffer>(), "down" + tag, t[5].cast<int>(), E, F, first_d);
                    parts.push_back(s);
                }
                return e.add_layer(E, F, parts);
            },
            py::arg("n_experts"), py::arg("n_ff"), py::arg("slices"),
            "Register a MoE layer: one slice per partition, GGUF bytes used in place (the caller keeps them alive)")
        .def("set_skip",
             [](MoEEngine& e, int layer, py::array_t<uint8_t, py::array::c_style | py::array::forcecast> mask) {
                 e.set_skip(layer, mask.data(), mask.size());
             })
        .def("submit",
             [](MoEEngine& e, int layer, int64_t T, int64_t K, int shared_layer) {
                 py::gil_scoped_release release;
                 e.submit(layer, T, K, shared_layer);
             },
             py::arg("layer"), py::arg("T"), py::arg("K"), py::arg("shared_layer") = -1)
        .def("wait",
             [](MoEEngine& e) {
                 py::gil_scoped_release release;
                 e.wait();
             })
        .def("forward",
             [](MoEEngine& e, int layer, int64_t T, int64_t K, int shared_layer) {
                 py::gil_scoped_release release;
                 e.forward(layer, T, K, shared_layer);
             },
             py::arg("layer"), py::arg("T"), py::arg("K"), py::arg("shared_layer") = -1,
             "submit + wait, the calling thread working as worker 0; shared_layer: a one-expert layer "
             "added for every token with weight 1")
        .def(
            "forward_arrays",
            [](MoEEngine& e, int layer, py::array_t<float, py::array::c_style> x, py::array_t<int64_t, py::array::c_style> ids,
               py::array_t<float, py::array::c_style> w, py::array_t<float, py::array::c_style> out, int shared_layer) {
                // decode's path: staging, forward and result in one call (the Python copies cost
                // ~40 us a layer on this class of machine)
                if (x.ndim() != 2 || x.shape(1) != e.d_model()) bad("x: expected float32 [T, " + std::to_string(e.d_model()) + "]");
                const int64_t T = x.shape(0);
                if (T > e.max_tokens()) bad("x: " + std::to_string(T) + " tokens exceed max_tokens " + std::to_string(e.max_tokens()));
                if (ids.ndim() != 2 || ids.shape(0) != T) bad("ids: expected int64 [T, K]");
                const int64_t K = ids.shape(1);
                if (w.ndim() != 2 || w.shape(0) != T || w.shape(1) != K) bad("weights: expected float32 [T, K]");
                if (out.ndim() != 2 || out.shape(0) != T || out.shape(1) != e.d_model()) bad("out: expected float32 [T, D]");
                if (K < 1 || K > e.max_k()) bad("ids: K=" + std::to_string(K) + " is outside 1.." + std::to_string(e.max_k()));
                const int64_t* ip = ids.data();
                for (int64_t i = 0; i < T * K; i++) e.ids()[i] = ip[i] < 0 ? -1 : (int32_t)std::min<int64_t>(ip[i], INT32_MAX);
                std::copy_n(x.data(), T * e.d_model(), e.x());
                std::copy_n(w.data(), T * K, e.weights());
                float* op = out.mutable_data();
                {
                    py::gil_scoped_release release;
                    e.forward(layer, T, K, shared_layer);
                }
                std::copy_n(e.y(), T * e.d_model(), op);
            },
            // noconvert: arrays of other dtypes or layouts raise TypeError (the caller's cue to
            // take the general path) instead of being copied
            py::arg("layer"), py::arg("x").noconvert(), py::arg("ids").noconvert(), py::arg("weights").noconvert(),
            py::arg("out").noconvert(), py::arg("shared_layer") = -1,
            "forward of float32 x [T, D], int64 ids / float32 weights [T, K] into out [T, D], staging included")
        .def_property_readonly_static("token_chunk", [](py::object) { return MoEEngine::kTokenChunk; },
                                      "tokens per chunk of a call (the scratch is sized for this many at most)")
        .def_property_readonly("busy", &MoEEngine::busy)
        .def_property_readonly("n_layers", &MoEEngine::n_layers)
        .def_property_readonly("max_tokens", &MoEEngine::max_tokens)
        .def_property_readonly("max_k", &MoEEngine::max_k)
        .def_property_readonly("d_model", &MoEEngine::d_model)
        .def_property_readonly("partition_threads", &MoEEngine::partition_threads)
        .def_property_readonly("buffer_bytes", &MoEEngine::buffer_bytes,
                               "bytes of the engine's I/O buffers and chunk scratch (sized by the first forward)")
        .def("layer_info",
             [](MoEEngine& e, int i) {
                 if (i < 0 || i >= e.n_layers()) bad("layer " + std::to_string(i) + " does not exist");
                 const moe_layer& L = e.layer(i);
                 py::dict d;
                 d["E"] = L.E;
                 d["D"] = L.D;
                 d["F"] = L.F;
                 d["types"] = py::make_tuple(L.gate_type(), L.up_type(), L.down_type());
                 return d;
             })
        .def("worker_cpus", [](MoEEngine& e) { return e.pool().worker_cpus(); })
        .def_property(
            "spin_us", [](MoEEngine& e) { return e.pool().spin_us(); },
            [](MoEEngine& e, long us) { e.pool().set_spin_us(us); },
            "How long idle workers spin for the next job before sleeping (microseconds)")
        .def_property_readonly("x", [](py::object self) {
            MoEEngine& e = self.cast<MoEEngine&>();
            return engine_buffer<float>(self, e.x(), e.max_tokens(), e.d_model());
        })
        .def_property_readonly("y", [](py::object self) {
            MoEEngine& e = self.cast<MoEEngine&>();
            return engine_buffer<float>(self, e.y(), e.max_tokens(), e.d_model());
        })
        .def_property_readonly("ids", [](py::object self) {
            MoEEngine& e = self.cast<MoEEngine&>();
            return engine_buffer<int32_t>(self, e.ids(), 1, e.max_tokens() * e.max_k());
        })
        .def_property_readonly("weights", [](py::object self) {
            MoEEngine& e = self.cast<MoEEngine&>();
            return engine_buffer<float>(self, e.weights(), 1, e.max_tokens() * e.max_k());
        });


    py::class_<py_mla>(m, "MLA")
        .def(py::init([](py::dict d) {
                 auto p = std::make_unique<py_mla>();
                 mla_layer& L = p->L;
                 auto i64 = [&](const char* k) { return d[k].cast<int64_t>(); };
                 L.D = i64("D"), L.H = i64("H"), L.N = i64("N"), L.R = i64("R"), L.V = i64("V"), L.C = i64("C");
                 if (L.D <= 0 || L.H <= 0 || L.N <= 0 || L.R <= 0 || L.R % 2 || L.V <= 0 || L.C <= 0)
                     bad("MLA: dims must be positive, R even");
                 if (L.N % 32 || L.C % 32) bad("MLA: N and C must be multiples of 32 (Q8_0 head rows)");
                 L.eps = d["eps"].cast<float>();
                 L.kq_scale = d["kq_scale"].cast<float>();
                 const int64_t QD = L.H * (L.N + L.R);
                 L.attn_norm = f32_vector(d["attn_norm"], L.D, "attn_norm", p->keep);
                 L.kv_a_norm = f32_vector(d["kv_a_norm"], L.C, "kv_a_norm", p->keep);
                 if (!d["q_a"].is_none()) {
                     const int64_t Q = i64("Q");
                     L.q_a = as_qlinear(d["q_a"], Q, L.D, "q_a", p->keep);
                     L.q_a_norm = f32_vector(d["q_a_norm"], Q, "q_a_norm", p->keep);
                     L.q_b = as_qlinear(d["q_b"], QD, Q, "q_b", p->keep);
                 } else {
                     L.q = as_qlinear(d["q"], QD, L.D, "q", p->keep);
                 }
                 L.kv_a = as_qlinear(d["kv_a"], L.C + L.R, L.D, "kv_a", p->keep);
                 L.wo = as_qlinear(d["wo"], L.D, L.H * L.V, "wo", p->keep);
                 L.k_up = q8_heads(d["k_up"], L.H, L.C, L.N, "k_up", p->keep);
                 L.v_up = q8_heads(d["v_up"], L.H, L.V, L.C, "v_up", p->keep);
                 return p;
             }),
             py::arg("weights"),
             "One layer's weights: dict of D H N R V C (Q) eps kq_scale, attn_norm kv_a_norm (q_a_norm) float32,\n"
             "q_a q_b | q (q_a None), kv_a, wo as (uint8 [rows, row_bytes], ggml_type), k_up / v_up Q8_0 [H, rows, bytes]")
        .def(
            "decode",
            [](py_mla& self, py::array_t<float, py::array::c_style> x, int64_t pos0,
               py::array_t<float, py::array::c_style> cache, py::array_t<float, py::array::c_style> rope,
               py::array_t<float, py::array::c_style> out, py::object engine) {
                const mla_layer& L = self.L;
                if (x.ndim() != 2 || x.shape(1) != L.D) bad("x: expected float32 [T, " + std::to_string(L.D) + "]");
                const int64_t T = x.shape(0);
                if (cache.ndim() != 2 || cache.shape(1) != L.C + L.R)
                    bad("cache: expected the layer's float32 rows [P, " + std::to_string(L.C + L.R) + "]");
                if (pos0 < 0 || pos0 + T > cache.shape(0))
                    bad("cache: positions " + std::to_string(pos0) + ".." + std::to_string(pos0 + T) + " exceed its " +
                        std::to_string(cache.shape(0)) + " rows");
                if (rope.ndim() != 2 || rope.shape(1) != L.R || rope.shape(0) < pos0 + T)
                    bad("rope: expected float32 [>= " + std::to_string(pos0 + T) + ", " + std::to_string(L.R) + "]");
                if (out.ndim() != 2 || out.shape(0) != T || out.shape(1) != L.D)
                    bad("out: expected float32 [" + std::to_string(T) + ", " + std::to_string(L.D) + "]");
                const float* xp = x.data();
                float* cp = cache.mutable_data();
                const float* rp = rope.data();
                float* op = out.mutable_data();
                if (!engine.is_none()) {
                    MoEEngine& e = engine.cast<MoEEngine&>();
                    if (e.busy()) throw std::runtime_error("MLA.decode: the expert engine is busy; wait() first");
                    py::gil_scoped_release release;
                    mla_decode(e.pool(), L, xp, T, pos0, cp, rp, op);
                } else {
                    py::gil_scoped_release release;
                    std::lock_guard<std::mutex> lock(g_pool_mutex);
                    mla_decode(shared_pool(0), L, xp, T, pos0, cp, rp, op);
                }
            },
            // cache and out are written: a converted copy would swallow the writes
            py::arg("x"), py::arg("pos0"), py::arg("cache").noconvert(), py::arg("rope"), py::arg("out").noconvert(),
            py::arg("engine") = py::none(),
            "Attention of x [T, D] at positions pos0.. (writes their cache rows) into out [T, D]");

    py::class_<py_gqa>(m, "GQA")
        .def(py::init([](py::dict d) {
                 static const char* known[] = {"D", "H", "Hkv", "Dk", "Dv", "R", "neox", "eps", "kq_scale",
                                               "attn_norm", "q", "k", "v", "o", "bq", "bk", "bv", "q_norm", "k_norm"};
                 for (auto item : d) {
                     const std::string key = py::str(item.first);
                     if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return key == k; }) ==
                         std::end(known))
                         bad("GQA: unknown key '" + key + "'");
                 }
                 for (const char* k : {"D", "H", "Hkv", "Dk", "Dv", "R", "neox", "eps", "kq_scale", "attn_norm", "q",
                                       "k", "v", "o"})
                     if (!d.contains(k)) bad(std::string("GQA: missing '") + k + "'");
                 auto p = std::make_unique<py_gqa>();
                 gqa_layer& L = p->L;
                 auto i64 = [&](const char* k) { return d[k].cast<int64_t>(); };
                 L.D = i64("D"), L.H = i64("H"), L.Hkv = i64("Hkv"), L.Dk = i64("Dk"), L.Dv = i64("Dv"), L.R = i64("R");
                 const std::string dims = " (D=" + std::to_string(L.D) + " H=" + std::to_string(L.H) +
                                          " Hkv=" + std::to_string(L.Hkv) + " Dk=" + std::to_string(L.Dk) +
                                          " Dv=" + std::to_string(L.Dv) + " R=" + std::to_string(L.R) + ")";
                 if (L.D <= 0 || L.H <= 0 || L.Hkv <= 0 || L.Dk <= 0 || L.Dv <= 0)
                     bad("GQA: D, H, Hkv, Dk and Dv must be positive" + dims);
                 if (L.R < 0 || L.R % 2 || L.R > L.Dk) bad("GQA: R must be even and within 0..Dk" + dims);
                 if (L.H % L.Hkv) bad("GQA: H must be a multiple of Hkv" + dims);
                 L.neox = d["neox"].cast<bool>();
                 L.eps = d["eps"].cast<float>();
                 L.kq_scale = d["kq_scale"].cast<float>();
                 if (!(L.eps >= 0.f) || !(L.kq_scale > 0.f) || !std::isfinite(L.kq_scale))
                     bad("GQA: eps must be >= 0 and kq_scale positive");
                 L.attn_norm = f32_vector(d["attn_norm"], L.D, "GQA: attn_norm", p->keep);
                 L.q = gqa_linear(d, "q", L.H * L.Dk, L.D, p->keep);
                 L.k = gqa_linear(d, "k", L.Hkv * L.Dk, L.D, p->keep);
                 L.v = gqa_linear(d, "v", L.Hkv * L.Dv, L.D, p->keep);
                 L.o = gqa_linear(d, "o", L.D, L.H * L.Dv, p->keep);
                 auto opt = [&](const char* k, int64_t n) -> const float* {
                     if (!d.contains(k) || d[k].is_none()) return nullptr;
                     return f32_vector(d[k], n, std::string("GQA: ") + k, p->keep);
                 };
                 L.bq = opt("bq", L.H * L.Dk);
                 L.bk = opt("bk", L.Hkv * L.Dk);
                 L.bv = opt("bv", L.Hkv * L.Dv);
                 L.q_norm = opt("q_norm", L.Dk);
                 L.k_norm = opt("k_norm", L.Dk);
                 return p;
             }),
             py::arg("weights"),
             "One layer's weights: dict of D H Hkv Dk Dv R neox eps kq_scale, attn_norm float32 [D],\n"
             "q k v o as (uint8 [rows, row_bytes], ggml_type), optional float32 bq bk bv, q_norm k_norm [Dk]")
        .def(
            "decode",
            [](py_gqa& self, py::array_t<float, py::array::c_style> x, int64_t pos0,
               py::array_t<float, py::array::c_style> k_cache, py::array_t<float, py::array::c_style> v_cache,
               py::array_t<float, py::array::c_style> rope, py::array_t<float, py::array::c_style> out,
               py::object engine) {
                const gqa_layer& L = self.L;
                if (x.ndim() != 2 || x.shape(1) != L.D) bad("x: expected float32 [T, " + std::to_string(L.D) + "]");
                const int64_t T = x.shape(0);
                auto check_cache = [&](py::array_t<float, py::array::c_style>& c, const char* name, int64_t Dh) {
                    if (c.ndim() != 3 || c.shape(1) != L.Hkv || c.shape(2) != Dh)
                        bad(std::string(name) + ": expected the layer's float32 rows [P, " + std::to_string(L.Hkv) +
                            ", " + std::to_string(Dh) + "]");
                    if (!c.writeable()) bad(std::string(name) + ": must be writable");
                    if (pos0 < 0 || pos0 + T > c.shape(0))
                        bad(std::string(name) + ": positions " + std::to_string(pos0) + ".." + std::to_string(pos0 + T) +
                            " exceed its " + std::to_string(c.shape(0)) + " rows");
                };
                check_cache(k_cache, "k_cache", L.Dk);
                check_cache(v_cache, "v_cache", L.Dv);
                if (rope.ndim() != 2 || rope.shape(1) != L.R || rope.shape(0) < pos0 + T)
                    bad("rope: expected float32 [>= " + std::to_string(pos0 + T) + ", " + std::to_string(L.R) + "]");
                if (out.ndim() != 2 || out.shape(0) != T || out.shape(1) != L.D)
                    bad("out: expected float32 [" + std::to_string(T) + ", " + std::to_string(L.D) + "]");
                const float* xp = x.data();
                float* kp = k_cache.mutable_data();
                float* vp = v_cache.mutable_data();
                const float* rp = rope.data();
                float* op = out.mutable_data();
                if (!engine.is_none()) {
                    MoEEngine& e = engine.cast<MoEEngine&>();
                    if (e.busy()) throw std::runtime_error("GQA.decode: the expert engine is busy; wait() first");
                    py::gil_scoped_release release;
                    gqa_decode(e.pool(), L, xp, T, pos0, kp, vp, rp, op);
                } else {
                    py::gil_scoped_release release;
                    std::lock_guard<std::mutex> lock(g_pool_mutex);
                    gqa_decode(shared_pool(0), L, xp, T, pos0, kp, vp, rp, op);
                }
            },
            // the caches and out are written: a converted copy would swallow the writes
            py::arg("x"), py::arg("pos0"), py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
            py::arg("rope"), py::arg("out").noconvert(), py::arg("engine") = py::none(),
            "Attention of x [T, D] at positions pos0.. (writes their k / v cache rows) into out [T, D]; out may be x");

    py::class_<ThreadPool>(m, "ThreadPool")
        .def(py::init<int, const std::vector<int>&>(), py::arg("threads"), py::arg("cpus") = std::vector<int>{})
        .def_property_readonly("size", &ThreadPool::size)
        .def("worker_cpus", &ThreadPool::worker_cpus);
}
