//! Scraping `/metrics` and reading one sample of the Prometheus text exposition.

/// GETs `/metrics` from `address` (`http://host:port`); asserts a 200.
pub async fn scrape(client: &reqwest::Client, address: &str) -> String {
    let response = client
        .get(format!("{address}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200, "GET /metrics");
    response.text().await.expect("metrics text")
}

/// The value of one sample, name plus labels exactly as exported (e.g.
/// `tally_flush_batches_total{result="failed"}`); 0 when absent.
pub fn metric(exposition: &str, sample: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(sample))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}
