// The compiled extension's op schemas: every op of din_kernels::<op> that csrc/cpu (and csrc/cuda) implement, with
// the schema strings of din_kernels/ops/schema.py (setup.py writes them into generated/schemas.h), nothing else.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "generated/schemas.h"

namespace din {

std::string build_info() {
  std::string info = "cpu=" DIN_CPU_CAPABILITY;
#ifdef DIN_WITH_CUDA
  info += " cuda=1";
#else
  info += " cuda=0";
#endif
  return info;
}

}  // namespace din

TORCH_LIBRARY(din_kernels, m) {
#define DIN_DEFINE(name, schema) m.def(name schema);
  DIN_COMPILED_SCHEMAS(DIN_DEFINE)
#undef DIN_DEFINE
  m.def("build_info() -> str", &din::build_info);
}

// `import din_kernels._C` loads this library (and so runs the registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "din_kernels' compiled ops (torch.ops.din_kernels)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
