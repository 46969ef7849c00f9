//! Logging in to a PostgreSQL that asks for it: a rotated `--database-password-file` (the
//! password is read again for every new connection, so when the role's password changes and
//! the file with it, connections opened after, here after every session of tally's is
//! terminated, log in with the new one, and the batches go on landing, with no restart), and
//! TLS with `sslmode=require` (the server's certificate verified against `--database-ca-file`).
//!
//! The shared test server trusts every local connection and never asks for a password, so
//! these tests start a PostgreSQL of their own that does (`scram-sha-256`;
//! [`PrivatePostgres`]).

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::common::data_dir;
use crate::private_pg::PrivatePostgres;
use crate::support::{Tally, TallyConfig, assert_given_up_on_and_cancelled, eventually, increment};

/// Writes `password` to `file` the way secret managers do: a new file renamed over the old.
fn rotate(file: &Path, password: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, format!("{password}\n")).expect("write the new password");
    std::fs::rename(&next, file).expect("rename it into place");
}

/// Posts an increment of `rotated` and waits until the store holds `value` for it.
async fn counted(
    client: &reqwest::Client,
    address: &str,
    counters: &tokio_postgres::Client,
    value: i64,
    what: &str,
) {
    assert_eq!(increment(client, address, "rotated").await, 202, "{what}");
    eventually(
        Duration::from_secs(15),
        &format!("{what} is stored"),
        || async {
            counters
                .query_opt("SELECT value FROM counters WHERE key = 'rotated'", &[])
                .await
                .ok()
                .flatten()
                .map(|row| row.get::<_, i64>(0))
                == Some(value)
        },
    )
    .await;
}

/// Creates the role `tally` with `password` and its database `tally` (as the superuser,
/// whose connection it returns), and a directory whose `pgpass` file holds the password.
async fn role(server: &PrivatePostgres, password: &str) -> (tokio_postgres::Client, TempDir) {
    let admin = server.admin("postgres").await;
    for statement in [
        format!("CREATE ROLE tally LOGIN PASSWORD '{password}'"),
        "CREATE DATABASE tally OWNER tally".to_owned(),
    ] {
        admin.batch_execute(&statement).await.expect(&statement);
    }
    let secrets = data_dir();
    rotate(&secrets.path().join("pgpass"), password);
    (admin, secrets)
}

/// A tally on `dir` for the role `tally` at `url`, with the password file of [`role`]'s
/// `secrets`, then `more` flags.
fn tally_config(dir: &Path, url: String, secrets: &TempDir, more: &[String]) -> TallyConfig {
    let mut config = TallyConfig::new(dir, None, "journal", "100ms");
    config.database_url = Some(url);
    config.extra = [
        "--database-password-file".to_owned(),
        secrets.path().join("pgpass").display().to_string(),
    ]
    .into_iter()
    .chain(more.iter().cloned())
    .collect();
    config
}

/// Starts `config`, which must fail, and returns its log.
async fn refused(config: &TallyConfig) -> String {
    let mut tally = Tally::spawn(config);
    let status = tally.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "tally must not start: {status}");
    tally.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_file_is_used_by_the_connections_opened_after() {
    let Some(server) = PrivatePostgres::start(false, "password rotation") else {
        return;
    };
    let (admin, secrets) = role(&server, "first-secret").await;
    let file = secrets.path().join("pgpass");
    let dir = data_dir();
    let config = tally_config(dir.path(), server.url("tally", "tally"), &secrets, &[]);
    let mut tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    let counters = server.admin("tally").await;
    counted(&client, &tally.address, &counters, 1, "the first increment").await;

    // The rotation: the role's password, then the file, then every session of tally's ends
    // (what a database restart or a network fault does), so each connection is opened anew.
    admin
        .batch_execute("ALTER ROLE tally PASSWORD 'second-secret'")
        .await
        .expect("change the role's password");
    rotate(&file, "second-secret");
    let ended: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'tally'",
            &[],
        )
        .await
        .expect("terminate tally's sessions")
        .get(0);
    assert!(
        ended >= 2,
        "a pooled connection and the instance lock's: {ended}"
    );
    eventually(
        Duration::from_secs(10),
        "tally's sessions have ended",
        || async { tally_sessions(&admin).await.0 == 0 },
    )
    .await;

    // Stored only through a connection opened with the new password.
    counted(
        &client,
        &tally.address,
        &counters,
        2,
        "the increment after the rotation",
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "the instance lock is taken again, with the new password",
        || async {
            tally
                .log()
                .contains("Holding this instance id's lock again.")
        },
    )
    .await;
    assert!(
        tally
            .metric("tally_store_password_reads_total{result=\"changed\"}")
            .await
            >= 1.0,
        "the new password is counted"
    );
    assert!(tally.terminate().await.success());
    let log = tally.log();
    assert!(
        log.contains("Read a new password from --database-password-file"),
        "the rotation is logged:\n{log}"
    );
    for secret in ["first-secret", "second-secret"] {
        assert!(!log.contains(secret), "a password is in the log:\n{log}");
    }
}

/// How many sessions of the role `tally` the server has, and how many of them use TLS.
async fn tally_sessions(admin: &tokio_postgres::Client) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'tally'",
            &[],
        )
        .await
        .expect("read pg_stat_activity");
    (row.get(0), row.get(1))
}

