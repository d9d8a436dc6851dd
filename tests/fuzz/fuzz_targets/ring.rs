//! The ring on foreign memory (`granary_ring::Ring::attach`): arbitrary
//! bytes as a region a device or another process wrote. Memory that holds
//! no valid ring is refused; one that passes is attached and drained, and
//! pushed to, however its slots are filled, without a panic or (under the
//! address sanitizer) an access out of bounds.
#![no_main]

use granary_ring::{Consumer, HeapRegion, Mode, Region, Ring};
use libfuzzer_sys::fuzz_target;

/// Four pushes through `push`, then pops until the ring is empty or 64
/// have come out.
fn exercise(mut push: impl FnMut([u8; 24]), consumer: &mut Consumer) {
    for round in 0..4u8 {
        push([round; 24]);
    }
    for _ in 0..64 {
        match consumer.try_pop() {
            Ok(message) => {
                let _ = message.payload().len();
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let region = HeapRegion::zeroed(data.len());
    // SAFETY: the region was just allocated with `data.len()` bytes and
    // nothing else refers to it yet.
    unsafe {
        region
            .base()
            .as_ptr()
            .copy_from_nonoverlapping(data.as_ptr(), data.len());
    }
    if Ring::inspect(&region).is_err() {
        return;
    }
    // SAFETY: this view is the only one of the memory: no role is held
    // elsewhere.
    let Ok(ring) = (unsafe { Ring::attach(region) }) else {
        return;
    };
    if ring.layout().mode == Mode::Mpsc {
        if let Ok((producer, mut consumer)) = ring.split_mpsc() {
            exercise(
                |payload| {
                    let _ = producer.try_push(payload);
                },
                &mut consumer,
            );
        }
    } else if let Ok((mut producer, mut consumer)) = ring.split_spsc() {
        exercise(
            |payload| {
                let _ = producer.try_push(payload);
            },
            &mut consumer,
        );
    }
});
