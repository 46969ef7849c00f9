//! Several instances against one PostgreSQL: addition is the whole model, so the table ends
//! up holding exactly the sums sent, whichever instance took which increment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::app::{spawn_app, test_config};
use crate::common::{Backend, data_dir};
use crate::pg::PgDatabase;
use crate::rng::Rng;
use crate::store::stored_counters;

const INSTANCES: usize = 3;
const INCREMENTS: usize = 30_000;
const KEYS: u64 = 300;
/// Requests in flight at once, over all instances.
const IN_FLIGHT: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_postgres_store_exactly_the_sums_sent() {
    let Some(db) = PgDatabase::create("three_instances_on_one_postgres").await else {
        return;
    };
    let backend = Backend::Postgres(db.url.clone());
    let dirs: Vec<_> = (0..INSTANCES).map(|_| data_dir()).collect();
    let mut apps = Vec::new();
    for dir in &dirs {
        let mut config = test_config(dir.path(), &backend);
        // Flush often and early, so that batches from the three instances overlap in the
        // database while ingest goes on.
        config.flush.interval = Duration::from_millis(50);
        config.flush.max_keys = 64_usize.try_into().expect("non-zero");
        apps.push(spawn_app(config, None).await);
    }
    let ids: BTreeSet<String> = apps.iter().map(|a| a.instance_id.clone()).collect();
    assert_eq!(
        ids.len(),
        INSTANCES,
        "each data dir gets its own instance id"
    );

    // The plan: deterministic keys and signed values, spread round-robin over the instances.
    let mut rng = Rng::new(0x7A11_7E57);
    let plan: Arc<Vec<(String, i64)>> = Arc::new(
        (0..INCREMENTS)
            .map(|_| (format!("key-{:03}", rng.below(KEYS)), rng.nonzero(1_000)))
            .collect(),
    );
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for (key, value) in plan.iter() {
        *want.entry(key.clone()).or_default() += value;
    }

    let started = Instant::now();
    let urls: Arc<Vec<String>> = Arc::new(
        apps.iter()
            .map(|a| format!("{}/increment", a.address))
            .collect(),
    );
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (plan, urls, client, next) = (
            Arc::clone(&plan),
            Arc::clone(&urls),
            client.clone(),
            Arc::clone(&next),
        );
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((key, value)) = plan.get(i) else {
                    return;
                };
                let response = client
                    .post(&urls[i % urls.len()])
                    .json(&serde_json::json!({ "key": key, "value": value }))
                    .send()
                    .await
                    .expect("request sent");
                assert_eq!(response.status(), 202, "increment {i}");
            }
        });
    }
    while let Some(worker) = workers.join_next().await {
        worker.expect("worker panicked");
    }
    let sent = started.elapsed();

    for app in apps {
        app.shutdown().await.expect("clean shutdown");
    }
    let stored = stored_counters(dirs[0].path(), &backend).await;
    assert_eq!(
        stored.len(),
        want.len(),
        "every key sent is stored, no other"
    );
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| stored.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v}, stored {:?}", stored.get(k)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} keys wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Every instance recorded its own batches.
    let client = crate::pg::client(&db.url).await;
    let instances = client
        .query("SELECT instance_id, last_seq FROM tally_instances", &[])
        .await
        .expect("read tally_instances");
    let recorded: BTreeSet<String> = instances.iter().map(|r| r.get(0)).collect();
    assert_eq!(recorded, ids);
    eprintln!(
        "{INCREMENTS} increments over {KEYS} keys via {INSTANCES} instances in {sent:?} \
         ({:.0}/s)",
        INCREMENTS as f64 / sent.as_secs_f64()
    );
}
