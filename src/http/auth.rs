//! Bearer-token authorization: a static token (`--auth-token`) and/or JWTs verified against a
//! configured key (`--jwt-secret` for HS256, `--jwt-public-key` for RS256/ES256).
//!
//! When any credential is configured, the [`Guard`](super::guard::Guard) runs in front of every route except
//! `/healthz` and `/readyz` (load balancers probe those without credentials). A request
//! without a valid `Authorization: Bearer <token>` header gets `401` JSON with
//! `WWW-Authenticate: Bearer realm="tally"` (plus `error="invalid_token"` when a token was sent
//! and refused, as RFC 6750 §3 asks). When nothing is configured the layer is not installed
//! at all, so an open tally pays nothing for this module.
//!
//! Order of checks for a presented token:
//! 1. The static token, compared in constant time ([`subtle`]): a plain `==` returns at the
//!    first differing byte, and the time that takes tells an attacker how many leading bytes
//!    they guessed right. Only the length can leak, which says nothing useful about a
//!    token of 16+ random characters.
//! 2. A JWT: the header's `alg` picks the key (HS* the secret, RS*/PS*/ES* the public key),
//!    so a token can never make tally verify an HMAC with the public key as secret (the
//!    classic algorithm-confusion attack; `jsonwebtoken` also refuses a key of the wrong
//!    family). `exp` is required; `exp` and `nbf` are checked with [`JWT_LEEWAY_SECONDS`] of
//!    leeway; `aud` and `iss` are required and checked when `--jwt-audience` /
//!    `--jwt-issuer` are set.
//!
//! **Failed authorizations are throttled before any verification**: each client (peer
//! address, or with `--trust-proxy` the address the proxy appended) has a budget of
//! [`FAILURE_BURST`] failures, refilled at [`FAILURES_PER_SECOND`]; once it is spent, the
//! client's requests get `429` with `Retry-After` without their token being looked at, so a
//! stream of forged tokens (an ES256 signature check costs ~300 µs) cannot keep a core busy.
//! The guards run in this order: this budget, the token, then the per-client rate limit
//! (`--rate-limit-per-second`, keyed by the verified subject when there is one).
//!
//! Verified JWTs are remembered (up to [`JWT_CACHE_CAPACITY`], keyed by the whole token),
//! so a client that reuses its token, as clients do until it expires, pays for the
//! signature check once: an ES256 verification costs about 300 µs of CPU, against about 15 µs
//! for a whole `POST /increment`. A remembered token is still refused once its `exp` (plus
//! leeway) has passed. Only tokens that verified are remembered, so garbage cannot fill the
//! cache, and a full shard is simply emptied (the next request of each client verifies
//! again).
//!
//! A valid JWT's `sub` travels on as a [`Subject`] request extension: the rate limiter keys
//! on it. The static token names no client (every holder sends the same string), so its
//! requests are limited per peer address instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ahash::RandomState;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::rate_limit::RateLimiter;
use crate::config::{Config, Secret};
use crate::metrics::Metrics;

/// Clock skew tolerated on `exp` and `nbf`. jsonwebtoken's default is 60s; 30s covers
/// NTP-synchronised hosts with room to spare while keeping expired tokens short-lived.
pub const JWT_LEEWAY_SECONDS: u64 = 30;

/// Failed authorizations a client may make at once before it is throttled.
pub const FAILURE_BURST: u32 = 20;

/// Failed authorizations per second a client may sustain.
pub const FAILURES_PER_SECOND: f64 = 2.0;

/// Most verified JWTs remembered at once. Tokens are a few hundred bytes, so the cache
/// stays under a few MB; 10,000 is far more distinct live tokens than one instance serves.
pub const JWT_CACHE_CAPACITY: usize = 10_000;

/// Independently locked parts of the JWT cache.
const JWT_CACHE_SHARDS: usize = 16;

/// Routes that never need a token: liveness and readiness probes.
pub fn is_open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// The authenticated subject of a request (a JWT's `sub`), as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(pub Arc<str>);

