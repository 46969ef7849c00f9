//! Per-client rate limiting: a token bucket per client, `429` with `Retry-After` past it.
//!
//! **Who is a client.** The JWT subject when the request carries a valid JWT with `sub`
//! (set by [`super::auth`]); otherwise the peer IP address, or with `--trust-proxy` the last
//! `X-Forwarded-For` entry (the address the trusted proxy saw; entries to its left were sent
//! by the client and could be anything). IPv6 addresses are grouped by /64: one host
//! usually holds a whole /64, and keying on full addresses would hand it 2^64 buckets.
//! The static `--auth-token` names no client (every holder sends the same string), so it
//! does not change the key. `/healthz` and `/readyz` are never limited.
//!
//! **The bucket.** GCRA (the "generic cell rate algorithm"), which is exactly a token
//! bucket of `burst` tokens refilled at `rate` per second, stored as one number per client:
//! the theoretical arrival time (TAT) of its next request. A request at `now` is allowed
//! when `TAT - now <= (burst - 1) / rate`, and then pushes TAT on by `1 / rate`. A client
//! whose TAT is in the past has a full bucket: it is indistinguishable from a client never
//! seen before.
//!
//! **Bounded memory, and why not `governor`.** governor's keyed limiter keeps a bucket for
//! every key it has seen until `retain_recent()` runs; between two sweeps its memory grows
//! with the number of distinct clients, which a flood from many addresses chooses. Here the
//! clients live in [`SHARDS`] hash maps of fixed capacity (`--rate-limit-max-clients` in
//! total). When a new client finds its shard full, entries with a full bucket are dropped
//! first (that loses nothing, see above); if none is, the entry closest to a full bucket is
//! evicted (that client gets at most a few tokens back early). Limited clients, the ones
//! the limiter exists for, are the last to go. No background task is needed, the cost of
//! the sweep falls only on new clients of a full shard, and the bound is exact: about
//! 50–100 bytes per client.
//!
//! **Cost.** When `--rate-limit-per-second` is not set the layer is not installed. When it
//! is, a request costs one hash and one short critical section on one of the shards (a
//! std `Mutex`: nothing is awaited while holding it).

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ahash::RandomState;
use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;

use super::auth::{self, Subject};
use super::error::ApiError;
use crate::config::Config;
use crate::metrics::Metrics;

/// Number of independently locked client maps. 64 keeps lock contention negligible on
/// any core count tally runs on, and each shard small enough that a full sweep is cheap.
pub const SHARDS: usize = 64;

/// Who a request counts against. Fixed-size, so the memory per client is fixed too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 peer.
    V4(u32),
    /// The /64 prefix of an IPv6 peer.
    V6Prefix(u64),
    /// A hash of a JWT subject (64 bits: with 10^5 clients a collision is a ~10^-9 event,
    /// and its only effect is two subjects sharing a bucket).
    Subject(u64),
}

impl ClientKey {
    /// The key of a peer address: IPv4 (also when IPv4-mapped), or the IPv6 /64.
    pub fn from_ip(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The outcome of [`RateLimiter::check`] for a refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// How long until this client's next request would be allowed.
    pub wait: Duration,
}

impl Limited {
    /// `wait` in whole seconds, rounded up, at least 1: the `Retry-After` value.
    pub fn retry_after_seconds(&self) -> u64 {
        (self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0)).max(1)
    }
}

/// One shard: client → TAT, in nanoseconds since [`RateLimiter::epoch`].
type Shard = Mutex<std::collections::HashMap<ClientKey, u64, RandomState>>;

/// The per-client limiter. Shared by every request through an `Arc`.
pub struct RateLimiter {
    /// Nanoseconds between two requests at the sustained rate (1 / rate).
    interval_ns: u64,
    /// How far ahead of `now` a TAT may run: `(burst - 1) * interval_ns`.
    tolerance_ns: u64,
    /// Most clients per shard.
    shard_capacity: usize,
    /// Read the client address from X-Forwarded-For.
    trust_proxy: bool,
    /// Client maps; each lock is held for one lookup-and-update, never across an await.
    shards: Box<[Shard]>,
    /// Picks the shard of a key (and hashes JWT subjects).
    hasher: RandomState,
    /// Zero point of the TATs.
    epoch: Instant,
}

