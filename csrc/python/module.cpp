// The Python module `flamingo_rt._C` (built by setup.py only): importing it loads this
// library, which runs the TORCH_LIBRARY registrations of csrc/torch (the ops in
// torch.ops.flamingo_rt_C). C++ hosts link the same registrations without Python
// (CMake library `flamingo_rt`).
#include <Python.h>

namespace flamingo_rt {
bool built_with_cuda();
}

// `import flamingo_rt._C` loads this library (and so runs the registrations above).
// The module also says whether the CUDA kernels were compiled in.
static struct PyModuleDef flamingo_rt_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "flamingo_rt's C++/CUDA kernels, as torch ops in torch.ops.flamingo_rt_C.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&flamingo_rt_c_module);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", flamingo_rt::built_with_cuda() ? 1 : 0) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
