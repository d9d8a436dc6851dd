/*
 * Granary kernel prelude, shared by OpenCL C and CUDA C: the status codes a
 * kernel's granary_process returns (granary_kernels::Status).
 */
#ifndef GRANARY_PRELUDE_H
#define GRANARY_PRELUDE_H
#define GRANARY_STATUS_OK 0u
#define GRANARY_STATUS_BAD_LENGTH 1u
#define GRANARY_STATUS_BAD_INPUT 2u
#define GRANARY_STATUS_FAULT 3u
#define GRANARY_STATUS_UNSUPPORTED 4u
/* No fused multiply-add unless the source asks: results then match the
 * CPU implementations to the bit. */
#ifdef __OPENCL_C_VERSION__
#pragma OPENCL FP_CONTRACT OFF
#endif
#endif
