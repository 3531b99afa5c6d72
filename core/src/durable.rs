//! Files written so that a crash leaves either the old content or the new, never a torn mix:
//! the bytes go to `<name>.tmp`, are fsynced, renamed over `<name>`, and the directory is
//! fsynced so the rename itself survives a power loss.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Who may read a file [`write_atomic`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The process's umask decides (certificates, logs).
    Default,
    /// Owner only, mode 0600 (private keys).
    Private,
}

/// Writes `bytes` to `path` atomically and durably. An error names the step and the file.
pub fn write_atomic(path: &Path, bytes: &[u8], access: Access) -> io::Result<()> {
    let named = |step: &str, file: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{step} {}: {e}", file.display()))
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let mut options = OpenOptions::new();
    options.create(true).truncate(true).write(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(tmp).map_err(|e| named("creating", tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| named("writing", tmp, e))?;
    drop(file);
    std::fs::rename(tmp, path).map_err(|e| named("renaming", tmp, e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| named("syncing the directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_atomic(&path, b"old", Access::Default).unwrap();
        write_atomic(&path, b"new", Access::Default).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ca.pem")]);
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca-key.pem");
        write_atomic(&path, b"key", Access::Private).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_failure_names_the_step_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/ca.pem");
        let e = write_atomic(&path, b"x", Access::Default).unwrap_err();
        assert!(
            e.to_string().contains("creating") && e.to_string().contains("ca.pem.tmp"),
            "{e}"
        );
    }
}
