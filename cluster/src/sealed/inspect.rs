//! Reads chitchat 0.9's datagrams, to check them before chitchat applies
//! them, and writes one back shorter.
//!
//! chitchat keeps its decoder crate-private, so this module reads its wire
//! format itself (the format its `Serializable` impls write):
//!
//! - a message: magic `45139` (u16), protocol version `0`, a type byte
//!   (`0` Syn: digest, cluster name; `1` SynAck: digest, delta; `2` Ack:
//!   delta; `3` BadCluster);
//! - a digest: a u16 count of (node id, heartbeat, last GC version, max
//!   version);
//! - a node id: its name (a u16-length string), generation (u64) and
//!   gossip address (IP version byte `4` or `6`, the octets, a u16 port);
//! - a delta: a stream of blocks (`1` zstd-compressed, `2` plain, each with
//!   a u16 length; `0` ends it) whose bytes are operations: `0` a node (id,
//!   last GC version, the version its values follow), `1` a value (key,
//!   value, version, deletion status `0..=2`) and `2` the node's max
//!   version.
//!
//! All integers are little-endian. [`parse`] accepts exactly what
//! chitchat's own decoder accepts (a message that parses here decodes
//! there), and nothing longer than its input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC: u16 = 45_139;
/// chitchat's own bound on a block's decompressed bytes.
const BLOCK_MAX: usize = u16::MAX as usize;
/// Bytes per block when a delta is written again (chitchat's threshold).
const BLOCK_WRITE: usize = 16_384;

/// A node as chitchat names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct NodeId {
    pub(crate) name: String,
    pub(crate) generation: u64,
    pub(crate) gossip: SocketAddr,
}

/// A message's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Syn,
    SynAck,
    Ack,
    BadCluster,
}

/// One digest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DigestEntry {
    pub(crate) node: NodeId,
    pub(crate) heartbeat: u64,
    pub(crate) last_gc: u64,
    pub(crate) max_version: u64,
}

/// One key's new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyValue {
    pub(crate) key: String,
    pub(crate) value: String,
    pub(crate) version: u64,
    pub(crate) status: u8,
}

/// What a delta says about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeDelta {
    pub(crate) node: NodeId,
    pub(crate) last_gc: u64,
    pub(crate) from_version: u64,
    pub(crate) values: Vec<KeyValue>,
    pub(crate) max_version: Option<u64>,
}

impl NodeDelta {
    /// The greatest version it names.
    pub(crate) fn highest_version(&self) -> u64 {
        self.values
            .iter()
            .map(|value| value.version)
            .chain(self.max_version)
            .chain([self.last_gc, self.from_version])
            .max()
            .unwrap_or(0)
    }
}

/// A message read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) kind: Kind,
    /// The cluster a Syn names.
    pub(crate) cluster: Option<String>,
    pub(crate) digest: Vec<DigestEntry>,
    pub(crate) delta: Vec<NodeDelta>,
    /// Bytes before the delta (all of them for a Syn or BadCluster).
    pub(crate) before_delta: usize,
}

/// Why bytes are not a chitchat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    Truncated,
    Magic,
    ProtocolVersion,
    MessageType,
    Text,
    IpVersion,
    BlockType,
    Decompression,
    DeltaOrder,
    DeletionStatus,
    TrailingBytes,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.bytes.len() < n {
            return Err(Malformed::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let mut raw = [0u8; 2];
        raw.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(raw))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    fn text(&mut self) -> Result<String, Malformed> {
        let len = usize::from(self.u16()?);
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| Malformed::Text)
    }

    fn address(&mut self) -> Result<SocketAddr, Malformed> {
        let ip = match self.u8()? {
            4 => {
                let mut raw = [0u8; 4];
                raw.copy_from_slice(self.take(4)?);
                IpAddr::V4(Ipv4Addr::from(raw))
            }
            6 => {
                let mut raw = [0u8; 16];
                raw.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(raw))
            }
            _ => return Err(Malformed::IpVersion),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    fn node(&mut self) -> Result<NodeId, Malformed> {
        Ok(NodeId {
            name: self.text()?,
            generation: self.u64()?,
            gossip: self.address()?,
        })
    }

    fn digest(&mut self) -> Result<Vec<DigestEntry>, Malformed> {
        let count = self.u16()?;
        let mut entries: Vec<DigestEntry> = Vec::with_capacity(usize::from(count).min(1024));
        for _ in 0..count {
            let entry = DigestEntry {
                node: self.node()?,
                heartbeat: self.u64()?,
                last_gc: self.u64()?,
                max_version: self.u64()?,
            };
            // chitchat keeps a digest in a map: a repeated node replaces
            // the earlier entry.
            entries.retain(|known| known.node != entry.node);
            entries.push(entry);
        }
        Ok(entries)
    }

    /// A delta's block stream, decompressed.
    fn stream(&mut self, max_bytes: usize) -> Result<Vec<u8>, Malformed> {
        let mut out = Vec::new();
        loop {
            match self.u8()? {
                0 => return Ok(out),
                1 => {
                    let len = usize::from(self.u16()?);
                    let block = self.take(len)?;
                    let plain = zstd::bulk::decompress(block, BLOCK_MAX)
                        .map_err(|_| Malformed::Decompression)?;
                    out.extend_from_slice(&plain);
                }
                2 => {
                    let len = usize::from(self.u16()?);
                    out.extend_from_slice(self.take(len)?);
                }
                _ => return Err(Malformed::BlockType),
            }
            if out.len() > max_bytes {
                return Err(Malformed::Decompression);
            }
        }
    }
}

