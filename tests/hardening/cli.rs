//! The `tally` binary at its edge: a bad flag is one `error:` line and exit 2, a start-up
//! failure is one log record with its cause and exit 1, and nothing written to a pipe
//! carries ANSI colour codes.

use std::process::{Command, Output};

use crate::common::data_dir;

/// Runs the binary with `args`, stdout and stderr on pipes, in a clean environment (no
/// `TALLY_*`, `DATABASE_URL` or `NO_COLOR` from the test's own).
fn tally(args: &[&str]) -> Output {
    tally_with_env(args, &[])
}

/// [`tally`] with `env` set.
fn tally_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("TALLY_") || name == "DATABASE_URL" || name == "NO_COLOR" {
            command.env_remove(&*name);
        }
    }
    command
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run the tally binary")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("UTF-8 stderr")
}

#[test]
fn a_value_only_validation_refuses_is_one_line_naming_the_flag_and_exit_2() {
    let dir = data_dir();
    let path = dir.path().to_str().expect("UTF-8 temp path");
    let output = tally(&["--data-dir", path, "--flush-interval", "0s"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr,
        "error: invalid --flush-interval: must be longer than zero\n"
    );
    assert!(output.stdout.is_empty(), "stdout: {:?}", output.stdout);
    // Refused before anything was created.
    assert!(!dir.path().join("journal").exists());
}

#[test]
fn a_value_clap_refuses_names_the_flag_and_exits_2_without_colour() {
    let output = tally(&["--flush-max-keys", "0"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{stderr}");
    assert!(first.contains("--flush-max-keys"), "{stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "ANSI escapes on a pipe: {stderr:?}"
    );
}

#[test]
fn the_start_up_log_on_a_pipe_has_no_colour_and_a_failure_is_one_line_with_its_cause() {
    // Hold the port so that tally's own bind fails after it has logged its start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let address = taken.local_addr().expect("address").to_string();
    let dir = data_dir();
    let path = dir.path().to_str().expect("UTF-8 temp path");
    let output = tally(&["--data-dir", path, "--listen", &address, "--ack", "memory"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "ANSI escapes on a pipe: {stderr:?}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("Starting tally.") && l.contains("log-format=text")),
        "the start-up record prints the configuration: {stderr}"
    );
    let failure: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("Tally stopped with an error."))
        .collect();
    assert_eq!(failure.len(), 1, "{stderr}");
    assert!(
        failure[0].contains(&format!("cannot listen on {address} (--listen): ")),
        "the context and its cause on one line: {stderr}"
    );
    assert!(
        !stderr.contains("Stack backtrace"),
        "a start-up failure is not a panic: {stderr}"
    );
}

#[test]
fn help_does_not_print_secrets_from_the_environment() {
    let output = tally_with_env(
        &["--help"],
        &[
            ("DATABASE_URL", "postgres://u:db-password-value@h/db"),
            ("TALLY_AUTH_TOKEN", "auth-token-value-0123456789"),
            ("TALLY_JWT_SECRET", "jwt-secret-value-0123456789abcdef0123"),
        ],
    );
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    assert!(help.contains("--database-url"), "{help}");
    assert!(help.contains("[env: DATABASE_URL]"), "{help}");
    for secret in ["db-password-value", "auth-token-value", "jwt-secret-value"] {
        assert!(!help.contains(secret), "--help prints {secret}: {help}");
    }
}

/// `--database-ca-file` is for TLS, which only `sslmode=require` in the URL turns on: without
/// it the flag would do nothing, so it is refused, as is a file with no certificate in it;
/// each refusal names the flag, with exit 2.
#[test]
fn a_database_ca_file_needs_a_url_that_requires_tls() {
    let dir = data_dir();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").expect("write the CA file");
    let ca = ca.to_str().expect("UTF-8 temp path");
    for (url, why) in [
        (None, "sslmode=require"),
        (Some("postgres://u@127.0.0.1/db"), "sslmode=require"),
        (
            Some("postgres://u@127.0.0.1/db?sslmode=prefer"),
            "sslmode=require",
        ),
        (
            Some("postgres://u@127.0.0.1/db?sslmode=require"),
            "holds no certificate",
        ),
    ] {
        let mut args = vec!["--database-ca-file", ca];
        if let Some(url) = url {
            args.extend(["--database-url", url]);
        }
        let output = tally(&args);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: invalid --database-ca-file: ") && stderr.contains(why),
            "{args:?}: {stderr}"
        );
    }
}

/// `--database-password-file` is checked before start: it needs a URL without a password of
/// its own, and a file that can be read; each refusal names the flag and exits 2.
#[test]
fn a_database_password_file_is_checked_before_start() {
    let dir = data_dir();
    let secret = dir.path().join("pgpass");
    std::fs::write(&secret, "s3cret\n").expect("write the password file");
    let secret = secret.to_str().expect("UTF-8 temp path");
    let missing = dir.path().join("missing");
    let missing = missing.to_str().expect("UTF-8 temp path");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write an empty password file");
    let empty = empty.to_str().expect("UTF-8 temp path");
    for (args, why) in [
        (
            vec!["--database-password-file", secret],
            "needs --database-url",
        ),
        (
            vec![
                "--database-url",
                "postgres://u:inline@127.0.0.1/db",
                "--database-password-file",
                secret,
            ],
            "give it in one place",
        ),
        (
            vec![
                "--database-url",
                "postgres://u@127.0.0.1/db",
                "--database-password-file",
                missing,
            ],
            "cannot read",
        ),
        (
            vec![
                "--database-url",
                "postgres://u@127.0.0.1/db",
                "--database-password-file",
                empty,
            ],
            "its first line is empty",
        ),
    ] {
        let output = tally(&args);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: invalid --database-password-file: ") && stderr.contains(why),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret") && !stderr.contains("inline"),
            "{stderr}"
        );
    }
}
