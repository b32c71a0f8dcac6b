//! Policy throughput: recipients per second through the built-in filter + template as
//! Wasm components (warm instances, as jobs run them), side by side in the same run with
//! the same logic compiled natively into this binary. Single-threaded.
//!
//!     cargo bench --bench policy [-- RECIPIENTS] [--wasm-only | --native-only]
//!
//! (default 100000 recipients).

use std::hint::black_box;
use std::time::{Duration, Instant};

use letterbox::domain::{Letter, Newsletter, PluginKind, Subscriber, SubscriberStatus};
use letterbox::policy::{LetterInput, PolicyHost, PolicyLimits, Verdict, builtin};
use serde_json::{Map, Value, json};

fn subscribers(n: usize) -> Vec<Subscriber> {
    (0..n)
        .map(|i| Subscriber {
            id: i as u64 + 1,
            newsletter_id: 1,
            email: format!("reader{i}@example.org"),
            name: Some(format!("Reader {i}")),
            attributes: json!({ "plan": if i % 2 == 0 { "pro" } else { "free" }, "city": "Lyon" })
                .as_object()
                .cloned()
                .unwrap(),
            status: SubscriberStatus::Active,
            created_at: 1_700_000_000,
        })
        .collect()
}

fn letter() -> (Letter, Newsletter) {
    let letter = Letter {
        id: 1,
        newsletter_id: 1,
        subject: "Hello {{ name }}, news for {{ attributes.plan }}".into(),
        text: "Hi {{ name }},\n\nThis week in {{ attributes.city }}: lots.\n\nUnsubscribe: {{ unsubscribe_url }}\n"
            .into(),
        html: Some("<p>Hi {{ name }},</p><p>This week in {{ attributes.city }}.</p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a>".into()),
        filter: builtin::DEFAULT_FILTER_NAME.into(),
        template: builtin::DEFAULT_TEMPLATE_NAME.into(),
        params: Map::new(),
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

/// The default filter and template, natively: the same steps as `plugins/default-*`
/// (parse params and attributes, match the segment, render subject, text and HTML with
/// minijinja templates parsed once per letter and reused, as the guest does).
struct Native {
    letter: Letter,
    env: minijinja::Environment<'static>,
    params: minijinja::Value,
}

impl Native {
    fn new(letter: &Letter) -> Native {
        use minijinja::{AutoEscape, Environment, UndefinedBehavior};
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|n| {
            if n == "html" {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.add_template_owned("subject", letter.subject.clone()).unwrap();
        env.add_template_owned("text", letter.text.clone()).unwrap();
        if let Some(html) = &letter.html {
            env.add_template_owned("html", html.clone()).unwrap();
        }
        let params = Value::Object(letter.params.clone());
        Native {
            letter: letter.clone(),
            env,
            params: minijinja::Value::from(minijinja::value::Serde(&params)),
        }
    }

    fn evaluate(&self, subscriber: &Subscriber, url: &str) -> Result<Verdict, String> {
        use minijinja::value::Serde;
        use minijinja::{Value as J, context};
        let letter = &self.letter;
        // What crosses the boundary as text in the Wasm version.
        let params_text = Value::Object(letter.params.clone()).to_string();
        let attributes_text = Value::Object(subscriber.attributes.clone()).to_string();
        // filter
        let params: Value = serde_json::from_str(&params_text).map_err(|e| e.to_string())?;
        if let Some(segment) = params.get("segment") {
            let attributes: Value = serde_json::from_str(&attributes_text).map_err(|e| e.to_string())?;
            let name = segment
                .get("attribute")
                .and_then(Value::as_str)
                .ok_or("attribute")?;
            if attributes.get(name) != segment.get("equals") {
                return Ok(Verdict::Skip("not in segment".into()));
            }
        }
        // template
        let attributes: Value = serde_json::from_str(&attributes_text).map_err(|e| e.to_string())?;
        let ctx = context! {
            name => subscriber.name.clone().unwrap_or_default(),
            email => subscriber.email.clone(),
            attributes => J::from(Serde(&attributes)),
            unsubscribe_url => url,
            params => self.params.clone(),
        };
        let render = |n: &str| {
            self.env
                .get_template(n)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| e.to_string())
        };
        Ok(Verdict::Send(letterbox::policy::Rendered {
            subject: render("subject")?.replace(['\r', '\n'], " "),
            text: render("text")?,
            html: letter.html.as_ref().map(|_| render("html")).transpose()?,
            headers: Vec::new(),
        }))
    }
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let host = PolicyHost::new(PolicyLimits::default(), None).expect("engine");
    let filter = host
        .prepare(
            "bench-filter",
            "default-filter",
            PluginKind::Filter,
            builtin::DEFAULT_FILTER,
        )
        .expect("filter");
    let template = host
        .prepare(
            "bench-template",
            "default-template",
            PluginKind::Template,
            builtin::DEFAULT_TEMPLATE,
        )
        .expect("template");
    let (letter, newsletter) = letter();
    let evaluator = host
        .evaluator(filter, template, LetterInput::new(&letter, &newsletter))
        .expect("evaluator");
    let people = subscribers(n);
    let url = |s: &Subscriber| format!("https://news.example.com/u/1.{}.0123456789abcdef", s.id);

    let native = Native::new(&letter);
    // Same outputs both ways, checked once.
    let wasm_first = evaluator.evaluate(&people[0], url(&people[0])).unwrap();
    assert_eq!(wasm_first, native.evaluate(&people[0], &url(&people[0])).unwrap());

    let items: Vec<(Subscriber, String)> = people.iter().map(|s| (s.clone(), url(s))).collect();
    let mut wasm_best = Duration::MAX;
    let mut native_best = Duration::MAX;
    // `--wasm-only` skips the native rounds, for a profile of the Wasm path alone
    // (`perf record` with LETTERBOX_PERFMAP=1 names the guest's functions).
    let wasm_only = std::env::args().any(|a| a == "--wasm-only");
    // `--native-only` the other way round: under `valgrind --tool=callgrind`, the two
    // give instruction counts per recipient that the machine's noise does not move.
    let native_only = std::env::args().any(|a| a == "--native-only");
    for round in 1..=3 {
        let started = Instant::now();
        if !wasm_only {
            for (s, u) in &items {
                black_box(native.evaluate(s, u).unwrap());
            }
        }
        let native_time = started.elapsed().max(Duration::from_nanos(1));
        // As a job does: recipients in batches (0.2 policies take up to 64 per call).
        let started = Instant::now();
        if !native_only {
            for result in evaluator.evaluate_all(&items) {
                black_box(result.unwrap());
            }
        }
        let wasm_time = started.elapsed().max(Duration::from_nanos(1));
        println!(
            "round {round}: native {:>8.0} recipients/s   wasm {:>8.0} recipients/s",
            n as f64 / native_time.as_secs_f64(),
            n as f64 / wasm_time.as_secs_f64()
        );
        native_best = native_best.min(native_time);
        wasm_best = wasm_best.min(wasm_time);
    }
    let native_rate = n as f64 / native_best.as_secs_f64();
    let wasm_rate = n as f64 / wasm_best.as_secs_f64();
    println!("recipients={n}, filter+template, one thread, best of 3 rounds");
    println!(
        "native: {native_rate:>9.0} recipients/s  ({:.2} µs each)",
        1e6 / native_rate
    );
    println!(
        "wasm:   {wasm_rate:>9.0} recipients/s  ({:.2} µs each)",
        1e6 / wasm_rate
    );
    println!("wasm/native throughput ratio: {:.3}", wasm_rate / native_rate);
}
