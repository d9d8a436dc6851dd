//! Fuzzing `Ring::inspect` and `Ring::attach` with corrupt, truncated,
//! random and misaligned memory.
//!
//! Properties:
//! - an untouched ring (either mode, various geometries, with or without
//!   messages in it) attaches and reports the `LayoutInfo` it was created
//!   with, also from a byte-for-byte copy in other memory;
//! - every change to one byte of the 128-byte header line is rejected
//!   (checked exhaustively: every offset, every nonzero XOR), and so is every
//!   change to several of its bytes, with the error of the first check that
//!   the changed bytes fail;
//! - every truncation of a valid ring is rejected as `TooSmall`;
//! - random buffers of any length are rejected;
//! - a header line with a correct checksum but arbitrary field values is
//!   accepted exactly when its fields describe a consistent ring that fits
//!   the region;
//! - a valid ring at a base that is not 128-byte aligned is rejected as
//!   `Misaligned`;
//! - corrupting bytes after the header line (the rest of the control block,
//!   slot headers, payloads) never makes attaching panic, and when attaching
//!   succeeds it reports the original layout.
//!
//! `inspect` and `attach` must always agree.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;

use granary_ring::layout::{CONTROL_BYTES, HEADER_CRC_COVERS, LAYOUT_VERSION, LINE_BYTES, MAGIC};
use granary_ring::{
    BadLayout, ExternalRegion, HeapRegion, LayoutInfo, Mode, Region, Ring, RingConfig, TryPopError,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;

/// Copies `bytes` into fresh 128-byte aligned memory of the same length.
fn region_from(bytes: &[u8]) -> HeapRegion {
    let region = HeapRegion::zeroed(bytes.len());
    // SAFETY: the region is fresh, owns `bytes.len()` writable bytes, and
    // cannot overlap `bytes`.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.base().as_ptr(), bytes.len()) };
    region
}

/// The bytes of `region`.
fn snapshot(region: &dyn Region) -> Vec<u8> {
    // SAFETY: a region's `len()` bytes are initialised and readable (Region
    // contract); no ring handle is writing to them while this runs.
    unsafe { std::slice::from_raw_parts(region.base().as_ptr(), region.len()) }.to_vec()
}

/// `Ring::inspect`, then `Ring::attach` on the same region; both must agree.
fn inspect_and_attach<R: Region>(region: R) -> Result<LayoutInfo, BadLayout> {
    let inspected = Ring::inspect(&region);
    // SAFETY: the attached view takes no role, and no other view of this
    // memory takes one either.
    let attached = unsafe { Ring::attach(region) }.map(|ring| ring.layout());
    assert_eq!(inspected, attached, "inspect and attach disagree");
    attached
}

/// The bytes of a freshly created ring after pushing `messages` (at most
/// `capacity` of them) into it, and its layout.
fn valid_image(config: RingConfig, messages: usize) -> (Vec<u8>, LayoutInfo) {
    let info = config.layout().unwrap();
    let region = Arc::new(HeapRegion::zeroed(info.total_bytes));
    // SAFETY: fresh memory that only this ring and the views attached
    // to it below use.
    let ring = unsafe { Ring::init_in(region.clone(), config) }.unwrap();
    assert_eq!(ring.layout(), info);
    let max = info.max_payload as usize;
    let message = |i: usize| vec![i as u8; i.min(max)];
    match config.mode {
        Mode::Mpsc => {
            let (producer, _consumer) = ring.split_mpsc().unwrap();
            for i in 0..messages {
                producer.try_push_with(i as u64, message(i)).unwrap();
            }
        }
        Mode::Spsc => {
            let (mut producer, _consumer) = ring.split_spsc().unwrap();
            for i in 0..messages {
                producer.try_push_with(i as u64, message(i)).unwrap();
            }
        }
    }
    (snapshot(&*region), info)
}

fn config() -> impl Strategy<Value = RingConfig> {
    (
        select(vec![Mode::Mpsc, Mode::Spsc]),
        (1u32..=8).prop_map(|shift| 1 << shift),
        0..=200u32,
    )
        .prop_map(|(mode, capacity, max_payload)| RingConfig {
            mode,
            capacity,
            max_payload,
        })
}

/// The error an otherwise valid header gives once the bytes at `offsets`
/// (all inside the header line) have changed: the first check, in
/// validation order, that one of them falls under.
fn expected_header_error(header: &[u8], offsets: impl IntoIterator<Item = usize>) -> BadLayout {
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let first = offsets.into_iter().min().expect("at least one change");
    match first {
        0..4 => BadLayout::BadMagic { found: word(0) },
        4..8 => BadLayout::WrongVersion {
            found: word(4),
            expected: LAYOUT_VERSION,
        },
        // Any change to the covered bytes or to the stored CRC. (CRC-32 has
        // Hamming distance 5 at this length, so up to 4 flipped bits are
        // always caught; more are missed with probability 2^-32.)
        8..44 => BadLayout::HeaderChecksum {
            stored: word(HEADER_CRC_COVERS),
            computed: crc32fast::hash(&header[..HEADER_CRC_COVERS]),
        },
        _ => BadLayout::ReservedNotZero,
    }
}

#[test]
fn constants_match_the_documented_layout() {
    assert_eq!(MAGIC, u32::from_le_bytes(*b"GRNR"));
    assert_eq!(LINE_BYTES, 128);
    assert_eq!(CONTROL_BYTES, 768);
    assert_eq!(HEADER_CRC_COVERS, 40);
}

#[test]
fn every_single_byte_change_to_the_header_line_is_rejected() {
    for config in [
        RingConfig::mpsc(2, 0),
        RingConfig::spsc(2, 0),
        RingConfig::mpsc(4, 17),
        RingConfig::spsc(16, 40),
        RingConfig::mpsc(1 << 10, 1000),
    ] {
        let (image, info) = valid_image(config, 1);
        let region = region_from(&image);
        assert_eq!(Ring::inspect(&region), Ok(info));
        let base = region.base().as_ptr();
        for offset in 0..LINE_BYTES {
            for xor in 1..=255u8 {
                let mut header = image[..LINE_BYTES].to_vec();
                header[offset] ^= xor;
                // SAFETY: `offset` is inside the region, which no ring
                // handle uses; `inspect` below only reads it.
                unsafe { base.add(offset).write(header[offset]) };
                let want = expected_header_error(&header, [offset]);
                assert_eq!(
                    Ring::inspect(&region),
                    Err(want),
                    "{config:?}: byte {offset} ^ {xor:#04x}"
                );
            }
            // SAFETY: as above.
            unsafe { base.add(offset).write(image[offset]) };
        }
        assert_eq!(inspect_and_attach(region), Ok(info));
    }
}

#[test]
fn every_truncation_of_a_small_ring_is_rejected() {
    for config in [RingConfig::mpsc(2, 0), RingConfig::spsc(4, 16)] {
        let (image, info) = valid_image(config, 0);
        for len in 0..info.total_bytes {
            let required = if len < CONTROL_BYTES {
                CONTROL_BYTES
            } else {
                info.total_bytes
            };
            assert_eq!(
                inspect_and_attach(region_from(&image[..len])),
                Err(BadLayout::TooSmall { len, required }),
                "{config:?} cut to {len} bytes"
            );
        }
        assert_eq!(inspect_and_attach(region_from(&image)), Ok(info));
    }
}

/// Header fields, written in the header line with a correct checksum.
#[derive(Debug, Clone)]
struct Fields {
    magic: u32,
    version: u32,
    mode: u32,
    capacity: u32,
    slot_size: u32,
    max_payload: u32,
    slots_offset: u32,
    flags: u32,
    total_bytes: u64,
    /// A reserved word (index, value) to set, if any.
    reserved: Option<(usize, u32)>,
}

impl Fields {
    fn line(&self) -> [u8; LINE_BYTES] {
        let mut line = [0u8; LINE_BYTES];
        let words = [
            self.magic,
            self.version,
            self.mode,
            self.capacity,
            self.slot_size,
            self.max_payload,
            self.slots_offset,
            self.flags,
        ];
        for (i, word) in words.into_iter().enumerate() {
            line[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
        }
        line[32..40].copy_from_slice(&self.total_bytes.to_le_bytes());
        let crc = crc32fast::hash(&line[..HEADER_CRC_COVERS]);
        line[40..44].copy_from_slice(&crc.to_le_bytes());
        if let Some((index, value)) = self.reserved {
            line[44 + 4 * index..48 + 4 * index].copy_from_slice(&value.to_le_bytes());
        }
        line
    }

    /// The layout these fields describe, if they are consistent and the
    /// ring fits in `region_len` bytes; written from the documentation of
    /// `RingHeader`, independently of the crate's validation.
    fn reference(&self, region_len: usize) -> Option<LayoutInfo> {
        let mode = match self.mode {
            1 => Mode::Mpsc,
            2 => Mode::Spsc,
            _ => return None,
        };
        let total = 768 + u64::from(self.capacity) * u64::from(self.slot_size);
        let ok = self.magic == u32::from_le_bytes(*b"GRNR")
            && self.version == 1
            && self.flags == 0
            && self.reserved.is_none_or(|(_, value)| value == 0)
            && self.capacity.is_power_of_two()
            && (2..=1 << 24).contains(&self.capacity)
            && self.slot_size % 16 == 0
            && (32..=1 << 20).contains(&self.slot_size)
            && self.max_payload.checked_add(32) == Some(self.slot_size)
            && self.slots_offset == 768
            && self.total_bytes == total
            && total <= region_len as u64;
        ok.then_some(LayoutInfo {
            mode,
            capacity: self.capacity,
            slot_size: self.slot_size,
            max_payload: self.max_payload,
            total_bytes: total as usize,
        })
    }
}

/// Mostly `valid`, sometimes a nearby, a power-of-two or an arbitrary value.
fn perturbed(valid: u32) -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => Just(valid),
        1 => any::<u32>(),
        1 => (-48i64..=48).prop_map(move |delta| (i64::from(valid) + delta) as u32),
        1 => (0u32..32).prop_map(|shift| 1 << shift),
    ]
}

