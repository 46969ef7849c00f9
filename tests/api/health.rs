//! `/healthz`, `/readyz` and `/metrics`.

use crate::app::{spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::metrics::{metric, scrape};

async fn health_readiness_and_metrics_answer(backend: Backend) {
    let dir = data_dir();
    let app = spawn_app(test_config(dir.path(), &backend), None).await;

    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);

    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200, "the store is reachable, so ready");

    // The counter is process-wide (other tests share it), so compare before and after.
    let before = metric(
        &scrape(&app.client, &app.address).await,
        "tally_increments_total",
    );
    assert_eq!(app.increment("metered", 1).await, 202);
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text exposition, got {content_type:?}"
    );
    let text = response.text().await.expect("metrics text");
    assert!(
        text.contains("# TYPE tally_increments_total counter"),
        "metrics lack tally_increments_total:\n{text}"
    );
    let after = metric(&text, "tally_increments_total");
    assert!(
        after >= before + 1.0,
        "tally_increments_total went from {before} to {after} across one increment"
    );
    app.shutdown().await.expect("clean shutdown");
}

on_both_stores!(
    health_readiness_and_metrics_answer_sqlite,
    health_readiness_and_metrics_answer_postgres,
    health_readiness_and_metrics_answer
);
