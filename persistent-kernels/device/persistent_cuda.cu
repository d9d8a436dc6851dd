/*
 * Granary persistent kernel, CUDA C (NVRTC).
 *
 * Included after the ring layout (granary_ring::device::CUDA_HEADER), the
 * status codes (device/prelude.h) and the kernel's own
 *
 *   __device__ unsigned int granary_process(const unsigned char* request,
 *       unsigned int request_len, unsigned char* response,
 *       unsigned int response_max, unsigned int* response_len);
 *
 * which returns a status (0 = ok).
 *
 * Both rings live in pinned host memory mapped into the device's address
 * space (cuMemHostAlloc with DEVICEMAP|PORTABLE), so every access to them
 * crosses PCIe. The kernel is launched as ONE block of blockDim.x threads
 * (any count from 1 to GRANARY_BLOCK_MAX, at most the ring's capacity;
 * best a multiple of 32), and that block is:
 *
 *   - the request ring's only consumer (MPSC, rules M4-M5): no
 *     read-modify-write on `head` is needed, and none is made (atomics on
 *     mapped host memory are not atomic with respect to the host over PCIe);
 *   - the response ring's only producer, in SPSC mode (rules S1-S2, S5): it
 *     keeps its own `tail` and a cached `head`, and the host's close of that
 *     ring is the Abandon signal.
 *
 * One turn of the loop (docs/ring-protocol.md, rule numbers in brackets):
 *
 *   1. Thread t loads, with acquire at system scope, the sequence of the
 *      slot at position head + t, for t below the poll width (one warp
 *      while idle, the whole block while busy). The published prefix is the
 *      batch [M4].
 *      Thread 0 reads both rings' `closed` words in the same round trip;
 *      the response ring closed (Abandon) ends the kernel before it takes
 *      anything [S5].
 *   2. An empty turn beats the heartbeat [H1], ends the kernel if the
 *      request ring is closed and drained [C3], and backs off.
 *   3. Thread 0 finds room for the batch's responses [S1]; a batch that
 *      does not fit is cut to the room there is. SKIP slots need no room.
 *   4. Thread 0 stores the response tail with release [S2].
 *   5. Each thread copies its request from host memory into device scratch
 *      with 16-byte loads (a few PCIe round trips for the whole batch,
 *      instead of one per element; when at most 8 requests are published,
 *      the first 64 bytes come in the same round trip as the header in
 *      step 3, so a small request costs one round trip less), runs
 *      granary_process on the copy, writes the response slot, frees the
 *      request slot [M5] and publishes the response [M3], the last two
 *      under one release, so the request's slot is free before its
 *      response can be seen [K1].
 *   6. Thread 0 stores the new request head [M5] and beats the heartbeat.
 *
 * Visibility (PTX memory model, sm_70 and later): sequences are loaded with
 * ld.acquire.sys, so a thread that has acquired a published sequence reads
 * the payload written before it; each response's sequence is stored with
 * st.release.sys, so its bytes, and the freed request slot, reach the host
 * first. That release is the one fence on a response's path: a fence at
 * system scope waits for earlier writes to cross PCIe, about a microsecond.
 * The indices the host reads only for observation (request head, response
 * tail, heartbeats) are relaxed stores.
 */

#define GRANARY_BLOCK_MAX 1024u
/* Threads that poll while the kernel is idle: one warp. */
#define GRANARY_IDLE_POLL 32u
/* Payload bytes read together with a request's header (a small request
 * then costs one round trip across PCIe after its sequence). */
#define GRANARY_HEAD_BYTES 64u
/* The most published requests in a turn for which the first
 * GRANARY_HEAD_BYTES are read ahead, with the header. */
#define GRANARY_PREFETCH_MAX 8u
/* Empty turns spun before the kernel starts to sleep between polls. */
#define GRANARY_SPIN_TURNS 4096u
/* The longest sleep between polls of an idle kernel, in nanoseconds. */
#define GRANARY_MAX_SLEEP_NS 20000u

