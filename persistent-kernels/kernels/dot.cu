/* x . y, one float, summed in element order (dot.cl in CUDA C). */
__device__ unsigned int granary_process(const unsigned char* request, unsigned int request_len,
                                        unsigned char* response, unsigned int response_max,
                                        unsigned int* response_len) {
    if (request_len == 0u || request_len % 8u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    if (response_max < 4u) return GRANARY_STATUS_FAULT;
    unsigned int n = request_len / 8u;
    const float* x = (const float*)request;
    const float* y = x + n;
    float sum = 0.0f;
    for (unsigned int i = 0; i < n; i++) sum = __fadd_rn(sum, __fmul_rn(x[i], y[i]));
    *(float*)response = sum;
    *response_len = 4u;
    return GRANARY_STATUS_OK;
}

extern "C" __global__ void granary_batch(const unsigned char* request, unsigned int request_len,
                                         unsigned char* response, unsigned int response_len) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    unsigned int n = request_len / 8u;
    const float* x = (const float*)request;
    const float* y = x + n;
    float sum = 0.0f;
    for (unsigned int i = 0; i < n; i++) sum = __fadd_rn(sum, __fmul_rn(x[i], y[i]));
    *(float*)response = sum;
}
