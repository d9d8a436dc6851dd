/*
 * Granary ring layout, version 1: the contract between host and device code.
 *
 * Shared by the CUDA C and OpenCL C preludes, which define:
 *   GRANARY_U32, GRANARY_U64         plain 32- and 64-bit unsigned integers
 *   GRANARY_ATOMIC_U32, _U64         the same sizes, accessed atomically
 *   GRANARY_OFFSETOF(type, member)   offsetof, where the compiler has a
 *                                    constant one (not NVRTC: offsets are
 *                                    then left to the host compiler's check)
 * Every offset below is checked against the Rust definitions by
 * ring-buffer/tests/device_layout.rs; the protocol is docs/ring-protocol.md.
 */
#ifndef GRANARY_RING_LAYOUT_H
#define GRANARY_RING_LAYOUT_H

#define GRANARY_RING_MAGIC 0x524E5247u /* "GRNR" little-endian */
#define GRANARY_RING_VERSION 1u
#define GRANARY_RING_MODE_MPSC 1u
#define GRANARY_RING_MODE_SPSC 2u
#define GRANARY_RING_LINE_BYTES 128
#define GRANARY_RING_CONTROL_BYTES 768
#define GRANARY_RING_SLOT_HEADER_BYTES 32
#define GRANARY_RING_SLOT_ALIGN 16
#define GRANARY_RING_TAIL_CLOSED_BIT 0x8000000000000000ull
#define GRANARY_RING_SLOT_FLAG_SKIP 1u

#define GRANARY_RING_OFF_MAGIC 0
#define GRANARY_RING_OFF_VERSION 4
#define GRANARY_RING_OFF_MODE 8
#define GRANARY_RING_OFF_CAPACITY 12
#define GRANARY_RING_OFF_SLOT_SIZE 16
#define GRANARY_RING_OFF_MAX_PAYLOAD 20
#define GRANARY_RING_OFF_SLOTS_OFFSET 24
#define GRANARY_RING_OFF_FLAGS 28
#define GRANARY_RING_OFF_TOTAL_BYTES 32
#define GRANARY_RING_OFF_HEADER_CRC 40
#define GRANARY_RING_OFF_TAIL 128
#define GRANARY_RING_OFF_HEAD 256
#define GRANARY_RING_OFF_CLOSED 384
#define GRANARY_RING_OFF_PRODUCER_HEARTBEAT 512
#define GRANARY_RING_OFF_CONSUMER_HEARTBEAT 640

#define GRANARY_SLOT_OFF_SEQUENCE 0
#define GRANARY_SLOT_OFF_REQUEST_ID 8
#define GRANARY_SLOT_OFF_LEN 16
#define GRANARY_SLOT_OFF_STATUS 20
#define GRANARY_SLOT_OFF_FLAGS 24
#define GRANARY_SLOT_OFF_RESERVED 28
#define GRANARY_SLOT_OFF_PAYLOAD 32

/* Line 0: written once when the ring is created, read-only afterwards. */
typedef struct granary_ring_header {
    GRANARY_U32 magic;        /* GRANARY_RING_MAGIC */
    GRANARY_U32 version;      /* GRANARY_RING_VERSION */
    GRANARY_U32 mode;         /* GRANARY_RING_MODE_* */
    GRANARY_U32 capacity;     /* power of two, 2 ..= 2^24 */
    GRANARY_U32 slot_size;    /* multiple of 16, 32 ..= 1 MiB */
    GRANARY_U32 max_payload;  /* slot_size - 32 */
    GRANARY_U32 slots_offset; /* GRANARY_RING_CONTROL_BYTES */
    GRANARY_U32 flags;        /* reserved, zero */
    GRANARY_U64 total_bytes;  /* slots_offset + capacity * slot_size */
    GRANARY_U32 header_crc;   /* CRC-32 (IEEE) of bytes 0..40 */
    GRANARY_U32 reserved[21]; /* zero */
} granary_ring_header;

