//! Subscriber imports: CSV streamed from a reader, or JSON rows already parsed.
//!
//! Rows are validated one by one; a bad row is counted and reported (with its row
//! number and why) and the rest go on. Valid rows are upserted by email in batches of
//! `BATCH`, each one store operation, while the next batch is being parsed: a CSV file
//! of any length is imported in bounded memory (at most a few batches at once).
//!
//! A batch is committed before the next one is written, so an import cut short (the
//! client went away, a read failed) keeps what it committed; imports are upserts, so
//! sending the whole file again is safe.

use std::io::Read;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::domain::{ImportSummary, NewSubscriber, RowError};
use crate::mail;
use crate::store::{Store, StoreError};

/// Rows per store operation: large enough that the commit's fixed cost (~3 ms) is
/// spread thin, small enough to keep memory flat.
pub const BATCH: usize = 5_000;

/// Rejected rows listed in a summary; the rest are only counted.
pub const MAX_ERRORS_LISTED: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input as a whole is unusable (no `email` column, not CSV, unreadable).
    #[error("{0}")]
    Invalid(String),
    /// Reading the body failed part-way; `summary` is what was committed before.
    #[error("the upload stopped after {} rows were imported: {reason}", summary.inserted + summary.updated)]
    Interrupted { reason: String, summary: ImportSummary },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks one subscriber's fields; `Err` is the reason the row is refused.
pub fn subscriber(
    email: &str,
    name: Option<&str>,
    attributes: Map<String, Value>,
) -> Result<NewSubscriber, String> {
    checked(email, name, attributes).map(|(subscriber, _)| subscriber)
}

/// A display name as stored: line breaks and other control characters folded to
/// spaces (a name is one header line; real exports carry quoted line breaks), trimmed,
/// `None` when empty. The flag says whether anything but trimming changed it.
pub fn name(name: &str) -> (Option<String>, bool) {
    let folded = mail::fold_header_text(name);
    let changed = folded.as_ref() != name.trim();
    (Some(folded.into_owned()).filter(|n| !n.is_empty()), changed)
}

/// A name must fit on a header line whatever it holds (see `mail::MAX_NAME_CHARS`);
/// counted as given, so that the API's documented `maxLength` is the rule.
pub fn check_name_length(name: &str) -> Result<(), String> {
    let chars = name.chars().count();
    if chars > mail::MAX_NAME_CHARS {
        return Err(format!(
            "the name has {chars} characters; at most {} are allowed",
            mail::MAX_NAME_CHARS
        ));
    }
    Ok(())
}

/// [`subscriber`], and whether the name had to be folded.
fn checked(
    email: &str,
    raw_name: Option<&str>,
    attributes: Map<String, Value>,
) -> Result<(NewSubscriber, bool), String> {
    let email = mail::parse_address(email).map_err(|e| e.to_string())?;
    // PostgreSQL's text cannot hold NUL: the row is refused alike on every backend (a
    // name's control characters, NUL among them, are folded below instead).
    if let Some((key, _)) = attributes
        .iter()
        .find(|(key, value)| key.contains('\0') || crate::domain::nul_at(value, String::new()).is_some())
    {
        return Err(format!(
            "attribute {key:?} may not contain the NUL character (U+0000)"
        ));
    }
    if let Some(raw) = raw_name {
        check_name_length(raw)?;
    }
    let (name, folded) = raw_name.map(name).unwrap_or((None, false));
    Ok((
        NewSubscriber {
            email,
            name,
            attributes,
        },
        folded,
    ))
}

/// A batch of parsed rows on its way to the store.
struct Batch {
    rows: Vec<NewSubscriber>,
    errors: Vec<RowError>,
    rejected: u64,
    names_folded: u64,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            rows: Vec::with_capacity(BATCH),
            errors: Vec::new(),
            rejected: 0,
            names_folded: 0,
        }
    }

    fn accept(&mut self, (subscriber, folded): (NewSubscriber, bool)) {
        self.names_folded += u64::from(folded);
        self.rows.push(subscriber);
    }

    fn reject(&mut self, row: u64, line: Option<u64>, reason: String) {
        self.rejected += 1;
        self.errors.push(RowError { row, line, reason });
    }
}

