// Python bindings of fastes._C. Each concept keeps its kernels in its own files (noise_cpu.cpp,
// noise_cuda.cu, es_update_cpu.cpp, stochastic_round_cpu.cpp) behind a plain C ABI; this file only
// validates inputs, picks the device and the stream, and converts errors (bad input -> ValueError).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#ifdef FASTES_WITH_CUDA
// c10 only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers for nothing.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "attention.h"
#include "noise.h"
#include "philox.h"
#include "stochastic_round.h"
#include "update.h"

namespace py = pybind11;

namespace {

constexpr uint64_t kU32Max = 0xFFFFFFFFull;
constexpr uint64_t kU64Max = ~0ull;

// A Python int in [0, max], or ValueError naming `arg` (bools and floats are refused, like
// fastes.noise.check_uint). Taken as an object so that 2**64 - 1 and negative values give a
// ValueError instead of pybind's TypeError for an unmatched overload.
uint64_t to_uint(const py::handle& obj, const char* arg, uint64_t max) {
  if (PyBool_Check(obj.ptr()) || !PyLong_Check(obj.ptr()))
    throw py::value_error(std::string(arg) + " must be a non-negative integer, got " + std::string(py::repr(obj)));
  const unsigned long long v = PyLong_AsUnsignedLongLong(obj.ptr());
  if (PyErr_Occurred()) {  // negative or >= 2**64
    PyErr_Clear();
    throw py::value_error(std::string(arg) + " must be in [0, " + std::to_string(max) + "], got " +
                          std::string(py::repr(obj)));
  }
  if (v > max)
    throw py::value_error(std::string(arg) + " must be in [0, " + std::to_string(max) + "], got " + std::to_string(v));
  return v;
}

uint32_t to_u32(const py::handle& obj, const char* arg) { return (uint32_t)to_uint(obj, arg, kU32Max); }

// kind: 0 / 1, or the names used by fastes.noise ("gaussian" / "rademacher").
int to_kind(const py::handle& obj) {
  if (py::isinstance<py::str>(obj)) {
    const std::string s = obj.cast<std::string>();
    if (s == "gaussian") return FASTES_KIND_GAUSSIAN;
    if (s == "rademacher") return FASTES_KIND_RADEMACHER;
  } else if (!PyBool_Check(obj.ptr()) && PyLong_Check(obj.ptr())) {
    const long long k = PyLong_AsLongLong(obj.ptr());
    if (PyErr_Occurred()) PyErr_Clear();
    else if (k == FASTES_KIND_GAUSSIAN || k == FASTES_KIND_RADEMACHER) return (int)k;
  }
  throw py::value_error("kind must be 0 ('gaussian') or 1 ('rademacher'), got " + std::string(py::repr(obj)));
}

// Threads for a CPU kernel: torch's intra-op setting unless given explicitly.
int resolve_threads(int64_t num_threads) {
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0: torch.get_num_threads())");
  return num_threads == 0 ? at::get_num_threads() : (int)num_threads;
}

void check_float_out(const torch::Tensor& out) {
  if (out.scalar_type() != torch::kFloat32)
    throw py::value_error(std::string("out must be a float32 tensor, got ") + std::string(c10::toString(out.scalar_type())));
  if (!out.is_contiguous()) throw py::value_error("out must be contiguous");
}