/// Why the configured credentials cannot be used. Reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// `--jwt-public-key` names a file that cannot be read.
    #[error("cannot read --jwt-public-key {path}: {source}")]
    ReadKey {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a PEM-encoded RSA or EC public key.
    #[error("--jwt-public-key {path} is not a PEM RSA or EC public key (RSA: {rsa}; EC: {ec})")]
    BadKey {
        path: String,
        rsa: jsonwebtoken::errors::Error,
        ec: jsonwebtoken::errors::Error,
    },
}

/// A JWT key and the validation rules that go with it.
struct JwtKey {
    key: DecodingKey,
    validation: Validation,
}

/// The configured credentials. Built once at start-up, shared by every request.
pub struct Auth {
    /// Failed authorizations per client, checked before verifying.
    failures: RateLimiter,
    static_token: Option<Secret>,
    /// HS256 key (`--jwt-secret`).
    hmac: Option<JwtKey>,
    /// RSA or EC key (`--jwt-public-key`).
    public: Option<JwtKey>,
    /// Tokens that verified: token → what it grants. Each lock is held for one lookup or
    /// insert, never across an await.
    verified: Box<[VerifiedShard]>,
    /// Picks the cache shard of a token.
    hasher: RandomState,
}

/// One part of the JWT cache: token → what it grants.
type VerifiedShard = Mutex<HashMap<Box<[u8]>, Verified, RandomState>>;

/// What a verified JWT grants, and until when.
#[derive(Clone)]
struct Verified {
    subject: Option<Subject>,
    /// `exp` in seconds since the Unix epoch.
    expires: u64,
}

/// The claims tally reads itself; jsonwebtoken validates `exp`/`nbf`/`aud`/`iss`.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Required by the validation; a number, possibly fractional (NumericDate).
    exp: f64,
}

