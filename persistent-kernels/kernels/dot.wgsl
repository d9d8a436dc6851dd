// x . y, one f32; the request is x followed by y. Summed in element order,
// as the CPU implementation does, so results match bit for bit.
fn granary_process(at: u32, request_len: u32, out: u32, response_max: u32) -> vec2<u32> {
    if (request_len == 0u || request_len % 8u != 0u) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    if (response_max < 4u) { return vec2<u32>(GRANARY_STATUS_FAULT, 0u); }
    let n = request_len / 8u;
    var sum = 0.0;
    for (var i = 0u; i < n; i++) {
        sum = sum + granary_in(at + i) * granary_in(at + n + i);
    }
    granary_out(out, sum);
    return vec2<u32>(GRANARY_STATUS_OK, 4u);
}

// Batch path: one invocation computes the whole sum, in order, so the
// result is the CPU's to the bit (a tree reduction would not be). Pass p
// adds terms p * GRANARY_CHUNK onwards to the sum the earlier passes left
// in the response.
fn granary_element(e: u32, request_len: u32, response_len: u32) {
    let n = request_len / 8u;
    let base = granary_params.step * GRANARY_CHUNK;
    var sum = 0.0;
    if (granary_params.step > 0u) {
        sum = bitcast<f32>(granary_response[0]);
    }
    for (var i = base; i < min(n, base + GRANARY_CHUNK); i++) {
        sum = sum + granary_in(i) * granary_in(n + i);
    }
    granary_out(0u, sum);
}
