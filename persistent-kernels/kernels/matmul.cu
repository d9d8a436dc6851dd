/* C = A B; the request is n, k, m as whole-number floats, then A (n x k),
 * then B (k x m), row-major (matmul.cl in CUDA C). */
__device__ unsigned int granary_process(const unsigned char* request, unsigned int request_len,
                                        unsigned char* response, unsigned int response_max,
                                        unsigned int* response_len) {
    if (request_len < 20u || request_len % 4u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    const float* in = (const float*)request;
    unsigned long long d[3];
    for (int j = 0; j < 3; j++) {
        float v = in[j];
        if (!(v >= 1.0f && v <= 16777216.0f) || v != floorf(v)) return GRANARY_STATUS_BAD_INPUT;
        d[j] = (unsigned long long)v;
    }
    unsigned long long n = d[0], k = d[1], m = d[2];
    if (3ull + n * k + k * m != (unsigned long long)(request_len / 4u)) {
        return GRANARY_STATUS_BAD_LENGTH;
    }
    if (n * m * 4ull > (unsigned long long)response_max) return GRANARY_STATUS_BAD_INPUT;
    const float* a = in + 3;
    const float* b = a + n * k;
    float* c = (float*)response;
    for (unsigned long long row = 0; row < n; row++) {
        for (unsigned long long col = 0; col < m; col++) {
            float sum = 0.0f;
            for (unsigned long long i = 0; i < k; i++) {
                sum = __fadd_rn(sum, __fmul_rn(a[row * k + i], b[i * m + col]));
            }
            c[row * m + col] = sum;
        }
    }
    *response_len = (unsigned int)(n * m * 4ull);
    return GRANARY_STATUS_OK;
}

extern "C" __global__ void granary_batch(const unsigned char* request, unsigned int request_len,
                                         unsigned char* response, unsigned int response_len) {
    const float* in = (const float*)request;
    unsigned long long n = (unsigned long long)in[0], k = (unsigned long long)in[1],
                       m = (unsigned long long)in[2];
    unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n * m) return;
    unsigned long long row = e / m, col = e % m;
    const float* a = in + 3;
    const float* b = a + n * k;
    float sum = 0.0f;
    for (unsigned long long i = 0; i < k; i++) {
        sum = __fadd_rn(sum, __fmul_rn(a[row * k + i], b[i * m + col]));
    }
    ((float*)response)[e] = sum;
}