impl Auth {
    /// The configured credentials, or `None` when authorization is off.
    ///
    /// # Errors
    ///
    /// When `--jwt-public-key` cannot be read or is not an RSA/EC public key in PEM.
    pub fn from_config(config: &Config) -> Result<Option<Self>, AuthConfigError> {
        if !config.auth_enabled() {
            return Ok(None);
        }
        let hmac = config.auth.jwt_secret.as_ref().map(|secret| JwtKey {
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation: validation(config, AlgorithmFamily::Hmac),
        });
        let public = match &config.auth.jwt_public_key {
            None => None,
            Some(path) => {
                let display = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| AuthConfigError::ReadKey {
                    path: display.clone(),
                    source,
                })?;
                let (key, family) = match DecodingKey::from_rsa_pem(&pem) {
                    Ok(key) => (key, AlgorithmFamily::Rsa),
                    Err(rsa) => match DecodingKey::from_ec_pem(&pem) {
                        Ok(key) => (key, AlgorithmFamily::Ec),
                        Err(ec) => {
                            return Err(AuthConfigError::BadKey {
                                path: display,
                                rsa,
                                ec,
                            });
                        }
                    },
                };
                Some(JwtKey {
                    key,
                    validation: validation(config, family),
                })
            }
        };
        Ok(Some(Self {
            failures: RateLimiter::new(
                FAILURES_PER_SECOND,
                FAILURE_BURST,
                config.rate_limit.max_clients.get(),
                config.rate_limit.trust_proxy,
            ),
            static_token: config.auth.token.clone(),
            hmac,
            public,
            verified: (0..JWT_CACHE_SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::new())))
                .collect(),
            hasher: RandomState::new(),
        }))
    }

    /// Checks an `Authorization` header. `Ok(Some(sub))` for a JWT with a subject,
    /// `Ok(None)` for the static token or a JWT without `sub`.
    ///
    /// # Errors
    ///
    /// [`ApiError::Unauthorized`] saying what is wrong (missing, not Bearer, expired, ...).
    pub fn verify(&self, authorization: Option<&HeaderValue>) -> Result<Option<Subject>, ApiError> {
        let Some(value) = authorization else {
            return Err(unauthorized(
                "this endpoint needs an Authorization: Bearer <token> header",
                false,
            ));
        };
        let token = bearer_token(value.as_bytes()).ok_or_else(|| {
            unauthorized("the Authorization header must be `Bearer <token>`", false)
        })?;
        if let Some(expected) = &self.static_token
            && bool::from(token.ct_eq(expected.expose().as_bytes()))
        {
            return Ok(None);
        }
        if self.hmac.is_none() && self.public.is_none() {
            return Err(unauthorized("the bearer token is not valid", true));
        }
        self.verify_jwt(token)
    }

    fn verify_jwt(&self, token: &[u8]) -> Result<Option<Subject>, ApiError> {
        let now = jsonwebtoken::get_current_timestamp();
        let shard = &self.verified[self.hasher.hash_one(token) as usize % self.verified.len()];
        // A poisoned lock only means a request panicked during a map operation; the map
        // of plain values is still consistent.
        let lock = || {
            shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        // A statement of its own, so the guard is dropped before `remove` locks again.
        let hit = lock().get(token).cloned();
        if let Some(hit) = hit {
            if hit.expires.saturating_add(JWT_LEEWAY_SECONDS) >= now {
                return Ok(hit.subject);
            }
            lock().remove(token);
        }
        let verified = self.verify_signed(token)?;
        let subject = verified.subject.clone();
        let mut cache = lock();
        if cache.len() >= JWT_CACHE_CAPACITY / JWT_CACHE_SHARDS {
            cache.clear();
        }
        cache.insert(token.into(), verified);
        Ok(subject)
    }

    /// The full check: signature, algorithm, `exp`, `nbf`, `aud`, `iss`.
    fn verify_signed(&self, token: &[u8]) -> Result<Verified, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| unauthorized("the bearer token is not valid", true))?;
        let key = match header.alg.family() {
            AlgorithmFamily::Hmac => self.hmac.as_ref(),
            AlgorithmFamily::Rsa | AlgorithmFamily::Ec => self.public.as_ref(),
            AlgorithmFamily::Ed => None,
        }
        .filter(|k| k.validation.algorithms.contains(&header.alg))
        .ok_or_else(|| {
            unauthorized(
                &format!("JWT algorithm {:?} is not accepted here", header.alg),
                true,
            )
        })?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| unauthorized(jwt_error_message(e.kind()), true))?;
        Ok(Verified {
            subject: data.claims.sub.map(|s| Subject(s.into())),
            // Saturating float-to-int: a negative or NaN exp cannot get here (validation
            // refused it), a huge one is "never".
            expires: data.claims.exp as u64,
        })
    }
}

/// Validation rules for one key family: the family's algorithms, `exp` required, `nbf`
/// checked when present, `aud`/`iss` required when configured.
fn validation(config: &Config, family: AlgorithmFamily) -> Validation {
    let mut validation = Validation::new_for_family(family);
    // EC keys sign with the curve's own hash: ES256 on P-256, ES384 on P-384. Both are
    // listed; a token signed for the other curve fails signature verification.
    if family == AlgorithmFamily::Ec {
        validation.algorithms = vec![Algorithm::ES256, Algorithm::ES384];
    }
    validation.leeway = JWT_LEEWAY_SECONDS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if config.auth.jwt_audience.is_empty() {
        // tally has no audience of its own to compare with; tokens are accepted whatever
        // their `aud`. Set --jwt-audience to refuse tokens minted for other services.
        validation.validate_aud = false;
    } else {
        validation.set_audience(&config.auth.jwt_audience);
        required.push("aud");
    }
    if !config.auth.jwt_issuer.is_empty() {
        validation.set_issuer(&config.auth.jwt_issuer);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 7235 §2.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn jwt_error_message(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the JWT has expired (exp)",
        ErrorKind::ImmatureSignature => "the JWT is not valid yet (nbf)",
        ErrorKind::InvalidAudience => "the JWT audience (aud) is not accepted",
        ErrorKind::InvalidIssuer => "the JWT issuer (iss) is not accepted",
        ErrorKind::InvalidSignature => "the JWT signature does not verify",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "the JWT has no exp claim",
            "aud" => "the JWT has no aud claim",
            "iss" => "the JWT has no iss claim",
            _ => "the JWT lacks a required claim",
        },
        ErrorKind::InvalidAlgorithm => "the JWT algorithm is not accepted here",
        _ => "the bearer token is not valid",
    }
}

