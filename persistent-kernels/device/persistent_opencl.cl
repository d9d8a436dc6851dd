/*
 * Granary persistent kernel, OpenCL C 2.0.
 *
 * Included after the ring layout (granary_ring::device::OPENCL_HEADER) and
 * the kernel's own
 *
 *   uint granary_process(global const uchar* request, uint request_len,
 *                        global uchar* response, uint response_max,
 *                        uint* response_len);
 *
 * which returns a status (0 = ok). Each work-group is one work-item: it
 * claims requests from the MPSC request ring with a compare-and-swap on
 * `head` (Vyukov's dequeue, so several work-groups can share the consumer
 * role), answers on the response ring as one of its MPSC producers, and
 * exits once the request ring is closed and drained (docs/ring-protocol.md,
 * rules M1-M5 and C1-C3). Shared words use acquire/release (GRANARY_SCOPE
 * below).
 */

/* The host is the other party: all-SVM-devices scope where the device
 * offers it (OpenCL 3.0 makes it optional; POCL's CPU device, whose "device"
 * is the host's own memory system, offers device scope only). */
#if defined(__opencl_c_atomic_scope_all_devices) || (__OPENCL_C_VERSION__ == 200)
#define GRANARY_SCOPE memory_scope_all_svm_devices
#else
#define GRANARY_SCOPE memory_scope_device
#endif

static inline global granary_slot_header* granary_slot(global uchar* ring, ulong position) {
    global granary_ring_control* control = (global granary_ring_control*)ring;
    ulong index = position & (ulong)(control->header.capacity - 1u);
    return (global granary_slot_header*)(ring + GRANARY_RING_CONTROL_BYTES
                                         + index * (ulong)control->header.slot_size);
}

/* M4 for several consumers: claim the next published request. */
static int granary_take(global uchar* ring, ulong* position) {
    global granary_ring_control* control = (global granary_ring_control*)ring;
    ulong head = atomic_load_explicit(&control->head.value, memory_order_relaxed, GRANARY_SCOPE);
    for (;;) {
        global granary_slot_header* slot = granary_slot(ring, head);
        ulong sequence = atomic_load_explicit(&slot->sequence, memory_order_acquire, GRANARY_SCOPE);
        long lag = (long)(sequence - (head + 1));
        if (lag == 0) {
            if (atomic_compare_exchange_weak_explicit(&control->head.value, &head, head + 1,
                                                      memory_order_relaxed, memory_order_relaxed,
                                                      GRANARY_SCOPE)) {
                *position = head;
                return 1;
            }
        } else if (lag < 0) {
            return 0;
        } else {
            head = atomic_load_explicit(&control->head.value, memory_order_relaxed, GRANARY_SCOPE);
        }
    }
}

/* M1-M2: claim a response slot. 1 = claimed, 0 = full, -1 = closed. */
static int granary_claim(global uchar* ring, ulong* position) {
    global granary_ring_control* control = (global granary_ring_control*)ring;
    ulong tail = atomic_load_explicit(&control->tail.value, memory_order_relaxed, GRANARY_SCOPE);
    for (;;) {
        if (tail & GRANARY_RING_TAIL_CLOSED_BIT) return -1;
        global granary_slot_header* slot = granary_slot(ring, tail);
        ulong sequence = atomic_load_explicit(&slot->sequence, memory_order_acquire, GRANARY_SCOPE);
        long lag = (long)(sequence - tail);
        if (lag == 0) {
            if (atomic_compare_exchange_weak_explicit(&control->tail.value, &tail, tail + 1,
                                                      memory_order_relaxed, memory_order_relaxed,
                                                      GRANARY_SCOPE)) {
                *position = tail;
                return 1;
            }
        } else if (lag < 0) {
            return 0;
        } else {
            tail = atomic_load_explicit(&control->tail.value, memory_order_relaxed, GRANARY_SCOPE);
        }
    }
}

/* C3: closed, and every claimed request taken. */
static int granary_closed_and_drained(global uchar* ring) {
    global granary_ring_control* control = (global granary_ring_control*)ring;
    if (atomic_load_explicit(&control->closed.value, memory_order_acquire, GRANARY_SCOPE) == 0u) {
        return 0;
    }
    ulong tail = atomic_load_explicit(&control->tail.value, memory_order_acquire, GRANARY_SCOPE);
    ulong head = atomic_load_explicit(&control->head.value, memory_order_acquire, GRANARY_SCOPE);
    return (tail & GRANARY_RING_TAIL_CLOSED_BIT) != 0
        && (tail & ~GRANARY_RING_TAIL_CLOSED_BIT) == head;
}

kernel void granary_persistent(global uchar* requests, global uchar* responses) {
    global granary_ring_control* request_control = (global granary_ring_control*)requests;
    global granary_ring_control* response_control = (global granary_ring_control*)responses;
    const ulong request_capacity = (ulong)request_control->header.capacity;
    const uint request_max = request_control->header.max_payload;
    const uint response_max = response_control->header.max_payload;
    uint backoff = 1;
    for (;;) {
        /* 4. Heartbeat, busy or idle. */
        atomic_fetch_add_explicit(&request_control->consumer_heartbeat.value, 1ul,
                                  memory_order_relaxed, GRANARY_SCOPE);
        /* 1. Wait for a request: spin, backing off up to 1024 empty turns. */
        ulong position;
        if (!granary_take(requests, &position)) {
            /* 5. Exit when closed and drained. */
            if (granary_closed_and_drained(requests)) break;
            for (volatile uint i = 0; i < backoff; i++) {}
            backoff = min(backoff * 2u, 1024u);
            continue;
        }
        backoff = 1;
        global granary_slot_header* request = granary_slot(requests, position);
        /* A slot its producer abandoned (rules A3, K2) carries nothing:
         * release it unanswered. */
        if (request->flags & GRANARY_RING_SLOT_FLAG_SKIP) {
            atomic_store_explicit(&request->sequence, position + request_capacity,
                                  memory_order_release, GRANARY_SCOPE);
            continue;
        }
        const ulong request_id = request->request_id;
        const uint request_len = request->len;
        /* 3 (first half). A response slot; wait while the host is behind. */
        ulong out;
        int claimed;
        while ((claimed = granary_claim(responses, &out)) == 0) {
            atomic_fetch_add_explicit(&response_control->producer_heartbeat.value, 1ul,
                                      memory_order_relaxed, GRANARY_SCOPE);
        }
        if (claimed < 0) {
            atomic_store_explicit(&request->sequence, position + request_capacity,
                                  memory_order_release, GRANARY_SCOPE);
            break;
        }
        global granary_slot_header* response = granary_slot(responses, out);
        /* 2. Process; a bad length never reaches the kernel's code. */
        uint response_len = 0;
        uint status;
        if (request_len > request_max) {
            status = GRANARY_STATUS_BAD_LENGTH;
        } else {
            status = granary_process((global const uchar*)(request + 1), request_len,
                                     (global uchar*)(response + 1), response_max, &response_len);
            if (status == 0u && response_len > response_max) status = GRANARY_STATUS_FAULT;
        }
        if (status != 0u) response_len = 0;
        response->request_id = request_id;
        response->len = response_len;
        response->status = status;
        response->flags = 0u;
        /* 3. Release the request (M5), then publish the response (M3): whoever
         * sees the response may count the request's slot free (rule K1). */
        atomic_store_explicit(&request->sequence, position + request_capacity,
                              memory_order_release, GRANARY_SCOPE);
        atomic_store_explicit(&response->sequence, out + 1, memory_order_release, GRANARY_SCOPE);
    }
}
