// Granary's two WGSL entry points, placed after the prelude and the
// kernel's source. WGSL gives a shader that spins no forward-progress
// guarantee and the host no coherent memory it could poll, so there is no
// persistent kernel here: the host drains the ring into one dispatch of
// granary_ring per micro-batch, and the batch path dispatches
// granary_batch over one invocation per output word. GRANARY_GROUP, the
// invocations per work-group, is defined by the host before the prelude.

// The batch path: invocation e computes output word e.
@compute @workgroup_size(GRANARY_GROUP)
fn granary_batch(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.y * granary_params.row + id.x;
    // Output words: the length rounded up, without overflowing.
    let words = granary_params.response_len / 4u + select(0u, 1u, granary_params.response_len % 4u != 0u);
    if (e >= words) {
        return;
    }
    granary_element(e, granary_params.request_len, granary_params.response_len);
}

// The ring path: invocation j answers job j of the micro-batch.
@compute @workgroup_size(GRANARY_GROUP)
fn granary_ring(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = id.y * granary_params.row + id.x;
    if (j >= granary_params.request_len) {
        return;
    }
    let job = granary_jobs[j];
    let done = granary_process(job.at, job.request_len, job.out, job.response_max);
    // A response longer than its room is a fault, as on the other backends.
    if (done.x == GRANARY_STATUS_OK && done.y > job.response_max) {
        granary_jobs[j].status = GRANARY_STATUS_FAULT;
        granary_jobs[j].response_len = 0u;
    } else if (done.x == GRANARY_STATUS_OK) {
        granary_jobs[j].status = done.x;
        granary_jobs[j].response_len = done.y;
    } else {
        granary_jobs[j].status = done.x;
        granary_jobs[j].response_len = 0u;
    }
}
