// Python bindings of fastes._C. Each concept keeps its kernels in its own files (noise_cpu.cpp,
// noise_cuda.cu, later update_*.cpp / .cu) behind a plain C ABI; this file only validates inputs,
// picks the device and the stream, and converts errors (bad input -> ValueError).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>

#ifdef FASTES_WITH_CUDA
// c10 only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers for nothing.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "noise.h"
#include "philox.h"

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
  m.def("philox_blocks", &philox_blocks, py::arg("seed"), py::arg("tensor_id"), py::arg("noise_index"),
        py::arg("step"), py::arg("start_block"), py::arg("num_blocks"), py::arg("num_threads") = 0,
        "Raw Philox words as int64 [num_blocks, 4] (CPU), like fastes.noise.uint32_blocks.");
  m.def("gaussian_from_words", &gaussian_from_words, py::arg("words"), py::arg("num_threads") = 0,
        "Box-Muller of int64 words [..., 4] -> float32 [..., 4] (CPU), like fastes.noise.gaussian_from_words.");
  m.def("philox4x32_raw", &philox4x32_raw, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        py::arg("k0"), py::arg("k1"), "Philox4x32-10 of one counter and key -> 4 uint32 (known-answer tests).");
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in.");
  m.def("num_threads", []() { return at::get_num_threads(); }, "Threads CPU kernels use by default.");
}
