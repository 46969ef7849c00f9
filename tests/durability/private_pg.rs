//! A PostgreSQL server of a test's own, in a temporary directory: for what the shared test
//! server cannot do, such as asking for a password, serving TLS, or being one of a primary
//! and its streaming standby that fail over. Built from the server's `initdb`, `pg_ctl` and
//! `pg_basebackup` (Debian's `/usr/lib/postgresql/<version>/bin`, or the `PATH`), run as the
//! `postgres` user when the tests run as root. Without them a test skips loudly, and fails
//! under `TALLY_REQUIRE_POSTGRES=1`.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::pg::shout;
use crate::support::free_port;
/// The superuser's password of the private server.
pub const ADMIN_SECRET: &str = "admin-secret-of-the-test-server";

/// A PostgreSQL server of a test's own, in a temporary directory, that asks every client
/// for a password; stopped when dropped.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// Run its commands as the `postgres` user (the tests run as root, which PostgreSQL
    /// refuses to run as).
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Starts one, or says loudly why it cannot (a panic under `TALLY_REQUIRE_POSTGRES=1`)
    /// and that the `what` test is skipped. With `tls`, it serves TLS with a certificate for
    /// 127.0.0.1 signed by a CA of its own (`ca.crt` in [`Self::file`]), and the role `tally`
    /// may log in over TLS only.
    pub fn start(tls: bool, what: &str) -> Option<Self> {
        or_skip(Self::try_start(tls), what)
    }

    /// A streaming standby of this server (`pg_basebackup -R`), started and serving reads:
    /// one to fail over to. `None` as for [`Self::start`]. Not of a TLS server, whose
    /// `pg_hba.conf` has no `replication` line. (The failover tests also change the
    /// standby's `primary_conninfo` by reload, which PostgreSQL allows from version 13.)
    pub fn standby(&self, what: &str) -> Option<Self> {
        or_skip(self.try_standby(), what)
    }

    fn try_standby(&self) -> Result<Self, String> {
        let standby = Self::empty(self.bin.clone())?;
        // As the superuser, whose password `-R` writes into the standby's
        // `primary_conninfo` with the rest of the connection's settings.
        run(standby
            .command("pg_basebackup")
            .env("PGPASSWORD", ADMIN_SECRET)
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R"])
            .arg(format!("--port={}", self.port))
            .arg("-D")
            .arg(standby.data()))?;
        standby.launch(&[])?;
        Ok(standby)
    }

    /// A server with nothing in its directory yet, which the server's user may write.
    fn empty(bin: PathBuf) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let server = Self {
            bin,
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres"])
                .arg(server.dir.path()))?;
        }
        Ok(server)
    }

    /// Starts the server on its data directory, with `options` (`-c name=value`, …) beside
    /// its port and socket directory.
    fn launch(&self, options: &[String]) -> Result<(), String> {
        let mut all = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        for option in options {
            all.push(' ');
            all.push_str(option);
        }
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.file("log"))
            .args(["-o", &all, "-w", "-t", "30", "start"]))
    }

    /// Stops the server: `fast` (sessions ended, and a standby sent every WAL record
    /// first, as in a switchover) or `immediate` (as a crash).
    pub fn stop(&self, mode: &str) {
        let stopped = run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "stop"]));
        stopped.expect("the server stops");
    }

    /// Promotes a standby to a primary that takes writes, and waits until it does.
    pub fn promote(&self) {
        let promoted = run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "30", "promote"]));
        promoted.expect("the standby is promoted");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A self-signed CA named `name`, its key and certificate in `<stem>.key` and
    /// `<stem>.crt` of the server's directory.
    fn new_ca(&self, name: &str, stem: &str) -> Result<(), String> {
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .arg("-subj")
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(self.file(&format!("{stem}.key")))
            .arg("-out")
            .arg(self.file(&format!("{stem}.crt"))))
    }

    fn try_start(tls: bool) -> Result<Self, String> {
        let server = Self::empty(server_bin().ok_or("initdb not found")?)?;
        let secret = server.file("admin-secret");
        std::fs::write(&secret, ADMIN_SECRET).map_err(|e| e.to_string())?;
        if tls {
            // A CA, and a certificate for 127.0.0.1 that it signs (rustls refuses a CA
            // certificate as the server's own).
            let extensions = server.file("server.ext");
            std::fs::write(
                &extensions,
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
            )
            .map_err(|e| e.to_string())?;
            server.new_ca("tally test CA", "ca")?;
            run(Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=127.0.0.1",
                ])
                .arg("-keyout")
                .arg(server.file("server.key"))
                .arg("-out")
                .arg(server.file("server.csr")))?;
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-set_serial", "1", "-in"])
                .arg(server.file("server.csr"))
                .arg("-CA")
                .arg(server.file("ca.crt"))
                .arg("-CAkey")
                .arg(server.file("ca.key"))
                .arg("-extfile")
                .arg(&extensions)
                .arg("-out")
                .arg(server.file("server.crt")))?;
            // A CA that signed nothing of this server's, for a refusal with a CA file given.
            server.new_ca("another CA", "other-ca")?;
            // PostgreSQL refuses a key that others can read.
            std::fs::set_permissions(server.file("server.key"), Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
        }
        // Files written since `empty` (the secret, the certificates and keys) to the
        // server's user too.
        if server.as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres"])
                .arg(server.dir.path()))?;
        }
        run(server
            .command("initdb")
            .args([
                "--username=postgres",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
            ])
            .args(["--no-locale", "--no-sync"])
            .arg(format!("--pwfile={}", secret.display()))
            .arg("-D")
            .arg(server.data()))?;
        let mut options = Vec::new();
        if tls {
            // The superuser (the test's own connections) plain, `tally` over TLS only.
            std::fs::write(
                server.data().join("pg_hba.conf"),
                "host all postgres 127.0.0.1/32 scram-sha-256\n\
                 hostssl all tally 127.0.0.1/32 scram-sha-256\n",
            )
            .map_err(|e| e.to_string())?;
            options.extend([
                "-c ssl=on".to_owned(),
                format!("-c ssl_cert_file={}", server.file("server.crt").display()),
                format!("-c ssl_key_file={}", server.file("server.key").display()),
            ]);
        }
        server.launch(&options)?;
        Ok(server)
    }

    /// Writes over the server's certificate (of a TLS server) one for the same name and key,
    /// signed by the same CA, that was valid on 1 January 2020 only (`openssl ca` dates one
    /// in the past; `openssl x509` cannot), keeping the valid one in `server.crt.valid`. The
    /// server reads it at its next reload.
    pub fn expire_certificate(&self) -> Result<(), String> {
        std::fs::copy(self.file("server.crt"), self.file("server.crt.valid"))
            .map_err(|e| e.to_string())?;
        std::fs::write(
            self.file("ca.cnf"),
            "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\n\
             serial = serial\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n",
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(self.file("index.txt"), "").map_err(|e| e.to_string())?;
        std::fs::write(self.file("serial"), "02\n").map_err(|e| e.to_string())?;
        run(Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=127.0.0.1", "-key"])
            .arg(self.file("server.key"))
            .arg("-out")
            .arg(self.file("expired.csr")))?;
        run(Command::new("openssl")
            .current_dir(self.dir.path())
            .args(["ca", "-batch", "-notext", "-config", "ca.cnf"])
            .args([
                "-cert",
                "ca.crt",
                "-keyfile",
                "ca.key",
                "-in",
                "expired.csr",
            ])
            .args([
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
            ])
            .args(["-extfile", "server.ext", "-out", "expired.crt"]))?;
        std::fs::copy(self.file("expired.crt"), self.file("server.crt"))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Puts back the certificate [`Self::expire_certificate`] wrote over.
    pub fn renew_certificate(&self) -> Result<(), String> {
        std::fs::copy(self.file("server.crt.valid"), self.file("server.crt"))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// A file of the server's directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `program` of the server's binaries, as the user the server runs as.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// The URL of `database` as `user`, with no password in it.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// Its address, `127.0.0.1:<port>`, for a URL of several hosts.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A connection to `database` as the superuser.
    pub async fn admin(&self, database: &str) -> tokio_postgres::Client {
        let mut config: tokio_postgres::Config =
            self.url("postgres", database).parse().expect("a valid URL");
        config.password(ADMIN_SECRET);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("the superuser logs in with its password");
        tokio::spawn(connection);
        client
    }

    /// Has the server read its configuration and certificate files again, and returns
    /// once it has: `pg_reload_conf()` only signals the postmaster, and a connection opened
    /// before it gets round to it would meet the old files. A session forked after the
    /// reload carries the postmaster's new load time.
    pub async fn reload(&self) {
        let admin = self.admin("postgres").await;
        let before: String = (admin
            .query_one("SELECT pg_conf_load_time()::text", &[])
            .await)
            .expect("the load time")
            .get(0);
        (admin.batch_execute("SELECT pg_reload_conf()").await).expect("reload");
        let reloaded = "SELECT pg_conf_load_time() > $1::text::timestamptz";
        crate::support::eventually(
            std::time::Duration::from_secs(10),
            "the server reloads",
            || async {
                let fresh = self.admin("postgres").await;
                (fresh.query_one(reloaded, &[&before]).await).is_ok_and(|row| row.get(0))
            },
        )
        .await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// The directory of `initdb` and `pg_ctl`: Debian's newest, else the `PATH`'s.
fn server_bin() -> Option<PathBuf> {
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    debian.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str()?.parse::<u32>().ok())
    });
    debian.pop().or_else(|| {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file()))
    })
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// `started`, or `None` having said loudly that the `what` test is skipped and why (a panic
/// under `TALLY_REQUIRE_POSTGRES=1`).
fn or_skip(started: Result<PrivatePostgres, String>, what: &str) -> Option<PrivatePostgres> {
    match started {
        Ok(server) => Some(server),
        Err(why) if std::env::var("TALLY_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!("TALLY_REQUIRE_POSTGRES=1, but no private PostgreSQL server starts: {why}")
        }
        Err(why) => {
            shout(&format!(
                "SKIPPED {what} test: no private PostgreSQL server starts ({why}). Install \
                 PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup)."
            ));
            None
        }
    }
}
