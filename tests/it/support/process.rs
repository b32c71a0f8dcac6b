//! The real `letterbox` binary as a child process: started on port 0 over a data
//! directory (and the test backend's database), killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Api;

/// A child process killed (SIGKILL) when dropped, so a failing test leaves none behind.
pub struct Server(pub Child);

impl Server {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a node's state lives across its restarts: a data directory, and the test
/// backend's database if it is PostgreSQL.
pub struct Home {
    pub data: tempfile::TempDir,
    pub database: Option<String>,
}

impl Home {
    pub async fn new() -> Home {
        Home {
            data: tempfile::tempdir().unwrap(),
            database: super::test_database().await,
        }
    }
}

/// `letterbox serve` on port 0 over `home`, with the test API token, stdout piped (for
/// the listen address) and stderr passed through.
pub fn letterbox_command(home: &Home) -> Command {
    letterbox_command_on(home, "127.0.0.1:0")
}

/// `letterbox_command`, listening on `listen`.
pub fn letterbox_command_on(home: &Home, listen: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_letterbox"));
    command
        .args(["serve", "--listen", listen])
        .arg("--data")
        .arg(home.data.path())
        .env_remove("LETTERBOX_DATABASE_URL");
    if let Some(url) = &home.database {
        // A killed node's claims are rescued once its lease expires: keep that short.
        command
            .env("LETTERBOX_DATABASE_URL", url)
            .env("LETTERBOX_LEASE", "2s");
    }
    // No NO_COLOR: a pipe is not a terminal, so the server must choose plain lines
    // by itself (contained.rs checks it).
    command
        .env_remove("NO_COLOR")
        .env("LETTERBOX_API_TOKEN", super::TEST_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// Starts `letterbox serve` on port 0 with `args` and returns it with the API it
/// listens on, once it listens.
pub fn spawn_node(home: &Home, args: &[&str]) -> (Server, Api) {
    spawn(home, args, None)
}

/// `spawn_node`, also keeping every line the node logs (to stdout).
pub fn spawn_node_logged(home: &Home, args: &[&str]) -> (Server, Api, Arc<Mutex<Vec<String>>>) {
    let logged = Arc::new(Mutex::new(Vec::new()));
    let (server, api) = spawn(home, args, Some(logged.clone()));
    (server, api, logged)
}

fn spawn(home: &Home, args: &[&str], keep: Option<Arc<Mutex<Vec<String>>>>) -> (Server, Api) {
    let mut child = letterbox_command(home)
        .args(args)
        .env("LETTERBOX_LOG", "info")
        .spawn()
        .expect("spawn letterbox");
    let stdout = child.stdout.take().unwrap();
    let child = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining stdout so the child never blocks on a full pipe.
    // LETTERBOX_TEST_NODE_LOGS=1 shows what the node logs (to stdout) on stderr.
    let echo = std::env::var_os("LETTERBOX_TEST_NODE_LOGS").is_some();
    let pid = child.0.id();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[node {pid}] {line}");
            }
            if let Some(keep) = &keep {
                keep.lock().unwrap().push(line.clone());
            }
            if let Some(rest) = line.split("listening on http://").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("letterbox printed its listen address");
    (child, Api::new(format!("http://{addr}")))
}

/// Sends `signal` (e.g. "-STOP") to a child.
pub fn signal(server: &Server, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal}");
}

/// Starts `letterbox serve` with `args`, its stdout and stderr going where the test
/// says (a pipe, a file), on a free port chosen first: its log may never be read, so
/// the listen address cannot come from there. Returns once it answers `/healthz`.
pub async fn spawn_with_output(home: &Home, args: &[&str], stdout: Stdio, stderr: Stdio) -> (Server, Api) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = letterbox_command_on(home, &format!("127.0.0.1:{port}"))
        .args(args)
        .env("LETTERBOX_LOG", "info")
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn letterbox");
    let api = Api::new(format!("http://127.0.0.1:{port}"));
    api.wait_healthy().await;
    (Server(child), api)
}