/// Header fields near those of a valid ring, and a region length near its
/// size.
fn fields_and_len() -> impl Strategy<Value = (Fields, usize)> {
    config().prop_flat_map(|config| {
        let info = config.layout().unwrap();
        let total = info.total_bytes;
        let fields = (
            (
                perturbed(MAGIC),
                perturbed(LAYOUT_VERSION),
                perturbed(info.mode as u32),
                perturbed(info.capacity),
                perturbed(info.slot_size),
            ),
            (
                perturbed(info.max_payload),
                perturbed(CONTROL_BYTES as u32),
                perturbed(0),
                prop_oneof![
                    8 => Just(total as u64),
                    1 => any::<u64>(),
                    1 => 0..2 * total as u64,
                ],
                prop_oneof![
                    8 => Just(None),
                    1 => (0..21usize, any::<u32>()).prop_map(Some),
                ],
            ),
        )
            .prop_map(
                |(
                    (magic, version, mode, capacity, slot_size),
                    (max_payload, slots_offset, flags, total_bytes, reserved),
                )| Fields {
                    magic,
                    version,
                    mode,
                    capacity,
                    slot_size,
                    max_payload,
                    slots_offset,
                    flags,
                    total_bytes,
                    reserved,
                },
            );
        let len = prop_oneof![
            4 => Just(total),
            1 => CONTROL_BYTES..total,
            1 => total..total + 4096,
            1 => 0..CONTROL_BYTES,
        ];
        (fields, len)
    })
}

