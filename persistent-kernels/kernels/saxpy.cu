/* y = a*x + y (saxpy.cl in CUDA C). __fmul_rn keeps the multiply and the
 * add separate, as on the CPU. */
__device__ unsigned int granary_process(const unsigned char* request, unsigned int request_len,
                                        unsigned char* response, unsigned int response_max,
                                        unsigned int* response_len) {
    if (request_len < 12u || request_len % 4u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    unsigned int count = request_len / 4u;
    if (count % 2u == 0u) return GRANARY_STATUS_BAD_LENGTH;
    unsigned int n = (count - 1u) / 2u;
    if (n * 4u > response_max) return GRANARY_STATUS_BAD_LENGTH;
    const float* in = (const float*)request;
    float a = in[0];
    if (!isfinite(a)) return GRANARY_STATUS_BAD_INPUT;
    const float* x = in + 1;
    const float* y = x + n;
    float* out = (float*)response;
    for (unsigned int i = 0; i < n; i++) out[i] = __fadd_rn(__fmul_rn(a, x[i]), y[i]);
    *response_len = n * 4u;
    return GRANARY_STATUS_OK;
}

extern "C" __global__ void granary_batch(const unsigned char* request, unsigned int request_len,
                                         unsigned char* response, unsigned int response_len) {
    unsigned long long n = response_len / 4u;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* in = (const float*)request;
    ((float*)response)[i] = __fadd_rn(__fmul_rn(in[0], in[1 + i]), in[1 + n + i]);
}
