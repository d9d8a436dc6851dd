/* response[i] = 2 * request[i]; f32, little-endian (double.cl in CUDA C). */
__device__ unsigned int granary_process(const unsigned char* request, unsigned int request_len,
                                        unsigned char* response, unsigned int response_max,
                                        unsigned int* response_len) {
    if (request_len == 0u || request_len % 4u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    if (request_len > response_max) return GRANARY_STATUS_BAD_LENGTH;
    const float* in = (const float*)request;
    float* out = (float*)response;
    for (unsigned int i = 0; i < request_len / 4u; i++) out[i] = 2.0f * in[i];
    *response_len = request_len;
    return GRANARY_STATUS_OK;
}

extern "C" __global__ void granary_batch(const unsigned char* request, unsigned int request_len,
                                         unsigned char* response, unsigned int response_len) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= response_len / 4u) return;
    ((float*)response)[i] = 2.0f * ((const float*)request)[i];
}
