"""CPU kernels written in C++ and called through XLA's FFI.

`build.library()` compiles the sources of this folder once per machine (with
the C++ compiler found on PATH, `-march=native`) into a cache folder; `conv`,
`norm`, `head` and `decide` register and call the convolution, BatchNorm,
exit-head and exit-decision kernels. Optional: where no compiler is
available, `adaptive_vision.cpu.resolve` picks the other implementations.
"""
