//! The client's checked-in generated code, descriptor set and proto copies
//! equal what the codegen program makes from proto/ now.

#[test]
fn checked_in_generated_code_matches_the_proto_files() {
    let root = keybroker_codegen::workspace_root();
    let files = keybroker_codegen::generate(&root).expect("codegen");
    assert!(files.len() >= 5);
    for file in files {
        let checked_in = std::fs::read(root.join(&file.path))
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo run -p keybroker-codegen`", file.path.display()));
        assert!(
            checked_in == file.contents,
            "{} is stale: run `cargo run -p keybroker-codegen` and commit the result",
            file.path.display()
        );
    }
}