// Fills `out` (flattened) with elements offset.. of one noise stream; returns `out`.
torch::Tensor noise_fill(torch::Tensor out, const py::object& seed_obj, const py::object& tensor_id_obj,
                         const py::object& noise_index_obj, const py::object& step_obj, const py::object& offset_obj,
                         const py::object& kind_obj, int64_t num_threads) {
  check_float_out(out);
  const uint64_t seed = to_uint(seed_obj, "seed", kU64Max);
  const uint32_t tensor_id = to_u32(tensor_id_obj, "tensor_id");
  const uint32_t noise_index = to_u32(noise_index_obj, "noise_index");
  const uint32_t step = to_u32(step_obj, "step");
  const uint64_t offset = to_uint(offset_obj, "offset", kU64Max);
  const int kind = to_kind(kind_obj);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const uint64_t per = kind == FASTES_KIND_GAUSSIAN ? FASTES_GAUSSIAN_PER_BLOCK : FASTES_RADEMACHER_PER_BLOCK;
  const uint64_t last = offset + (uint64_t)(n - 1);
  if (last < offset || last / per > kU32Max)
    throw py::value_error("noise stream exceeds 2**32 blocks; tensor too large for one counter space");

  const char* err = nullptr;
  if (out.device().is_cpu()) {
    const int threads = resolve_threads(num_threads);
    float* ptr = out.data_ptr<float>();
    py::gil_scoped_release no_gil;
    err = fastes_noise_fill_cpu(ptr, n, seed, tensor_id, noise_index, step, offset, kind, threads);
  } else if (out.device().is_cuda()) {
#ifdef FASTES_WITH_CUDA
    const c10::cuda::CUDAGuard guard(out.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
    err = fastes_noise_fill_cuda(out.data_ptr<float>(), n, seed, tensor_id, noise_index, step, offset, kind, stream);
    if (err) throw std::runtime_error(std::string("fastes noise_fill CUDA launch failed: ") + err);
#else
    throw std::runtime_error(
        "fastes._C was built without CUDA (torch without CUDA or nvcc not found at build time); "
        "rebuild with `pip install -e . --no-build-isolation` on a CUDA machine, or use the Triton/torch path");
#endif
  } else {
    throw py::value_error("out must be on a CPU or CUDA device, got " + out.device().str());
  }
  if (err) throw py::value_error(err);
  return out;
}

std::vector<uint32_t> to_indices(const py::sequence& seq) {
  std::vector<uint32_t> out;
  out.reserve(seq.size());
  for (const py::handle& item : seq) out.push_back(to_u32(item, "noise_indices"));
  return out;
}

void check_cpu_contiguous(const torch::Tensor& t, const char* arg) {
  if (!t.device().is_cpu()) throw py::value_error(std::string(arg) + " must be a CPU tensor, got " + t.device().str());
  if (!t.is_contiguous()) throw py::value_error(std::string(arg) + " must be contiguous");
}

// FASTES_DTYPE_* of a float32 / bfloat16 / float16 tensor, or ValueError naming `arg`.
int dtype_code(const torch::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return FASTES_DTYPE_FLOAT32;
    case torch::kBFloat16: return FASTES_DTYPE_BFLOAT16;
    case torch::kFloat16: return FASTES_DTYPE_FLOAT16;
    default:
      throw py::value_error(std::string(arg) + " must be float32, bfloat16 or float16, got " +
                            std::string(c10::toString(t.scalar_type())));
  }
}

// Row r of out [K, n] <- elements offset.. of stream (seed, tensor_id, noise_indices[r], step); CPU only.
torch::Tensor noise_fill_many(torch::Tensor out, const py::object& seed_obj, const py::object& tensor_id_obj,
                              const py::sequence& indices_obj, const py::object& step_obj,
                              const py::object& offset_obj, const py::object& kind_obj, int64_t num_threads) {
  check_float_out(out);
  check_cpu_contiguous(out, "out");
  const std::vector<uint32_t> indices = to_indices(indices_obj);
  if (out.dim() != 2 || out.size(0) != (int64_t)indices.size())
    throw py::value_error("out must be 2-D [K, n] with K = len(noise_indices) = " + std::to_string(indices.size()));
  const uint64_t seed = to_uint(seed_obj, "seed", kU64Max);
  const uint32_t tensor_id = to_u32(tensor_id_obj, "tensor_id");
  const uint32_t step = to_u32(step_obj, "step");
  const uint64_t offset = to_uint(offset_obj, "offset", kU64Max);
  const int kind = to_kind(kind_obj);
  const int threads = resolve_threads(num_threads);
  float* ptr = out.data_ptr<float>();
  const char* err;
  {
    py::gil_scoped_release no_gil;
    err = fastes_noise_fill_many_cpu(ptr, out.size(0), out.size(1), seed, tensor_id, indices.data(), step, offset,
                                     kind, threads);
  }
  if (err) throw py::value_error(err);
  return out;
}

