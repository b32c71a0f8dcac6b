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

/// What the outer component imports and exports.
#[derive(Debug, Default)]
pub struct Surface {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
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
/// links, exporting `kind`'s function (and not only the other kind's).
pub fn check(bytes: &[u8], kind: PluginKind) -> Result<Surface, PolicyError> {
    let surface = surface(bytes)?;
    if let Some(name) = surface
        .imports
        .iter()
        .find(|name| !LINKED_IMPORTS.iter().any(|prefix| name.starts_with(prefix)))
    {
        return Err(PolicyError::RefusedImport { name: name.clone() });
    }
    let (wanted, other, other_kind) = match kind {
        PluginKind::Filter => ("filter", "render", PluginKind::Template),
        PluginKind::Template => ("render", "filter", PluginKind::Filter),
    };
    if !surface.exports.iter().any(|e| e == wanted) {
        let detail = if surface.exports.iter().any(|e| e == other) {
            format!(
                "it exports `{other}`, the {other_kind} world's function; upload it with kind={other_kind}"
            )
        } else {
            format!(
                "the {kind} world expects an exported function `{wanted}`, the component exports {:?}",
                surface.exports
            )
        };
        return Err(PolicyError::WrongWorld { kind, detail });
    }
    Ok(surface)
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
        check(&bytes, PluginKind::Filter).unwrap();
    }

    #[test]
    fn refuses_what_cannot_run_before_compiling() {
        let http = component(r#"(component (import "wasi:http/outgoing-handler@0.2.0" (instance)))"#);
        let e = check(&http, PluginKind::Filter).unwrap_err();
        assert!(
            matches!(e, PolicyError::RefusedImport { ref name } if name.starts_with("wasi:http/")),
            "{e}"
        );

        let core = b"\0asm\x01\0\0\0".to_vec();
        let e = check(&core, PluginKind::Filter).unwrap_err();
        assert!(e.to_string().contains("core WebAssembly module"), "{e}");

        let e = check(b"definitely not wasm", PluginKind::Filter).unwrap_err();
        assert!(e.to_string().contains("not WebAssembly"), "{e}");

        let e = check(&http[..http.len() - 3], PluginKind::Filter).unwrap_err();
        assert!(matches!(e, PolicyError::InvalidComponent(_)), "{e}");

        let e = check(&component("(component)"), PluginKind::Template).unwrap_err();
        assert!(
            e.to_string().contains("expects an exported function `render`"),
            "{e}"
        );
    }
}
