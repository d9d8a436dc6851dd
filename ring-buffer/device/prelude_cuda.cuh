/* Granary ring: CUDA C prelude. Shared words are plain integers that device
 * code accesses through cuda::atomic_ref or the atomic*() intrinsics with
 * __threadfence_system() where the host observes them (host-mapped memory). */
#define GRANARY_U32 unsigned int
#define GRANARY_U64 unsigned long long
#define GRANARY_ATOMIC_U32 unsigned int
#define GRANARY_ATOMIC_U64 unsigned long long
#define GRANARY_OFFSETOF(type, member) __builtin_offsetof(type, member)
#ifndef __CUDACC_RTC__
#include <stddef.h>
#endif
