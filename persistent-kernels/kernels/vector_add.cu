/* c = a + b; the request is a followed by b (vector_add.cl in CUDA C). */
__device__ unsigned int granary_process(const unsigned char* request, unsigned int request_len,
                                        unsigned char* response, unsigned int response_max,
                                        unsigned int* response_len) {
    if (request_len == 0u || request_len % 8u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    unsigned int n = request_len / 8u;
    if (n * 4u > response_max) return GRANARY_STATUS_BAD_LENGTH;
    const float* a = (const float*)request;
    const float* b = a + n;
    float* c = (float*)response;
    for (unsigned int i = 0; i < n; i++) c[i] = a[i] + b[i];
    *response_len = n * 4u;
    return GRANARY_STATUS_OK;
}

extern "C" __global__ void granary_batch(const unsigned char* request, unsigned int request_len,
                                         unsigned char* response, unsigned int response_len) {
    unsigned long long n = response_len / 4u;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* a = (const float*)request;
    ((float*)response)[i] = a[i] + a[n + i];
}
