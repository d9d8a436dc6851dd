//! The C declarations that device code compiles against agree with the Rust
//! layout, offset by offset.
//!
//! The shared part of `CUDA_HEADER` and `OPENCL_HEADER` is compiled with the
//! host C compiler (`$CC`, else `cc`), with the same integer types the
//! device preludes use. The program prints `offsetof` and `sizeof` of every
//! field and the value of every `#define`; each is compared with
//! `offset_of!`/`size_of` on the Rust structs and with the Rust constants.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use granary_ring::device::{CUDA_HEADER, LAYOUT_H, OPENCL_HEADER};
use granary_ring::layout::{
    CONTROL_BYTES, ControlBlock, LAYOUT_VERSION, LINE_BYTES, MAGIC, RingHeader, SLOT_ALIGN,
    SLOT_FLAG_SKIP, SLOT_HEADER_BYTES, SlotHeader, TAIL_CLOSED_BIT,
};

const HOST_PRELUDE: &str = "#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n\
#define GRANARY_U32 uint32_t\n#define GRANARY_U64 uint64_t\n\
#define GRANARY_ATOMIC_U32 uint32_t\n#define GRANARY_ATOMIC_U64 uint64_t\n\
#define GRANARY_OFFSETOF(type, member) offsetof(type, member)\n";

/// (name printed by the C program, Rust value).
fn expected() -> Vec<(&'static str, u64)> {
    macro_rules! off {
        ($ty:ty, $field:ident) => {
            offset_of!($ty, $field) as u64
        };
    }
    vec![
        ("sizeof_header", size_of::<RingHeader>() as u64),
        ("sizeof_control", size_of::<ControlBlock>() as u64),
        ("sizeof_slot_header", size_of::<SlotHeader>() as u64),
        ("header.magic", off!(RingHeader, magic)),
        ("header.version", off!(RingHeader, version)),
        ("header.mode", off!(RingHeader, mode)),
        ("header.capacity", off!(RingHeader, capacity)),
        ("header.slot_size", off!(RingHeader, slot_size)),
        ("header.max_payload", off!(RingHeader, max_payload)),
        ("header.slots_offset", off!(RingHeader, slots_offset)),
        ("header.flags", off!(RingHeader, flags)),
        ("header.total_bytes", off!(RingHeader, total_bytes)),
        ("header.header_crc", off!(RingHeader, header_crc)),
        ("header.reserved", off!(RingHeader, reserved)),
        ("control.header", off!(ControlBlock, header)),
        ("control.tail", off!(ControlBlock, tail)),
        ("control.head", off!(ControlBlock, head)),
        ("control.closed", off!(ControlBlock, closed)),
        (
            "control.producer_heartbeat",
            off!(ControlBlock, producer_heartbeat),
        ),
        (
            "control.consumer_heartbeat",
            off!(ControlBlock, consumer_heartbeat),
        ),
        ("slot.sequence", off!(SlotHeader, sequence)),
        ("slot.request_id", off!(SlotHeader, request_id)),
        ("slot.len", off!(SlotHeader, len)),
        ("slot.status", off!(SlotHeader, status)),
        ("slot.flags", off!(SlotHeader, flags)),
        ("slot.reserved", off!(SlotHeader, reserved)),
        // The #defines device code uses directly.
        ("GRANARY_RING_MAGIC", u64::from(MAGIC)),
        ("GRANARY_RING_VERSION", u64::from(LAYOUT_VERSION)),
        ("GRANARY_RING_LINE_BYTES", LINE_BYTES as u64),
        ("GRANARY_RING_CONTROL_BYTES", CONTROL_BYTES as u64),
        ("GRANARY_RING_SLOT_HEADER_BYTES", SLOT_HEADER_BYTES as u64),
        ("GRANARY_RING_SLOT_ALIGN", SLOT_ALIGN as u64),
        ("GRANARY_RING_TAIL_CLOSED_BIT", TAIL_CLOSED_BIT),
        ("GRANARY_RING_SLOT_FLAG_SKIP", u64::from(SLOT_FLAG_SKIP)),
        ("GRANARY_RING_MODE_MPSC", granary_ring::Mode::Mpsc as u64),
        ("GRANARY_RING_MODE_SPSC", granary_ring::Mode::Spsc as u64),
        ("GRANARY_RING_OFF_MAGIC", off!(RingHeader, magic)),
        ("GRANARY_RING_OFF_VERSION", off!(RingHeader, version)),
        ("GRANARY_RING_OFF_MODE", off!(RingHeader, mode)),
        ("GRANARY_RING_OFF_CAPACITY", off!(RingHeader, capacity)),
        ("GRANARY_RING_OFF_SLOT_SIZE", off!(RingHeader, slot_size)),
        (
            "GRANARY_RING_OFF_MAX_PAYLOAD",
            off!(RingHeader, max_payload),
        ),
        (
            "GRANARY_RING_OFF_SLOTS_OFFSET",
            off!(RingHeader, slots_offset),
        ),
        ("GRANARY_RING_OFF_FLAGS", off!(RingHeader, flags)),
        (
            "GRANARY_RING_OFF_TOTAL_BYTES",
            off!(RingHeader, total_bytes),
        ),
        ("GRANARY_RING_OFF_HEADER_CRC", off!(RingHeader, header_crc)),
        ("GRANARY_RING_OFF_TAIL", off!(ControlBlock, tail)),
        ("GRANARY_RING_OFF_HEAD", off!(ControlBlock, head)),
        ("GRANARY_RING_OFF_CLOSED", off!(ControlBlock, closed)),
        (
            "GRANARY_RING_OFF_PRODUCER_HEARTBEAT",
            off!(ControlBlock, producer_heartbeat),
        ),
        (
            "GRANARY_RING_OFF_CONSUMER_HEARTBEAT",
            off!(ControlBlock, consumer_heartbeat),
        ),
        ("GRANARY_SLOT_OFF_SEQUENCE", off!(SlotHeader, sequence)),
        ("GRANARY_SLOT_OFF_REQUEST_ID", off!(SlotHeader, request_id)),
        ("GRANARY_SLOT_OFF_LEN", off!(SlotHeader, len)),
        ("GRANARY_SLOT_OFF_STATUS", off!(SlotHeader, status)),
        ("GRANARY_SLOT_OFF_FLAGS", off!(SlotHeader, flags)),
        ("GRANARY_SLOT_OFF_RESERVED", off!(SlotHeader, reserved)),
        ("GRANARY_SLOT_OFF_PAYLOAD", SLOT_HEADER_BYTES as u64),
        // The slot macro: slot 5 of a 4-slot ring of 48-byte slots is slot 1.
        ("slot_macro_5_of_4x48", (CONTROL_BYTES + 48) as u64),
    ]
}

