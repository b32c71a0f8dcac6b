//! A throwaway Postfix (Debian's `postfix` package, which `.ci/run` installs) for tests
//! that need a real MTA: its own configuration, queue and log in a temporary directory,
//! listening on a free port of 127.0.0.1, never touching the machine's own mail system.
//!
//! It accepts mail from 127.0.0.1 and
//! - delivers `LOCAL_DOMAIN` to local users; no such users exist, so each message for that
//!   domain is accepted and then bounced, with a DSN (RFC 3464) to its envelope sender,
//!   exactly as Postfix does for a mailbox that has gone;
//! - relays every other domain the caller routes to a port of 127.0.0.1 (a test SMTP
//!   server, or letterbox's inbound listener for the bounce domain).
//!
//! Postfix's master runs as root and hands work to processes running as the `postfix`
//! user, so the tests need root (CI runs as root).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::free_port;

/// The domain whose recipients Postfix bounces.
pub const LOCAL_DOMAIN: &str = "mta.test";

pub struct Postfix {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Postfix {
    /// Starts Postfix on a free port, relaying each `(domain, port)` to 127.0.0.1:port.
    pub fn start(routes: &[(&str, u16)]) -> Postfix {
        assert!(
            Path::new("/usr/sbin/postfix").exists(),
            "these tests need Debian's postfix package (apt-get install postfix; .ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Postfix's own processes (user postfix) must reach the queue and write the data
        // directory; the temporary directory is root's and private otherwise.
        set_mode(root, 0o755);
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir(root.join(sub)).unwrap();
        }
        run(Command::new("chown").arg("postfix").arg(root.join("data")));
        let port = free_port();
        let transports: Vec<String> = routes
            .iter()
            .map(|(domain, port)| format!("{domain}=smtp:[127.0.0.1]:{port}"))
            .collect();
        let root_path = root.display();
        // Empty local_recipient_maps: unknown local users are accepted, then bounced by
        // local(8) ("unknown user"), so the answer is a DSN rather than a 550 at RCPT.
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {root_path}/queue
data_directory = {root_path}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
myhostname = {LOCAL_DOMAIN}
mydomain = test
myorigin = {LOCAL_DOMAIN}
mydestination = {LOCAL_DOMAIN}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
maillog_file_prefixes = {root_path}
maillog_file = {root_path}/maillog
transport_maps = inline:{{ {} }}
",
            transports.join(", ")
        );
        std::fs::write(root.join("etc/main.cf"), main_cf).unwrap();
        // No chroot (the queue is not set up as a jail) and only the services these
        // tests use.
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"
        );
        std::fs::write(root.join("etc/master.cf"), master_cf).unwrap();
        let postfix = Postfix { dir, port };
        let started = postfix.command("start").output().unwrap();
        assert!(
            started.status.success(),
            "postfix start: {}{}; its log:\n{}",
            String::from_utf8_lossy(&started.stdout),
            String::from_utf8_lossy(&started.stderr),
            postfix.log()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postfix did not listen on {port}; its log:\n{}",
                postfix.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        postfix
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Postfix's mail log, to show what it did when a test fails.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    fn command(&self, action: &str) -> Command {
        let mut command = Command::new("/usr/sbin/postfix");
        command.arg("-c").arg(self.dir.path().join("etc")).arg(action);
        command
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        // `abort` stops the master and its children at once; the queue is thrown away.
        let _ = self.command("abort").output();
    }
}

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
