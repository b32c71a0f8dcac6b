//! The cheap look at an upload, before anything is compiled: is it a component, does
//! it import only what the host links, and does it export its kind's function? It reads
//! the outer component's import and export sections only (milliseconds for an 18 MB
//! Python component), so a component the host can never run is refused before it costs
//! seconds of compilation and hundreds of MiB. Whether the exported function has the
//! world's exact type is only known once it is compiled and linked (`PolicyHost::check`).

use wasmparser::{ComponentTypeRef, Encoding, Parser, Payload};

use super::PolicyError;
use crate::domain::PluginKind;

/// Interfaces the host links (prefixes of import names). Language runtimes import these
/// whether or not a policy uses them: Rust's std the cli, io, clocks, random and
/// filesystem interfaces, CPython also sockets. Every one is linked and grants nothing
/// at run time: no preopened directories, no environment or arguments, captured stdio,
/// and no network (TCP, UDP and name lookup are denied, every address check fails).
/// Anything else (HTTP, another host's interfaces) has no implementation here, so a
/// component importing it could never be instantiated: it is refused at upload.
pub const LINKED_IMPORTS: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:sockets/",
    "letterbox:policy/",
];

/// The custom section in which a component asks for more (or less) linear memory per
/// instance than the server's default: UTF-8 `memory_mib=N`. `letterbox plugin build`
/// writes it from `policy.toml`'s `memory_mib`, `plugin upload --memory-mib` adds it to
/// any component. Being in the bytes, the ask is part of the version (its sha256) and
/// travels with it to every node and through `letterbox migrate`.
pub const LIMITS_SECTION: &str = "letterbox:limits";

/// The most any component may ask for, whatever the server allows.
pub const MAX_MEMORY_MIB: u32 = 4096;

/// What the outer component imports and exports, and the memory it asks for.
#[derive(Debug, Default)]
pub struct Surface {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// From the `letterbox:limits` section, when there is one.
    pub memory_mib: Option<u32>,
}

/// The `memory_mib` of a `letterbox:limits` section's contents.
fn memory_ask(data: &[u8]) -> Result<u32, PolicyError> {
    let bad = || {
        PolicyError::InvalidComponent(format!(
            "its {LIMITS_SECTION} section must read memory_mib=N with N from 1 to {MAX_MEMORY_MIB}, \
             not {:?}",
            String::from_utf8_lossy(&data[..data.len().min(64)])
        ))
    };
    let text = std::str::from_utf8(data).map_err(|_| bad())?;
    let mib: u32 = text
        .trim()
        .strip_prefix("memory_mib=")
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    if !(1..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(bad());
    }
    Ok(mib)
}

/// `bytes` with a `letterbox:limits` section asking for `memory_mib` per instance
/// appended (a custom section may follow the component's last section). An older ask
/// is left in place and the last one counts.
pub fn with_memory_ask(mut bytes: Vec<u8>, memory_mib: u32) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let contents = format!("memory_mib={memory_mib}");
    let mut payload = Vec::new();
    leb128(LIMITS_SECTION.len(), &mut payload);
    payload.extend_from_slice(LIMITS_SECTION.as_bytes());
    payload.extend_from_slice(contents.as_bytes());
    bytes.push(0); // custom section
    leb128(payload.len(), &mut bytes);
    bytes.extend_from_slice(&payload);
    bytes
}

/// Reads the outer component's imports and exports, without validating function bodies.
pub fn surface(bytes: &[u8]) -> Result<Surface, PolicyError> {
    let invalid = |e: wasmparser::BinaryReaderError| PolicyError::InvalidComponent(e.to_string());
    if !bytes.starts_with(b"\0asm") {
        return Err(PolicyError::InvalidComponent(
            "these bytes are not WebAssembly (a component begins with \\0asm)".into(),
        ));
    }
    let mut surface = Surface::default();
    // Nested modules and components come as their own Version ... End runs; only the
    // outermost (depth 1) sections are the component's own imports and exports.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != Encoding::Component {
                    return Err(PolicyError::InvalidComponent(
                        "this is a core WebAssembly module, not a component: build it for \
                         wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
                            .into(),
                    ));
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::CustomSection(reader) if depth == 1 && reader.name() == LIMITS_SECTION => {
                surface.memory_mib = Some(memory_ask(reader.data())?);
            }
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.map_err(invalid)?;
                    // Types named at the top level (`recipient`, ...) need no provider.
                    if !matches!(import.ty, ComponentTypeRef::Type(_)) {
                        surface.imports.push(import.name.name.to_string());
                    }
                }
            }
            Payload::ComponentExportSection(reader) if depth == 1 => {
                for export in reader {
                    surface
                        .exports
                        .push(export.map_err(invalid)?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(PolicyError::InvalidComponent("the component ends early".into()));
    }
    Ok(surface)
}

/// The cheap checks of an upload of `kind`: a component, importing only what the host
/// links, exporting `kind`'s function (and not only the other kind's), asking for no
/// more memory per instance than `max_memory_mib`.
pub fn check(bytes: &[u8], kind: PluginKind, max_memory_mib: u32) -> Result<Surface, PolicyError> {
    let surface = surface(bytes)?;
    if let Some(mib) = surface.memory_mib
        && mib > max_memory_mib
    {
        return Err(PolicyError::TooMuchMemory {
            asked: mib,
            allowed: max_memory_mib,
        });
    }
    if let Some(name) = surface
        .imports
        .iter()
        .find(|name| !LINKED_IMPORTS.iter().any(|prefix| name.starts_with(prefix)))
    {
        return Err(PolicyError::RefusedImport { name: name.clone() });
    }
    let wanted = main_export(kind);
    if !surface.exports.iter().any(|e| e == wanted) {
        let other_kind = [PluginKind::Filter, PluginKind::Template, PluginKind::Automation]
            .into_iter()
            .find(|k| surface.exports.iter().any(|e| e == main_export(*k)));
        let detail = match other_kind {
            Some(other_kind) => format!(
                "it exports `{}`, the {other_kind} world's function; upload it with kind={other_kind}",
                main_export(other_kind)
            ),
            None => format!(
                "the {kind} world expects an exported function `{wanted}`, the component exports {:?}",
                surface.exports
            ),
        };
        return Err(PolicyError::WrongWorld { kind, detail });
    }
    Ok(surface)
}

/// The export that tells a kind's world from the others.
fn main_export(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Filter => "filter",
        PluginKind::Template => "render",
        PluginKind::Automation => "on-event",
    }
}

