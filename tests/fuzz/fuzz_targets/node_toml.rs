//! A node's TOML file (`granary::node_file`): arbitrary text is read and
//! checked, and a file that reads is written, and what is written reads
//! back and writes the same text; its secret, as a node reads it.
#![no_main]

use granary::node_file::NodeFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = NodeFile::from_toml(text) else {
        return;
    };
    let _ = granary::cluster::ClusterSecret::from_hex(&file.secret);
    let written = file.to_toml().expect("a file that reads writes");
    let again = NodeFile::from_toml(&written).expect("a file written reads back");
    // Compared as text: a float field reads back as the number it wrote.
    assert_eq!(again.to_toml().expect("it writes again"), written);
});
