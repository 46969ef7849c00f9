//! `/metrics` of a fresh instance: every metric tally names is exported before anything has
//! happened (no flush, no error yet), and the exposition passes `promtool check metrics`.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::app::{spawn_app, test_config};
use crate::common::{Backend, data_dir};
use crate::metrics::scrape;
use crate::pg::shout;

/// Every metric name declared in `src/metrics.rs` (`pub const X: &str = "tally_…";`), read
/// from the source so that a metric added there without being registered fails this test.
fn declared_metric_names() -> Vec<String> {
    let source = include_str!("../../src/metrics.rs");
    let names: Vec<String> = source
        .lines()
        .filter(|line| line.trim_start().starts_with("pub const ") && line.contains(": &str"))
        .filter_map(|line| line.split('"').nth(1))
        .filter(|name| name.starts_with("tally_"))
        .map(str::to_owned)
        .collect();
    assert!(
        names.len() >= 10,
        "expected the metric names of src/metrics.rs, found {names:?}"
    );
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_exported_from_the_first_scrape() {
    let dir = data_dir();
    let app = spawn_app(test_config(dir.path(), &Backend::Sqlite), None).await;
    let text = scrape(&app.client, &app.address).await;

    let missing: Vec<String> = declared_metric_names()
        .into_iter()
        .filter(|name| {
            !text
                .lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} ")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not in the first scrape: {missing:?}\n{text}"
    );

    // Every label value a dashboard or an alert would select on is there too, at 0 before
    // its first event.
    let series = [
        r#"tally_flush_batches_total{result="committed"}"#,
        r#"tally_flush_batches_total{result="already_applied"}"#,
        r#"tally_flush_batches_total{result="failed",reason="timeout"}"#,
        r#"tally_flush_batches_total{result="failed",reason="not_connected"}"#,
        r#"tally_flush_batches_total{result="failed",reason="connection_lost"}"#,
        r#"tally_flush_batches_total{result="failed",reason="database_error"}"#,
        r#"tally_flush_batches_total{result="failed",reason="other"}"#,
        r#"tally_flush_batches_total{result="rejected"}"#,
        r#"tally_rejected_total{reason="overloaded"}"#,
        r#"tally_rejected_total{reason="timeout"}"#,
        r#"tally_rejected_total{reason="invalid_value"}"#,
        r#"tally_flush_duration_seconds_count"#,
        r#"tally_http_request_duration_seconds_count{route="/increment",method="POST",status="202"}"#,
    ];
    let absent: Vec<&str> = series
        .iter()
        .copied()
        .filter(|s| !text.lines().any(|l| l.starts_with(&format!("{s} "))))
        .collect();
    assert!(absent.is_empty(), "series missing: {absent:?}\n{text}");

    promtool_accepts(&text);
    app.shutdown().await.expect("clean shutdown");
}

/// Runs `promtool check metrics` on `exposition` and fails on any finding. Without promtool
/// the check is skipped loudly, unless `CI` is set: there it must run.
fn promtool_accepts(exposition: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required in CI (Debian package `prometheus`)"
            );
            shout("SKIPPED: install prometheus for promtool (`promtool check metrics`)");
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(exposition.as_bytes())
        .expect("write the exposition to promtool");
    let output = child.wait_with_output().expect("promtool runs");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && findings.trim().is_empty(),
        "promtool check metrics reported:\n{findings}"
    );
}
