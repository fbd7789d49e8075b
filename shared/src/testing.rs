//! Test support (feature `testing`): a real nats-server with JetStream on a free port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server in a temporary directory, killed on drop.
pub struct NatsServer {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server -js` on a free loopback port and waits until it accepts clients.
    pub async fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("could not start nats-server (deploy/local/install.sh installs it): {e}")
            })?;
        let url = format!("nats://127.0.0.1:{port}");
        let started = Instant::now();
        while async_nats::connect(&url).await.is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err("nats-server did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            url,
            _dir: dir,
        })
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
