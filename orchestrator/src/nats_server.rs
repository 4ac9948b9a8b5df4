//! The local nats-server child of `baton dev`: JetStream with file storage under the data
//! dir and `sync_interval: always` (every write fsync'd before it is acknowledged).

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use baton_transport::jetstream::local_server_config;

/// A nats-server child process, stopped on drop.
pub struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    /// Starts `binary` with JetStream stored under `data_dir/jetstream`, listening on
    /// 127.0.0.1:`port` (0: a free port), and waits until it accepts connections.
    pub fn start(binary: &Path, data_dir: &Path, port: u16) -> anyhow::Result<NatsServer> {
        if !binary.exists() {
            bail!(
                "nats-server not found at {}: run `cargo xtask setup` or pass --nats-server-bin",
                binary.display()
            );
        }
        let port = if port == 0 { free_port()? } else { port };
        std::fs::create_dir_all(data_dir)?;
        let store = data_dir.join("jetstream");
        let config = data_dir.join("nats.conf");
        std::fs::write(&config, local_server_config(port, &store))?;
        let log = std::fs::File::create(data_dir.join("nats-server.log"))?;
        let mut command = Command::new(binary);
        command
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nats-server exited with {status}; see {}",
                    data_dir.join("nats-server.log").display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("nats-server did not listen on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(NatsServer { child, port })
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // SIGTERM lets the server close its store cleanly; SIGKILL if it lingers.
        let pid = self.child.id() as i32;
        terminate(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on loopback right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The nats-server binary installed by `cargo xtask setup`.
pub fn default_binary(baton_home: &Path) -> PathBuf {
    baton_home.join("bin").join("nats-server")
}

#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing. If `baton dev` is
    // killed (even with SIGKILL), the kernel sends the child SIGTERM, so no orphaned
    // server keeps the port and the store locked.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn terminate(pid: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}
