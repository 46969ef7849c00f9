//! An error and its causes on one line, each said once.
//!
//! Why not an error's `Display` alone, or anyhow's `{:#}`: the errors of the PostgreSQL
//! stack do not agree on where a cause is said. tokio-postgres shows only its kind ("db
//! error", "error connecting to server") and keeps the server's words ("FATAL: too many
//! connections for role …") or the socket's ("Connection refused") for `source()`, so a log
//! line of its `Display` says nothing an operator can act on. deadpool's pool error, on the
//! other hand, repeats its cause's text and returns it as `source()` too, so walking the
//! chain, as `{:#}` does, says the same thing twice or three times. [`Causes`] walks the
//! chain and adds a cause only when the text so far does not already hold it. It also keeps
//! to one line: the server's words come as `ERROR: …\nDETAIL: …\nHINT: …`, and a line
//! break inside a text log record would split it in two for journald, grep and log
//! shippers.

use std::error::Error;
use std::fmt;

/// `error: cause: cause's cause …` on one line (a line break becomes `; `), with every
/// cause already in the text left out.
pub struct Causes<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = one_line(self.0);
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let said = one_line(error);
            if !said.is_empty() && !text.contains(&said) {
                text.push_str(": ");
                text.push_str(&said);
            }
            cause = error.source();
        }
        f.write_str(&text)
    }
}

/// What `error` says, its lines joined by `; `.
fn one_line(error: &dyn Error) -> String {
    let said = error.to_string();
    if said.contains('\n') {
        said.lines()
            .map(str::trim_end)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    } else {
        said
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that says `text`, with or without its cause's text, and has `cause`.
    #[derive(Debug)]
    struct Layer {
        text: &'static str,
        says_cause: bool,
        cause: Option<Box<Layer>>,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)?;
            match &self.cause {
                Some(cause) if self.says_cause => write!(f, ": {cause}"),
                _ => Ok(()),
            }
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.cause.as_deref().map(|c| c as &(dyn Error + 'static))
        }
    }

    fn layer(text: &'static str, says_cause: bool, cause: Option<Layer>) -> Layer {
        Layer {
            text,
            says_cause,
            cause: cause.map(Box::new),
        }
    }

    #[test]
    fn a_cause_kept_for_source_only_is_said() {
        // tokio-postgres: "db error", the server's words only in `source()`.
        let server = layer("FATAL: too many connections for role \"t\"", false, None);
        let db = layer("db error", false, Some(server));
        assert_eq!(
            Causes(&db).to_string(),
            "db error: FATAL: too many connections for role \"t\""
        );
    }

    #[test]
    fn the_servers_detail_and_hint_stay_on_the_line() {
        // tokio-postgres' DbError: "ERROR: …\nDETAIL: …\nHINT: …".
        let server = layer(
            "FATAL: the database system is starting up\nDETAIL: Consistent recovery state has \
             not been yet reached.\nHINT: Wait.",
            false,
            None,
        );
        let db = layer("db error", false, Some(server));
        assert_eq!(
            Causes(&db).to_string(),
            "db error: FATAL: the database system is starting up; DETAIL: Consistent recovery \
             state has not been yet reached.; HINT: Wait."
        );
    }

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        // deadpool's pool error says its cause and returns it as `source()` as well.
        let server = layer("FATAL: no", false, None);
        let db = layer("db error", false, Some(server));
        let pool = layer("Error occurred while creating a new object", true, Some(db));
        let store = layer("store unavailable", true, Some(pool));
        assert_eq!(
            Causes(&store).to_string(),
            "store unavailable: Error occurred while creating a new object: db error: FATAL: no"
        );
    }
}