impl RateLimiter {
    /// The limiter configured by `--rate-limit-*` and `--trust-proxy`, or `None` when rate
    /// limiting is off.
    pub fn from_config(config: &Config) -> Option<Self> {
        let rate = config.rate_limit.per_second?;
        // Default burst: one second's worth of requests.
        let burst = config
            .rate_limit
            .burst
            .map(std::num::NonZeroU32::get)
            .unwrap_or_else(|| rate.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        Some(Self::new(
            rate,
            burst,
            config.rate_limit.max_clients.get(),
            config.rate_limit.trust_proxy,
        ))
    }

    /// A limiter allowing `burst` requests at once and `rate` per second sustained, per
    /// client, remembering at most `max_clients` clients.
    pub fn new(rate: f64, burst: u32, max_clients: usize, trust_proxy: bool) -> Self {
        let interval_ns = (1e9 / rate).round().clamp(1.0, u64::MAX as f64) as u64;
        let shards = max_clients.clamp(1, SHARDS);
        Self {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst.max(1) - 1)),
            shard_capacity: (max_clients / shards).max(1),
            trust_proxy,
            shards: (0..shards)
                .map(|_| Mutex::new(std::collections::HashMap::with_hasher(RandomState::new())))
                .collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }

    /// The client a request counts against (see the module doc).
    pub fn client_key(&self, request: &Request) -> ClientKey {
        if let Some(Subject(sub)) = request.extensions().get::<Subject>() {
            return ClientKey::Subject(self.hasher.hash_one(sub.as_bytes()));
        }
        if self.trust_proxy
            && let Some(ip) = forwarded_for(request.headers())
        {
            return ClientKey::from_ip(ip);
        }
        match request.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => ClientKey::from_ip(peer.ip()),
            // Every connection served by `http::serve` carries its peer address; a router
            // used without it (an embedding) limits all its callers as one client.
            None => ClientKey::V4(0),
        }
    }

    /// Takes one token from `key`'s bucket at time `now`.
    ///
    /// # Errors
    ///
    /// [`Limited`] with the time until a token is available, when the bucket is empty.
    pub fn check(&self, key: ClientKey, now: Instant) -> Result<(), Limited> {
        let now_ns =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let shard = &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()];
        // A poisoned lock only means another request panicked mid-update of a plain map of
        // integers; the map is still consistent, so keep using it.
        let mut clients = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tat = match clients.get(&key) {
            Some(&tat) => tat.max(now_ns),
            None => {
                if clients.len() >= self.shard_capacity {
                    make_room(&mut clients, self.shard_capacity, now_ns);
                }
                now_ns
            }
        };
        let allowed_until = now_ns.saturating_add(self.tolerance_ns);
        if tat > allowed_until {
            return Err(Limited {
                wait: Duration::from_nanos(tat - allowed_until),
            });
        }
        clients.insert(key, tat.saturating_add(self.interval_ns));
        Ok(())
    }

    /// Whether `key` has a token left at time `now`, without taking it (for budgets that
    /// are spent only on some outcomes, like failed authorizations).
    ///
    /// # Errors
    ///
    /// [`Limited`] with the time until a token is available, when the bucket is empty.
    pub fn peek(&self, key: ClientKey, now: Instant) -> Result<(), Limited> {
        let now_ns =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let shard = &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()];
        let clients = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tat = clients.get(&key).map_or(now_ns, |&tat| tat.max(now_ns));
        let allowed_until = now_ns.saturating_add(self.tolerance_ns);
        if tat > allowed_until {
            return Err(Limited {
                wait: Duration::from_nanos(tat - allowed_until),
            });
        }
        Ok(())
    }

    /// Clients currently remembered (for tests and diagnostics; locks every shard).
    pub fn tracked_clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

/// Frees at least one slot in a shard holding `capacity` clients: drops every client whose
/// bucket is full again (TAT not after `now`: forgetting it loses nothing), and if that
/// frees nothing, the client closest to a full bucket.
fn make_room<S: BuildHasher>(
    clients: &mut std::collections::HashMap<ClientKey, u64, S>,
    capacity: usize,
    now_ns: u64,
) {
    clients.retain(|_, tat| *tat > now_ns);
    while clients.len() >= capacity {
        let Some(closest_to_full) = clients
            .iter()
            .min_by_key(|(_, tat)| **tat)
            .map(|(key, _)| *key)
        else {
            return;
        };
        clients.remove(&closest_to_full);
    }
}

