/* c = a + b; the request is a followed by b, of equal length. */
uint granary_process(global const uchar* request, uint request_len,
                     global uchar* response, uint response_max, uint* response_len) {
    if (request_len == 0u || request_len % 8u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    uint n = request_len / 8u;
    if (n * 4u > response_max) return GRANARY_STATUS_BAD_LENGTH;
    global const float* a = (global const float*)request;
    global const float* b = a + n;
    global float* c = (global float*)response;
    for (uint i = 0; i < n; i++) c[i] = a[i] + b[i];
    *response_len = n * 4u;
    return GRANARY_STATUS_OK;
}

kernel void granary_batch(global const uchar* request, uint request_len,
                          global uchar* response, uint response_len) {
    size_t n = response_len / 4u;
    size_t i = get_global_id(0);
    if (i >= n) return;
    global const float* a = (global const float*)request;
    ((global float*)response)[i] = a[i] + a[n + i];
}
