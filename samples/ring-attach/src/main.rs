//! Two views of one ring, as a host and a device share one.
//!
//! The "host" formats a ring in a shared region and keeps only the producer
//! role; a second view attaches to the same bytes, validates the layout and
//! takes the consumer role, as a device kernel does with host-mapped memory.
//! Run with `cargo run -p ring-attach`.

use std::sync::Arc;
use std::thread;

use granary_ring::{Consumer, HeapRegion, PopError, Ring, RingConfig, WaitPolicy};

/// A consumer that closes the ring when it stops for any reason, a panic
/// included: a producer waiting for room is woken with `Closed` rather
/// than waiting forever.
struct Closing(Consumer);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = RingConfig::mpsc(256, 64);
    let region = Arc::new(HeapRegion::zeroed(config.layout()?.total_bytes));
    // SAFETY: fresh memory that only this ring and the views attached
    // to it below use.
    let host = unsafe { Ring::init_in(region.clone(), config) }?;
    // SAFETY: the host view below keeps only producers; this view takes the
    // one consumer.
    let device = unsafe { Ring::attach(region) }?;
    println!("attached: {:?}", device.layout());

    // Each view takes only its own role.
    let producer = host.into_producer()?;
    let mut consumer = Closing(device.into_consumer());
    let kernel = thread::spawn(move || {
        let mut sum = 0u64;
        let policy = WaitPolicy::default();
        loop {
            match consumer.0.pop(&policy, None) {
                Ok(message) => sum += message.payload().iter().map(|&b| u64::from(b)).sum::<u64>(),
                Err(PopError::Closed) => return Ok(sum),
                Err(err) => return Err(err),
            }
        }
    });
    let mut expected = 0u64;
    for i in 0..10_000u64 {
        let payload = [(i % 251) as u8; 16];
        expected += payload.iter().map(|&b| u64::from(b)).sum::<u64>();
        if let Err(err) = producer.push_with(i, payload, &WaitPolicy::default(), None) {
            // The consumer closed the ring: its own error says why.
            return match kernel.join() {
                Ok(Err(consumer)) => Err(format!("the consumer stopped: {consumer}").into()),
                Ok(Ok(_)) => Err(format!("the consumer stopped early: {err}").into()),
                Err(_) => Err("consumer thread panicked".into()),
            };
        }
    }
    producer.close();
    let sum = kernel.join().map_err(|_| "consumer thread panicked")??;
    println!("consumer summed {sum} across views (expected {expected})");
    if sum != expected {
        return Err("sums differ".into());
    }
    Ok(())
}
