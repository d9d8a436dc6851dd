/* Granary ring: CUDA C prelude. Shared words are plain integers that device
 * code accesses with PTX acquire/release at system scope and
 * __threadfence_system() where the host observes them (host-mapped memory;
 * see persistent-kernels/device/persistent_cuda.cu). */
#define GRANARY_U32 unsigned int
#define GRANARY_U64 unsigned long long
#define GRANARY_ATOMIC_U32 unsigned int
#define GRANARY_ATOMIC_U64 unsigned long long
/* NVRTC has neither <stddef.h> nor a constant-expression offsetof: under
 * NVRTC GRANARY_OFFSETOF stays undefined and the layout header checks sizes
 * only. The offsets are checked against the Rust layout by the host C
 * compiler (ring-buffer/tests/device_layout.rs). */
#ifndef __CUDACC_RTC__
#include <stddef.h>
#define GRANARY_OFFSETOF(type, member) __builtin_offsetof(type, member)
#endif