/// Upserts a batch's valid rows and adds the outcome to `summary`, listing at most
/// `MAX_ERRORS_LISTED` refused rows.
async fn commit(
    store: &Store,
    newsletter_id: u64,
    batch: Batch,
    summary: &mut ImportSummary,
) -> Result<(), StoreError> {
    if !batch.rows.is_empty() {
        let stored = store.upsert_subscribers(newsletter_id, batch.rows).await?;
        summary.inserted += stored.inserted;
        summary.updated += stored.updated;
    }
    summary.rejected += batch.rejected;
    summary.names_folded += batch.names_folded;
    let room = MAX_ERRORS_LISTED.saturating_sub(summary.errors.len());
    summary.errors.extend(batch.errors.into_iter().take(room));
    Ok(())
}

/// JSON rows (each an object `{email, name?, attributes?}`), validated one by one.
pub async fn json(store: &Store, newsletter_id: u64, rows: Vec<Value>) -> Result<ImportSummary, ImportError> {
    store.newsletter(newsletter_id).await?;
    let mut summary = ImportSummary::default();
    let mut batch = Batch::new();
    for (i, row) in rows.into_iter().enumerate() {
        match json_row(row) {
            Ok(checked) => batch.accept(checked),
            Err(reason) => batch.reject(i as u64 + 1, None, reason),
        }
        if batch.rows.len() == BATCH {
            commit(
                store,
                newsletter_id,
                std::mem::replace(&mut batch, Batch::new()),
                &mut summary,
            )
            .await?;
        }
    }
    commit(store, newsletter_id, batch, &mut summary).await?;
    Ok(summary)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    email: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
}

fn json_row(row: Value) -> Result<(NewSubscriber, bool), String> {
    let row: JsonRow = serde_json::from_value(row).map_err(|e| e.to_string())?;
    checked(
        &row.email,
        row.name.as_deref(),
        row.attributes.unwrap_or_default(),
    )
}

/// Where each CSV column goes.
#[derive(Debug)]
struct Columns {
    email: usize,
    name: Option<usize>,
    /// (column, attribute name) for every other column.
    attributes: Vec<(usize, String)>,
    width: usize,
}

impl Columns {
    /// Reads the header row: an `email` column, an optional `name` column (any case),
    /// and attribute columns named as the header says.
    fn from_header(header: &csv::StringRecord) -> Result<Columns, String> {
        let mut seen = std::collections::HashSet::new();
        let (mut email, mut name, mut attributes) = (None, None, Vec::new());
        for (i, raw) in header.iter().enumerate() {
            let title = raw.trim().trim_start_matches('\u{feff}');
            if title.is_empty() {
                return Err(format!("column {} of the header row has no name", i + 1));
            }
            if !seen.insert(title.to_ascii_lowercase()) {
                return Err(format!("the header row names {title:?} twice"));
            }
            match title.to_ascii_lowercase().as_str() {
                "email" => email = Some(i),
                "name" => name = Some(i),
                _ => attributes.push((i, title.to_string())),
            }
        }
        let email =
            email.ok_or("the header row has no `email` column (expected: email, name, then attributes)")?;
        Ok(Columns {
            email,
            name,
            attributes,
            width: header.len(),
        })
    }

    fn row(&self, record: &csv::StringRecord) -> Result<(NewSubscriber, bool), String> {
        if record.len() != self.width {
            return Err(format!(
                "has {} fields where the header has {}",
                record.len(),
                self.width
            ));
        }
        let mut attributes = Map::new();
        for (i, key) in &self.attributes {
            // An empty cell is no value, not an empty string.
            if let Some(value) = record.get(*i).filter(|v| !v.is_empty()) {
                attributes.insert(key.clone(), Value::String(value.to_string()));
            }
        }
        let email = record.get(self.email).unwrap_or_default();
        checked(email, self.name.and_then(|i| record.get(i)), attributes)
    }
}