// Fused full-rank ES update of a CPU weight in place (coeffs already hold lr * s * folded c_k).
torch::Tensor es_update_full(torch::Tensor weight, const py::object& seed_obj, const py::object& tensor_id_obj,
                             const py::sequence& indices_obj, const std::vector<double>& coeffs,
                             const py::object& step_obj, const py::object& kind_obj,
                             const py::object& sr_tensor_id_obj, int64_t num_threads) {
  check_cpu_contiguous(weight, "weight");
  const int dtype = dtype_code(weight, "weight");
  const std::vector<uint32_t> indices = to_indices(indices_obj);
  if (indices.size() != coeffs.size())
    throw py::value_error("coeffs must have one entry per noise index, got " + std::to_string(coeffs.size()) +
                          " for " + std::to_string(indices.size()));
  const std::vector<float> c(coeffs.begin(), coeffs.end());  // fp32, like the Triton kernel's coefficients
  const uint64_t seed = to_uint(seed_obj, "seed", kU64Max);
  const uint32_t tensor_id = to_u32(tensor_id_obj, "tensor_id");
  const uint32_t step = to_u32(step_obj, "step");
  const int kind = to_kind(kind_obj);
  const uint32_t sr_tensor_id = to_u32(sr_tensor_id_obj, "sr_tensor_id");
  const int threads = resolve_threads(num_threads);
  void* ptr = weight.data_ptr();
  const char* err;
  {
    py::gil_scoped_release no_gil;
    err = fastes_es_update_full_cpu(ptr, dtype, weight.numel(), seed, tensor_id, indices.data(), c.data(),
                                    (int64_t)c.size(), step, kind, sr_tensor_id, threads);
  }
  if (err) throw py::value_error(err);
  return weight;
}

// out <- value (fp32) stochastically rounded to out's dtype with the bits of elements offset.. of
// the rounding stream (seed, sr_tensor_id, SR_NOISE_INDEX, step); CPU only.
torch::Tensor stochastic_round(const torch::Tensor& value, torch::Tensor out, const py::object& seed_obj,
                               const py::object& sr_tensor_id_obj, const py::object& step_obj,
                               const py::object& offset_obj, int64_t num_threads) {
  if (value.scalar_type() != torch::kFloat32) throw py::value_error("value must be a float32 tensor");
  check_cpu_contiguous(value, "value");
  check_cpu_contiguous(out, "out");
  const int dtype = dtype_code(out, "out");
  if (value.numel() != out.numel())
    throw py::value_error("value and out must have the same number of elements, got " +
                          std::to_string(value.numel()) + " and " + std::to_string(out.numel()));
  const uint64_t seed = to_uint(seed_obj, "seed", kU64Max);
  const uint32_t sr_tensor_id = to_u32(sr_tensor_id_obj, "sr_tensor_id");
  const uint32_t step = to_u32(step_obj, "step");
  const uint64_t offset = to_uint(offset_obj, "offset", kU64Max);
  if (dtype != FASTES_DTYPE_FLOAT32) {  // narrower out over its own input: threads would race
    const char* a = (const char*)value.data_ptr();
    const char* b = (const char*)out.data_ptr();
    if (a < b + out.nbytes() && b < a + value.nbytes()) throw py::value_error("value and out must not overlap");
  }
  const int threads = resolve_threads(num_threads);
  const float* src = value.data_ptr<float>();
  void* dst = out.data_ptr();
  const char* err;
  {
    py::gil_scoped_release no_gil;
    err = fastes_stochastic_round_cpu(src, dst, dtype, value.numel(), seed, sr_tensor_id, step, offset, threads);
  }
  if (err) throw py::value_error(err);
  return out;
}

// Raw stream: int64 [num_blocks, 4] of uint32 words (the layout of fastes.noise.uint32_blocks).
torch::Tensor philox_blocks(const py::object& seed_obj, const py::object& tensor_id_obj,
                            const py::object& noise_index_obj, const py::object& step_obj,
                            const py::object& start_block_obj, const py::object& num_blocks_obj, int64_t num_threads) {
  const uint64_t seed = to_uint(seed_obj, "seed", kU64Max);
  const uint32_t tensor_id = to_u32(tensor_id_obj, "tensor_id");
  const uint32_t noise_index = to_u32(noise_index_obj, "noise_index");
  const uint32_t step = to_u32(step_obj, "step");
  const uint64_t start_block = to_uint(start_block_obj, "start_block", kU32Max);
  const uint64_t num_blocks = to_uint(num_blocks_obj, "num_blocks", kU32Max + 1);
  if (start_block + num_blocks > kU32Max + 1)
    throw py::value_error("noise stream exceeds 2**32 blocks; tensor too large for one counter space");
  const int threads = resolve_threads(num_threads);
  torch::Tensor out = torch::empty({(int64_t)num_blocks, 4}, torch::dtype(torch::kInt64));
  int64_t* ptr = out.data_ptr<int64_t>();
  const char* err;
  {
    py::gil_scoped_release no_gil;
    err = fastes_philox_blocks_cpu(ptr, seed, tensor_id, noise_index, step, start_block, (int64_t)num_blocks, threads);
  }
  if (err) throw py::value_error(err);
  return out;
}

