"""CPU kernels written in C++ and called through XLA's FFI.

`build.library()` compiles the sources of this folder once per machine (with
the C++ compiler found on PATH, `-march=native`) into a cache folder; `conv`,
`norm` and `head` register and call the convolution, BatchNorm and exit-head
kernels. Nothing here is used off
CPU, and the library runs without it: when no compiler is available the
models fall back to their other implementations (models.conv).
"""
