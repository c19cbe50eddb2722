// Ranks candidate ads with a din_kernels package (din_kernels.export / python -m din_kernels export) from C++.
//
//   rank PACKAGE.pt2 EXTENSION.so INPUTS.pt [THREADS] [REPEATS]
//
// PACKAGE.pt2: the AOTInductor package of DIN.rank / BaseModel.rank. EXTENSION.so: din_kernels' compiled extension
// (din_kernels/_C*.so), whose TORCH_LIBRARY registrations define the ops the package calls
// (din_kernels::target_attention_fwd, din_kernels::dice_fwd); it is loaded before the package. INPUTS.pt: the
// package's inputs as torch.save({name: int64 tensor}) (make_inputs.py writes one), looked up by the names of the
// package's metadata "din_kernels.inputs", in that order. THREADS: intra-op threads (default: libtorch's). REPEATS:
// also time that many calls and print the median to stderr.
//
// Prints the logits [Nq], one a line. The package does not check its input's values (ids inside their tables,
// lengths and offsets): every index is clamped, so bad values give unspecified logits, never a memory error.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, sep);) parts.push_back(part);
  return parts;
}

// The package's inputs, in the order of its metadata, from a torch.save'd dict of tensors.
std::vector<at::Tensor> read_inputs(const std::string& path, const std::vector<std::string>& names) {
  c10::IValue value = torch::jit::pickle_load(read_file(path));
  if (!value.isGenericDict()) throw std::runtime_error(path + " must hold a dict {name: tensor}");
  c10::Dict<c10::IValue, c10::IValue> dict = value.toGenericDict();
  std::vector<at::Tensor> inputs;
  for (const std::string& name : names) {
    if (!dict.contains(name)) throw std::runtime_error(path + " has no tensor '" + name + "'");
    inputs.push_back(dict.at(name).toTensor().to(at::kLong).contiguous());
  }
  return inputs;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s PACKAGE.pt2 EXTENSION.so INPUTS.pt [THREADS] [REPEATS]\n", argv[0]);
    return 2;
  }
  // RTLD_LAZY: the library's Python module entry point (PyInit__C) refers to libpython, which is never called here.
  if (dlopen(argv[2], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[2], dlerror());
    return 1;
  }
  try {
    if (argc > 4) at::set_num_threads(std::stoi(argv[4]));
    const int repeats = argc > 5 ? std::stoi(argv[5]) : 0;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto metadata = loader.get_metadata();
    auto names = split(metadata["din_kernels.inputs"], ',');
    if (names.empty()) throw std::runtime_error(std::string(argv[1]) + " is not a din_kernels rank package");
    std::vector<at::Tensor> inputs = read_inputs(argv[3], names);

    at::Tensor logits = loader.run(inputs)[0].to(at::kFloat).contiguous();
    const float* values = logits.data_ptr<float>();
    for (int64_t i = 0; i < logits.numel(); ++i) std::printf("%.9g\n", values[i]);

    if (repeats > 0) {
      std::vector<double> ms;
      for (int r = 0; r < repeats; ++r) {
        auto start = std::chrono::steady_clock::now();
        loader.run(inputs);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      std::sort(ms.begin(), ms.end());
      std::fprintf(stderr, "median_ms %.4f over %d calls, %d threads\n", ms[ms.size() / 2], repeats,
                   at::get_num_threads());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
