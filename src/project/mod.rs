//! Policy projects on an author's machine: `letterbox plugin new` writes one, `letterbox
//! plugin build` turns it into `policy.wasm` with the language's own tool (cargo,
//! jco, componentize-py), and `letterbox plugin upload DIR` reads its name and
//! kind. It owns the project layout (`policy.toml`, `wit/`, the example sources from
//! `examples/policies/`) and knows how to call each toolchain; it knows nothing of HTTP
//! or of the server. Before it reports a build done it checks the component the way an
//! upload is checked (`policy::inspect`), so a wrong import is found on the author's
//! machine, in milliseconds.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::domain::PluginKind;
use crate::policy::{PolicyError, inspect};

/// The file that makes a directory a policy project.
pub const MANIFEST: &str = "policy.toml";
/// What `build` writes, and `upload DIR` sends.
pub const OUTPUT: &str = "policy.wasm";

/// The versions a new project pins. A project keeps the ones it was made with; see the
/// author's guide for moving.
pub const JCO: &str = "1.35.0";
pub const COMPONENTIZE_PY: &str = "0.25.1";
pub const WIT_BINDGEN: &str = "0.63.0";

const WIT: &str = include_str!("../../wit/policy.wit");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Rust,
    Js,
    Python,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "rust",
            Lang::Js => "js",
            Lang::Python => "python",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("{0} already exists and is not empty; choose a new directory")]
    Exists(PathBuf),
    #[error("{} is not a policy project (it has no {MANIFEST}); `letterbox plugin new` makes one", .0.display())]
    NotAProject(PathBuf),
    #[error("{}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("{tool} is not installed (or not on PATH): {hint}")]
    Missing { tool: String, hint: String },
    #[error("{tool} failed ({status}); its output is above")]
    ToolFailed { tool: String, status: String },
    #[error("{} was built but cannot be uploaded", path.display())]
    Refused {
        path: PathBuf,
        #[source]
        source: PolicyError,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ProjectError + '_ {
    move |source| ProjectError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `policy.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    /// The name it is uploaded under.
    pub name: String,
    pub kind: PluginKind,
    pub language: Lang,
    /// Linear memory per instance to ask the server for, in MiB (default: the server's,
    /// 64 unless configured). `build` writes it into the component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(skip)]
    pub dir: PathBuf,
}

/// A name the server accepts: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The example `new` starts from, per language and kind (also in `examples/policies/`).
pub fn example(lang: Lang, kind: PluginKind) -> &'static str {
    match (lang, kind) {
        (Lang::Rust, PluginKind::Filter) => include_str!("../../examples/policies/rust/filter.rs"),
        (Lang::Rust, PluginKind::Template) => {
            include_str!("../../examples/policies/rust/template.rs")
        }
        (Lang::Js, PluginKind::Filter) => include_str!("../../examples/policies/js/filter.js"),
        (Lang::Js, PluginKind::Template) => include_str!("../../examples/policies/js/template.js"),
        (Lang::Python, PluginKind::Filter) => {
            include_str!("../../examples/policies/python/filter.py")
        }
        (Lang::Python, PluginKind::Template) => {
            include_str!("../../examples/policies/python/template.py")
        }
        (Lang::Rust, PluginKind::Automation) => {
            include_str!("../../examples/policies/rust/automation.rs")
        }
        (Lang::Js, PluginKind::Automation) => {
            include_str!("../../examples/policies/js/automation.js")
        }
        (Lang::Python, PluginKind::Automation) => {
            include_str!("../../examples/policies/python/automation.py")
        }
    }
}

/// The source file a language's project builds from, relative to the project.
pub fn source_file(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "src/lib.rs",
        Lang::Js => "policy.js",
        Lang::Python => "policy.py",
    }
}

/// The files of a new project, relative to its directory.
fn files(project: &Project) -> Vec<(&'static str, String)> {
    let Project {
        name, kind, language, ..
    } = project;
    let manifest = format!(
        "# A letterbox policy project. `letterbox plugin build .` writes {OUTPUT};\n\
         # `letterbox plugin upload .` uploads it under this name and kind.\n\
         name = \"{name}\"\nkind = \"{kind}\"\nlanguage = \"{language}\"\n\
         # Memory per instance, in MiB, if the server's default (64) is not enough:\n\
         # memory_mib = 128\n"
    );
    let mut files = vec![
        (MANIFEST, manifest),
        ("wit/policy.wit", WIT.to_string()),
        (source_file(*language), example(*language, *kind).to_string()),
        ("README.md", readme(project)),
    ];
    match language {
        Lang::Rust => {
            // A crate name: letters, digits and `_`/`-`, not starting with a digit.
            let mut crate_name: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            if !crate_name.starts_with(|c: char| c.is_ascii_alphabetic()) {
                crate_name.insert_str(0, "policy-");
            }
            files.push((
                "Cargo.toml",
                format!(
                    "[package]\nname = \"{crate_name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
                     [lib]\ncrate-type = [\"cdylib\"]\n\n\
                     [dependencies]\nserde_json = \"1\"\nwit-bindgen = \"{WIT_BINDGEN}\"\n\n\
                     # Small and fast: one codegen unit, LTO, no unwinding (a panic traps, and the\n\
                     # host fails only the recipients of that call).\n\
                     [profile.release]\nopt-level = 3\nlto = true\ncodegen-units = 1\nstrip = true\npanic = \"abort\"\n\n\
                     # Its own workspace, so it builds alone wherever it is put.\n[workspace]\n"
                ),
            ));
            files.push((
                ".cargo/config.toml",
                "# wasm SIMD: serde_json's scanning has simd128 paths, and wasmtime compiles them\n\
                 # to the host's vector instructions.\n\
                 [target.wasm32-wasip2]\nrustflags = [\"-C\", \"target-feature=+simd128\"]\n"
                    .to_string(),
            ));
            files.push((".gitignore", format!("/target\n/{OUTPUT}\n")));
        }
        Lang::Js => {
            // QuickJS has no console: console.js makes one on stdout and stderr, which
            // the `*-js` worlds of wit/console.wit import.
            files.push((
                "console.js",
                include_str!("../../examples/policies/js/console.js").to_string(),
            ));
            files.push(("wit/console.wit", include_str!("wit/console.wit").to_string()));
            files.push(("wit/deps/io.wit", include_str!("wit/io.wit").to_string()));
            files.push(("wit/deps/cli.wit", include_str!("wit/cli.wit").to_string()));
            files.push((
                "package.json",
                format!(
                    "{{\n  \"name\": \"{}\",\n  \"private\": true,\n  \"type\": \"module\",\n  \
                     \"description\": \"A letterbox {kind} policy\",\n  \
                     \"scripts\": {{\n    \"build\": \"jco {}\"\n  }},\n  \
                     \"devDependencies\": {{\n    \"@bytecodealliance/jco\": \"{JCO}\"\n  }}\n}}\n",
                    name.to_ascii_lowercase(),
                    js_build_args(*kind).join(" ")
                ),
            ));
            files.push((".gitignore", format!("/node_modules\n/{OUTPUT}\n")));
        }
        Lang::Python => {
            files.push((
                "requirements.txt",
                format!("# The build tool, not a runtime dependency.\ncomponentize-py=={COMPONENTIZE_PY}\n"),
            ));
            files.push((".gitignore", format!("/.venv\n/{OUTPUT}\n__pycache__/\n")));
        }
    }
    files
}

fn readme(project: &Project) -> String {
    let Project {
        name, kind, language, ..
    } = project;
    let setup = match language {
        Lang::Rust => "Needs Rust (https://rustup.rs) and its wasm32-wasip2 target:\n\n    rustup target add wasm32-wasip2\n".to_string(),
        Lang::Js => format!(
            "Needs Node.js 18 or newer with npm. The first build runs `npm install`, which\n\
             fetches jco {JCO} (pinned in package.json); it builds with jco's QuickJS backend.\n"
        ),
        Lang::Python => format!(
            "Needs componentize-py {COMPONENTIZE_PY} (pinned in requirements.txt), in a venv\n\
             here, which the build finds:\n\n    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt\n"
        ),
    };
    let letter = match kind {
        PluginKind::Filter => format!(
            "    letterbox letter create --newsletter 1 --subject 'For pros' --text 'Hello' \\\n        \
             --filter {name} --params '{{\"segment\": {{\"attribute\": \"plan\", \"equals\": \"pro\"}}}}'\n"
        ),
        PluginKind::Template => format!(
            "    letterbox letter create --newsletter 1 --subject 'Hi {{{{name}}}}' \\\n        \
             --text 'Your picks this week.' --template {name}\n"
        ),
        PluginKind::Automation => return automation_readme(project, &setup),
    };
    format!(
        "# {name}\n\n\
         A letterbox {kind} policy in {language}, against `wit/policy.wit`\n\
         (letterbox:policy@0.3.0). It starts as the example from letterbox's\n\
         `examples/policies/`; `{source}` says what it does.\n\n\
         ## Build\n\n{setup}\n    letterbox plugin build .\n\n\
         writes `{OUTPUT}` and checks it as the server will (imports, exports).\n\n\
         ## Try it against a real subscriber\n\n\
         With a server running (`letterbox serve`) and `LETTERBOX_API_TOKEN` set:\n\n    \
         letterbox plugin upload .\n{letter}    \
         curl -s -H \"Authorization: Bearer $LETTERBOX_API_TOKEN\" -H 'content-type: application/json' \\\n        \
         -d '{{\"subscriber_id\": 1}}' http://127.0.0.1:8080/v1/letters/LETTER_ID/preview\n\n\
         The preview shows the filter's decision and the rendered message for that\n\
         subscriber; nothing is sent. `letterbox send LETTER_ID --follow` sends it.\n\n\
         What the policy prints (console.log, print, println!) goes to the server's log,\n\
         the first 4 KiB of each call, with the policy's name. Limits, versions and\n\
         pinning are in letterbox's plugins/README.md.\n",
        source = source_file(*language),
    )
}

/// The README of an automation project: built and uploaded like the others, tried by
/// creating an automation that names it.
fn automation_readme(project: &Project, setup: &str) -> String {
    let Project { name, language, .. } = project;
    format!(
        "# {name}\n\n\
         A letterbox automation policy in {language}, against `wit/policy.wit`\n\
         (letterbox:policy@0.3.0, world `automation`). It starts as the drip sequence from\n\
         letterbox's `examples/policies/`; `{source}` says what it does and what its\n\
         config holds.\n\n\
         ## Build\n\n{setup}\n    letterbox plugin build .\n\n\
         writes `{OUTPUT}` and checks it as the server will (imports, exports).\n\n\
         ## Upload\n\n\
         With a server running (`letterbox serve`) and `LETTERBOX_API_TOKEN` set:\n\n    \
         letterbox plugin upload .\n\n\
         An automation names this policy, the event types it listens to and its config;\n\
         letterbox's README (Automations) shows how to create one and follow what it does.\n\n\
         What the policy prints (console.log, print, println!) goes to the server's log,\n\
         the first 4 KiB of each call, with the policy's name. Limits, versions and\n\
         pinning are in letterbox's plugins/README.md.\n",
        source = source_file(*language),
    )
}

fn js_build_args(kind: PluginKind) -> Vec<String> {
    // QuickJS, not jco's default StarlingMonkey: measured with the examples
    // (benches/languages.rs), it runs them 5x faster (36k against 7k recipients/s), in a
    // component of 1.6 MB instead of 12 that compiles in 1.5 s instead of 11. The sync
    // runtime: policies are plain calls, not the component model's async ABI. The
    // `-js` world adds stdout and stderr for console.js.
    [
        "componentize",
        "policy.js",
        "--wit",
        "wit",
        "--world-name",
        match kind {
            PluginKind::Filter => "filter-js",
            PluginKind::Template => "template-js",
            PluginKind::Automation => "automation-js",
        },
        "--backend",
        "quickjs",
        "--backend-qjs-disable-async",
        "-o",
        OUTPUT,
    ]
    .map(String::from)
    .to_vec()
}

/// What `create` made.
pub struct Created {
    pub project: Project,
    pub files: Vec<PathBuf>,
}

/// Writes a new project into `dir` (created if absent; it must be empty). `name`
/// defaults to the directory's name.
pub fn create(
    dir: &Path,
    language: Lang,
    kind: PluginKind,
    name: Option<String>,
) -> Result<Created, ProjectError> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io_error(dir))?;
        if entries.next().is_some() {
            return Err(ProjectError::Exists(dir.to_path_buf()));
        }
    }
    let name = match name {
        Some(name) => name,
        None => std::path::absolute(dir)
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default(),
    };
    if !valid_name(&name) {
        return Err(ProjectError::Manifest {
            path: dir.join(MANIFEST),
            message: format!(
                "{name:?} cannot be a policy's name: use 1 to 64 letters, digits, '-', '_' or '.' (--name)"
            ),
        });
    }
    let project = Project {
        name,
        kind,
        language,
        memory_mib: None,
        dir: dir.to_path_buf(),
    };
    let mut written = Vec::new();
    for (file, contents) in files(&project) {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        std::fs::write(&path, contents).map_err(io_error(&path))?;
        written.push(path);
    }
    Ok(Created {
        project,
        files: written,
    })
}

/// Reads the project in `dir`.
pub fn open(dir: &Path) -> Result<Project, ProjectError> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ProjectError::NotAProject(dir.to_path_buf()));
        }
        Err(e) => return Err(io_error(&path)(e)),
    };
    let mut project: Project = toml::from_str(&text).map_err(|e| ProjectError::Manifest {
        path: path.clone(),
        message: e.message().to_string(),
    })?;
    if !valid_name(&project.name) {
        return Err(ProjectError::Manifest {
            path,
            message: format!(
                "name {:?} is not a policy name: use 1 to 64 letters, digits, '-', '_' or '.'",
                project.name
            ),
        });
    }
    project.dir = dir.to_path_buf();
    Ok(project)
}

/// Runs `program args` in `dir`, its output shown as it comes.
fn run_tool(dir: &Path, program: &Path, args: &[String], tool: &str) -> Result<(), ProjectError> {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProjectError::Missing {
                tool: tool.to_string(),
                hint: hint(tool),
            },
            _ => io_error(program)(e),
        })?;
    if !status.success() {
        return Err(ProjectError::ToolFailed {
            tool: tool.to_string(),
            status: status.to_string(),
        });
    }
    Ok(())
}

fn hint(tool: &str) -> String {
    match tool {
        "cargo" => "install Rust from https://rustup.rs, then `rustup target add wasm32-wasip2`".into(),
        "node" | "npm" => {
            "install Node.js 18 or newer with npm (e.g. `apt install nodejs npm`, or https://nodejs.org)"
                .into()
        }
        "componentize-py" => format!(
            "in the project, `python3 -m venv .venv && .venv/bin/pip install componentize-py=={COMPONENTIZE_PY}` \
             (the build looks in .venv first, then on PATH)"
        ),
        _ => format!("install {tool}"),
    }
}

/// `program` on PATH, if it is there.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn require(program: &str) -> Result<PathBuf, ProjectError> {
    on_path(program).ok_or_else(|| ProjectError::Missing {
        tool: program.to_string(),
        hint: hint(program),
    })
}

/// What `build` made.
pub struct Built {
    pub path: PathBuf,
    pub size: u64,
}

/// Builds `project` into `DIR/policy.wasm` with its language's tool, then checks it as
/// an upload is checked.
pub fn build(project: &Project) -> Result<Built, ProjectError> {
    let dir = &project.dir;
    let output = dir.join(OUTPUT);
    match project.language {
        Lang::Rust => build_rust(project, &output)?,
        Lang::Js => {
            let node = require("node")?;
            // Relative to the project, where the tool runs.
            let cli = "node_modules/@bytecodealliance/jco/dist/jco.js";
            let tool = dir.join(cli);
            // npm installs when jco is missing, and again when package.json changed since
            // (a new pin), so the build uses the version the project names.
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let stale = match (
                modified(&dir.join("package.json")),
                modified(&dir.join("node_modules/.package-lock.json")),
            ) {
                (Some(wanted), Some(installed)) => wanted > installed,
                _ => false,
            };
            if !tool.is_file() || stale {
                let npm = require("npm")?;
                run_tool(
                    dir,
                    &npm,
                    &["install".into(), "--no-audit".into(), "--no-fund".into()],
                    "npm",
                )?;
            }
            if !tool.is_file() {
                return Err(ProjectError::Missing {
                    tool: "jco".into(),
                    hint: format!(
                        "`npm install` did not install it: add \"@bytecodealliance/jco\": \"{JCO}\" to package.json's devDependencies"
                    ),
                });
            }
            let mut args = js_build_args(project.kind);
            // A project made before console.js existed has only the plain worlds.
            if !dir.join("wit/console.wit").is_file()
                && let Some(world) = args.iter_mut().find(|a| a.ends_with("-js"))
            {
                *world = project.kind.as_str().to_string();
            }
            args.insert(0, cli.to_string());
            run_tool(dir, &node, &args, "jco")?;
        }
        Lang::Python => {
            let venv = dir.join(".venv/bin/componentize-py");
            let tool = if venv.is_file() {
                venv
            } else {
                require("componentize-py")?
            };
            let args = [
                "-d",
                "wit",
                "-w",
                project.kind.as_str(),
                "componentize",
                "policy",
                "-o",
                OUTPUT,
            ];
            run_tool(dir, &tool, &args.map(String::from), "componentize-py")?;
        }
    }
    let mut bytes = std::fs::read(&output).map_err(io_error(&output))?;
    if let Some(mib) = project.memory_mib {
        bytes = inspect::with_memory_ask(bytes, mib);
        std::fs::write(&output, &bytes).map_err(io_error(&output))?;
    }
    // The server checks the memory ask against its own ceiling; here only the absolute one.
    inspect::check(&bytes, project.kind, inspect::MAX_MEMORY_MIB).map_err(|source| {
        ProjectError::Refused {
            path: output.clone(),
            source,
        }
    })?;
    Ok(Built {
        path: output,
        size: bytes.len() as u64,
    })
}

fn build_rust(project: &Project, output: &Path) -> Result<(), ProjectError> {
    let cargo = require("cargo")?;
    // rustup says plainly that the target is missing; cargo's own error for it is a page
    // about `core`.
    if let Some(rustup) = on_path("rustup") {
        let installed = Command::new(rustup)
            .args(["target", "list", "--installed"])
            .current_dir(&project.dir)
            .output()
            .map_err(io_error(&project.dir))?;
        let listed = String::from_utf8_lossy(&installed.stdout);
        if installed.status.success() && !listed.lines().any(|l| l.trim() == "wasm32-wasip2") {
            return Err(ProjectError::Missing {
                tool: "the wasm32-wasip2 target".into(),
                hint: "rustup target add wasm32-wasip2".into(),
            });
        }
    }
    // The artifact's path comes from cargo's own report, so CARGO_TARGET_DIR and the
    // crate's name need no guessing.
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format",
            "json-render-diagnostics",
        ])
        .current_dir(&project.dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(io_error(&cargo))?;
    if !out.status.success() {
        return Err(ProjectError::ToolFailed {
            tool: "cargo".into(),
            status: out.status.to_string(),
        });
    }
    let artifact = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .collect::<Vec<_>>()
        })
        .rfind(|f| f.extension().is_some_and(|e| e == "wasm"))
        .ok_or_else(|| ProjectError::ToolFailed {
            tool: "cargo".into(),
            status: "it built no .wasm file: is the crate a `cdylib`?".into(),
        })?;
    std::fs::copy(&artifact, output).map_err(io_error(output))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_project_reads_back_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("vip-only");
        for lang in [Lang::Rust, Lang::Js, Lang::Python] {
            let at = at.join(lang.to_string());
            let created = create(&at, lang, PluginKind::Filter, Some("vip-only".into())).unwrap();
            assert!(created.files.iter().all(|f| f.is_file()));
            let project = open(&at).unwrap();
            assert_eq!(project.name, "vip-only");
            assert_eq!(project.kind, PluginKind::Filter);
            assert_eq!(project.language, lang);
            assert!(matches!(
                create(&at, lang, PluginKind::Filter, None),
                Err(ProjectError::Exists(_))
            ));
        }
        // The name defaults to the directory's.
        let created = create(&dir.path().join("weekly"), Lang::Js, PluginKind::Template, None).unwrap();
        assert_eq!(created.project.name, "weekly");
        let bad = create(&dir.path().join("a b"), Lang::Js, PluginKind::Template, None);
        assert!(
            matches!(bad, Err(ProjectError::Manifest { .. })),
            "a name with a space"
        );
    }

    #[test]
    fn a_broken_manifest_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(open(dir.path()), Err(ProjectError::NotAProject(_))));
        let manifest = "name = \"x\"\nkind = \"filter\"\nlanguage = \"js\"\nmemory_mib = 160\n";
        std::fs::write(dir.path().join(MANIFEST), manifest).unwrap();
        assert_eq!(open(dir.path()).unwrap().memory_mib, Some(160));
        std::fs::write(
            dir.path().join(MANIFEST),
            "name = \"x\"\nkind = \"filtr\"\nlanguage = \"js\"\n",
        )
        .unwrap();
        let error = open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("policy.toml") && error.contains("filtr"),
            "{error}"
        );
    }
}