/// The last address in the last `X-Forwarded-For` header: the one the nearest (trusted)
/// proxy appended. Accepts `ip` and `ip:port` forms.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers.get_all("x-forwarded-for").iter().next_back()?;
    let last = value.to_str().ok()?.rsplit(',').next()?.trim();
    last.parse::<IpAddr>()
        .ok()
        .or_else(|| last.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

impl super::guard::Guard for RateLimiter {
    /// Refuses a request with 429 + `Retry-After` when its client is over the limit.
    fn check(&self, request: &mut Request) -> Result<(), ApiError> {
        if auth::is_open(request.uri().path()) {
            return Ok(());
        }
        let key = self.client_key(request);
        RateLimiter::check(self, key, Instant::now()).map_err(|limited| {
            Metrics::global().rate_limited.increment(1);
            ApiError::RateLimited {
                retry_after_seconds: limited.retry_after_seconds(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(limiter: &RateLimiter, ms: u64) -> Instant {
        limiter.epoch + Duration::from_millis(ms)
    }

    #[test]
    fn allows_a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(10.0, 3, 100, false);
        let a = ClientKey::V4(1);
        for _ in 0..3 {
            assert_eq!(limiter.check(a, at(&limiter, 0)), Ok(()));
        }
        let refused = limiter.check(a, at(&limiter, 0)).expect_err("burst spent");
        assert_eq!(refused.wait, Duration::from_millis(100));
        assert_eq!(refused.retry_after_seconds(), 1);
        // One token every 100 ms.
        assert_eq!(limiter.check(a, at(&limiter, 100)), Ok(()));
        assert!(limiter.check(a, at(&limiter, 150)).is_err());
        assert_eq!(limiter.check(a, at(&limiter, 200)), Ok(()));
        // After a long pause the bucket is full again, not fuller.
        for _ in 0..3 {
            assert_eq!(limiter.check(a, at(&limiter, 10_000)), Ok(()));
        }
        assert!(limiter.check(a, at(&limiter, 10_000)).is_err());
    }

    #[test]
    fn clients_have_separate_buckets() {
        let limiter = RateLimiter::new(1.0, 1, 100, false);
        let (a, b) = (ClientKey::V4(1), ClientKey::Subject(7));
        assert_eq!(limiter.check(a, at(&limiter, 0)), Ok(()));
        assert!(limiter.check(a, at(&limiter, 0)).is_err());
        assert_eq!(limiter.check(b, at(&limiter, 0)), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let limited = |ms| Limited {
            wait: Duration::from_millis(ms),
        };
        assert_eq!(limited(1).retry_after_seconds(), 1);
        assert_eq!(limited(1000).retry_after_seconds(), 1);
        assert_eq!(limited(1001).retry_after_seconds(), 2);
        assert_eq!(limited(0).retry_after_seconds(), 1);
    }

    #[test]
    fn memory_stays_bounded_however_many_clients_appear() {
        let max_clients = 1_000;
        let limiter = RateLimiter::new(1.0, 5, max_clients, false);
        // A limited client, and a flood of new ones within the same second.
        let victim = ClientKey::V4(u32::MAX);
        for _ in 0..5 {
            assert_eq!(limiter.check(victim, at(&limiter, 0)), Ok(()));
        }
        assert!(limiter.check(victim, at(&limiter, 0)).is_err());
        for n in 0..100_000u32 {
            let _ = limiter.check(ClientKey::V4(n), at(&limiter, 1));
        }
        assert!(
            limiter.tracked_clients() <= max_clients,
            "{} clients tracked",
            limiter.tracked_clients()
        );
        // The flood's entries (one request each) are closer to full than the victim's, so
        // the victim was not forgotten: still limited.
        assert!(limiter.check(victim, at(&limiter, 2)).is_err());
    }

    #[test]
    fn clients_with_full_buckets_are_dropped_first() {
        let limiter = RateLimiter::new(1.0, 1, 1, false);
        assert_eq!(limiter.check(ClientKey::V4(1), at(&limiter, 0)), Ok(()));
        assert_eq!(limiter.check(ClientKey::V4(2), at(&limiter, 5_000)), Ok(()));
        assert_eq!(limiter.tracked_clients(), 1);
    }

    #[test]
    fn keys_ipv6_by_prefix_and_ipv4_mapped_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            ClientKey::from_ip(ip("2001:db8:1:2::1")),
            ClientKey::from_ip(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            ClientKey::from_ip(ip("2001:db8:1:2::1")),
            ClientKey::from_ip(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::from_ip(ip("::ffff:10.0.0.1")),
            ClientKey::from_ip(ip("10.0.0.1"))
        );
    }

    #[test]
    fn reads_the_last_forwarded_for_entry() {
        let mut headers = HeaderMap::new();
        assert_eq!(forwarded_for(&headers), None);
        headers.append(
            "x-forwarded-for",
            "6.6.6.6, 10.0.0.2".parse().expect("header"),
        );
        assert_eq!(
            forwarded_for(&headers),
            Some("10.0.0.2".parse().expect("ip"))
        );
        headers.append("x-forwarded-for", "192.0.2.7:4711".parse().expect("header"));
        assert_eq!(
            forwarded_for(&headers),
            Some("192.0.2.7".parse().expect("ip"))
        );
        headers.insert("x-forwarded-for", "garbage".parse().expect("header"));
        assert_eq!(forwarded_for(&headers), None);
    }
}
