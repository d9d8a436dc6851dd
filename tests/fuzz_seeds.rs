//! The seed corpus of the cargo-fuzz targets (`tests/fuzz/corpus`): each
//! seed is made here from the real encoders, so it is a valid input of the
//! kind its target reads (a frame, a handshake stream, a named message, a
//! ring's memory, a node file, a gossip datagram), and the committed files
//! must be exactly these. After a format changes, write them again with
//! `GRANARY_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_seeds`.

use std::path::{Path, PathBuf};

use granary::actors::dispatch::encode;
use granary::cluster::SiloId;
use granary::cluster::wire::{self, Header, Kind, Outcome};
use granary::ring::{Region, Ring, RingConfig};
use serde::Serialize;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus")
}

/// A frame body as the length-delimited stream carries it.
fn framed(header: &Header, payload: &[u8]) -> Vec<u8> {
    let body = wire::encode(header, payload).expect("a seed frame encodes");
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn with_selector(selector: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend_from_slice(rest);
    out
}

fn frames() -> Seeds {
    let hello = Header::Hello {
        protocol: wire::PROTOCOL,
        cluster: "fuzz".into(),
        silo: SiloId::new("b:1", 1),
        nonce: [7; 32],
    };
    let challenge = Header::Challenge {
        protocol: wire::PROTOCOL,
        silo: SiloId::new("b:1", 1),
        nonce: [9; 32],
        proof: [3; 32],
    };
    let request = Header::Request {
        id: 1,
        grain_type: "account".into(),
        key: granary::actors::GrainKey::Str("alice".into()),
        message: "deposit".into(),
        kind: Kind::Call,
        chain: 42,
        time_left_us: 1_000_000,
    };
    let response = Header::Response {
        id: 1,
        outcome: Outcome::Failed(wire::RemoteError::Overloaded),
    };
    let body = |header: &Header, payload: &[u8]| {
        wire::encode(header, payload)
            .expect("a seed frame encodes")
            .to_vec()
    };
    let mut hello_then_proof = framed(&hello, &[]);
    hello_then_proof.extend(framed(&Header::Proof { proof: [1; 32] }, &[]));
    vec![
        ("request", with_selector(0, &body(&request, b"payload"))),
        ("response", with_selector(0, &body(&response, &[]))),
        ("hello", with_selector(0, &body(&hello, &[]))),
        ("accept-hello-proof", with_selector(1, &hello_then_proof)),
        (
            "connect-challenge",
            with_selector(2, &framed(&challenge, &[])),
        ),
        (
            "member-request",
            with_selector(3, &framed(&request, b"payload")),
        ),
    ]
}

#[derive(Serialize)]
struct Deposit {
    amount: i64,
    memo: String,
}

#[derive(Serialize)]
struct Rename(Vec<(u32, Option<String>)>);

fn named() -> Seeds {
    let deposit = encode(&Deposit {
        amount: 10,
        memo: "rent".into(),
    })
    .expect("encodes");
    let rename = encode(&Rename(vec![(1, Some("a".into())), (2, None)])).expect("encodes");
    vec![
        ("deposit", [&[0u8, 0, 1][..], &deposit].concat()),
        ("rename", [&[0u8, 1, 2][..], &rename].concat()),
        ("unknown-type", [&[1u8, 0, 3][..], &deposit].concat()),
    ]
}

/// A ring's memory after `messages` pushes.
fn ring_memory(config: RingConfig, messages: &[&[u8]]) -> Vec<u8> {
    let ring = Ring::new(config).expect("a seed ring");
    let (base, len) = {
        let region = ring.region();
        (region.base(), region.len())
    };
    let read = || {
        let mut out = vec![0u8; len];
        // SAFETY: `len` bytes at `base` are the ring's region, alive while
        // its handles below are; nothing else reads or writes it now.
        unsafe { base.as_ptr().copy_to_nonoverlapping(out.as_mut_ptr(), len) };
        out
    };
    match config.mode {
        granary::ring::Mode::Mpsc => {
            let (producer, consumer) = ring.split_mpsc().expect("an MPSC ring");
            for message in messages {
                producer.try_push(*message).expect("room in the seed ring");
            }
            let out = read();
            drop((producer, consumer));
            out
        }
        granary::ring::Mode::Spsc => {
            let (mut producer, consumer) = ring.split_spsc().expect("an SPSC ring");
            for message in messages {
                producer.try_push(*message).expect("room in the seed ring");
            }
            let out = read();
            drop((producer, consumer));
            out
        }
    }
}

fn rings() -> Seeds {
    vec![
        (
            "mpsc-two-messages",
            ring_memory(RingConfig::mpsc(4, 64), &[b"first", b"second"]),
        ),
        ("spsc-empty", ring_memory(RingConfig::spsc(8, 32), &[])),
    ]
}

fn node_files() -> Seeds {
    let full = "cluster = \"prod\"\n\
        secret = \"5f2a9c41e07bd3386a11f04c9be2d57003e8a6b1c94f2d0e7ab36c5d18f09e42\"\n\
        listen = \"10.0.0.5:7000\"\ngossip = \"10.0.0.5:7100\"\nseeds = [\"10.0.0.4:7100\"]\n\
        gossip_interval_ms = 200\nphi_threshold = 8.0\ndeath_grace_ms = 4000\n\
        storage = { kind = \"postgres\", url = \"postgres://granary@db/granary\" }\n\
        devices = { backend = \"cuda\", memory_mib = 40960 }\n\
        admin = { listen = \"127.0.0.1:9100\", token = \"t\" }\ndrain_grace_secs = 30\n\
        limits = { max_activations = 10, activation_limit = 20, storage_timeout_ms = 500 }\n\
        tls = { ca = \"certs/ca.pem\", cert = \"certs/10.0.0.5.pem\", key = \"certs/10.0.0.5-key.pem\" }\n";
    let small = "cluster = \"c\"\nsecret = \"00\"\nlisten = \"127.0.0.1:0\"\n\
        gossip = \"127.0.0.1:0\"\nstorage = { kind = \"memory\" }\n";
    vec![
        ("full", full.as_bytes().to_vec()),
        ("small", small.as_bytes().to_vec()),
    ]
}

fn gossip() -> Seeds {
    // chitchat's header: magic, protocol version, type.
    let header = |kind: u8| {
        let mut out = 45_139u16.to_le_bytes().to_vec();
        out.extend_from_slice(&[0, kind]);
        out
    };
    let node = |out: &mut Vec<u8>, name: &str, generation: u64| {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&generation.to_le_bytes());
        out.push(4);
        out.extend_from_slice(&[127, 0, 0, 1]);
        out.extend_from_slice(&7100u16.to_le_bytes());
    };
    let mut syn = header(0);
    syn.extend_from_slice(&1u16.to_le_bytes());
    node(&mut syn, "silo-1", 3);
    for field in [5u64, 0, 9] {
        syn.extend_from_slice(&field.to_le_bytes());
    }
    syn.extend_from_slice(&4u16.to_le_bytes());
    syn.extend_from_slice(b"fuzz");
    let mut ops = vec![0u8];
    node(&mut ops, "silo-2", 1);
    ops.extend_from_slice(&0u64.to_le_bytes());
    ops.extend_from_slice(&2u64.to_le_bytes());
    ops.push(1);
    for text in ["granary.state", "{}"] {
        ops.extend_from_slice(&(text.len() as u16).to_le_bytes());
        ops.extend_from_slice(text.as_bytes());
    }
    ops.extend_from_slice(&3u64.to_le_bytes());
    ops.push(0);
    ops.push(2);
    ops.extend_from_slice(&3u64.to_le_bytes());
    let mut ack = header(2);
    ack.push(2);
    ack.extend_from_slice(&(ops.len() as u16).to_le_bytes());
    ack.extend_from_slice(&ops);
    ack.push(0);
    vec![
        ("syn", with_selector(1, &syn)),
        ("ack", with_selector(1, &ack)),
        ("envelope", with_selector(0, &ack)),
    ]
}