/// The operations of a decompressed delta, as chitchat's builder groups
/// them: values and a max version only after their node, values in
/// increasing versions, no node twice.
fn delta(bytes: &[u8]) -> Result<Vec<NodeDelta>, Malformed> {
    let mut reader = Reader { bytes };
    let mut nodes: Vec<NodeDelta> = Vec::new();
    while !reader.bytes.is_empty() {
        match reader.u8()? {
            0 => {
                let node = reader.node()?;
                if nodes.iter().any(|known| known.node == node) {
                    return Err(Malformed::DeltaOrder);
                }
                nodes.push(NodeDelta {
                    node,
                    last_gc: reader.u64()?,
                    from_version: reader.u64()?,
                    values: Vec::new(),
                    max_version: None,
                });
            }
            1 => {
                let value = KeyValue {
                    key: reader.text()?,
                    value: reader.text()?,
                    version: reader.u64()?,
                    status: reader.u8()?,
                };
                if value.status > 2 {
                    return Err(Malformed::DeletionStatus);
                }
                let current = nodes.last_mut().ok_or(Malformed::DeltaOrder)?;
                if current
                    .values
                    .last()
                    .is_some_and(|last| last.version >= value.version)
                {
                    return Err(Malformed::DeltaOrder);
                }
                current.values.push(value);
            }
            2 => {
                let version = reader.u64()?;
                nodes.last_mut().ok_or(Malformed::DeltaOrder)?.max_version = Some(version);
            }
            _ => return Err(Malformed::DeltaOrder),
        }
    }
    Ok(nodes)
}

/// Reads a whole datagram's message; a delta decompressing past
/// `max_delta_bytes` is refused.
pub(crate) fn parse(bytes: &[u8], max_delta_bytes: usize) -> Result<Message, Malformed> {
    let mut reader = Reader { bytes };
    if reader.u16()? != MAGIC {
        return Err(Malformed::Magic);
    }
    if reader.u8()? != 0 {
        return Err(Malformed::ProtocolVersion);
    }
    let kind = match reader.u8()? {
        0 => Kind::Syn,
        1 => Kind::SynAck,
        2 => Kind::Ack,
        3 => Kind::BadCluster,
        _ => return Err(Malformed::MessageType),
    };
    let mut message = Message {
        kind,
        cluster: None,
        digest: Vec::new(),
        delta: Vec::new(),
        before_delta: 0,
    };
    match kind {
        Kind::Syn => {
            message.digest = reader.digest()?;
            message.cluster = Some(reader.text()?);
        }
        Kind::SynAck => message.digest = reader.digest()?,
        Kind::Ack | Kind::BadCluster => {}
    }
    message.before_delta = bytes.len() - reader.bytes.len();
    if matches!(kind, Kind::SynAck | Kind::Ack) {
        message.delta = delta(&reader.stream(max_delta_bytes)?)?;
    }
    if !reader.bytes.is_empty() {
        return Err(Malformed::TrailingBytes);
    }
    Ok(message)
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    // Every text here was read with a u16 length.
    let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..usize::from(len)]);
}

fn put_node(out: &mut Vec<u8>, node: &NodeId) {
    put_text(out, &node.name);
    out.extend_from_slice(&node.generation.to_le_bytes());
    match node.gossip.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&node.gossip.port().to_le_bytes());
}

/// The operations of `nodes`, as chitchat writes them.
fn operations(nodes: &[NodeDelta]) -> Vec<u8> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(0);
        put_node(&mut out, &node.node);
        out.extend_from_slice(&node.last_gc.to_le_bytes());
        out.extend_from_slice(&node.from_version.to_le_bytes());
        for value in &node.values {
            out.push(1);
            put_text(&mut out, &value.key);
            put_text(&mut out, &value.value);
            out.extend_from_slice(&value.version.to_le_bytes());
            out.push(value.status);
        }
        if let Some(version) = node.max_version {
            out.push(2);
            out.extend_from_slice(&version.to_le_bytes());
        }
    }
    out
}

/// `original` (whose parse is `message`) with only the first `keep` node
/// deltas: the same header and digest, the delta written again in
/// compressed blocks. A delta may leave nodes out (the receiver asks
/// again next round), so this is still a message chitchat handles.
pub(crate) fn with_fewer_nodes(original: &[u8], message: &Message, keep: usize) -> Vec<u8> {
    with_nodes(original, message, |index| index < keep)
}

