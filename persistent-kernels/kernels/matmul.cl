/* C = A B. The request is the dimensions n, k, m as floats holding whole
 * numbers, then A (n x k, row-major), then B (k x m); the response is C
 * (n x m). */
uint granary_process(global const uchar* request, uint request_len,
                     global uchar* response, uint response_max, uint* response_len) {
    if (request_len < 20u || request_len % 4u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    global const float* in = (global const float*)request;
    float dims[3] = {in[0], in[1], in[2]};
    ulong d[3];
    for (int j = 0; j < 3; j++) {
        if (!(dims[j] >= 1.0f && dims[j] <= 16777216.0f) || dims[j] != floor(dims[j])) {
            return GRANARY_STATUS_BAD_INPUT;
        }
        d[j] = (ulong)dims[j];
    }
    ulong n = d[0], k = d[1], m = d[2];
    if (3ul + n * k + k * m != (ulong)(request_len / 4u)) return GRANARY_STATUS_BAD_LENGTH;
    if (n * m * 4ul > (ulong)response_max) return GRANARY_STATUS_BAD_INPUT;
    global const float* a = in + 3;
    global const float* b = a + n * k;
    global float* c = (global float*)response;
    for (ulong row = 0; row < n; row++) {
        for (ulong col = 0; col < m; col++) {
            float sum = 0.0f;
            for (ulong i = 0; i < k; i++) sum += a[row * k + i] * b[i * m + col];
            c[row * m + col] = sum;
        }
    }
    *response_len = (uint)(n * m * 4ul);
    return GRANARY_STATUS_OK;
}

/* Batch path: one work-item per element of C; the host has checked the
 * dimensions. */
kernel void granary_batch(global const uchar* request, uint request_len,
                          global uchar* response, uint response_len) {
    global const float* in = (global const float*)request;
    ulong n = (ulong)in[0], k = (ulong)in[1], m = (ulong)in[2];
    size_t e = get_global_id(0);
    if (e >= n * m) return;
    ulong row = e / m, col = e % m;
    global const float* a = in + 3;
    global const float* b = a + n * k;
    float sum = 0.0f;
    for (ulong i = 0; i < k; i++) sum += a[row * k + i] * b[i * m + col];
    ((global float*)response)[e] = sum;
}