/// The `letterbox:policy` version a component was built against, by the types interface
/// it imports ("0.1", "0.2" or "0.3"); `None` when it imports none.
pub fn wit_version(surface: &Surface) -> Option<&'static str> {
    surface.imports.iter().find_map(|import| {
        let version = import.strip_prefix("letterbox:policy/")?.split_once('@')?.1;
        ["0.1", "0.2", "0.3"]
            .into_iter()
            .find(|v| version.strip_prefix(v).is_some_and(|rest| rest.starts_with('.')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn reads_only_the_outer_components_surface() {
        let bytes = component(
            r#"(component
                (import "wasi:sockets/tcp@0.2.9" (instance))
                (type $r (record (field "id" u64)))
                (import "recipient" (type (eq $r)))
                (component $inner (import "inner-only" (instance)))
                (core module $m (func (export "f")))
                (core instance $i (instantiate $m))
                (func $f (canon lift (core func $i "f")))
                (export "filter" (func $f)))"#,
        );
        let surface = surface(&bytes).unwrap();
        assert_eq!(surface.imports, ["wasi:sockets/tcp@0.2.9"]);
        assert_eq!(surface.exports, ["filter"]);
        // Sockets are linked (and denied at run time), so this passes the cheap check.
        check(&bytes, PluginKind::Filter, MAX_MEMORY_MIB).unwrap();
    }

    #[test]
    fn refuses_what_cannot_run_before_compiling() {
        let http = component(r#"(component (import "wasi:http/outgoing-handler@0.2.0" (instance)))"#);
        let e = check(&http, PluginKind::Filter, MAX_MEMORY_MIB).unwrap_err();
        assert!(
            matches!(e, PolicyError::RefusedImport { ref name } if name.starts_with("wasi:http/")),
            "{e}"
        );

        let core = b"\0asm\x01\0\0\0".to_vec();
        let e = check(&core, PluginKind::Filter, MAX_MEMORY_MIB).unwrap_err();
        assert!(e.to_string().contains("core WebAssembly module"), "{e}");

        let e = check(b"definitely not wasm", PluginKind::Filter, MAX_MEMORY_MIB).unwrap_err();
        assert!(e.to_string().contains("not WebAssembly"), "{e}");

        let e = check(&http[..http.len() - 3], PluginKind::Filter, MAX_MEMORY_MIB).unwrap_err();
        assert!(matches!(e, PolicyError::InvalidComponent(_)), "{e}");

        let e = check(&component("(component)"), PluginKind::Template, MAX_MEMORY_MIB).unwrap_err();
        assert!(
            e.to_string().contains("expects an exported function `render`"),
            "{e}"
        );
    }

    #[test]
    fn a_memory_ask_is_read_checked_and_the_last_one_counts() {
        let bytes = component(
            r#"(component
                (core module $m (func (export "f")))
                (core instance $i (instantiate $m))
                (func $f (canon lift (core func $i "f")))
                (export "filter" (func $f)))"#,
        );
        assert_eq!(surface(&bytes).unwrap().memory_mib, None);
        let asked = with_memory_ask(bytes.clone(), 128);
        assert_eq!(
            check(&asked, PluginKind::Filter, 512).unwrap().memory_mib,
            Some(128)
        );
        // wasmparser, and so wasmtime, still read it as a valid component.
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(&asked)
            .unwrap();
        let e = check(&asked, PluginKind::Filter, 64).unwrap_err();
        assert!(
            e.to_string().contains("asks for 128 MiB") && e.to_string().contains("at most 64"),
            "{e}"
        );
        let again = with_memory_ask(asked, 32);
        assert_eq!(surface(&again).unwrap().memory_mib, Some(32));
        let e = surface(&with_memory_ask(bytes, 0)).unwrap_err();
        assert!(
            e.to_string().contains("memory_mib=N with N from 1 to 4096"),
            "{e}"
        );
    }
}
