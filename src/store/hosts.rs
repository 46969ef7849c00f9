//! The hosts of a `--database-url` that names several (a primary and its standbys), apart,
//! so that each is tried under a deadline of its own.
//!
//! tokio-postgres tries such hosts in turn, but its `connect_timeout` bounds each host's TCP
//! connect only, where libpq's bounds the whole attempt: a host that accepts the connection
//! and then never answers (a server whose disk hangs, a proxy whose backend is gone) holds
//! the attempt until the caller gives up, and the host that would answer is never tried.
//! tokio-postgres offers no bound for one host of several, so tally splits the settings
//! into one per host and tries them itself ([`super::postgres`]).

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::Config;
use tokio_postgres::config::{Host as Address, LoadBalanceHosts};

/// One host of the URL, with every setting of the URL.
#[derive(Clone, Debug)]
pub(super) struct Host {
    /// The URL's settings with this host alone (its `hostaddr` and port with it).
    pub config: Config,
    /// How logs name it: `host:port`, or the `hostaddr`'s socket address.
    pub name: String,
    /// The host name to look up for its addresses, and the port: a TCP host given by name
    /// without a `hostaddr`.
    lookup: Option<(String, u16)>,
}

impl Host {
    /// Where to try this host now, each try with its own deadline, as libpq's
    /// `connect_timeout` applies "separately to each host name or IP address": one config
    /// per address its name has now (with `hostaddr` set, the name kept for TLS), or itself
    /// when given by address or as a socket directory.
    pub async fn addresses(&self) -> std::io::Result<Vec<(Config, String)>> {
        let Some((name, port)) = &self.lookup else {
            return Ok(vec![(self.config.clone(), self.name.clone())]);
        };
        let found: Vec<_> = tokio::net::lookup_host((name.as_str(), *port))
            .await?
            .collect();
        if found.is_empty() {
            return Err(std::io::Error::other("its name has no address"));
        }
        // As tokio-postgres spreads connections over a name's addresses.
        let first = if self.config.get_load_balance_hosts() == LoadBalanceHosts::Random {
            random_below(found.len())
        } else {
            0
        };
        let (before, after) = found.split_at(first);
        Ok((after.iter().chain(before))
            .map(|address| {
                let mut config = self.config.clone();
                config.hostaddr(address.ip());
                (config, format!("{} ({address})", self.name))
            })
            .collect())
    }
}

/// The hosts of a URL, and how long each may take to open a connection.
#[derive(Clone, Debug)]
pub(super) struct Hosts {
    hosts: Vec<Host>,
    random: bool,
    /// Each host's share of the wait for a new connection, or the URL's `connect_timeout`:
    /// the bound of one try's whole attempt (TCP, TLS, start-up, authentication) at one
    /// address of a host before the last, and of each TCP connect.
    pub per_host: Duration,
    /// The wait for a new connection, every host tried: `per_host` for each host, and at
    /// least the wait asked for.
    pub wait: Duration,
}

/// A URL whose lists of hosts, `hostaddr`s and ports do not pair up.
#[derive(Debug, thiserror::Error)]
#[error(
    "--database-url names {hosts} host(s), {addrs} hostaddr(s) and {ports} port(s): give one \
     port for all, or one per host, and as many hostaddrs as hosts (or none)"
)]
pub struct Unpaired {
    hosts: usize,
    addrs: usize,
    ports: usize,
}

impl Hosts {
    /// `config`'s hosts, each given its share of `wait`, at least `least` (or the URL's
    /// `connect_timeout` if it sets one), which also bounds each TCP connect. A URL with
    /// one host (or none: tokio-postgres then says what is missing) is kept whole.
    pub fn new(config: &Config, wait: Duration, least: Duration) -> Result<Self, Unpaired> {
        let (hosts, addrs, ports) = (
            config.get_hosts().len(),
            config.get_hostaddrs().len(),
            config.get_ports().len(),
        );
        let count = hosts.max(addrs);
        if (hosts > 0 && addrs > 0 && hosts != addrs) || (ports > 1 && ports != count) {
            return Err(Unpaired {
                hosts,
                addrs,
                ports,
            });
        }
        let factor = u32::try_from(count.max(1)).unwrap_or(u32::MAX);
        let per_host =
            (config.get_connect_timeout().copied()).unwrap_or_else(|| (wait / factor).max(least));
        let mut hosts = if count > 1 {
            (0..count).map(|i| alone(config, i)).collect()
        } else {
            vec![Host {
                config: config.clone(),
                name: name(config, 0),
                lookup: None,
            }]
        };
        for host in &mut hosts {
            host.config.connect_timeout(per_host);
        }
        Ok(Self {
            hosts,
            random: config.get_load_balance_hosts() == LoadBalanceHosts::Random,
            per_host,
            wait: per_host.saturating_mul(factor).max(wait),
        })
    }

