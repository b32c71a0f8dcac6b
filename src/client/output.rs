//! What every command shares: printing an answer (JSON with `--json`, else text for
//! people), a JSON value as text, a value for a query string, and reading a file.

use std::path::Path;

use serde_json::Value;

use super::{Client, ClientError};

/// Prints `value` as JSON with `--json`, else the human text.
pub(super) fn print(client: &Client, value: &Value, human: impl FnOnce() -> String) {
    if client.json_output() {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        println!("{}", human());
    }
}

/// `value` for a query string.
pub(super) fn encode(value: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
}

/// A JSON string without its quotes (other values as JSON).
pub(super) fn text(value: &Value) -> String {
    value
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string())
}

pub(super) async fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| ClientError::Io(format!("cannot read {}: {e}", path.display())))
}

pub(super) async fn read_text(path: &Path) -> Result<String, ClientError> {
    String::from_utf8(read(path).await?)
        .map_err(|_| ClientError::Io(format!("{} is not UTF-8 text", path.display())))
}
