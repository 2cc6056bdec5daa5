// pybind11 bindings of the lora kernels (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_lora(py::module_& m) { (void)m; }
