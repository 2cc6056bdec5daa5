// pybind11 bindings of the attention kernels (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_attention(py::module_& m) { (void)m; }
