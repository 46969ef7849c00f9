//! Authorization: the static bearer token and JWTs (HS256, ES256, RS256), and which routes
//! stay open.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tally::config::Secret;
use tally::startup::App;

use crate::app::TestApp;
use crate::support::{self, client, expect_error, increment};

const TOKEN: &str = "test-static-token-0123456789";
const SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/hardening/fixtures")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Claims valid for an hour, with `extra` merged in (a `null` removes a claim).
fn claims(extra: Value) -> Value {
    let mut claims = json!({"sub": "client-a", "exp": now() + 3600, "iat": now()});
    for (k, v) in extra.as_object().expect("object").clone() {
        if v.is_null() {
            claims.as_object_mut().expect("object").remove(&k);
        } else {
            claims[k] = v;
        }
    }
    claims
}

fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign HS256")
}

fn signed_with_fixture(alg: Algorithm, private: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(private)).expect("read fixture");
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .expect("fixture key");
    jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("sign")
}

async fn start_with(configure: impl FnOnce(&mut tally::config::Config)) -> TestApp {
    let (mut config, dir) = support::config();
    configure(&mut config);
    support::start((config, dir)).await
}

#[tokio::test]
async fn without_a_valid_static_token_every_route_but_the_probes_answers_401() {
    let server = start_with(|c| c.auth.token = Some(Secret::new(TOKEN))).await;
    let client = client();

    let missing = increment(&client, &server, None).await;
    assert_eq!(
        missing.headers()["www-authenticate"],
        r#"Bearer realm="tally""#
    );
    expect_error(missing, 401, "unauthorized").await;

    let wrong = increment(&client, &server, Some("test-static-token-0123456780")).await;
    assert_eq!(
        wrong.headers()["www-authenticate"],
        r#"Bearer realm="tally", error="invalid_token""#
    );
    expect_error(wrong, 401, "unauthorized").await;

    let basic = client
        .post(server.url("/increment"))
        .basic_auth("user", Some(TOKEN))
        .json(&json!({"key": "k", "value": 1}))
        .send()
        .await
        .expect("sent");
    expect_error(basic, 401, "unauthorized").await;

    for path in ["/counters/k", "/metrics", "/openapi.json", "/no-such-route"] {
        let response = client.get(server.url(path)).send().await.expect("sent");
        expect_error(response, 401, "unauthorized").await;
    }
    for path in ["/healthz", "/readyz"] {
        let response = client.get(server.url(path)).send().await.expect("sent");
        assert_eq!(response.status(), 200, "{path} stays open");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_static_token_grants_every_route() {
    let server = start_with(|c| c.auth.token = Some(Secret::new(TOKEN))).await;
    let client = client();
    assert_eq!(increment(&client, &server, Some(TOKEN)).await.status(), 202);
    let batch = client
        .post(server.url("/increments"))
        .bearer_auth(TOKEN)
        .json(&json!([{"key": "k", "value": 2}]))
        .send()
        .await
        .expect("sent");
    assert_eq!(batch.status(), 202);
    let counter: Value = client
        .get(server.url("/counters/k"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(counter["value"], 3);
    for path in ["/metrics", "/openapi.json"] {
        let response = client
            .get(server.url(path))
            .header("authorization", format!("bearer {TOKEN}"))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 200, "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn hs256_jwts_are_checked_for_signature_exp_and_nbf() {
    let server = start_with(|c| c.auth.jwt_secret = Some(Secret::new(SECRET))).await;
    let client = client();

    let good = hs256(&claims(json!({})), SECRET);
    assert_eq!(increment(&client, &server, Some(&good)).await.status(), 202);
    let no_sub = hs256(&claims(json!({"sub": null})), SECRET);
    assert_eq!(
        increment(&client, &server, Some(&no_sub)).await.status(),
        202
    );

    let cases = [
        (
            "wrong secret",
            hs256(&claims(json!({})), "another-secret-0123456789abcdef0123"),
        ),
        (
            "expired an hour ago",
            hs256(&claims(json!({"exp": now() - 3600})), SECRET),
        ),
        ("no exp", hs256(&claims(json!({"exp": null})), SECRET)),
        (
            "valid only in an hour",
            hs256(&claims(json!({"nbf": now() + 3600})), SECRET),
        ),
        ("not a JWT", "abc.def.ghi".to_owned()),
        ("tampered payload", {
            let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
            let other = hs256(
                &claims(json!({"sub": "admin"})),
                "x-secret-0123456789abcdef0123456789",
            );
            parts[1] = other.split('.').nth(1).expect("payload").to_owned();
            parts.join(".")
        }),
        ("alg none", {
            let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
            let payload = good.split('.').nth(1).expect("payload");
            format!("{header}.{payload}.")
        }),
    ];
    for (what, token) in cases {
        let response = increment(&client, &server, Some(&token)).await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="tally", error="invalid_token""#,
            "{what}"
        );
        let body = expect_error(response, 401, "unauthorized").await;
        eprintln!("{what}: {}", body["message"]);
    }
    let expired = increment(
        &client,
        &server,
        Some(&hs256(&claims(json!({"exp": now() - 3600})), SECRET)),
    )
    .await;
    let body = expect_error(expired, 401, "unauthorized").await;
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("exp")),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test]
async fn configured_audience_and_issuer_are_required() {
    let server = start_with(|c| {
        c.auth.jwt_secret = Some(Secret::new(SECRET));
        c.auth.jwt_audience = vec!["tally".to_owned(), "tally-staging".to_owned()];
        c.auth.jwt_issuer = vec!["https://idp.example".to_owned()];
    })
    .await;
    let client = client();
    let good = json!({"aud": "tally", "iss": "https://idp.example"});
    assert_eq!(
        increment(&client, &server, Some(&hs256(&claims(good), SECRET)))
            .await
            .status(),
        202
    );
    let list_aud = json!({"aud": ["other", "tally-staging"], "iss": "https://idp.example"});
    assert_eq!(
        increment(&client, &server, Some(&hs256(&claims(list_aud), SECRET)))
            .await
            .status(),
        202
    );
    for (what, extra, word) in [
        (
            "wrong aud",
            json!({"aud": "billing", "iss": "https://idp.example"}),
            "aud",
        ),
        ("missing aud", json!({"iss": "https://idp.example"}), "aud"),
        (
            "wrong iss",
            json!({"aud": "tally", "iss": "https://evil.example"}),
            "iss",
        ),
        ("missing iss", json!({"aud": "tally"}), "iss"),
    ] {
        let response = increment(&client, &server, Some(&hs256(&claims(extra), SECRET))).await;
        let body = expect_error(response, 401, "unauthorized").await;
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(word)),
            "{what}: {body}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn es256_and_rs256_jwts_verify_against_the_configured_public_key() {
    for (alg, public, private, other_private) in [
        (
            Algorithm::ES256,
            "es256-public.pem",
            "es256-private.pem",
            "rs256-private.pem",
        ),
        (
            Algorithm::RS256,
            "rs256-public.pem",
            "rs256-private.pem",
            "es256-private.pem",
        ),
    ] {
        let server = start_with(|c| c.auth.jwt_public_key = Some(fixture(public))).await;
        let client = client();
        let good = signed_with_fixture(alg, private, &claims(json!({})));
        assert_eq!(
            increment(&client, &server, Some(&good)).await.status(),
            202,
            "{alg:?}"
        );
        let expired = signed_with_fixture(alg, private, &claims(json!({"exp": now() - 3600})));
        expect_error(
            increment(&client, &server, Some(&expired)).await,
            401,
            "unauthorized",
        )
        .await;

        // A token of the other family, signed with a key tally does not know.
        let other_alg = if alg == Algorithm::ES256 {
            Algorithm::RS256
        } else {
            Algorithm::ES256
        };
        let foreign = signed_with_fixture(other_alg, other_private, &claims(json!({})));
        expect_error(
            increment(&client, &server, Some(&foreign)).await,
            401,
            "unauthorized",
        )
        .await;

        // Algorithm confusion: HS256 "signed" with the public key as HMAC secret.
        let pem = std::fs::read_to_string(fixture(public)).expect("public key");
        let confused = hs256(&claims(json!({})), &pem);
        expect_error(
            increment(&client, &server, Some(&confused)).await,
            401,
            "unauthorized",
        )
        .await;
        server.stop().await;
    }
}

#[tokio::test]
async fn a_static_token_and_jwts_can_be_accepted_side_by_side() {
    let server = start_with(|c| {
        c.auth.token = Some(Secret::new(TOKEN));
        c.auth.jwt_secret = Some(Secret::new(SECRET));
    })
    .await;
    let client = client();
    assert_eq!(increment(&client, &server, Some(TOKEN)).await.status(), 202);
    let jwt = hs256(&claims(json!({})), SECRET);
    assert_eq!(increment(&client, &server, Some(&jwt)).await.status(), 202);
    expect_error(
        increment(&client, &server, Some("not-the-token-0123456789")).await,
        401,
        "unauthorized",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn an_unusable_public_key_stops_start_up_naming_the_flag() {
    for path in [fixture("does-not-exist.pem"), fixture("README.md")] {
        let (mut config, _dir) = support::config();
        config.auth.jwt_public_key = Some(path.clone());
        let error = match App::build(config).await {
            Ok(_) => panic!("{} must be refused", path.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(error.contains("--jwt-public-key"), "{error}");
    }
}

/// Failed authorizations a client may make at once (tally's `FAILURE_BURST`).
const FAILURE_BURST: usize = 20;

/// Forged tokens spend a per-client budget of failures, checked before any signature work:
/// past it the client gets 429 with `Retry-After` without its token being verified (even a
/// valid one), and once the budget refills a valid token works again.
#[tokio::test]
async fn failed_authorizations_are_throttled_before_verification() {
    let server = start_with(|c| c.auth.jwt_secret = Some(Secret::new(SECRET.to_owned()))).await;
    let client = client();
    let forged = hs256(
        &claims(json!({})),
        "not-the-secret-0123456789abcdef0123456789",
    );
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let response = increment(&client, &server, Some(&forged)).await;
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(response.status().as_u16());
    }
    let refused = statuses.iter().filter(|&&s| s == 401).count();
    let throttled = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(refused + throttled, 100, "{statuses:?}");
    assert!(
        (FAILURE_BURST..=FAILURE_BURST + 10).contains(&refused),
        "about one burst of 401s, then 429s: {refused} × 401"
    );
    let valid = hs256(&claims(json!({})), SECRET);
    let throttled_valid = increment(&client, &server, Some(&valid)).await;
    assert_eq!(throttled_valid.status(), 429, "checked before the token");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let later = increment(&client, &server, Some(&valid)).await;
    assert_eq!(later.status(), 202, "the budget refills");
    server.stop().await;
}