/// `original` (whose parse is `message`) with only the node deltas whose
/// index `keep` accepts, the delta written again as [`with_fewer_nodes`]
/// writes it.
pub(crate) fn with_nodes(
    original: &[u8],
    message: &Message,
    keep: impl Fn(usize) -> bool,
) -> Vec<u8> {
    // A Syn and a BadCluster carry no delta: nothing to leave out. (Found
    // by the gossip fuzz target: a delta was appended to them.)
    if matches!(message.kind, Kind::Syn | Kind::BadCluster) {
        return original.to_vec();
    }
    let mut out = original[..message.before_delta].to_vec();
    let kept: Vec<NodeDelta> = message
        .delta
        .iter()
        .enumerate()
        .filter(|(index, _)| keep(*index))
        .map(|(_, node)| node.clone())
        .collect();
    let plain = operations(&kept);
    for chunk in plain.chunks(BLOCK_WRITE) {
        match zstd::bulk::compress(chunk, 0) {
            Ok(packed) if packed.len() < chunk.len() => {
                out.push(1);
                out.extend_from_slice(&(packed.len() as u16).to_le_bytes());
                out.extend_from_slice(&packed);
            }
            _ => {
                out.push(2);
                out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
                out.extend_from_slice(chunk);
            }
        }
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, generation: u64, port: u16) -> NodeId {
        NodeId {
            name: name.into(),
            generation,
            gossip: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn header(kind: u8) -> Vec<u8> {
        let mut out = MAGIC.to_le_bytes().to_vec();
        out.push(0);
        out.push(kind);
        out
    }

    #[test]
    fn a_syn_is_read_and_junk_is_refused_by_reason() {
        let mut syn = header(0);
        syn.extend_from_slice(&1u16.to_le_bytes());
        put_node(&mut syn, &node("a", 3, 7000));
        for field in [5u64, 0, 9] {
            syn.extend_from_slice(&field.to_le_bytes());
        }
        put_text(&mut syn, "prod");
        let message = parse(&syn, 1 << 20).expect("a seed message reads");
        assert_eq!(message.kind, Kind::Syn);
        assert_eq!(message.cluster.as_deref(), Some("prod"));
        assert_eq!(message.digest[0].node, node("a", 3, 7000));
        assert_eq!(message.digest[0].max_version, 9);
        assert_eq!(
            parse(&syn[..syn.len() - 1], 1 << 20),
            Err(Malformed::Truncated)
        );
        let mut longer = syn.clone();
        longer.push(0);
        assert_eq!(parse(&longer, 1 << 20), Err(Malformed::TrailingBytes));
        assert_eq!(parse(&[0, 0, 0, 0], 1 << 20), Err(Malformed::Magic));
        assert_eq!(parse(&header(9), 1 << 20), Err(Malformed::MessageType));
        // Written again with fewer nodes, a Syn is itself: it has no delta.
        // (A fuzz target found a delta appended to it.)
        let message = parse(&syn, 1 << 20).expect("a seed message reads");
        assert_eq!(with_nodes(&syn, &message, |_| false), syn);
        let bad_cluster = header(3);
        let message = parse(&bad_cluster, 1 << 20).expect("a seed message reads");
        assert_eq!(with_fewer_nodes(&bad_cluster, &message, 0), bad_cluster);
    }

    #[test]
    fn a_delta_written_again_reads_the_same_and_keeps_chitchats_order_rules() {
        let nodes: Vec<NodeDelta> = (0..3)
            .map(|n| NodeDelta {
                node: node(&format!("n{n}"), 1, 7000 + n),
                last_gc: 0,
                from_version: 2,
                values: vec![
                    KeyValue {
                        key: "k".into(),
                        value: "x".repeat(20_000),
                        version: 3,
                        status: 0,
                    },
                    KeyValue {
                        key: "l".into(),
                        value: "y".into(),
                        version: 4,
                        status: 1,
                    },
                ],
                max_version: Some(4),
            })
            .collect();
        let mut ack = header(2);
        let before_delta = ack.len();
        ack.push(2);
        let plain = operations(&nodes);
        // One plain block cannot hold it all: three.
        for chunk in plain.chunks(30_000) {
            ack.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
            ack.extend_from_slice(chunk);
            ack.push(2);
        }
        ack.pop();
        ack.push(0);
        let read = parse(&ack, 1 << 20).expect("a seed message reads");
        assert_eq!(read.delta, nodes);
        assert_eq!(read.before_delta, before_delta);
        let shorter = with_fewer_nodes(&ack, &read, 2);
        assert!(shorter.len() < 1_000, "compressed: {}", shorter.len());
        assert_eq!(
            parse(&shorter, 1 << 20)
                .expect("a seed message reads")
                .delta,
            nodes[..2]
        );
        // A delta that decompresses past the bound is refused.
        assert_eq!(parse(&ack, 10_000), Err(Malformed::Decompression));
        // Values out of order, or before any node.
        let mut swapped = nodes[0].clone();
        swapped.values.swap(0, 1);
        let mut bad = header(2);
        let ops = operations(&[swapped]);
        bad.push(2);
        bad.extend_from_slice(&(ops.len() as u16).to_le_bytes());
        bad.extend_from_slice(&ops);
        bad.push(0);
        assert_eq!(parse(&bad, 1 << 20), Err(Malformed::DeltaOrder));
    }
}