fn unauthorized(message: &str, token_presented: bool) -> ApiError {
    ApiError::Unauthorized {
        message: message.to_owned(),
        token_presented,
    }
}

impl super::guard::Guard for Auth {
    /// Every route but the probes needs a valid bearer token; a JWT's subject goes on as a
    /// [`Subject`] extension for the rate limiter.
    fn check(&self, request: &mut Request) -> Result<(), ApiError> {
        if is_open(request.uri().path()) {
            return Ok(());
        }
        let client = self.failures.client_key(request);
        let now = Instant::now();
        if let Err(limited) = self.failures.peek(client, now) {
            Metrics::global().rate_limited.increment(1);
            return Err(ApiError::RateLimited {
                retry_after_seconds: limited.retry_after_seconds(),
            });
        }
        match self.verify(request.headers().get(header::AUTHORIZATION)) {
            Ok(Some(subject)) => {
                request.extensions_mut().insert(subject);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(refusal) => {
                // Spends one failure; the answer to this request is the 401 either way.
                let _ = self.failures.check(client, now);
                Err(refusal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bearer_scheme_case_insensitively() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token(b""), None);
    }

    #[test]
    fn a_static_token_must_match_exactly() {
        let mut config = Config::defaults();
        config.auth.token = Some(Secret::new("0123456789abcdef"));
        let auth = Auth::from_config(&config)
            .expect("valid config")
            .expect("auth is on");
        let header = |s: &str| HeaderValue::from_str(s).expect("header value");
        assert!(matches!(
            auth.verify(Some(&header("Bearer 0123456789abcdef"))),
            Ok(None)
        ));
        for bad in [
            "Bearer 0123456789abcdeF",
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Token 0123456789abcdef",
        ] {
            assert!(
                matches!(
                    auth.verify(Some(&header(bad))),
                    Err(ApiError::Unauthorized { .. })
                ),
                "{bad} must be refused"
            );
        }
        assert!(matches!(
            auth.verify(None),
            Err(ApiError::Unauthorized {
                token_presented: false,
                ..
            })
        ));
    }

    #[test]
    fn a_remembered_jwt_is_refused_once_it_expires() {
        let mut config = Config::defaults();
        config.auth.jwt_secret = Some(Secret::new("0123456789abcdef0123456789abcdef"));
        let auth = Auth::from_config(&config)
            .expect("valid config")
            .expect("auth is on");
        let now = jsonwebtoken::get_current_timestamp();
        let sign = |exp: u64| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &serde_json::json!({"sub": "a", "exp": exp}),
                &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            )
            .expect("sign")
        };
        let token = sign(now + 3600);
        for _ in 0..2 {
            let subject = auth.verify_jwt(token.as_bytes()).expect("valid");
            assert_eq!(subject, Some(Subject("a".into())));
        }
        // The cache answers for what it remembers: a string that never verified, planted
        // as if it had, is granted while unexpired...
        let remember = |token: &str, expires: u64| {
            let shard =
                &auth.verified[auth.hasher.hash_one(token.as_bytes()) as usize % JWT_CACHE_SHARDS];
            shard.lock().expect("lock").insert(
                token.as_bytes().into(),
                Verified {
                    subject: Some(Subject("planted".into())),
                    expires,
                },
            );
        };
        remember("planted.token.x", now + 3600);
        assert_eq!(
            auth.verify_jwt(b"planted.token.x").expect("remembered"),
            Some(Subject("planted".into()))
        );
        // ...and a remembered token whose exp has passed is refused, not granted from memory.
        let expired = sign(now - 3600);
        remember(&expired, now - 3600);
        assert!(auth.verify_jwt(expired.as_bytes()).is_err());
        remember("planted.token.x", now - 3600);
        assert!(auth.verify_jwt(b"planted.token.x").is_err());
    }

    #[test]
    fn authorization_is_off_without_credentials() {
        assert!(
            Auth::from_config(&Config::defaults())
                .expect("valid")
                .is_none()
        );
    }
}
