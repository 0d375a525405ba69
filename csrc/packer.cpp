// Placeholder replaced by the FFD packer (issue: C++ packer).
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_packer, m) { m.doc() = "mllm_mega packer (placeholder)"; }
