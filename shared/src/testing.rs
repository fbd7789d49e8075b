//! Test support (feature `testing`): a real nats-server with JetStream on a free port, open to
//! anyone ([`NatsServer::start`]) or with Chatify's users and permissions, configured by
//! deploy/nats/start.sh exactly as deploy/local/up.sh and compose run it
//! ([`NatsServer::start_with_users`]).

use std::path::PathBuf;
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

    /// Starts nats-server through deploy/nats/start.sh (deploy/nats/nats.conf with
    /// permissions.conf and the users `chatify-gateway` and `chatify-persister`), JetStream
    /// on, on free loopback ports, and waits until the gateway's user can log in.
    pub async fn start_with_users() -> Result<(Self, Users), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let free_port = || -> std::io::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (port, monitor) = (free_port()?, free_port()?);
        let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats");
        let users = Users {
            gateway_password: uuid::Uuid::new_v4().simple().to_string(),
            persister_password: uuid::Uuid::new_v4().simple().to_string(),
        };
        let child = Command::new(deploy.join("start.sh"))
            .arg(deploy.join("nats.conf"))
            .arg(dir.path().join("nats.conf"))
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-sd"])
            .arg(dir.path().join("data"))
            .env("CHATIFY_NATS_GATEWAY_PASSWORD", &users.gateway_password)
            .env("CHATIFY_NATS_PERSISTER_PASSWORD", &users.persister_password)
            .env_remove("CHATIFY_NATS_SYNC")
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("CHATIFY_TEST_NATS_LOG") {
                // The server's log (its permission violations), for a test being debugged.
                Some(path) => Stdio::from(std::fs::File::create(path)?),
                None => Stdio::null(),
            })
            .spawn()
            .map_err(|e| format!("could not run deploy/nats/start.sh: {e}"))?;
        let url = format!("nats://127.0.0.1:{port}");
        let started = Instant::now();
        while async_nats::ConnectOptions::with_user_and_password(
            GATEWAY_USER.into(),
            users.gateway_password.clone(),
        )
        .connect(&url)
        .await
        .is_err()
        {
            if started.elapsed() > Duration::from_secs(10) {
                return Err("nats-server did not start with deploy/nats/start.sh".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((
            Self {
                child,
                url,
                _dir: dir,
            },
            users,
        ))
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

/// The NATS user of the gateways (deploy/nats/start.sh).
pub const GATEWAY_USER: &str = "chatify-gateway";
/// The NATS user of the persisters.
pub const PERSISTER_USER: &str = "chatify-persister";

/// The passwords of a [`NatsServer::start_with_users`].
#[derive(Debug, Clone)]
pub struct Users {
    /// The password of [`GATEWAY_USER`].
    pub gateway_password: String,
    /// The password of [`PERSISTER_USER`].
    pub persister_password: String,
}

impl Users {
    /// NATS settings logging in as the gateways do.
    pub fn gateway(&self, url: &str) -> crate::config::NatsSettings {
        crate::config::NatsSettings {
            url: url.to_owned(),
            user: GATEWAY_USER.into(),
            password: self.gateway_password.clone().into(),
            ..Default::default()
        }
    }

    /// NATS settings logging in as the persisters do.
    pub fn persister(&self, url: &str) -> crate::config::NatsSettings {
        crate::config::NatsSettings {
            url: url.to_owned(),
            user: PERSISTER_USER.into(),
            password: self.persister_password.clone().into(),
            ..Default::default()
        }
    }
}