    /// How many hosts there are.
    pub fn count(&self) -> usize {
        self.hosts.len()
    }

    /// The hosts in the order to try them now: the URL's, or with `load_balance_hosts=random`
    /// from a host chosen at random (then in the URL's order, round the list). The last
    /// apart, as it is tried differently.
    pub fn in_turn(&self) -> (impl Iterator<Item = &Host>, &Host) {
        let count = self.hosts.len();
        let first = if self.random { random_below(count) } else { 0 };
        // `new` keeps at least one host.
        let last = &self.hosts[(first + count - 1) % count];
        let before = (0..count - 1).map(move |i| &self.hosts[(first + i) % count]);
        (before, last)
    }
}

/// A number below `bound` (0 if `bound` is), at random: a start in a list, where no crate
/// is needed for it, as std's hasher keys are random per process and per `RandomState`.
fn random_below(bound: usize) -> usize {
    let random = RandomState::new().hash_one(0_u8);
    usize::try_from(random % bound.max(1) as u64).unwrap_or(0)
}

/// `config` with its `i`th host alone. tokio-postgres' `Config` can add a host but not take
/// one away, so every setting is copied to a new one (a unit test compares the result with
/// the same URL written with that host alone, setting by setting).
fn alone(config: &Config, i: usize) -> Host {
    let mut one = Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation());
    match config.get_hosts().get(i) {
        Some(Address::Tcp(host)) => {
            one.host(host);
        }
        #[cfg(unix)]
        Some(Address::Unix(path)) => {
            one.host_path(path);
        }
        None => {}
    }
    if let Some(&addr) = config.get_hostaddrs().get(i) {
        one.hostaddr(addr);
    }
    if !config.get_ports().is_empty() {
        one.port(port(config, i));
    }
    if let Some(&timeout) = config.get_connect_timeout() {
        one.connect_timeout(timeout);
    }
    if let Some(&timeout) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(timeout);
    }
    one.keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle());
    if let Some(interval) = config.get_keepalives_interval() {
        one.keepalives_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        one.keepalives_retries(retries);
    }
    one.target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding())
        // Among the addresses of one host name, as tokio-postgres does.
        .load_balance_hosts(config.get_load_balance_hosts());
    let lookup = match (config.get_hosts().get(i), config.get_hostaddrs().get(i)) {
        (Some(Address::Tcp(host)), None) => Some((host.clone(), port(config, i))),
        _ => None,
    };
    Host {
        name: name(config, i),
        config: one,
        lookup,
    }
}

/// The port of `config`'s `i`th host: its own, the one for all, or PostgreSQL's.
fn port(config: &Config, i: usize) -> u16 {
    let ports = config.get_ports();
    ports
        .get(i)
        .or_else(|| ports.first())
        .copied()
        .unwrap_or(5432)
}