proptest! {
    // Failures print a minimal input; nothing is written to disk.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn untouched_rings_attach_with_their_layout(
        config in config(),
        fill in 0..=1usize,
        extra in 0..300usize,
    ) {
        let info = config.layout().unwrap();
        let messages = fill * info.capacity as usize / 2 + fill;
        let (image, info) = valid_image(config, messages);
        prop_assert_eq!(image.len(), info.total_bytes);
        prop_assert_eq!(info.mode, config.mode);
        prop_assert_eq!(info.capacity, config.capacity);
        prop_assert!(info.max_payload >= config.max_payload);
        prop_assert_eq!(info.slot_size % 16, 0);
        prop_assert_eq!(info.slot_size - info.max_payload, 32);

        // A copy in other memory, exactly as long or longer, is the same ring.
        prop_assert_eq!(inspect_and_attach(region_from(&image)), Ok(info));
        let mut longer = image.clone();
        longer.resize(image.len() + extra, 0xA5);
        prop_assert_eq!(inspect_and_attach(region_from(&longer)), Ok(info));

        // The copy carries the messages too.
        let copy = region_from(&image);
        // SAFETY: this is the only view of the copy.
        let ring = unsafe { Ring::attach(copy) }.unwrap();
        prop_assert_eq!(ring.len(), messages);
        prop_assert!(!ring.is_closed());
        let mut consumer = match config.mode {
            Mode::Mpsc => ring.split_mpsc().unwrap().1,
            Mode::Spsc => ring.split_spsc().unwrap().1,
        };
        for i in 0..messages {
            let message = consumer.try_pop().unwrap();
            prop_assert_eq!(message.position(), i as u64);
            prop_assert_eq!(message.request_id(), i as u64);
            prop_assert_eq!(message.payload(), &vec![i as u8; i.min(info.max_payload as usize)][..]);
        }
        prop_assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
    }

    #[test]
    fn any_change_to_the_header_line_is_rejected(
        config in config(),
        changes in btree_map(0..LINE_BYTES, 1..=255u8, 1..=12),
    ) {
        let (mut image, _) = valid_image(config, 0);
        for (&offset, &xor) in &changes {
            image[offset] ^= xor;
        }
        let want = expected_header_error(&image[..LINE_BYTES], changes.keys().copied());
        prop_assert_eq!(inspect_and_attach(region_from(&image)), Err(want));
    }

    #[test]
    fn header_bytes_set_to_random_values_are_rejected(
        config in config(),
        // Offset -> new value; offsets whose value equals the original are
        // dropped below, and the case is discarded if none is left.
        values in btree_map(0..LINE_BYTES, any::<u8>(), 1..=40),
    ) {
        let (mut image, _) = valid_image(config, 0);
        let changed: BTreeMap<usize, u8> = values
            .into_iter()
            .filter(|&(offset, value)| image[offset] != value)
            .collect();
        prop_assume!(!changed.is_empty());
        for (&offset, &value) in &changed {
            image[offset] = value;
        }
        let want = expected_header_error(&image[..LINE_BYTES], changed.keys().copied());
        prop_assert_eq!(inspect_and_attach(region_from(&image)), Err(want));
    }

    #[test]
    fn truncated_rings_are_too_small(
        (config, cut) in config().prop_flat_map(|config| {
            let total = config.layout().unwrap().total_bytes;
            (Just(config), 0..total)
        }),
    ) {
        let (image, info) = valid_image(config, 1);
        let required = if cut < CONTROL_BYTES { CONTROL_BYTES } else { info.total_bytes };
        let want = Err(BadLayout::TooSmall { len: cut, required });
        // A short copy of its own...
        prop_assert_eq!(inspect_and_attach(region_from(&image[..cut])), want);
        // ...and a short window onto the full ring, through an `Arc` that
        // keeps the memory alive.
        let full = Arc::new(region_from(&image));
        // SAFETY: `full` is kept alive (by `keep`) until after the external
        // region and any ring over it are dropped, and `cut` bytes of it are
        // valid, initialised and aligned.
        let window = unsafe { ExternalRegion::new(full.base(), cut) };
        let keep = full.clone();
        prop_assert_eq!(inspect_and_attach(window), want);
        prop_assert_eq!(inspect_and_attach(keep), Ok(info));
    }

    #[test]
    fn random_buffers_are_rejected(bytes in vec(any::<u8>(), 0..4096)) {
        prop_assert!(inspect_and_attach(region_from(&bytes)).is_err());
    }

    #[test]
    fn random_buffers_with_a_good_magic_and_version_are_rejected(
        mut bytes in vec(any::<u8>(), 0..4096),
    ) {
        let len = bytes.len();
        let prefix = [MAGIC.to_le_bytes(), LAYOUT_VERSION.to_le_bytes()].concat();
        let n = len.min(8);
        bytes[..n].copy_from_slice(&prefix[..n]);
        let result = inspect_and_attach(region_from(&bytes));
        if len < CONTROL_BYTES {
            prop_assert_eq!(result, Err(BadLayout::TooSmall { len, required: CONTROL_BYTES }));
        } else {
            prop_assert!(result.is_err());
        }
    }

    #[test]
    fn checksummed_headers_are_accepted_exactly_when_consistent(
        (fields, len) in fields_and_len(),
        garbage in any::<u8>(),
    ) {
        let mut bytes = vec![garbage; len];
        let line = fields.line();
        let n = len.min(LINE_BYTES);
        bytes[..n].copy_from_slice(&line[..n]);
        // Indices of an empty ring, so only the header decides (corrupt
        // indices are covered by `corrupt_indices_are_rejected`).
        bytes[n..len.min(CONTROL_BYTES)].fill(0);
        let result = inspect_and_attach(region_from(&bytes));
        match fields.reference(len) {
            Some(info) => prop_assert_eq!(result, Ok(info)),
            None => {
                let err = result.unwrap_err();
                prop_assert!(
                    !matches!(err, BadLayout::HeaderChecksum { .. } | BadLayout::Misaligned { .. }),
                    "{:?}", err
                );
            }
        }
    }

    #[test]
    fn a_misaligned_base_is_rejected(config in config(), shift in 1..LINE_BYTES) {
        let (image, info) = valid_image(config, 1);
        let backing = HeapRegion::zeroed(image.len() + 2 * LINE_BYTES);
        for offset in [shift, LINE_BYTES] {
            // SAFETY: `offset + image.len()` bytes fit in `backing`, which no
            // ring uses, and `image` is not inside it.
            let base = unsafe {
                let base = backing.base().as_ptr().add(offset);
                std::ptr::copy_nonoverlapping(image.as_ptr(), base, image.len());
                NonNull::new(base).unwrap()
            };
            // SAFETY: `backing` outlives this region and any ring over it
            // (both dropped inside this iteration); the bytes are valid and
            // initialised.
            let region = unsafe { ExternalRegion::new(base, image.len()) };
            let want = if offset % LINE_BYTES == 0 {
                Ok(info)
            } else {
                Err(BadLayout::Misaligned { addr: base.as_ptr() as usize, required: 128 })
            };
            prop_assert_eq!(inspect_and_attach(region), want);
        }
    }

    #[test]
    fn corruption_after_the_header_line_does_not_panic(
        (config, changes) in config().prop_flat_map(|config| {
            let total = config.layout().unwrap().total_bytes;
            (Just(config), btree_map(LINE_BYTES..total, 1..=255u8, 1..=64))
        }),
        messages in 0..=2usize,
    ) {
        let (mut image, info) = valid_image(config, messages);
        for (&offset, &xor) in &changes {
            image[offset] ^= xor;
        }
        if let Ok(got) = inspect_and_attach(region_from(&image)) {
            prop_assert_eq!(got, info);
        }
    }

    #[test]
    fn corrupt_indices_are_rejected(
        config in config(),
        head in any::<u64>(),
        ahead in any::<u64>(),
    ) {
        let (mut image, info) = valid_image(config, 0);
        let tail = head.wrapping_add(ahead);
        image[256..264].copy_from_slice(&head.to_le_bytes());
        image[128..136].copy_from_slice(&tail.to_le_bytes());
        // Only MPSC rings carry the closed bit in `tail`.
        let closed_bit = if info.mode == Mode::Mpsc { 1u64 << 63 } else { 0 };
        let plain_tail = tail & !closed_bit;
        let consistent = plain_tail < 1 << 63
            && head <= plain_tail
            && plain_tail - head <= u64::from(info.capacity);
        let result = inspect_and_attach(region_from(&image));
        if consistent {
            prop_assert_eq!(result, Ok(info));
        } else {
            prop_assert_eq!(result, Err(BadLayout::BadIndices { head, tail: plain_tail }));
        }
    }
}