/* One shared word alone on its 128-byte line. */
typedef struct granary_ring_line_u64 {
    GRANARY_ATOMIC_U64 value;
    GRANARY_U32 pad[30];
} granary_ring_line_u64;

typedef struct granary_ring_line_u32 {
    GRANARY_ATOMIC_U32 value;
    GRANARY_U32 pad[31];
} granary_ring_line_u32;

typedef struct granary_ring_control {
    granary_ring_header header;
    granary_ring_line_u64 tail;               /* MPSC: bit 63 = closed */
    granary_ring_line_u64 head;
    granary_ring_line_u32 closed;             /* 0 open, 1 closed */
    granary_ring_line_u64 producer_heartbeat;
    granary_ring_line_u64 consumer_heartbeat;
} granary_ring_control;

typedef struct granary_slot_header {
    GRANARY_ATOMIC_U64 sequence; /* p + 1 once written (both modes); MPSC: p when free */
    GRANARY_U64 request_id;
    GRANARY_U32 len;             /* 0 ..= max_payload */
    GRANARY_U32 status;
    GRANARY_U32 flags;           /* GRANARY_RING_SLOT_FLAG_* */
    GRANARY_U32 reserved;
} granary_slot_header;

/* Compile-time checks: a negative array size fails the build. */
#define GRANARY_RING_CHECK(name, cond) typedef char granary_ring_check_##name[(cond) ? 1 : -1]
GRANARY_RING_CHECK(header_size, sizeof(granary_ring_header) == GRANARY_RING_LINE_BYTES);
GRANARY_RING_CHECK(control_size, sizeof(granary_ring_control) == GRANARY_RING_CONTROL_BYTES);
GRANARY_RING_CHECK(slot_header_size, sizeof(granary_slot_header) == GRANARY_RING_SLOT_HEADER_BYTES);
#ifdef GRANARY_OFFSETOF
GRANARY_RING_CHECK(off_total, GRANARY_OFFSETOF(granary_ring_header, total_bytes) == GRANARY_RING_OFF_TOTAL_BYTES);
GRANARY_RING_CHECK(off_crc, GRANARY_OFFSETOF(granary_ring_header, header_crc) == GRANARY_RING_OFF_HEADER_CRC);
GRANARY_RING_CHECK(off_tail, GRANARY_OFFSETOF(granary_ring_control, tail) == GRANARY_RING_OFF_TAIL);
GRANARY_RING_CHECK(off_head, GRANARY_OFFSETOF(granary_ring_control, head) == GRANARY_RING_OFF_HEAD);
GRANARY_RING_CHECK(off_closed, GRANARY_OFFSETOF(granary_ring_control, closed) == GRANARY_RING_OFF_CLOSED);
GRANARY_RING_CHECK(off_pbeat, GRANARY_OFFSETOF(granary_ring_control, producer_heartbeat) == GRANARY_RING_OFF_PRODUCER_HEARTBEAT);
GRANARY_RING_CHECK(off_cbeat, GRANARY_OFFSETOF(granary_ring_control, consumer_heartbeat) == GRANARY_RING_OFF_CONSUMER_HEARTBEAT);
GRANARY_RING_CHECK(off_len, GRANARY_OFFSETOF(granary_slot_header, len) == GRANARY_SLOT_OFF_LEN);
GRANARY_RING_CHECK(off_slot_flags, GRANARY_OFFSETOF(granary_slot_header, flags) == GRANARY_SLOT_OFF_FLAGS);
#endif

/* The header of the slot that holds `position` (capacity is a power of two). */
#define GRANARY_RING_SLOT(ring_base, slot_size, capacity, position)                    \
    ((granary_slot_header *)((ring_base) + GRANARY_RING_CONTROL_BYTES +                  \
                             (size_t)((position) & ((GRANARY_U64)(capacity) - 1)) * (slot_size)))

#endif /* GRANARY_RING_LAYOUT_H */
