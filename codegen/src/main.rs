//! `cargo run -p keybroker-codegen`: regenerate the client's checked-in code.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let root = keybroker_codegen::workspace_root();
    for file in keybroker_codegen::generate(&root)? {
        let path = root.join(&file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, &file.contents).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", file.path.display());
    }
    Ok(())
}