fn c_program() -> String {
    let mut body = String::new();
    for (name, _) in expected() {
        let expr = if let Some(rest) = name.strip_prefix("sizeof_") {
            let ty = match rest {
                "header" => "granary_ring_header",
                "control" => "granary_ring_control",
                _ => "granary_slot_header",
            };
            format!("sizeof({ty})")
        } else if let Some((group, field)) = name.split_once('.') {
            let ty = match group {
                "header" => "granary_ring_header",
                "control" => "granary_ring_control",
                _ => "granary_slot_header",
            };
            format!("offsetof({ty}, {field})")
        } else if name == "slot_macro_5_of_4x48" {
            "(size_t)((char *)GRANARY_RING_SLOT((char *)0, 48, 4, 5) - (char *)0)".to_string()
        } else {
            format!("({name})")
        };
        body.push_str(&format!(
            "    printf(\"%s=%llu\\n\", \"{name}\", (unsigned long long)({expr}));\n"
        ));
    }
    format!("{HOST_PRELUDE}{LAYOUT_H}\nint main(void) {{\n{body}    return 0;\n}}\n")
}

#[test]
fn device_headers_embed_the_shared_layout() {
    assert!(CUDA_HEADER.ends_with(LAYOUT_H));
    assert!(OPENCL_HEADER.ends_with(LAYOUT_H));
    assert!(CUDA_HEADER.contains("#define GRANARY_ATOMIC_U64 unsigned long long"));
    assert!(OPENCL_HEADER.contains("#define GRANARY_ATOMIC_U64 atomic_ulong"));
}

#[test]
fn c_layout_matches_rust_offsets() {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let dir = std::env::temp_dir().join(format!("granary-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("layout.c");
    let binary = dir.join("layout");
    std::fs::write(&source, c_program()).unwrap();
    // Rust links through `cc` on Linux, so a C compiler is always present
    // where this test builds; its absence is a failure, not a skip.
    let compiled = Command::new(&compiler)
        .args([
            "-std=c11",
            "-Wall",
            "-Werror",
            "-Wno-unused-local-typedefs",
            "-o",
        ])
        .arg(&binary)
        .arg(&source)
        .output()
        .unwrap_or_else(|err| panic!("cannot run the C compiler `{compiler}`: {err}"));
    assert!(
        compiled.status.success(),
        "the layout header does not compile:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&binary).output().unwrap();
    assert!(run.status.success());
    let printed: HashMap<String, u64> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.parse().unwrap()))
        .collect();
    let expected = expected();
    assert_eq!(printed.len(), expected.len());
    for (name, rust) in expected {
        assert_eq!(printed[name], rust, "C and Rust disagree on {name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
