/* Granary ring: OpenCL C 2.0 prelude. Shared words are C11-style atomics in
 * fine-grained SVM, accessed with memory_order_acquire / memory_order_release
 * at memory_scope_all_svm_devices where the host observes them. */
#pragma OPENCL EXTENSION cl_khr_int64_base_atomics : enable
#pragma OPENCL EXTENSION cl_khr_int64_extended_atomics : enable
#define GRANARY_U32 uint
#define GRANARY_U64 ulong
#define GRANARY_ATOMIC_U32 atomic_uint
#define GRANARY_ATOMIC_U64 atomic_ulong
#define GRANARY_OFFSETOF(type, member) __builtin_offsetof(type, member)
