/* x . y, one float; the request is x followed by y. Summed in element
 * order, as the CPU implementation does, so results match bit for bit. */
uint granary_process(global const uchar* request, uint request_len,
                     global uchar* response, uint response_max, uint* response_len) {
    if (request_len == 0u || request_len % 8u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    if (response_max < 4u) return GRANARY_STATUS_FAULT;
    uint n = request_len / 8u;
    global const float* x = (global const float*)request;
    global const float* y = x + n;
    float sum = 0.0f;
    for (uint i = 0; i < n; i++) sum += x[i] * y[i];
    *(global float*)response = sum;
    *response_len = 4u;
    return GRANARY_STATUS_OK;
}

/* Batch path: one work-item computes the whole sum, in order, so the
 * result is the CPU's to the bit (a tree reduction would not be). */
kernel void granary_batch(global const uchar* request, uint request_len,
                          global uchar* response, uint response_len) {
    if (get_global_id(0) != 0) return;
    uint n = request_len / 8u;
    global const float* x = (global const float*)request;
    global const float* y = x + n;
    float sum = 0.0f;
    for (uint i = 0; i < n; i++) sum += x[i] * y[i];
    *(global float*)response = sum;
}
