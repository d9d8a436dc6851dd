//! A headless Chromium driven over WebDriver (chromedriver's HTTP and
//! JSON protocol, W3C WebDriver), for the dashboard test: the page is
//! rendered and its scripts run as in an operator's browser, and the test
//! reads what the page shows from its DOM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support;

/// The browser and its driver, found on this machine, or why not.
pub fn available() -> Result<(PathBuf, PathBuf), String> {
    let find = |variable: &str, names: &[&str]| -> Result<PathBuf, String> {
        if let Some(path) = std::env::var_os(variable) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(format!("{variable}={} is not a file", path.display()))
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| {
                format!(
                    "no {} on PATH (Debian: apt-get install chromium chromium-driver; or set {variable})",
                    names.join(" or ")
                )
            })
    };
    let chromium = find("GRANARY_CHROMIUM", &["chromium", "chromium-browser"])?;
    let driver = find("GRANARY_CHROMEDRIVER", &["chromedriver"])?;
    Ok((chromium, driver))
}

/// A chromedriver with one headless Chromium session; both end when
/// dropped.
pub struct Browser {
    driver: Child,
    address: SocketAddr,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes Chromium; killing the driver ends
        // whatever is left.
        let session = format!("/session/{}", self.session);
        let address = self.address;
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| {
                    runtime.block_on(support::exchange(address, "DELETE", &session, &[], ""))
                })
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless
    /// session with a fresh profile under `profile`.
    pub async fn start(chromium: &Path, driver: &Path, profile: &Path) -> Browser {
        // A port no `bind(0)` can take before chromedriver binds it.
        let port = crate::test_ports::free_port();
        let address: SocketAddr = ([127, 0, 0, 1], port).into();
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut browser = Browser {
            driver,
            address,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while support::get(address, "/status", None).await.is_none() {
            assert!(Instant::now() < deadline, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--window-size=1400,1000",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
            }},
        });
        let answer = browser.command("POST", "/session", capabilities).await;
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, _, answer) = support::exchange(self.address, method, path, &[], &body)
            .await
            .unwrap_or_else(|| panic!("chromedriver did not answer {method} {path}"));
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|err| panic!("{method} {path}: not JSON ({err}): {answer}"));
        assert_eq!(status, 200, "{method} {path}: {answer}");
        answer["value"].clone()
    }

    /// Opens `url` and waits for it to load.
    pub async fn open(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.command("POST", &path, json!({ "url": url })).await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn run(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.command("POST", &path, json!({ "script": script, "args": [] }))
            .await
    }

    /// Saves a screenshot of the page as PNG at `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let at = format!("/session/{}/screenshot", self.session);
        let encoded = self.command("GET", &at, Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        std::fs::write(path, png).expect("the screenshot is written");
    }
}
