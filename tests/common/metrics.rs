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

/// The value of a series: name plus labels as exported (e.g.
/// `tally_flush_batches_total{result="committed"}`), summed over the labels it leaves out
/// (`tally_flush_batches_total{result="failed"}` adds up every `reason`); a name without
/// labels is only the sample without any. 0 when absent.
pub fn metric(exposition: &str, series: &str) -> f64 {
    let (name, wanted) = split(series);
    let wanted: Vec<&str> = labels(wanted).collect();
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(sample, _)| {
            let (sample_name, have) = split(sample);
            sample_name == name
                && (wanted.is_empty() == have.is_empty())
                && wanted.iter().all(|label| labels(have).any(|l| l == *label))
        })
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
}

/// The series of batches `tally_flush_batches_total` counted failed for `reason`.
#[allow(dead_code, reason = "used by the durability tests only")]
pub fn failed_for(reason: &str) -> String {
    format!("tally_flush_batches_total{{result=\"failed\",reason=\"{reason}\"}}")
}

/// A series' name and its labels without the braces (`""` when it has none).
fn split(series: &str) -> (&str, &str) {
    match series.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}')),
        None => (series, ""),
    }
}

/// `name="value"` pairs of a label list (tally's label values hold no `",`).
fn labels(list: &str) -> impl Iterator<Item = &str> {
    list.split("\",")
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_end_matches('"'))
}
