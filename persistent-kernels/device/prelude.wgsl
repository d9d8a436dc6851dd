// Granary WGSL prelude, placed before every kernel's WGSL source: the
// status codes (granary_kernels::Status) and the bindings both entry points
// share.
//
// Requests and responses are little-endian 32-bit words: a kernel reads
// request word `i` of the request that starts at word `at` with
// `granary_in(at + i)` (as f32) and writes response word `i` of the
// response that starts at word `out` with `granary_out(out + i, value)`.
// Lengths are in bytes, as in the OpenCL C and CUDA C sources.
//
// A kernel defines two functions:
//
//   fn granary_process(at: u32, request_len: u32, out: u32,
//                      response_max: u32) -> vec2<u32>
//       one ring request; returns (status, response length in bytes);
//   fn granary_element(e: u32, request_len: u32, response_len: u32)
//       one output word of the batch path, whose request starts at word 0
//       and whose response starts at word 0; the host has checked the
//       request with the kernel's output_len. It runs once per pass
//       (GRANARY_CHUNK below).
//
// naga marks no multiply-add as NoContraction, so a driver may fuse a*b+c
// into one rounding (lavapipe does not; NVIDIA's compiler may): results
// match the CPU implementations to the bit, or the CPU's sums computed with
// fused multiply-adds.

// llvmpipe, under lavapipe, ends an invocation's loops after 65535
// iterations in all (a guard against shaders that never end). The batch
// path therefore runs a kernel's `granary_element` in passes
// (`Wgsl::passes` on the host says how many; `granary_params.step` which
// one): an invocation loops at most GRANARY_CHUNK times per pass and
// carries its partial result in the response to the next. Ring requests
// are small enough for one. GRANARY_CHUNK (granary_kernels::WGSL_CHUNK)
// and GRANARY_GROUP are defined by the host, from its own constants,
// before this prelude.

const GRANARY_STATUS_OK: u32 = 0u;
const GRANARY_STATUS_BAD_LENGTH: u32 = 1u;
const GRANARY_STATUS_BAD_INPUT: u32 = 2u;
const GRANARY_STATUS_FAULT: u32 = 3u;
const GRANARY_STATUS_UNSUPPORTED: u32 = 4u;

struct GranaryParams {
    // Batch path: the request's and response's lengths in bytes. Ring
    // path: the number of jobs in the micro-batch, then 0.
    request_len: u32,
    response_len: u32,
    // Invocations along x in one row of the dispatch grid (a grid wider
    // than the 65535 work-groups one dimension allows goes on in y).
    row: u32,
    // Batch path: which pass this dispatch is, from 0. Ring path: 0.
    step: u32,
}

// One ring request of a micro-batch: where its words start and how many
// bytes it holds, where its response goes and how many bytes fit there.
// The kernel writes the status and the response length back.
struct GranaryJob {
    at: u32,
    request_len: u32,
    out: u32,
    response_max: u32,
    status: u32,
    response_len: u32,
}

@group(0) @binding(0) var<storage, read> granary_request: array<u32>;
@group(0) @binding(1) var<storage, read_write> granary_response: array<u32>;
@group(0) @binding(2) var<uniform> granary_params: GranaryParams;
@group(0) @binding(3) var<storage, read_write> granary_jobs: array<GranaryJob>;

fn granary_in(word: u32) -> f32 {
    return bitcast<f32>(granary_request[word]);
}

fn granary_out(word: u32, value: f32) {
    granary_response[word] = bitcast<u32>(value);
}
