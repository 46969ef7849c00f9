//! PostgreSQL helpers: a fresh database per run, the store's total, and the database's CPU.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

static NEXT_DB: AtomicU64 = AtomicU64::new(1);

/// Connects one client and drives its connection on a task.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", mask(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn mask(url: &str) -> String {
    match url.split_once('@') {
        Some((_, host)) => format!("postgres://…@{host}"),
        None => url.to_owned(),
    }
}

/// A database created for one run and dropped by [`BenchDb::drop_db`].
pub struct BenchDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl BenchDb {
    /// Creates `tally_bench_<pid>_<n>` through `admin_url`.
    pub async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!(
            "tally_bench_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(admin_url).await.with_context(|| {
            "PostgreSQL is needed for the pg variants; start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        })?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        let url = with_database(admin_url, &name);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url,
        })
    }

    /// Drops the database (closing any connection still open to it).
    pub async fn drop_db(self) -> anyhow::Result<()> {
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("cannot drop database {}", self.name))
    }

    /// `sum(value)` of the counters table.
    pub async fn total(&self) -> anyhow::Result<i64> {
        let client = connect(&self.url).await?;
        let row = client
            .query_one("SELECT coalesce(sum(value), 0)::int8 FROM counters", &[])
            .await
            .context("cannot sum the counters table")?;
        Ok(row.get(0))
    }
}

impl BenchDb {
    /// Process ids of the backends serving this database (other than the asking one).
    pub async fn backend_pids(&self) -> anyhow::Result<Vec<u32>> {
        let client = connect(&self.url).await?;
        let rows = client
            .query(
                "SELECT pid FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .context("cannot list the database's backends")?;
        Ok(rows
            .iter()
            .filter_map(|r| u32::try_from(r.get::<_, i32>(0)).ok())
            .collect())
    }
}

/// CPU seconds of each of `pids` now.
pub fn snapshot(pids: &[u32]) -> Vec<(u32, f64)> {
    pids.iter()
        .filter_map(|&p| process_cpu_seconds(p).map(|c| (p, c)))
        .collect()
}

/// CPU seconds used between two snapshots by the processes present in both.
pub fn used_between(before: &[(u32, f64)], after: &[(u32, f64)]) -> f64 {
    after
        .iter()
        .filter_map(|(p, a)| before.iter().find(|(q, _)| q == p).map(|(_, b)| a - b))
        .sum()
}

/// `admin_url` with its database name replaced by `name`.
pub fn with_database(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// CPU seconds (user + system, all threads) used so far by process `pid`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.rfind(')')?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// Context switches (voluntary and involuntary) of every thread of process `pid` so far,
/// summed over `/proc/<pid>/task/*/status`. Threads that exited are not counted, so read it
/// while the server runs.
pub fn process_context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(status) = std::fs::read_to_string(task.ok()?.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// CPU seconds of the whole machine so far (all cores), from one read of /proc/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTimes {
    /// Everything but idle and iowait.
    pub busy: f64,
    /// Idle and iowait: a run that leaves cores idle is bound by waiting, not by CPU.
    pub idle: f64,
}

pub fn machine_times() -> MachineTimes {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return MachineTimes::default();
    };
    // user nice system idle iowait irq softirq steal
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let seconds = |fields: &[usize]| {
        let ticks: u64 = fields.iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum();
        ticks as f64 / clock_ticks()
    };
    MachineTimes {
        busy: seconds(&[0, 1, 2, 5, 6, 7]),
        idle: seconds(&[3, 4]),
    }
}

/// CPU seconds used by this process and by its children that have been waited for (wrk).
pub fn own_and_reaped_children_seconds() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &raw mut usage) } == 0 {
            for t in [usage.ru_utime, usage.ru_stime] {
                total += t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            }
        }
    }
    total
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