// Gaussians [..., 4] of given words [..., 4] (int64 holding uint32), like fastes.noise.gaussian_from_words.
torch::Tensor gaussian_from_words(const torch::Tensor& words, int64_t num_threads) {
  if (words.scalar_type() != torch::kInt64 || !words.device().is_cpu())
    throw py::value_error("words must be an int64 CPU tensor");
  if (words.dim() == 0 || words.size(-1) != 4) throw py::value_error("words must have shape [..., 4]");
  const torch::Tensor w = words.contiguous();
  if (w.numel() && (w.min().item<int64_t>() < 0 || w.max().item<int64_t>() > (int64_t)kU32Max))
    throw py::value_error("words must hold uint32 values in [0, 2**32)");
  const int threads = resolve_threads(num_threads);
  torch::Tensor out = torch::empty(w.sizes(), torch::dtype(torch::kFloat32));
  const int64_t* src = w.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const char* err;
  {
    py::gil_scoped_release no_gil;
    err = fastes_gaussian_from_words_cpu(src, w.numel() / 4, dst, threads);
  }
  if (err) throw py::value_error(err);
  return out;
}

// Philox4x32-10 on an explicit counter and key, for known-answer tests of the C++ generator.
py::tuple philox4x32_raw(const py::object& c0, const py::object& c1, const py::object& c2, const py::object& c3,
                         const py::object& k0, const py::object& k1) {
  const fastes_u32x4 w = fastes_philox4x32_10(to_u32(c0, "c0"), to_u32(c1, "c1"), to_u32(c2, "c2"), to_u32(c3, "c3"),
                                              to_u32(k0, "k0"), to_u32(k1, "k1"));
  return py::make_tuple(w.x[0], w.x[1], w.x[2], w.x[3]);
}

