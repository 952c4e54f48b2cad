"""Base layer: errors, atomic file I/O, on-disk arrays, image decoding, CPU threads, allocator and kernels, distributed ranks, secrets. Imports nothing of graft above it."""