__device__ __forceinline__ unsigned long long granary_load_acquire_u64(
    const volatile unsigned long long* address) {
    unsigned long long value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ unsigned int granary_load_acquire_u32(
    const volatile unsigned int* address) {
    unsigned int value;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ unsigned int granary_load_relaxed_u32(
    const volatile unsigned int* address) {
    unsigned int value;
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ void granary_store_release_u64(volatile unsigned long long* address,
                                                          unsigned long long value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" : : "l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ void granary_store_relaxed_u64(volatile unsigned long long* address,
                                                          unsigned long long value) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" : : "l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ granary_slot_header* granary_slot(unsigned char* ring,
                                                             unsigned int slot_size,
                                                             unsigned long long capacity,
                                                             unsigned long long position) {
    return (granary_slot_header*)(ring + GRANARY_RING_CONTROL_BYTES
                                  + (size_t)(position & (capacity - 1ull)) * slot_size);
}

/* Copies `bytes` rounded up to 16 (both ends 16-byte aligned, and the
 * rounded length within both buffers), with eight loads in flight. */
__device__ __forceinline__ void granary_copy16(unsigned char* to, const unsigned char* from,
                                               unsigned int bytes) {
    const uint4* source = (const uint4*)from;
    uint4* target = (uint4*)to;
    const unsigned int words = (bytes + 15u) / 16u;
#pragma unroll 8
    for (unsigned int i = 0; i < words; i++) target[i] = source[i];
}

/* requests, responses: the rings' device addresses (host-mapped).
 * scratch: device memory, blockDim.x * scratch_stride bytes; each thread
 * uses its own stride, request copy first, then its response. */
extern "C" __global__ void __launch_bounds__(GRANARY_BLOCK_MAX)
granary_persistent(unsigned char* requests, unsigned char* responses, unsigned char* scratch,
                   unsigned int scratch_stride) {
    granary_ring_control* request_control = (granary_ring_control*)requests;
    granary_ring_control* response_control = (granary_ring_control*)responses;
    /* Header lines are written before launch and never change. */
    const unsigned long long request_capacity = request_control->header.capacity;
    const unsigned int request_slot = request_control->header.slot_size;
    const unsigned int request_max = request_control->header.max_payload;
    const unsigned long long response_capacity = response_control->header.capacity;
    const unsigned int response_slot = response_control->header.slot_size;
    const unsigned int response_max = response_control->header.max_payload;
    const unsigned int width = blockDim.x;
    const unsigned int t = threadIdx.x;
    const unsigned int request_room = (request_max + 15u) & ~15u;
    unsigned char* my_request = scratch + (size_t)t * scratch_stride;
    unsigned char* my_response = my_request + request_room;

    __shared__ unsigned long long s_head;        /* request ring: next position to take */
    __shared__ unsigned long long s_tail;        /* response ring: next position to fill */
    __shared__ unsigned long long s_cached_head; /* response ring: host's head, cached (S1) */
    __shared__ unsigned long long s_beat;        /* heartbeat value last stored */
    __shared__ unsigned long long s_waits;       /* response producer heartbeat */
    __shared__ unsigned int s_ready;             /* published prefix of this turn */
    __shared__ unsigned int s_take;              /* slots taken this turn */
    __shared__ unsigned int s_answered;          /* responses among them */
    __shared__ unsigned int s_skips;             /* SKIP slots among the first s_ready */
    __shared__ unsigned int s_poll;              /* threads that poll this turn */
    __shared__ unsigned int s_idle;              /* empty turns in a row */
    __shared__ int s_exit;
    __shared__ unsigned int s_abandon;           /* response ring's `closed`, this turn */
    __shared__ unsigned int s_closing;           /* request ring's `closed`, this turn */
    __shared__ unsigned int s_out[GRANARY_BLOCK_MAX]; /* response offset per taken slot */
    __shared__ unsigned char s_skip[GRANARY_BLOCK_MAX];

    if (t == 0) {
        s_head = granary_load_acquire_u64(&request_control->head.value);
        s_tail = granary_load_acquire_u64(&response_control->tail.value) & ~GRANARY_RING_TAIL_CLOSED_BIT;
        s_cached_head = granary_load_acquire_u64(&response_control->head.value);
        s_beat = granary_load_acquire_u64(&request_control->consumer_heartbeat.value);
        s_waits = granary_load_acquire_u64(&response_control->producer_heartbeat.value);
        s_poll = width < GRANARY_IDLE_POLL ? width : GRANARY_IDLE_POLL;
        s_idle = 0;
        s_exit = 0;
    }
    __syncthreads();

    for (;;) {
        const unsigned long long head = s_head;
        const unsigned int poll = s_poll;
        if (t == 0) s_ready = poll;
        __syncthreads();

        /* 1. The published prefix. Thread 0 also reads both `closed` words,
         * relaxed and issued before its acquire load, so all three loads
         * cross PCIe together: the checks cost no round trip of their own. */
        granary_slot_header* slot = granary_slot(requests, request_slot, request_capacity, head + t);
        if (t == 0) {
            s_abandon = granary_load_relaxed_u32(&response_control->closed.value);
            s_closing = granary_load_relaxed_u32(&request_control->closed.value);
        }
        if (t < poll) {
            unsigned long long sequence = granary_load_acquire_u64(&slot->sequence);
            if (sequence != head + t + 1ull) atomicMin(&s_ready, t);
        }
        __syncthreads();
        const unsigned int ready = s_ready;
        /* Abandon (S5: checked before anything is taken). */
        if (s_abandon != 0u) break;

        /* 2. An empty turn. */
        if (ready == 0u) {
            if (t == 0) {
                s_beat += 1ull;
                granary_store_relaxed_u64(&request_control->consumer_heartbeat.value, s_beat);
                if (s_closing != 0u) {
                    unsigned long long tail = granary_load_acquire_u64(&request_control->tail.value);
                    if ((tail & GRANARY_RING_TAIL_CLOSED_BIT) != 0ull
                        && (tail & ~GRANARY_RING_TAIL_CLOSED_BIT) == head) {
                        s_exit = 1; /* closed and drained (C3) */
                    }
                }
                s_poll = width < GRANARY_IDLE_POLL ? width : GRANARY_IDLE_POLL;
                /* Saturates one past the longest sleep. */
                if (s_idle <= GRANARY_SPIN_TURNS + GRANARY_MAX_SLEEP_NS / 64u) s_idle += 1u;
                if (s_idle > GRANARY_SPIN_TURNS) {
                    unsigned int sleep = (s_idle - GRANARY_SPIN_TURNS) * 64u;
                    __nanosleep(sleep < GRANARY_MAX_SLEEP_NS ? sleep : GRANARY_MAX_SLEEP_NS);
                }
            }
            __syncthreads();
            if (s_exit) break;
            continue;
        }

        /* 3. SKIP slots, then room for the responses. */
        /* Few requests: latency counts, so read ahead. Many: PCIe read
         * requests count, so read exactly each request's length. */
        const bool prefetch = ready <= GRANARY_PREFETCH_MAX;
        const unsigned int prefetched = prefetch ? GRANARY_HEAD_BYTES : 0u;
        unsigned int skip = 0u;
        unsigned long long request_id = 0ull;
        unsigned int request_len = 0u;
        if (t < ready) {
            /* One round trip: the header's fields and the payload's first
             * GRANARY_HEAD_BYTES are independent loads, all issued before
             * any is used. */
            const unsigned long long id = slot->request_id;
            /* len, status, flags, reserved: one 16-byte load (slot + 16
             * is 16-byte aligned). */
            const uint4 words = *(const uint4*)((const unsigned char*)slot + 16);
            if (prefetch) {
                const uint4* payload = (const uint4*)(slot + 1);
                uint4* copy = (uint4*)my_request;
                const unsigned int head_words = request_room / 16u < GRANARY_HEAD_BYTES / 16u
                                                    ? request_room / 16u
                                                    : GRANARY_HEAD_BYTES / 16u;
#pragma unroll
                for (unsigned int i = 0; i < GRANARY_HEAD_BYTES / 16u; i++) {
                    if (i < head_words) copy[i] = payload[i];
                }
            }
            request_id = id;
            request_len = words.x;
            skip = (words.z & GRANARY_RING_SLOT_FLAG_SKIP) != 0u ? 1u : 0u;
            s_skip[t] = (unsigned char)skip;
        }
        const unsigned int skips = __syncthreads_count(skip);
        if (t == 0) {
            s_idle = 0;
            s_skips = skips;
            unsigned long long room = response_capacity - (s_tail - s_cached_head);
            if ((unsigned long long)(ready - skips) > room) {
                s_cached_head = granary_load_acquire_u64(&response_control->head.value);
                room = response_capacity - (s_tail - s_cached_head);
            }
            unsigned int take;
            unsigned int answered;
            if (skips == 0u) {
                take = (unsigned long long)ready <= room ? ready : (unsigned int)room;
                answered = take;
            } else {
                /* Rare: number the answered slots, up to the room there is. */
                take = 0u;
                answered = 0u;
                while (take < ready) {
                    if (s_skip[take] == 0u) {
                        if ((unsigned long long)answered == room) break;
                        s_out[take] = answered;
                        answered += 1u;
                    }
                    take += 1u;
                }
            }
            s_take = take;
            s_answered = answered;
            if (take == 0u) {
                /* The host is behind: nothing taken; beat, stop on Abandon,
                 * and poll again. */
                s_waits += 1ull;
                granary_store_relaxed_u64(&response_control->producer_heartbeat.value, s_waits);
                if (granary_load_acquire_u32(&response_control->closed.value) != 0u) s_exit = 1;
            }
            if (answered != 0u) {
                /* 4. S2: the tail before the publications. Relaxed: the
                 * host's consumer reads sequences, not the tail, and a
                 * fence here would sit on every response's path. */
                granary_store_relaxed_u64(&response_control->tail.value, s_tail + answered);
            }
        }
        __syncthreads();
        if (s_exit) break;
        const unsigned int take = s_take;
        const unsigned long long tail = s_tail;

        /* 5. Process and answer. */
        if (t < take) {
            const unsigned long long position = head + t;
            if (s_skip[t] != 0u) {
                granary_store_release_u64(&slot->sequence, position + request_capacity);
            } else {
                const unsigned long long out = tail + (s_skips == 0u ? t : s_out[t]);
                granary_slot_header* response =
                    granary_slot(responses, response_slot, response_capacity, out);
                unsigned int response_len = 0u;
                unsigned int status;
                const bool fits = request_len <= request_max;
                if (fits && request_len > prefetched) {
                    granary_copy16(my_request + prefetched,
                                   (const unsigned char*)(slot + 1) + prefetched,
                                   request_len - prefetched);
                }
                if (!fits) {
                    status = GRANARY_STATUS_BAD_LENGTH;
                } else {
                    status = granary_process(my_request, request_len, my_response, response_max,
                                             &response_len);
                    if (status == GRANARY_STATUS_OK && response_len > response_max) {
                        status = GRANARY_STATUS_FAULT;
                    }
                }
                if (status != GRANARY_STATUS_OK) response_len = 0u;
                if (response_len != 0u) {
                    granary_copy16((unsigned char*)(response + 1), my_response, response_len);
                }
                response->request_id = request_id;
                response->len = response_len;
                response->status = status;
                response->flags = 0u;
                /* M5 then M3 under one fence: the request's slot is freed
                 * (relaxed), then the release store of the response's
                 * sequence orders the response's bytes and that free
                 * before it [K1]. M5 asks for a release on the free; a
                 * relaxed store is enough here because every load of the
                 * request's slot fed a store to scratch (the copy) that
                 * comes before the free in program order, and a store
                 * cannot issue before the load whose value it writes has
                 * returned: the slot is read completely before it can be
                 * seen free. (A release would add a fence, 0.7 us, to every
                 * response; BENCHMARKS.md.) */
                granary_store_relaxed_u64(&slot->sequence, position + request_capacity);
                granary_store_release_u64(&response->sequence, out + 1ull);
            }
        }
        __syncthreads();

        /* 6. The new indices, and a beat. */
        if (t == 0) {
            s_tail = tail + s_answered;
            s_head = head + take;
            /* For observers and blocked producers only (M5): relaxed, so no
             * fence delays the next poll. */
            granary_store_relaxed_u64(&request_control->head.value, head + take);
            s_beat += 1ull;
            granary_store_relaxed_u64(&request_control->consumer_heartbeat.value, s_beat);
            /* A full poll asks for the whole block next turn. */
            s_poll = take == poll ? width : (width < GRANARY_IDLE_POLL ? width : GRANARY_IDLE_POLL);
        }
        __syncthreads();
    }
}
