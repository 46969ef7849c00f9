//! Pure request-body parsers: bytes + Content-Type → validated [`Increment`]s.
//!
//! No I/O and no state, so they can be fuzzed and table-tested. Well-formedness errors
//! (400) are told apart from wrong or missing values (422) with serde_json's error
//! classification.

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::error::ApiError;
use crate::key::{Increment, Key};

/// Body formats tally reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json` (or any `+json` type).
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// `application/x-ndjson`: one JSON object per line.
    Ndjson,
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_batch_items: usize,
    /// `--max-body-bytes`: checked against `Content-Length` before the body is read.
    pub max_body_bytes: usize,
}

/// One increment as it travels on the wire: a JSON object (not an array of its values) or
/// a form. Unknown fields are ignored.
#[derive(utoipa::ToSchema)]
#[schema(as = Increment, example = json!({"key": "page:home", "value": 1}))]
pub(crate) struct Wire {
    /// The counter: non-empty UTF-8 of at most `--max-key-bytes` bytes (default 256),
    /// without NUL.
    #[schema(min_length = 1, max_length = 256, pattern = "^[^\\u0000]+$")]
    key: String,
    /// The delta to add: a signed 64-bit integer (negative decrements).
    #[schema(format = Int64)]
    value: i64,
}

/// [`Wire`]'s fields, as serde's derive reads them.
#[derive(Deserialize)]
struct Fields {
    key: String,
    value: i64,
}

impl<'de> Deserialize<'de> for Wire {
    /// An object only: serde's derive would also take `["k", 1]`, the fields by position,
    /// which is not the contract.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly;
        impl<'de> Visitor<'de> for ObjectOnly {
            type Value = Wire;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"an object {"key": …, "value": …}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Wire, A::Error> {
                let Fields { key, value } = Fields::deserialize(MapAccessDeserializer::new(map))?;
                Ok(Wire { key, value })
            }
        }
        deserializer.deserialize_map(ObjectOnly)
    }
}

/// Refuses a form whose percent-escapes do not decode to UTF-8 (`key=%ff`): decoded
/// lossily, distinct byte strings would share one counter, where a JSON body with invalid
/// UTF-8 is refused.
fn check_form_utf8(body: &[u8]) -> Result<(), ApiError> {
    for part in body.split(|&b| b == b'&' || b == b'=') {
        if percent_encoding::percent_decode(part)
            .decode_utf8()
            .is_err()
        {
            return Err(ApiError::Invalid(format!(
                "form body: {:?} does not decode to UTF-8",
                String::from_utf8_lossy(part)
            )));
        }
    }
    Ok(())
}

impl Wire {
    fn validate(self, limits: &Limits) -> Result<Increment, ApiError> {
        let key = Key::parse(self.key, limits.max_key_bytes)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        Ok(Increment {
            key,
            delta: self.value,
        })
    }
}

/// Reads the Content-Type's media type and checks that it is one of `accepted`.
///
/// # Errors
///
/// `ApiError::UnsupportedMediaType` (415) naming what the route accepts.
pub fn format(content_type: Option<&str>, accepted: &[Format]) -> Result<Format, ApiError> {
    let essence = content_type
        .and_then(|ct| ct.split(';').next())
        .map_or("", str::trim);
    // Compared without lowercasing into a new string: this runs once per request.
    let is = |name: &str| essence.eq_ignore_ascii_case(name);
    let found = if is("application/x-www-form-urlencoded") {
        Some(Format::Form)
    } else if is("application/x-ndjson") || is("application/jsonl") {
        Some(Format::Ndjson)
    } else if is("application/json") || is_json_suffix(essence) {
        Some(Format::Json)
    } else {
        None
    };
    found.filter(|f| accepted.contains(f)).ok_or_else(|| {
        let names: Vec<&str> = accepted
            .iter()
            .map(|f| match f {
                Format::Json => "application/json",
                Format::Form => "application/x-www-form-urlencoded",
                Format::Ndjson => "application/x-ndjson",
            })
            .collect();
        let got = if essence.is_empty() {
            "no Content-Type".to_owned()
        } else {
            format!("Content-Type {:?}", essence.to_ascii_lowercase())
        };
        ApiError::UnsupportedMediaType(format!("got {got}; send one of: {}", names.join(", ")))
    })
}

/// `application/<anything>+json`, in any case.
fn is_json_suffix(essence: &str) -> bool {
    let bytes = essence.as_bytes();
    bytes.len() > "application/+json".len()
        && bytes[..12].eq_ignore_ascii_case(b"application/")
        && bytes[bytes.len() - 5..].eq_ignore_ascii_case(b"+json")
}

fn json_error(e: &serde_json::Error, context: &str) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => ApiError::Invalid(format!("{context}{e}")),
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::Malformed(format!("{context}{e}"))
        }
    }
}

/// Parses the body of `POST /increment`: one JSON object or a form.
///
/// # Errors
///
/// 400 for malformed JSON, 422 for a missing/ill-typed field or an invalid key.
pub fn parse_one(format: Format, body: &[u8], limits: &Limits) -> Result<Increment, ApiError> {
    let wire: Wire = match format {
        Format::Json | Format::Ndjson => {
            serde_json::from_slice(body).map_err(|e| json_error(&e, ""))?
        }
        Format::Form => {
            check_form_utf8(body)?;
            serde_urlencoded::from_bytes(body)
                .map_err(|e| ApiError::Invalid(format!("form body: {e}")))?
        }
    };
    wire.validate(limits)
}

