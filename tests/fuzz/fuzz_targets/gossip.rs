//! Sealed gossip (`cluster/src/sealed`): the reader of chitchat's wire
//! format, rule 3's checks and the writer, and the envelope, on arbitrary
//! bytes. The first byte picks which.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => granary_cluster::fuzzing::envelope(rest),
        Some((_, rest)) => granary_cluster::fuzzing::gossip(rest),
        None => {}
    }
});
