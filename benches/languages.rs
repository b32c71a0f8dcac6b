//! Policies per language: the example filter and template (`examples/policies/`) in
//! Rust, JavaScript and Python, each built from a fresh project with the real toolchain
//! (`letterbox::project`, what `letterbox plugin build` runs), then measured side by side
//! in one run:
//!
//! - the size of the two components, and the time to compile each (no cache);
//! - the first recipient on fresh instances (instantiate + prepare + one call, both
//!   policies), median of 5;
//! - the linear memory one warm instance of each holds;
//! - recipients per second through filter + template on one thread, with 0.2 batching,
//!   best of 3 rounds (instances are replaced every ~1,000 recipients, as in jobs).
//!
//! The three languages must decide and render alike; the first 200 recipients are
//! compared before anything is timed.
//!
//!     cargo bench --bench languages [-- RECIPIENTS] [rust] [js] [python] [NAME=F.wasm,T.wasm]
//!
//! (default 20000 recipients, all three). `NAME=F.wasm,T.wasm` adds a pair built
//! elsewhere (another toolchain, other build options) that implements the same example. Needs the toolchains `letterbox plugin build`
//! needs (`.ci/policy-tools` puts componentize-py on PATH). Projects are kept in
//! target/bench-policies, so a second run skips `npm install`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use letterbox::domain::{Letter, Newsletter, PluginKind, Subscriber, SubscriberStatus};
use letterbox::policy::{LetterInput, PolicyHost, PolicyLimits, Verdict};
use letterbox::project::{self, Lang};
use serde_json::{Map, json};

fn subscribers(n: usize) -> Vec<Subscriber> {
    (0..n)
        .map(|i| {
            let picks = json!([
                { "title": format!("Story {i}"), "url": format!("https://example.org/s/{i}") },
                { "title": "Rust 2026", "url": "https://example.org/rust" },
                "Tea & biscuits",
            ]);
            Subscriber {
                id: i as u64 + 1,
                newsletter_id: 1,
                email: format!("reader{i}@example.org"),
                name: Some(format!("Reader {i}")),
                attributes: json!({
                    "plan": if i % 4 == 3 { "free" } else { "pro" },
                    "letters_30d": i % 6,
                    "picks": picks,
                })
                .as_object()
                .cloned()
                .unwrap(),
                status: SubscriberStatus::Active,
                created_at: 1_700_000_000,
            }
        })
        .collect()
}

fn letter() -> (Letter, Newsletter) {
    let params = json!({
        "segment": { "attribute": "plan", "equals": "pro" },
        "frequency_cap": { "attribute": "letters_30d", "max": 5 },
        "picks_heading": "Picked for you",
    });
    let letter = Letter {
        id: 1,
        newsletter_id: 1,
        subject: "Hello {{name}}, this week's picks".into(),
        text: "Hi {{name}},\n\nThis week: lots.\n\nUnsubscribe: {{unsubscribe_url}}\n".into(),
        html: Some(
            "<html><body><p>Hi {{name}},</p><p>This week: lots.</p>\
             <a href=\"{{unsubscribe_url}}\">Unsubscribe</a></body></html>"
                .into(),
        ),
        filter: "bench-filter".into(),
        template: "bench-template".into(),
        params: params.as_object().cloned().unwrap_or_else(Map::new),
        created_at: 0,
    };
    let newsletter = Newsletter {
        id: 1,
        name: "Bench".into(),
        from: "bench@example.com".into(),
        created_at: 0,
    };
    (letter, newsletter)
}

