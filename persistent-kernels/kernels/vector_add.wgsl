// c = a + b; the request is a followed by b, of equal length.
fn granary_process(at: u32, request_len: u32, out: u32, response_max: u32) -> vec2<u32> {
    if (request_len == 0u || request_len % 8u != 0u) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    let n = request_len / 8u;
    if (n * 4u > response_max) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    for (var i = 0u; i < n; i++) {
        granary_out(out + i, granary_in(at + i) + granary_in(at + n + i));
    }
    return vec2<u32>(GRANARY_STATUS_OK, n * 4u);
}

fn granary_element(e: u32, request_len: u32, response_len: u32) {
    let n = response_len / 4u;
    granary_out(e, granary_in(e) + granary_in(n + e));
}
