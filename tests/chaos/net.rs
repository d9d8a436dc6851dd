//! The network: one namespace per silo, each joined to a bridge in the
//! harness's namespace by a veth pair, with a real address; faults as
//! nftables rules inside the namespaces.
//!
//! The bridge holds the harness's own address (`.1`): the client node, and
//! the relays to PostgreSQL and etcd, listen there. Silo `i` is `.(10+i)`
//! in namespace `<prefix>-<i>`. Every fault rule lives in one table,
//! `inet chaos`, of each silo's namespace, so healing is deleting it.
//! Silo `i`'s side of its veth pair is `eth0` in its namespace.

use std::net::Ipv4Addr;
use std::process::Command;

/// Runs a command, failing with its output.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("{program} {}: {err}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs `nft -f -` with `script` inside `namespace`.
fn nft(namespace: &str, script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| format!("nft in {namespace}: {err}"))?;
    child
        .stdin
        .take()
        .ok_or("nft's stdin")?
        .write_all(script.as_bytes())
        .map_err(|err| format!("nft in {namespace}: {err}"))?;
    let output = child
        .wait_with_output()
        .map_err(|err| format!("nft in {namespace}: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {namespace}: {}\n{script}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

pub struct Net {
    prefix: String,
    bridge: String,
    subnet: [u8; 3],
    silos: usize,
}

impl Net {
    /// The bridge, and `silos` namespaces on it.
    pub fn create(silos: usize) -> Result<Net, String> {
        sweep();
        let pid = std::process::id();
        let net = Net {
            prefix: format!("granary-chaos-{pid}"),
            bridge: format!("grchb{}", pid % 100_000),
            // 10.213.x.0/24: a subnet of this run's own.
            subnet: [10, 213, (pid % 250) as u8],
            silos,
        };
        // Dropped on failure, which removes what was made.
        net.build()?;
        Ok(net)
    }

    fn build(&self) -> Result<(), String> {
        let (net, pid) = (self, std::process::id());
        run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        let host = format!("{}/24", net.host());
        run("ip", &["addr", "add", &host, "dev", &net.bridge])?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        for i in 0..net.silos {
            let namespace = net.namespace(i);
            let outside = format!("grchv{}n{i}", pid % 100_000);
            run("ip", &["netns", "add", &namespace])?;
            run(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns",
                    &namespace,
                ],
            )?;
            run(
                "ip",
                &["link", "set", &outside, "master", &net.bridge, "up"],
            )?;
            let address = format!("{}/24", net.silo(i));
            run(
                "ip",
                &["-n", &namespace, "addr", "add", &address, "dev", "eth0"],
            )?;
            run("ip", &["-n", &namespace, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// The harness's address on the bridge.
    pub fn host(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    /// Silo `i`'s address.
    pub fn silo(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 10 + i as u8)
    }

    pub fn namespace(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Cuts the silos of `group` off from every other silo, both ways; the
    /// harness (the client node, the relays) still reaches all of them, so
    /// both sides take calls.
    pub fn partition(&self, group: &[usize]) -> Result<(), String> {
        let others: Vec<usize> = (0..self.silos).filter(|i| !group.contains(i)).collect();
        for (side, far) in [(group, others.as_slice()), (others.as_slice(), group)] {
            let far: Vec<String> = far.iter().map(|&i| self.silo(i).to_string()).collect();
            if far.is_empty() {
                continue;
            }
            let far = far.join(", ");
            for &i in side {
                nft(
                    &self.namespace(i),
                    &format!(
                        "table inet chaos {{\n  chain input {{ type filter hook input priority 0; ip saddr {{ {far} }} drop; }}\n  chain output {{ type filter hook output priority 0; ip daddr {{ {far} }} drop; }}\n}}\n"
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// Cuts silo `i` off from everything: the other silos, the client node,
    /// storage and etcd.
    pub fn isolate(&self, i: usize) -> Result<(), String> {
        nft(
            &self.namespace(i),
            "table inet chaos {\n  chain input { type filter hook input priority 0; iifname \"eth0\" drop; }\n  chain output { type filter hook output priority 0; oifname \"eth0\" drop; }\n}\n",
        )
    }

    /// Drops `percent` of the packets every silo receives, at random.
    pub fn loss(&self, percent: u32) -> Result<(), String> {
        for i in 0..self.silos {
            nft(
                &self.namespace(i),
                &format!(
                    "table inet chaos {{\n  chain input {{ type filter hook input priority 0; numgen random mod 100 < {percent} drop; }}\n}}\n"
                ),
            )?;
        }
        Ok(())
    }

    /// Removes every fault rule.
    pub fn heal(&self) -> Result<(), String> {
        for i in 0..self.silos {
            // Deleting a table that is not there fails: add it first.
            nft(
                &self.namespace(i),
                "table inet chaos\ndelete table inet chaos\n",
            )?;
        }
        Ok(())
    }
}

/// Ends every process in `namespace` and deletes it.
fn remove_namespace(namespace: &str) {
    if let Ok(output) = Command::new("ip")
        .args(["netns", "pids", namespace])
        .output()
    {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
    }
    let _ = run("ip", &["netns", "del", namespace]);
}

/// Removes what an earlier run that was killed left behind: its silos,
/// namespaces and bridge (a run's names carry its process id).
fn sweep() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("granary-chaos-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(name);
            // The veth's far end goes with its namespace once every
            // process in it is gone; this end, at once.
            let index = name.rsplit('-').next().unwrap_or_default();
            let _ = run(
                "ip",
                &["link", "del", &format!("grchv{}n{index}", pid % 100_000)],
            );
            let _ = run("ip", &["link", "del", &format!("grchb{}", pid % 100_000)]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let pid = std::process::id();
        for i in 0..self.silos {
            remove_namespace(&self.namespace(i));
            // The far end of the veth goes with its namespace, once the
            // kernel has finished with it; this end, now, so that a next
            // run in this process can take the name again.
            let _ = run(
                "ip",
                &["link", "del", &format!("grchv{}n{i}", pid % 100_000)],
            );
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}
