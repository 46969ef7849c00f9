//! Child processes: start a server on a free port, wait until it answers, stop it cleanly.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::http;

/// A free port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?)
}

/// A server under test.
pub struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `program args..`, logging to `log`, and waits until `GET /healthz` answers 200.
    pub async fn start(
        program: &Path,
        args: &[String],
        addr: SocketAddr,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let mut server = Self {
            child,
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "{} exited with {status} before answering /healthz:\n{}",
                    program.display(),
                    server.log_tail()
                );
            }
            if let Ok((200, _)) = http::get(addr, "/healthz").await {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer /healthz within 30s:\n{}",
                    program.display(),
                    server.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Sends SIGTERM and waits for the process to exit (tally drains its pending deltas into
    /// the store first). Returns its exit status and how long the stop took.
    pub async fn stop(mut self) -> anyhow::Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        if let Some(pid) = self.child.id() {
            let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
            // SAFETY: kill(2) with a pid we started and still own (not yet reaped).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(90), self.child.wait()).await {
            Ok(status) => Ok((status?, started.elapsed())),
            Err(_) => {
                self.child.kill().await?;
                bail!(
                    "server did not exit within 90s of SIGTERM; killed it:\n{}",
                    self.log_tail()
                )
            }
        }
    }
}

/// The tally binary: `--tally-bin`, else `tally` next to this executable.
pub fn tally_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .context("cannot locate this executable")?
            .parent()
            .context("this executable has no directory")?
            .join("tally"),
    };
    if !path.is_file() {
        bail!(
            "tally binary not found at {}: build it with `cargo build --release --bin tally` \
             (same target dir as tally-bench) or pass --tally-bin",
            path.display()
        );
    }
    Ok(path)
}

/// A scratch directory for one run, removed by [`ScratchDir::remove`].
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn create(label: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tally-bench-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
