//! A real browser for the console's tests: Debian's chromium, headless, driven over
//! WebDriver through chromedriver (fantoccini). Each `Browser` has its own chromedriver
//! on a free port and its own empty profile. Screenshots go to
//! `target/console-screenshots/`, named by the test, and each path is printed.
//!
//! Without chromium and chromedriver the browser tests are skipped with a note, unless
//! `LETTERBOX_REQUIRE_BROWSER=1` (CI) makes that a failure. axe-core's script is read
//! from `LETTERBOX_AXE` (`.ci/browser-tools` prints its path).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    test: String,
    shots: usize,
}

/// The window sizes screenshots are taken at.
pub const DESKTOP: (u32, u32) = (1280, 900);
pub const PHONE: (u32, u32) = (375, 812);

impl Browser {
    /// A browser for `test` (the screenshots' prefix), or `None` (skip) without one.
    /// `dark`: the system asks for dark mode.
    pub async fn start(test: &str, dark: bool) -> Option<Browser> {
        Browser::start_in_zone(test, dark, None).await
    }

    /// As `start`, with the browser's time zone set to `zone` (`TZ`, e.g.
    /// `Asia/Kolkata`) rather than the machine's.
    pub async fn start_in_zone(test: &str, dark: bool, zone: Option<&str>) -> Option<Browser> {
        if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists() {
            assert!(
                std::env::var("LETTERBOX_REQUIRE_BROWSER").is_err(),
                "LETTERBOX_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing"
            );
            eprintln!("skipped: no chromium/chromedriver (Debian: apt-get install chromium chromium-driver)");
            return None;
        }
        let port = super::free_port();
        let mut driver = Command::new(CHROMEDRIVER);
        if let Some(zone) = zone {
            // chromium, started by chromedriver, inherits it.
            driver.env("TZ", zone);
        }
        let driver = driver
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--hide-scrollbars".into(),
            format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        if dark {
            args.push("--force-dark-mode".into());
            args.push("--blink-settings=preferredColorScheme=0".into());
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        // The page's `alert` would block the session: a test that sees one failed.
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver: {e}"),
            }
        };
        Some(Browser {
            client,
            driver,
            _profile: profile,
            test: test.to_string(),
            shots: 0,
        })
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    pub async fn path(&self) -> String {
        let url = self.client.current_url().await.unwrap();
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// Waits for an element matching `css`.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => panic!("no element {css:?} on {}: {e}", self.path().await),
        }
    }

    /// Replaces the text of the field `css` with `text`, as typed.
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The text of `css`, read again if the page was replaced between finding and
    /// reading it.
    pub async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.find(css).await.text().await {
                Ok(text) => return text,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("text of {css}: {e}"),
            }
        }
    }

    /// Waits until `check` holds of the page's text (the `main` element's).
    pub async fn wait_text(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The page may be replaced between finding `main` and reading it (a form's
            // answer arriving): a stale element is read again.
            let text = self.find("main").await.text().await.unwrap_or_default();
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {what}; the page says:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element `css` is shown (not `hidden`); its text.
    pub async fn wait_shown(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let element = self.find(css).await;
            // An element of the page being replaced (a form's answer arriving) is stale:
            // read the new page's.
            if let Ok(None) = element.attr("hidden").await
                && let Ok(text) = element.text().await
            {
                return text;
            }
            assert!(Instant::now() < deadline, "{css} stayed hidden");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element `css` is hidden.
    pub async fn wait_hidden(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.find(css).await.attr("hidden").await.ok().flatten().is_some() {
                return;
            }
            assert!(Instant::now() < deadline, "{css} stayed shown");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the text of `css` satisfies `check`.
    pub async fn wait_for_text(&self, css: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.find(css).await.text().await.unwrap_or_default();
            if check(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "{css} says {text:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the preview frame's text satisfies `check`; its text.
    pub async fn preview_text(&self, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.client.clone().enter_frame(0).await.unwrap();
            let text = self.client.find(fantoccini::Locator::Css("body")).await;
            let text = match text {
                Ok(body) => body.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            self.client.clone().enter_parent_frame().await.unwrap();
            if check(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "the preview says {text:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves a screenshot of the page at desktop and at phone width, and prints where.
    pub async fn screenshots(&mut self, name: &str) {
        for (label, (w, h)) in [("desktop", DESKTOP), ("phone", PHONE)] {
            self.client.set_window_size(w, h).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            let png = self.client.screenshot().await.unwrap();
            self.shots += 1;
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{}-{:02}-{name}-{label}.png", self.test, self.shots));
            std::fs::write(&path, png).unwrap();
            println!("screenshot: {}", path.display());
        }
        self.client.set_window_size(DESKTOP.0, DESKTOP.1).await.unwrap();
    }

    /// axe-core's serious and critical violations on the page, as "rule: target" lines.
    /// Without `LETTERBOX_AXE` the check is skipped with a note (CI sets it).
    pub async fn accessibility_problems(&self) -> Vec<String> {
        let Ok(path) = std::env::var("LETTERBOX_AXE") else {
            assert!(
                std::env::var("LETTERBOX_REQUIRE_BROWSER").is_err(),
                "LETTERBOX_REQUIRE_BROWSER is set but LETTERBOX_AXE is not (see .ci/browser-tools)"
            );
            eprintln!("skipped the accessibility check: LETTERBOX_AXE is not set (.ci/browser-tools)");
            return Vec::new();
        };
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // Injected through WebDriver, not a <script> of the page: the console's CSP
        // forbids inline script, and WebDriver's own scripts are not subject to it.
        self.client
            .execute(&source, vec![])
            .await
            .expect("inject axe-core");
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] })
                    .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact,
                        help: v.help, nodes: v.nodes.map(n => n.target.join(' ')) }))))
                    .catch(e => done([{ id: 'axe-failed', impact: 'critical', help: String(e), nodes: [] }]));",
                vec![],
            )
            .await
            .expect("run axe-core");
        result
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .map(|v| format!("{} ({}): {} at {}", v["id"], v["impact"], v["help"], v["nodes"]))
            .collect()
    }

    /// Fails the test if the page has a serious or critical accessibility violation.
    pub async fn assert_accessible(&self) {
        let problems = self.accessibility_problems().await;
        assert!(
            problems.is_empty(),
            "axe-core on {}:\n{}",
            self.path().await,
            problems.join("\n")
        );
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
