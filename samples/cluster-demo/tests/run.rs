//! The sample end to end: two nodes from node files, hosting the sample's
//! own grains, each calling every counter; and a node file that is not
//! there, refused with its path.

use std::process::Command;

#[test]
fn two_nodes_host_the_samples_counters() {
    let output = Command::new(env!("CARGO_BIN_EXE_cluster-demo"))
        .output()
        .expect("the sample ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for key in ["apples", "pears", "plums", "figs"] {
        assert!(
            stdout.contains(&format!(
                "counter {key}: total 3 after a call from each node and one retried"
            )),
            "{stdout}"
        );
    }
}

#[test]
fn a_missing_node_file_is_named() {
    let path = std::env::temp_dir().join(format!("no-such-node-{}.toml", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_cluster-demo"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("the sample ran");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&*path.to_string_lossy()), "{stderr}");
}
