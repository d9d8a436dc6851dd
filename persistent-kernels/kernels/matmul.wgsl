// C = A B. The request is the dimensions n, k, m as floats holding whole
// numbers, then A (n x k, row-major), then B (k x m); the response is C
// (n x m). WGSL has no 64-bit integers: products of dimensions are checked
// by division before they are formed.
fn granary_process(at: u32, request_len: u32, out: u32, response_max: u32) -> vec2<u32> {
    if (request_len < 20u || request_len % 4u != 0u) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    var d: array<u32, 3>;
    for (var j = 0u; j < 3u; j++) {
        let v = granary_in(at + j);
        if (!(v >= 1.0 && v <= 16777216.0) || v != floor(v)) {
            return vec2<u32>(GRANARY_STATUS_BAD_INPUT, 0u);
        }
        d[j] = u32(v);
    }
    let n = d[0];
    let k = d[1];
    let m = d[2];
    let words = request_len / 4u;
    // n*k + k*m + 3 == words, without overflowing: each product is at most
    // `words` or the lengths cannot match.
    if (n > words / k || m > words / k) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    if (n * k + k * m + 3u != words) { return vec2<u32>(GRANARY_STATUS_BAD_LENGTH, 0u); }
    if (m > (response_max / 4u) / n) { return vec2<u32>(GRANARY_STATUS_BAD_INPUT, 0u); }
    let a = at + 3u;
    let b = a + n * k;
    for (var row = 0u; row < n; row++) {
        for (var col = 0u; col < m; col++) {
            var sum = 0.0;
            for (var i = 0u; i < k; i++) {
                sum = sum + granary_in(a + row * k + i) * granary_in(b + i * m + col);
            }
            granary_out(out + row * m + col, sum);
        }
    }
    return vec2<u32>(GRANARY_STATUS_OK, n * m * 4u);
}

// Batch path: one invocation per element of C; the host has checked the
// dimensions. Pass p adds the terms i = p * GRANARY_CHUNK onwards to the
// sum the earlier passes left in the response, so each element is summed
// over i in order.
fn granary_element(e: u32, request_len: u32, response_len: u32) {
    let n = u32(granary_in(0u));
    let k = u32(granary_in(1u));
    let m = u32(granary_in(2u));
    let row = e / m;
    let col = e % m;
    let a = 3u;
    let b = a + n * k;
    let base = granary_params.step * GRANARY_CHUNK;
    var sum = 0.0;
    if (granary_params.step > 0u) {
        sum = bitcast<f32>(granary_response[e]);
    }
    for (var i = base; i < min(k, base + GRANARY_CHUNK); i++) {
        sum = sum + granary_in(a + row * k + i) * granary_in(b + i * m + col);
    }
    granary_out(e, sum);
}
