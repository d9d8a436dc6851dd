//! A node's TOML file (`granary::node_file`): arbitrary text is read and
//! checked, and a file that reads is written and read back the same; its
//! secret, as a node reads it.
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
    assert_eq!(again, file);
});
