//! The default policies shipped inside the binary. `build.rs` builds them from
//! `plugins/` for wasm32-wasip2; they are stored like uploaded plugins at start-up, so a
//! letter that names no policy uses these.

pub const DEFAULT_FILTER_NAME: &str = "default-filter";
pub const DEFAULT_TEMPLATE_NAME: &str = "default-template";

pub const DEFAULT_FILTER: &[u8] = include_bytes!(concat!(env!("LETTERBOX_WASM_DIR"), "/default_filter.wasm"));
pub const DEFAULT_TEMPLATE: &[u8] =
    include_bytes!(concat!(env!("LETTERBOX_WASM_DIR"), "/default_template.wasm"));
