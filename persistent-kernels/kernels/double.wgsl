// response[i] = 2 * request[i]; f32, little-endian.
fn granary_process(at: u32, request_len: u32, out: u32, response_max: u32) -> vec2<u32> {
    if (request_len == 0u || request_len % 4u != 0u) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    if (request_len > response_max) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    for (var i = 0u; i < request_len / 4u; i++) {
        granary_out(out + i, 2.0 * granary_in(at + i));
    }
    return vec2<u32>(GRANARY_STATUS_OK, request_len);
}

fn granary_element(e: u32, request_len: u32, response_len: u32) {
    granary_out(e, 2.0 * granary_in(e));
}