/// A CSV file (header row: `email`, `name`, then attribute columns; attribute values
/// are strings, empty cells are left out) from a blocking reader. Parsing runs on the
/// blocking pool; batches go to the store while the next is parsed.
pub async fn csv<R: Read + Send + 'static>(
    store: &Store,
    newsletter_id: u64,
    reader: R,
) -> Result<ImportSummary, ImportError> {
    store.newsletter(newsletter_id).await?;
    // Two batches queued behind the one being written: parsing never waits for a
    // commit, and memory stays at a few batches.
    let (tx, mut rx) = mpsc::channel::<Batch>(2);
    let parser = tokio::task::spawn_blocking(move || parse_csv(reader, tx));
    let mut summary = ImportSummary::default();
    while let Some(batch) = rx.recv().await {
        commit(store, newsletter_id, batch, &mut summary).await?;
    }
    store.imported(summary.inserted).await;
    match parser.await {
        Ok(Ok(())) => Ok(summary),
        Ok(Err(Parse::Header(reason))) => Err(ImportError::Invalid(reason)),
        Ok(Err(Parse::Read(reason))) => Err(ImportError::Interrupted { reason, summary }),
        Err(e) => Err(ImportError::Invalid(format!("the CSV parser failed: {e}"))),
    }
}

enum Parse {
    Header(String),
    Read(String),
}

fn parse_csv<R: Read>(reader: R, tx: mpsc::Sender<Batch>) -> Result<(), Parse> {
    let mut csv = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .from_reader(reader);
    let mut record = csv::StringRecord::new();
    let columns = match csv.read_record(&mut record) {
        Ok(true) => Columns::from_header(&record).map_err(Parse::Header)?,
        Ok(false) => return Err(Parse::Header("the file is empty; expected a header row".into())),
        Err(e) => return Err(Parse::Header(format!("the header row: {e}"))),
    };
    let mut batch = Batch::new();
    let mut number = 0u64;
    loop {
        number += 1;
        match csv.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map(|p| p.line());
                match columns.row(&record) {
                    Ok(checked) => batch.accept(checked),
                    Err(reason) => batch.reject(number, line, reason),
                }
            }
            // Not UTF-8: this row only. Anything else is the input failing.
            Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => {
                let line = e.position().map(|p| p.line());
                batch.reject(number, line, "is not valid UTF-8".into());
            }
            Err(e) => return Err(Parse::Read(e.to_string())),
        }
        if batch.rows.len() + batch.errors.len() >= BATCH {
            let full = std::mem::replace(&mut batch, Batch::new());
            if tx.blocking_send(full).is_err() {
                // The importer stopped (a store error); it reports why.
                return Ok(());
            }
        }
    }
    let _ = tx.blocking_send(batch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_folded_to_one_line() {
        assert_eq!(name("  Ann Lee "), (Some("Ann Lee".into()), false));
        assert_eq!(
            name("Eve\r\nBcc: x@example.org"),
            (Some("Eve Bcc: x@example.org".into()), true)
        );
        assert_eq!(name("Ann \n Lee\t"), (Some("Ann Lee".into()), true));
        assert_eq!(name("\u{0}\u{7f}"), (None, true));
        assert_eq!(name(" "), (None, false));
        assert_eq!(name("Zoë\u{2028}Ng"), (Some("Zoë Ng".into()), true));
    }

    fn header(fields: &[&str]) -> Result<Columns, String> {
        Columns::from_header(&csv::StringRecord::from(fields.to_vec()))
    }

    #[test]
    fn header_columns_are_found_in_any_case_and_order() {
        // A spreadsheet's UTF-8 byte order mark must not hide the first column's name.
        let columns = header(&["\u{feff}Email", "plan", " Name "]).unwrap();
        assert_eq!((columns.email, columns.name), (0, Some(2)));
        assert_eq!(columns.attributes, vec![(1, "plan".to_string())]);
        assert!(header(&["name", "plan"]).unwrap_err().contains("email"));
        assert!(header(&["email", ""]).unwrap_err().contains("column 2"));
        assert!(header(&["email", "EMAIL"]).unwrap_err().contains("twice"));
    }

    #[test]
    fn empty_cells_are_no_attribute() {
        let columns = header(&["email", "name", "plan", "city"]).unwrap();
        let (row, folded) = columns
            .row(&csv::StringRecord::from(vec!["a@example.org", "", "pro", ""]))
            .unwrap();
        assert_eq!((row.name, folded), (None, false));
        assert_eq!(
            Value::Object(row.attributes),
            serde_json::json!({ "plan": "pro" })
        );
    }
}
