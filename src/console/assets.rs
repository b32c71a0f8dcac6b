//! The console's static files, embedded in the binary. Each is served under a name that
//! carries a hash of its content, so a browser may keep it for ever and still never
//! runs an old script against a new page.

use std::sync::LazyLock;

use sha2::{Digest, Sha256};

/// One embedded file.
pub struct Asset {
    /// The path it is served at, `/console/assets/NAME.HASH.EXT`.
    pub path: String,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

const FILES: &[(&str, &str, &str, &[u8])] = &[
    (
        "console",
        "css",
        "text/css; charset=utf-8",
        include_bytes!("assets/console.css"),
    ),
    (
        "console",
        "js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/console.js"),
    ),
    ("icon", "svg", "image/svg+xml", include_bytes!("assets/icon.svg")),
];

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|(name, ext, content_type, bytes)| Asset {
            path: format!(
                "/console/assets/{name}.{}.{ext}",
                &hex::encode(Sha256::digest(bytes))[..12]
            ),
            content_type,
            bytes,
        })
        .collect()
});

/// The asset served at `path`, if any.
pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Where `name.ext` is served (`console.css` → `/console/assets/console.1a2b….css`).
pub fn url(file: &str) -> &'static str {
    ASSETS
        .iter()
        .zip(FILES)
        .find(|(_, (name, ext, _, _))| file.strip_prefix(name).and_then(|r| r.strip_prefix('.')) == Some(ext))
        .map(|(asset, _)| asset.path.as_str())
        .unwrap_or("/console/assets/missing")
}
