//! `chatify-gateway healthcheck` / `chatify-persister healthcheck`: asks the running process on
//! this machine for `/readyz`, for container health checks that need no curl.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("could not reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("no answer from {0} in time")]
    Timeout(String),
    #[error("{addr} answered {status_line:?}")]
    NotReady { addr: String, status_line: String },
}

/// Whether the command line asks for the health check.
pub fn requested() -> bool {
    std::env::args().nth(1).as_deref() == Some("healthcheck")
}

/// GETs `/readyz` from the process listening on `host:port`; Ok when it answers 200.
pub async fn probe(host: &str, port: u16) -> Result<(), HealthError> {
    let host = if host == "0.0.0.0" || host == "::" {
        "127.0.0.1"
    } else {
        host
    };
    let addr = format!("{host}:{port}");
    let exchange = async {
        let mut stream =
            TcpStream::connect(&addr)
                .await
                .map_err(|source| HealthError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        let request = format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let io_error = |source| HealthError::Connect {
            addr: addr.clone(),
            source,
        };
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(io_error)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map_err(io_error)?;
        let status_line = String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        if status_line.split_whitespace().nth(1) == Some("200") {
            Ok(())
        } else {
            Err(HealthError::NotReady {
                addr: addr.clone(),
                status_line,
            })
        }
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .map_err(|_| HealthError::Timeout(addr.clone()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(answer: &'static str) -> Result<u16, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        Ok(port)
    }

    #[tokio::test]
    async fn ready_only_on_200() -> Result<(), std::io::Error> {
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await?;
        assert!(probe("127.0.0.1", ok).await.is_ok());
        let down =
            serve_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await?;
        assert!(matches!(
            probe("0.0.0.0", down).await,
            Err(HealthError::NotReady { .. })
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        assert!(matches!(
            probe("127.0.0.1", closed).await,
            Err(HealthError::Connect { .. })
        ));
        Ok(())
    }
}