/// Builds the example of `kind` in `lang` (kept under `root`, source refreshed).
fn build(root: &Path, lang: Lang, kind: PluginKind) -> PathBuf {
    let dir = root.join(format!("{lang}-{kind}"));
    if !dir.join(project::MANIFEST).is_file() {
        project::create(&dir, lang, kind, Some(format!("bench-{lang}-{kind}"))).expect("new project");
    }
    std::fs::write(dir.join(project::source_file(lang)), project::example(lang, kind)).unwrap();
    let project = project::open(&dir).expect("project");
    let started = Instant::now();
    let built = project::build(&project).unwrap_or_else(|e| {
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        panic!("{lang} {kind}: {e}{cause}")
    });
    eprintln!(
        "built {lang} {kind}: {:.1} MB in {:.1} s",
        built.size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    built.path
}

struct Row {
    lang: String,
    sizes: (u64, u64),
    compile: (Duration, Duration),
    first: Duration,
    memory: (usize, usize),
    rate: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(20_000);
    let mut langs: Vec<Lang> = [Lang::Rust, Lang::Js, Lang::Python]
        .into_iter()
        .filter(|l| args.iter().any(|a| *a == l.to_string()))
        .collect();
    if langs.is_empty() {
        langs = vec![Lang::Rust, Lang::Js, Lang::Python];
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-policies");
    std::fs::create_dir_all(&root).unwrap();
    // Rust projects share one target directory with each other, not with this build.
    // SAFETY: single-threaded here, before anything reads the environment concurrently.
    unsafe { std::env::set_var("CARGO_TARGET_DIR", root.join("cargo-target")) };
    let mut built: Vec<(String, PathBuf, PathBuf)> = langs
        .iter()
        .map(|&l| {
            let filter = build(&root, l, PluginKind::Filter);
            (l.to_string(), filter, build(&root, l, PluginKind::Template))
        })
        .collect();
    for (name, files) in args.iter().filter_map(|a| a.split_once('=')) {
        let (filter, template) = files.split_once(',').expect("NAME=FILTER.wasm,TEMPLATE.wasm");
        built.push((name.to_string(), filter.into(), template.into()));
    }

    let host = PolicyHost::new(PolicyLimits::default(), None).expect("engine");
    let (letter, newsletter) = letter();
    let people = subscribers(n);
    let items: Vec<(Subscriber, String)> = people
        .iter()
        .map(|s| {
            (
                s.clone(),
                format!("https://news.example.com/u/1.{}.0123456789abcdef", s.id),
            )
        })
        .collect();
    let mut rows = Vec::new();
    let mut reference: Option<(String, Vec<Verdict>)> = None;
    for (lang, filter_path, template_path) in built {
        let compile = |path: &Path, kind: PluginKind| {
            let bytes = std::fs::read(path).unwrap();
            let id = format!("{lang}-{kind}");
            let started = Instant::now();
            let policy = host.prepare(&id, &id, kind, &bytes).expect("compile");
            (policy, started.elapsed(), bytes.len() as u64)
        };
        let (filter, filter_compile, filter_size) = compile(&filter_path, PluginKind::Filter);
        let (template, template_compile, template_size) = compile(&template_path, PluginKind::Template);
        let evaluator = || {
            host.evaluator(
                filter.clone(),
                template.clone(),
                LetterInput::new(&letter, &newsletter),
            )
            .expect("evaluator")
        };

        // Fresh instances each time: instantiate, prepare and one call, both policies.
        let mut firsts: Vec<Duration> = (0..5)
            .map(|_| {
                let e = evaluator();
                let started = Instant::now();
                e.evaluate(&items[0].0, items[0].1.clone())
                    .expect("first recipient");
                started.elapsed()
            })
            .collect();
        firsts.sort();

        let e = evaluator();
        let sample: Vec<Verdict> = e
            .evaluate_all(&items[..200.min(n)])
            .into_iter()
            .map(|r| r.expect("evaluation"))
            .collect();
        match &reference {
            None => reference = Some((lang.clone(), sample)),
            Some((first, expected)) => {
                for (i, (a, b)) in expected.iter().zip(&sample).enumerate() {
                    assert_eq!(a, b, "recipient {i}: {first} and {lang} disagree");
                }
            }
        }
        let mut best = Duration::MAX;
        for round in 1..=3 {
            let started = Instant::now();
            for result in e.evaluate_all(&items) {
                std::hint::black_box(result.expect("evaluation"));
            }
            let took = started.elapsed();
            eprintln!(
                "{lang} round {round}: {:.0} recipients/s",
                n as f64 / took.as_secs_f64()
            );
            best = best.min(took);
        }
        rows.push(Row {
            lang,
            sizes: (filter_size, template_size),
            compile: (filter_compile, template_compile),
            first: firsts[firsts.len() / 2],
            memory: e.memory_per_instance(),
            rate: n as f64 / best.as_secs_f64(),
        });
    }

    let sent = reference
        .map(|(_, v)| v.iter().filter(|v| matches!(v, Verdict::Send(_))).count())
        .unwrap_or(0);
    println!(
        "recipients={n}, filter + template, one thread, best of 3 rounds; of the first 200, {sent} sent and the rest skipped, alike in every language"
    );
    println!(
        "{:<18} {:>16} {:>18} {:>15} {:>18} {:>14}",
        "language",
        "size MB (f / t)",
        "compile s (f / t)",
        "first recipient",
        "memory MiB (f / t)",
        "recipients/s"
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    for r in &rows {
        println!(
            "{:<18} {:>16} {:>18} {:>12.1} ms {:>18} {:>14.0}",
            r.lang,
            format!("{:.2} / {:.2}", r.sizes.0 as f64 / 1e6, r.sizes.1 as f64 / 1e6),
            format!(
                "{:.2} / {:.2}",
                r.compile.0.as_secs_f64(),
                r.compile.1.as_secs_f64()
            ),
            r.first.as_secs_f64() * 1e3,
            format!("{:.1} / {:.1}", mib(r.memory.0), mib(r.memory.1)),
            r.rate
        );
    }
}