bool has_cuda() {
#ifdef FASTES_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// Paged attention on CPU, float32 (see attention.h); writes and returns `out`.
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                              const torch::Tensor& cu_seqlens_q, const torch::Tensor& seq_lens,
                              const torch::Tensor& block_tables, double scale, torch::Tensor out, int64_t window,
                              int64_t num_threads) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&q, &k_cache, &v_cache, &out})
    if (t->device().type() != torch::kCPU || t->scalar_type() != torch::kFloat32)
      throw py::value_error("paged_attention: q, k_cache, v_cache and out must be float32 CPU tensors");
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&cu_seqlens_q, &seq_lens, &block_tables})
    if (t->device().type() != torch::kCPU || t->scalar_type() != torch::kInt32 || !t->is_contiguous())
      throw py::value_error("paged_attention: cu_seqlens_q, seq_lens and block_tables must be contiguous int32 CPU");
  if (q.dim() != 3 || k_cache.dim() != 4 || !k_cache.is_contiguous() || !v_cache.is_contiguous() ||
      k_cache.sizes() != v_cache.sizes() || q.size(2) != k_cache.size(3) || q.stride(2) != 1)
    throw py::value_error("paged_attention: q must be [T, heads, D] (D contiguous), caches contiguous and alike");
  if (!out.is_contiguous() || out.sizes() != q.sizes()) throw py::value_error("paged_attention: bad out");
  const int64_t num_seqs = seq_lens.numel();
  if (cu_seqlens_q.numel() != num_seqs + 1 || block_tables.dim() != 2 || block_tables.size(0) != num_seqs)
    throw py::value_error("paged_attention: cu_seqlens_q must have S+1 entries and block_tables S rows");
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  if (num_seqs > 0 && (cu[0] != 0 || cu[num_seqs] > q.size(0)))
    throw py::value_error("paged_attention: cu_seqlens_q must start at 0 and end within q's rows");
  const char* err = fastes_paged_attention_cpu(
      q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), cu, seq_lens.data_ptr<int32_t>(),
      block_tables.data_ptr<int32_t>(), num_seqs, block_tables.size(1), k_cache.size(0), q.size(1),
      k_cache.size(2), q.size(2), k_cache.size(1), q.stride(0), q.stride(1), (float)scale, window,
      out.data_ptr<float>(), resolve_threads(num_threads));
  if (err != nullptr) throw py::value_error(std::string("paged_attention: ") + err);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastes C++/CUDA kernels (noise contract of DESIGN.md section 2; reference: fastes.noise)";
  m.attr("KIND_GAUSSIAN") = FASTES_KIND_GAUSSIAN;
  m.attr("KIND_RADEMACHER") = FASTES_KIND_RADEMACHER;

  m.def("noise_fill", &noise_fill, py::arg("out"), py::arg("seed"), py::arg("tensor_id"), py::arg("noise_index"),
        py::arg("step"), py::arg("offset"), py::arg("kind"), py::arg("num_threads") = 0,
        "Fill float32 contiguous `out` (CPU or CUDA) with elements offset..offset+numel-1 of the stream "
        "(seed, tensor_id, noise_index, step); kind 0/'gaussian' or 1/'rademacher'. CUDA runs on torch's "
        "current stream. num_threads=0 uses torch.get_num_threads(); the result never depends on it. "
        "Returns `out`.");
  m.def("noise_fill_many", &noise_fill_many, py::arg("out"), py::arg("seed"), py::arg("tensor_id"),
        py::arg("noise_indices"), py::arg("step"), py::arg("offset"), py::arg("kind"), py::arg("num_threads") = 0,
        "Fill float32 contiguous CPU `out` [K, n]: row k = elements offset.. of stream "
        "(seed, tensor_id, noise_indices[k], step), several members' noise in one call. Returns `out`.");
  m.def("es_update_full", &es_update_full, py::arg("weight"), py::arg("seed"), py::arg("tensor_id"),
        py::arg("noise_indices"), py::arg("coeffs"), py::arg("step"), py::arg("kind"), py::arg("sr_tensor_id"),
        py::arg("num_threads") = 0,
        "Fused full-rank ES update of a contiguous CPU weight (float32/bfloat16/float16) in place: "
        "W <- round(W + sum_k coeffs[k] * E_k) with fp32 sums in index order, no noise tensor; bf16/fp16 "
        "stochastically rounded with the stream of sr_tensor_id. coeffs (floats) already hold lr*s*c_k and "
        "are used as float32. Returns `weight`; the result never depends on num_threads.");
  m.def("stochastic_round", &stochastic_round, py::arg("value"), py::arg("out"), py::arg("seed"),
        py::arg("sr_tensor_id"), py::arg("step"), py::arg("offset") = 0, py::arg("num_threads") = 0,
        "out <- float32 `value` rounded to out's dtype (bfloat16/float16 stochastically, float32 copied) with "
        "the words of elements offset.. of (seed, sr_tensor_id, SR_NOISE_INDEX, step); CPU, contiguous. "
        "Returns `out`.");
  m.def("philox_blocks", &philox_blocks, py::arg("seed"), py::arg("tensor_id"), py::arg("noise_index"),
        py::arg("step"), py::arg("start_block"), py::arg("num_blocks"), py::arg("num_threads") = 0,
        "Raw Philox words as int64 [num_blocks, 4] (CPU), like fastes.noise.uint32_blocks.");
  m.def("gaussian_from_words", &gaussian_from_words, py::arg("words"), py::arg("num_threads") = 0,
        "Box-Muller of int64 words [..., 4] -> float32 [..., 4] (CPU), like fastes.noise.gaussian_from_words.");
  m.def("philox4x32_raw", &philox4x32_raw, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        py::arg("k0"), py::arg("k1"), "Philox4x32-10 of one counter and key -> 4 uint32 (known-answer tests).");
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("cu_seqlens_q"), py::arg("seq_lens"), py::arg("block_tables"), py::arg("scale"), py::arg("out"),
        py::arg("window") = 0, py::arg("num_threads") = 0,
        "Causal GQA attention of packed float32 queries over the paged CPU KV cache (fastes.ops.attention "
        "layout); window 0: none. Rows of sequences with seq_len 0 get zeros. Returns `out`.");
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in.");
  m.def("num_threads", []() { return at::get_num_threads(); }, "Threads CPU kernels use by default.");
}
