//! The silos: `granary node` processes, each in its namespace, started,
//! killed, paused and restarted by the harness.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::{Net, run};

pub struct Silo {
    namespace: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Times started, for the log file's name.
    starts: u32,
}

impl Silo {
    pub fn new(net: &Net, i: usize, config: PathBuf, dir: &Path) -> Silo {
        Silo {
            namespace: net.namespace(i),
            config,
            log: dir.join(format!("silo-{i}")),
            child: None,
            starts: 0,
        }
    }

    pub fn start(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log_path = self.log.with_extension(format!("{}.log", self.starts));
        let log = std::fs::File::create(&log_path)
            .map_err(|err| format!("{}: {err}", log_path.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace])
            .arg(env!("CARGO_BIN_EXE_granary"))
            .arg("node")
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|err| format!("starting a silo in {}: {err}", self.namespace))?;
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, signal: &str) -> Result<(), String> {
        let child = self.child.as_ref().ok_or("the silo is not running")?;
        // `ip netns exec` execs the node: the pid is the node's.
        run("kill", &[signal, &child.id().to_string()])
    }

    pub fn kill(&mut self) -> Result<(), String> {
        let mut child = self.child.take().ok_or("the silo is not running")?;
        child.kill().map_err(|err| format!("SIGKILL: {err}"))?;
        child
            .wait()
            .map_err(|err| format!("reaping a killed silo: {err}"))?;
        Ok(())
    }

    pub fn pause(&self) -> Result<(), String> {
        self.signal("-STOP")
    }

    pub fn resume(&self) -> Result<(), String> {
        self.signal("-CONT")
    }

    /// SIGTERM, and waits up to `grace` for the drain to finish.
    pub fn stop(&mut self, grace: Duration) -> Result<(), String> {
        self.signal("-TERM")?;
        let mut child = self.child.take().ok_or("the silo is not running")?;
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("the drained silo exited with {status}")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("the silo did not drain within {grace:?}"));
                }
                Err(err) => return Err(format!("waiting for a drained silo: {err}")),
            }
        }
    }

    /// Whether the node's last run ended by stopping to serve on purpose
    /// (`granary node` says so as it exits).
    pub fn stopped_serving(&self) -> bool {
        std::fs::read_to_string(self.log.with_extension(format!("{}.log", self.starts)))
            .is_ok_and(|log| log.contains("the node stopped serving"))
    }

    /// Whether the process ended on its own: its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}

impl Drop for Silo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
