//! A PostgreSQL cluster of the test's own (Debian's `postgresql` package), for tests
//! that stop and start the database: `initdb` in a temporary directory (as the
//! `postgres` user when the tests run as root, since initdb refuses root), started on
//! 127.0.0.1 and a free port, stopped and removed when dropped.

use std::path::PathBuf;
use std::process::Command;

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_root: bool,
    /// More `-c name=value` settings for the server.
    settings: Vec<String>,
}

impl PgCluster {
    /// A new cluster, started; `None` (with a note) where PostgreSQL is not installed,
    /// unless `LETTERBOX_REQUIRE_POSTGRES` says the run must have it.
    pub fn start() -> Option<PgCluster> {
        Self::start_with(None)
    }

    /// A new cluster that speaks TLS (`ssl=on`) with this certificate chain and key
    /// (PEM), started.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<PgCluster> {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Option<PgCluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| {
                let mut versions: Vec<PathBuf> = dirs.flatten().map(|d| d.path().join("bin")).collect();
                versions.sort();
                versions.pop()
            })
            .filter(|bin| bin.join("initdb").exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("LETTERBOX_REQUIRE_POSTGRES").is_none(),
                "PostgreSQL is not installed (Debian: apt-get install postgresql)"
            );
            eprintln!("skipped: PostgreSQL is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let as_root = is_root();
        if as_root {
            let status = Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cluster = PgCluster {
            dir,
            bin,
            port,
            as_root,
            settings: Vec::new(),
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        if let Some((cert, key)) = tls {
            // The server refuses a key others can read; as root, the files go to postgres.
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = cluster.dir.path().join("data").join(name);
                std::fs::write(&path, pem).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                if as_root {
                    let status = Command::new("chown").arg("postgres").arg(&path).status().unwrap();
                    assert!(status.success(), "chown postgres {name}");
                }
            }
            cluster.settings = vec![
                "ssl=on".into(),
                "ssl_cert_file=server.crt".into(),
                "ssl_key_file=server.key".into(),
            ];
        }
        cluster.start_again();
        Some(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let tool = self.bin.join(tool);
        let mut command = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool);
            c
        } else {
            Command::new(&tool)
        };
        let output = command.args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{} {args:?}: {}{}",
            tool.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The superuser's URL, for `scratch_database`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The superuser's URL with `host` for the address (a name the server's
    /// certificate may or may not hold).
    pub fn url_via(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }

    /// Stops the server at once (`-m immediate`: what a crash or a lost host looks like
    /// to its clients; it recovers from the WAL when started again).
    pub fn stop(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let data = self.data();
        let log = self.dir.path().join("log").display().to_string();
        let mut options = format!(
            "-h 127.0.0.1 -p {} -k {} -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        for setting in &self.settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &options, "start"],
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let tool = self.bin.join("pg_ctl");
        let mut command = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool);
            c
        } else {
            Command::new(&tool)
        };
        let _ = command.args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}

/// Whether the tests run as root (initdb must then run as `postgres`).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