/// How logs name `config`'s `i`th host.
fn name(config: &Config, i: usize) -> String {
    let port = port(config, i);
    match (config.get_hosts().get(i), config.get_hostaddrs().get(i)) {
        (Some(Address::Tcp(host)), _) => match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port).to_string(),
            Err(_) => format!("{host}:{port}"),
        },
        #[cfg(unix)]
        (Some(Address::Unix(path)), _) => format!("{}:{port}", path.display()),
        (None, Some(&addr)) => SocketAddr::new(addr, port).to_string(),
        (None, None) => "(no host)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &str = "dbname=d user=u password=p options='-c x=1' application_name=a \
         sslmode=require sslnegotiation=direct connect_timeout=3 tcp_user_timeout=4 \
         keepalives=0 keepalives_idle=5 keepalives_interval=6 keepalives_retries=7 \
         target_session_attrs=read-write channel_binding=require load_balance_hosts=random";

    /// The hosts' names in the order they are tried now.
    fn names(hosts: &Hosts) -> Vec<String> {
        let (before, last) = hosts.in_turn();
        before.chain([last]).map(|h| h.name.clone()).collect()
    }

    fn parse(hosts: &str) -> Config {
        format!("{hosts} {SETTINGS}").parse().expect("a valid URL")
    }

    /// Every setting is copied: each host alone reads as the URL written with it alone.
    #[test]
    fn each_host_alone_has_every_setting_of_the_url() {
        let whole = parse("host=h1,/run/pg hostaddr=10.0.0.1,10.0.0.2 port=5433,5434");
        let hosts = Hosts::new(&whole, Duration::from_secs(1), Duration::ZERO).expect("paired");
        let alone: Vec<_> = hosts.hosts.iter().map(|h| h.config.clone()).collect();
        let expected = [
            parse("host=h1 hostaddr=10.0.0.1 port=5433"),
            parse("host=/run/pg hostaddr=10.0.0.2 port=5434"),
        ];
        assert_eq!(alone, expected);
        let names: Vec<_> = hosts.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["h1:5433", "/run/pg:5434"]);
        assert_eq!(hosts.per_host, Duration::from_secs(3), "the URL's own");
    }

    /// One port serves every host; hostaddrs alone name the hosts.
    #[test]
    fn one_port_serves_every_host() {
        let whole: Config = "hostaddr=10.0.0.1,10.0.0.2 port=6000"
            .parse()
            .expect("valid");
        let hosts = Hosts::new(&whole, Duration::from_secs(4), Duration::ZERO).expect("paired");
        assert_eq!(
            names(&hosts),
            ["10.0.0.1:6000", "10.0.0.2:6000"],
            "in the URL's order"
        );
        assert_eq!(hosts.per_host, Duration::from_secs(2));
        for host in &hosts.hosts {
            assert_eq!(host.config.get_ports(), [6000]);
            assert_eq!(host.config.get_hostaddrs().len(), 1);
        }
    }

    /// A host by name is tried at each of its addresses (the name kept, for TLS); one by
    /// address, or a socket directory, once.
    #[tokio::test]
    async fn a_host_by_name_is_tried_at_each_of_its_addresses() {
        let whole = parse("host=localhost,::1,/run/pg port=5433");
        let hosts = Hosts::new(&whole, Duration::from_secs(1), Duration::ZERO).expect("paired");
        for (i, name, address) in [
            (0, "localhost", "localhost:5433 ("),
            (1, "::1", "[::1]:5433 ("),
        ] {
            let tries = hosts.hosts[i].addresses().await.expect("resolves");
            assert!(!tries.is_empty());
            for (config, tried) in &tries {
                assert_eq!(
                    config.get_hosts(),
                    [Address::Tcp(name.into())],
                    "kept for TLS"
                );
                let [addr] = config.get_hostaddrs() else {
                    panic!("one address per try: {config:?}");
                };
                assert!(addr.is_loopback(), "{addr}");
                assert!(tried.starts_with(address), "{tried}");
            }
        }
        let by_address = Hosts::new(
            &parse("hostaddr=::1,10.0.0.1 port=5433"),
            Duration::from_secs(1),
            Duration::ZERO,
        )
        .expect("paired");
        let hosts = [
            (&hosts.hosts[2], "/run/pg:5433"),
            (&by_address.hosts[0], "[::1]:5433"),
        ];
        for (host, name) in hosts {
            let tries = host.addresses().await.expect("nothing to look up");
            assert_eq!(tries.len(), 1);
            assert_eq!(tries[0].0, host.config, "as it is");
            assert_eq!(tries[0].1, name);
        }
    }

    #[test]
    fn lists_that_do_not_pair_up_are_refused_with_what_to_give() {
        for url in [
            "host=a,b,c port=1,2",
            "host=a,b hostaddr=10.0.0.1",
            "hostaddr=10.0.0.1,10.0.0.2 port=1,2,3",
        ] {
            let config: Config = url.parse().expect("parses");
            let error = Hosts::new(&config, Duration::from_secs(1), Duration::ZERO).expect_err(url);
            assert!(error.to_string().contains("one per host"), "{error}");
        }
    }

    /// With `load_balance_hosts=random` every host comes first some of the time.
    #[test]
    fn random_order_starts_anywhere_and_keeps_every_host() {
        let hosts = Hosts::new(&parse("host=a,b,c"), Duration::from_secs(1), Duration::ZERO)
            .expect("paired");
        let mut first = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut turn = names(&hosts);
            first.insert(turn[0].clone());
            turn.sort();
            assert_eq!(turn, ["a:5432", "b:5432", "c:5432"], "every host once");
        }
        assert_eq!(first.len(), 3, "{first:?}");
    }
}