/// Seeds by name.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("frames", frames()),
        ("named", named()),
        ("ring", rings()),
        ("node_toml", node_files()),
        ("gossip", gossip()),
    ]
}

#[test]
fn the_committed_fuzz_seeds_are_what_they_claim() {
    let write = std::env::var_os("GRANARY_WRITE_FUZZ_SEEDS").is_some();
    for (target, seeds) in all() {
        let folder = corpus().join(target);
        if write {
            std::fs::create_dir_all(&folder).expect("a corpus folder");
        }
        for (name, bytes) in seeds {
            let path = folder.join(name);
            if write {
                std::fs::write(&path, &bytes).expect("a seed is written");
                continue;
            }
            let committed = std::fs::read(&path).unwrap_or_else(|err| {
                panic!(
                    "{}: {err}; write the seeds with GRANARY_WRITE_FUZZ_SEEDS=1",
                    path.display()
                )
            });
            assert!(
                committed == bytes,
                "{} is not the seed this test makes; write the seeds again with \
                 GRANARY_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
    }
}

/// Each seed is an input its target reads as intended, not junk: frames
/// decode, rings pass inspection, node files read.
#[test]
fn every_seed_is_a_valid_input_of_its_kind() {
    for (name, seed) in frames() {
        if seed[0] == 0 {
            wire::decode(seed[1..].to_vec().into()).unwrap_or_else(|err| panic!("{name}: {err}"));
        }
    }
    for (name, seed) in rings() {
        let region = granary::ring::HeapRegion::zeroed(seed.len());
        // SAFETY: the region was just allocated with `seed.len()` bytes and
        // nothing else refers to it.
        unsafe {
            region
                .base()
                .as_ptr()
                .copy_from_nonoverlapping(seed.as_ptr(), seed.len());
        }
        Ring::inspect(&region).unwrap_or_else(|err| panic!("{name}: {err}"));
    }
    for (name, seed) in node_files() {
        let text = std::str::from_utf8(&seed).expect("text");
        granary::node_file::NodeFile::from_toml(text).unwrap_or_else(|err| panic!("{name}: {err}"));
    }
}
