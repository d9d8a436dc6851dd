/* response[i] = 2 * request[i]; f32, little-endian. Payloads are 16-byte
 * aligned in their slots and buffers, so they are read as floats. */
uint granary_process(global const uchar* request, uint request_len,
                     global uchar* response, uint response_max, uint* response_len) {
    if (request_len == 0u || request_len % 4u != 0u) return GRANARY_STATUS_BAD_LENGTH;
    if (request_len > response_max) return GRANARY_STATUS_BAD_LENGTH;
    global const float* in = (global const float*)request;
    global float* out = (global float*)response;
    for (uint i = 0; i < request_len / 4u; i++) out[i] = 2.0f * in[i];
    *response_len = request_len;
    return GRANARY_STATUS_OK;
}

/* Batch path: one work-item per output element; the host has checked the
 * lengths against the kernel's batch shape. */
kernel void granary_batch(global const uchar* request, uint request_len,
                          global uchar* response, uint response_len) {
    size_t i = get_global_id(0);
    if (i >= response_len / 4u) return;
    ((global float*)response)[i] = 2.0f * ((global const float*)request)[i];
}