/// With `sslmode=require` tally connects over TLS, every connection (the pool's and the
/// instance lock's), verifying the server's certificate against `--database-ca-file`; with
/// another CA's certificate there, the server's is refused and tally does not start, saying
/// what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sslmode_require_every_connection_is_tls_verified_against_the_ca_file() {
    let Some(server) = PrivatePostgres::start(true, "TLS") else {
        return;
    };
    let (admin, secrets) = role(&server, "tls-secret").await;
    let url = format!("{}?sslmode=require", server.url("tally", "tally"));

    // Without sslmode=require the connection is plain, which the server refuses to `tally`.
    let plain = data_dir();
    let log = refused(&tally_config(
        plain.path(),
        server.url("tally", "tally"),
        &secrets,
        &[],
    ))
    .await;
    assert!(
        log.contains("no encryption"),
        "the refusal says why:\n{log}"
    );

    // With the certificate of a CA that did not sign the server's (and the system's roots,
    // which do not vouch for it either), the refusal says so once, in rustls' words, and
    // names the flag that mends it.
    let other_ca = data_dir();
    let other = [
        "--database-ca-file".to_owned(),
        server.file("other-ca.crt").display().to_string(),
    ];
    let log = refused(&tally_config(
        other_ca.path(),
        url.clone(),
        &secrets,
        &other,
    ))
    .await;
    let stopped = log
        .lines()
        .find(|line| line.contains("Tally stopped with an error"))
        .unwrap_or_default();
    assert!(
        stopped.contains("invalid peer certificate: UnknownIssuer")
            && stopped
                .contains("give the certificate of the CA that signed it with --database-ca-file")
            && stopped.matches("error performing TLS handshake").count() == 1,
        "the refusal says why, once, and what to do:\n{log}"
    );
    // With the right CA but a host name the certificate does not name (it names
    // 127.0.0.1), the refusal says to connect by one it names.
    let by_name = data_dir();
    let localhost = url.replace("127.0.0.1", "localhost");
    let log = refused(&tally_config(
        by_name.path(),
        localhost,
        &secrets,
        &ca_file(&server),
    ))
    .await;
    assert!(
        log.contains("not valid for name") && log.contains("connect by a host name it names"),
        "the refusal says why and what to do:\n{log}"
    );
    // With the right CA and name but a certificate past its validity, the refusal says to
    // renew it (or look at this host's clock).
    server.expire_certificate().expect("an expired certificate");
    server.reload().await;
    let expired = data_dir();
    let log = refused(&tally_config(
        expired.path(),
        url.clone(),
        &secrets,
        &ca_file(&server),
    ))
    .await;
    assert!(
        log.contains("invalid peer certificate: certificate expired")
            && log.contains("out of its validity period: renew it on the server"),
        "the refusal says why and what to do:\n{log}"
    );
    server
        .renew_certificate()
        .expect("the valid certificate back");
    server.reload().await;

    let dir = data_dir();
    let config = tally_config(dir.path(), url, &secrets, &ca_file(&server));
    let mut tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    let counters = server.admin("tally").await;
    counted(
        &client,
        &tally.address,
        &counters,
        1,
        "an increment over TLS",
    )
    .await;
    let (sessions, over_tls) = tally_sessions(&admin).await;
    assert!(
        sessions >= 2 && over_tls == sessions,
        "{over_tls} of tally's {sessions} sessions use TLS (a pooled one and the lock's at least)"
    );
    assert!(tally.terminate().await.success());
}

/// The flag that makes tally trust `server`'s CA.
fn ca_file(server: &PrivatePostgres) -> [String; 2] {
    [
        "--database-ca-file".to_owned(),
        server.file("ca.crt").display().to_string(),
    ]
}

/// Under TLS too, the batches given up on while someone holds the instance's row lock are
/// cancelled on the server, not left waiting there, each holding a connection (the cancel
/// request keeps the connection's `sslmode`, so it must go over TLS as well; the plain
/// server's case is `outage::batches_given_up_on_a_held_lock_do_not_pile_up_on_the_server`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tls_batches_given_up_on_a_held_lock_are_cancelled() {
    let Some(server) = PrivatePostgres::start(true, "TLS") else {
        return;
    };
    let (admin, secrets) = role(&server, "tls-secret").await;
    let dir = data_dir();
    let more = ["--store-timeout", "1s", "--instance-id", "locked"]
        .map(str::to_owned)
        .into_iter()
        .chain(ca_file(&server))
        .collect::<Vec<_>>();
    let url = format!("{}?sslmode=require", server.url("tally", "tally"));
    let config = tally_config(dir.path(), url, &secrets, &more);
    let mut tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    let counters = server.admin("tally").await;
    counted(&client, &tally.address, &counters, 1, "an increment").await;

    let holder = server.admin("tally").await;
    holder
        .batch_execute(
            "BEGIN; SELECT 1 FROM tally_instances WHERE instance_id = 'locked' FOR UPDATE",
        )
        .await
        .expect("hold the instance's row");
    assert_eq!(increment(&client, &tally.address, "rotated").await, 202);
    // About five attempts are given up on in six seconds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut most = 0;
    for _ in 0..30 {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = 'tally' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("read pg_stat_activity")
            .get(0);
        most = most.max(waiting);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_given_up_on_and_cancelled(&tally, most).await;
    holder.batch_execute("ROLLBACK").await.expect("release");
    eventually(
        Duration::from_secs(10),
        "the batch is stored once the lock is released",
        || async {
            counters
                .query_one("SELECT value FROM counters WHERE key = 'rotated'", &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 2)
        },
    )
    .await;
    assert!(tally.terminate().await.success());
}
