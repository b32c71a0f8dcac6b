//! A small disk of the test's own: a tmpfs mounted over a directory (as root), and a
//! way to fill it.

use std::path::Path;

/// A tmpfs mounted over a directory for the test, unmounted when dropped.
pub struct Mount(std::path::PathBuf);

impl Mount {
    /// `None` (with a note) without root or where mounting is not allowed.
    pub fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Some(Mount(dir.to_path_buf())),
            _ => {
                eprintln!("skipped: cannot mount a tmpfs (the full-disk test needs root)");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the file system is full.
pub fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 16];
    let mut written = 0;
    while file.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    // What is left, a page at a time.
    while file.write_all(&chunk[..4096]).is_ok() {
        written += 4096;
    }
    let _ = file.sync_all();
    written
}
