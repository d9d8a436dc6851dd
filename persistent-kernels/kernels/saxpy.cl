/* y = a*x + y; the request is the scalar a, then x, then y, of equal
 * length. A non-finite a is bad input. */
uint granary_process(global const uchar* request, uint request_len,
                     global uchar* response, uint response_max, uint* response_len) {
    if (request_len < 12u || request_len % 4u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    uint count = request_len / 4u;
    if (count % 2u == 0u) return GRANARY_STATUS_BAD_LENGTH;
    uint n = (count - 1u) / 2u;
    if (n * 4u > response_max) return GRANARY_STATUS_BAD_LENGTH;
    global const float* in = (global const float*)request;
    float a = in[0];
    if (!isfinite(a)) return GRANARY_STATUS_BAD_INPUT;
    global const float* x = in + 1;
    global const float* y = x + n;
    global float* out = (global float*)response;
    for (uint i = 0; i < n; i++) out[i] = a * x[i] + y[i];
    *response_len = n * 4u;
    return GRANARY_STATUS_OK;
}

kernel void granary_batch(global const uchar* request, uint request_len,
                          global uchar* response, uint response_len) {
    size_t n = response_len / 4u;
    size_t i = get_global_id(0);
    if (i >= n) return;
    global const float* in = (global const float*)request;
    ((global float*)response)[i] = in[0] * in[1 + i] + in[1 + n + i];
}