/// Parses the body of `POST /increments`: a JSON array of objects, or NDJSON. Validates
/// every item before returning, so the caller can accept all or none.
///
/// # Errors
///
/// 400 / 422 as [`parse_one`], naming the item; 413 if there are more items than allowed.
pub fn parse_many(
    format: Format,
    body: &[u8],
    limits: &Limits,
) -> Result<Vec<Increment>, ApiError> {
    let wires: Vec<Wire> = match format {
        Format::Json => serde_json::from_slice(body).map_err(|e| json_error(&e, ""))?,
        Format::Ndjson => body
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, line)| !line.trim_ascii().is_empty())
            .map(|(n, line)| {
                serde_json::from_slice(line)
                    .map_err(|e| json_error(&e, &format!("line {}: ", n + 1)))
            })
            .collect::<Result<_, _>>()?,
        Format::Form => {
            return Err(ApiError::UnsupportedMediaType(
                "batches are JSON or NDJSON".into(),
            ));
        }
    };
    if wires.len() > limits.max_batch_items {
        return Err(ApiError::TooLarge(format!(
            "batch has {} items; the limit is {} (--max-batch-items)",
            wires.len(),
            limits.max_batch_items
        )));
    }
    wires
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            w.validate(limits)
                .map_err(|e| ApiError::Invalid(format!("item {i}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_body_bytes: 4096,
        max_key_bytes: 8,
        max_batch_items: 3,
    };

    fn one(format: Format, body: &str) -> Result<Increment, ApiError> {
        parse_one(format, body.as_bytes(), &LIMITS)
    }

    #[test]
    fn reads_json_and_form() {
        let want = Increment {
            key: Key::parse("abc", 8).expect("valid"),
            delta: -5,
        };
        assert_eq!(
            one(Format::Json, r#"{"key":"abc","value":-5}"#).ok(),
            Some(want.clone())
        );
        assert_eq!(one(Format::Form, "key=abc&value=-5").ok(), Some(want));
        // Escaped UTF-8 and `+` still read as they should.
        assert_eq!(
            one(Format::Form, "key=%C3%A9+x&value=1")
                .map(|i| i.key.as_str().to_owned())
                .ok(),
            Some("é x".to_owned())
        );
    }

    #[test]
    fn tells_malformed_from_invalid() {
        let cases: &[(Format, &str, &str)] = &[
            (Format::Json, r#"{"key":"a","value":1"#, "400"),
            (Format::Json, "not json", "400"),
            (Format::Json, "", "400"),
            (Format::Json, r#"{"key":"a"}"#, "422"),
            (Format::Json, r#"{"value":1}"#, "422"),
            (Format::Json, r#"{"key":"a","value":1.5}"#, "422"),
            (Format::Json, r#"{"key":"a","value":"1"}"#, "422"),
            (
                Format::Json,
                r#"{"key":"a","value":9223372036854775808}"#,
                "422",
            ),
            (Format::Json, r#"{"key":1,"value":1}"#, "422"),
            (Format::Json, r#"{"key":"","value":1}"#, "422"),
            (Format::Json, r#"{"key":"123456789","value":1}"#, "422"),
            (Format::Json, r#"{"key":"a\u0000","value":1}"#, "422"),
            (Format::Json, "[]", "422"),
            (Format::Json, r#"["a", 1]"#, "422"),
            (Format::Form, "key=a", "422"),
            (Format::Form, "key=%ff&value=1", "422"),
            (Format::Form, "key=a&value=1&x=%c3%28", "422"),
            (Format::Form, "key=a&value=x", "422"),
            (Format::Form, "key=&value=1", "422"),
        ];
        for (format, body, want) in cases {
            let got = match one(*format, body) {
                Err(ApiError::Malformed(_)) => "400",
                Err(ApiError::Invalid(_)) => "422",
                other => panic!("{body:?}: unexpected {other:?}"),
            };
            assert_eq!(got, *want, "body {body:?}");
        }
    }

    #[test]
    fn batches_are_all_or_nothing_and_bounded() {
        let ok = parse_many(
            Format::Json,
            br#"[{"key":"a","value":1},{"key":"b","value":2}]"#,
            &LIMITS,
        );
        assert_eq!(ok.map(|v| v.len()).ok(), Some(2));
        let nd = parse_many(
            Format::Ndjson,
            b"{\"key\":\"a\",\"value\":1}\n\n{\"key\":\"b\",\"value\":2}\n",
            &LIMITS,
        );
        assert_eq!(nd.map(|v| v.len()).ok(), Some(2));
        let bad = parse_many(
            Format::Json,
            br#"[{"key":"a","value":1},{"key":"","value":2}]"#,
            &LIMITS,
        );
        assert!(matches!(bad, Err(ApiError::Invalid(m)) if m.starts_with("item 1")));
        let nd_bad = parse_many(
            Format::Ndjson,
            b"{\"key\":\"a\",\"value\":1}\n{oops\n",
            &LIMITS,
        );
        assert!(matches!(nd_bad, Err(ApiError::Malformed(m)) if m.starts_with("line 2")));
        let many = parse_many(
            Format::Json,
            &serde_json::to_vec(&vec![serde_json::json!({"key":"a","value":1}); 4]).expect("json"),
            &LIMITS,
        );
        assert!(matches!(many, Err(ApiError::TooLarge(_))));
    }

    #[test]
    fn reads_content_types() {
        let all = [Format::Json, Format::Form];
        assert_eq!(
            format(Some("application/json; charset=utf-8"), &all).ok(),
            Some(Format::Json)
        );
        assert_eq!(
            format(Some("Application/JSON"), &all).ok(),
            Some(Format::Json)
        );
        assert_eq!(
            format(Some("application/x-www-form-urlencoded"), &all).ok(),
            Some(Format::Form)
        );
        assert!(format(Some("text/plain"), &all).is_err());
        assert!(format(None, &all).is_err());
        assert!(format(Some("application/x-ndjson"), &all).is_err());
    }
}
