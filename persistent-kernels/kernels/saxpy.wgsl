// y = a*x + y; the request is the scalar a, then x, then y, of equal
// length. A non-finite a is bad input.
fn granary_finite(x: f32) -> bool {
    // Exponent bits all ones: infinity or NaN.
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn granary_process(at: u32, request_len: u32, out: u32, response_max: u32) -> vec2<u32> {
    if (request_len < 12u || request_len % 4u != 0u) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    let count = request_len / 4u;
    if (count % 2u == 0u) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    let n = (count - 1u) / 2u;
    if (n * 4u > response_max) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    let a = granary_in(at);
    if (!granary_finite(a)) { return vec2<u32>(GRANARY_STATUS_BAD_INPUT, 0u); }
    for (var i = 0u; i < n; i++) {
        granary_out(out + i, a * granary_in(at + 1u + i) + granary_in(at + 1u + n + i));
    }
    return vec2<u32>(GRANARY_STATUS_OK, n * 4u);
}

fn granary_element(e: u32, request_len: u32, response_len: u32) {
    let n = response_len / 4u;
    granary_out(e, granary_in(0u) * granary_in(1u + e) + granary_in(1u + n + e));
}
