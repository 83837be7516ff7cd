//! `keybroker audit verify FILE...`: checks the audit log's hash chain and
//! reports the first line that was removed, reordered or edited. Given one
//! file, its rotated predecessors (`FILE.<UTC time>`) are checked first, so
//! the chain is followed across rotations.

use std::path::PathBuf;

use crate::security::audit::{self, Verdict};

/// The files to check, in chain order: as given, or, for one file, its
/// rotated predecessors then the file.
pub fn chain_files(files: &[PathBuf]) -> Vec<PathBuf> {
    match files {
        [one] => {
            let mut all = audit::rotated_siblings(one);
            all.push(one.clone());
            all
        }
        many => many.to_vec(),
    }
}

/// Verifies `files` and describes the result; `Err` when the chain is
/// broken or a file cannot be read.
pub fn verify(files: &[PathBuf]) -> Result<String, String> {
    let files = chain_files(files);
    let names = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    match audit::verify(&files).map_err(|e| format!("cannot read the audit log ({names}): {e}"))? {
        Verdict::Intact { events } => Ok(format!("intact: {events} events chained through {names}")),
        Verdict::Broken { file, line, reason } => Err(format!("broken at {}:{line}: {reason}", file.display())),
    }
}
