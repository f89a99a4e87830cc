//! The static secret access key, read from `secret_access_key_file`, which must be private.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::io::AsyncReadExt;

use crate::store::StoreError;
use crate::store::error::Result;

/// Permission bits that let group or others read the file.
const READABLE_BY_OTHERS: u32 = 0o044;

/// Reads the secret (trimmed), refusing a file that group or others can read: the key would
/// be exposed to every local user, so fail loudly instead of using it.
pub(super) async fn read_secret_file(path: &Path) -> Result<String> {
    let err = |source| StoreError::ReadSecret {
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(err)?;
    // Checked on the opened file, so a swap of the path after the check cannot matter.
    let mode = file.metadata().await.map_err(err)?.permissions().mode() & 0o7777;
    if mode & READABLE_BY_OTHERS != 0 {
        return Err(StoreError::SecretFileTooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut secret = String::new();
    file.read_to_string(&mut secret).await.map_err(err)?;
    Ok(secret.trim().to_string())
}

#[cfg(test)]
mod tests {
    use std::fs::Permissions;

    use super::*;

    #[tokio::test]
    async fn a_secret_readable_by_group_or_others_is_refused_naming_file_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s3-secret");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o444] {
            std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            let err = read_secret_file(&path).await.unwrap_err();
            assert!(
                matches!(&err, StoreError::SecretFileTooOpen { path: p, mode: m } if *p == path && *m == mode),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
        for mode in [0o600, 0o400, 0o620] {
            std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_secret_file(&path).await.unwrap(), "s3cr3t");
        }
        let missing = dir.path().join("missing");
        let err = read_secret_file(&missing).await.unwrap_err();
        assert!(matches!(err, StoreError::ReadSecret { .. }), "{err:?}");
    }
}
