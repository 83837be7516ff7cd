//! Every TOML example in the README is a valid keybroker configuration
//! fragment: each parses into the configuration types, whose unknown-field
//! checks catch a misspelt setting.

use keybroker_server::config::{BackendConfig, RootKeyConfig};

#[test]
fn readme_toml_examples_use_real_settings() {
    let readme = std::fs::read_to_string(keybroker_codegen::workspace_root().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme.split("```toml\n").skip(1).filter_map(|b| b.split("```").next()).collect();
    assert!(blocks.len() >= 3, "expected the configuration examples in the README");
    for block in blocks {
        let table: toml::Table = block.parse().unwrap_or_else(|e| panic!("invalid TOML in README:\n{block}\n{e}"));
        if let Some(backends) = table.get("backends").and_then(|b| b.as_table()) {
            for (name, backend) in backends {
                backend
                    .clone()
                    .try_into::<BackendConfig>()
                    .unwrap_or_else(|e| panic!("README backend {name:?} is not a valid backend: {e}"));
            }
        }
        if let Some(store) = table.get("store") {
            store
                .clone()
                .try_into::<keybroker_server::config::StoreConfig>()
                .unwrap_or_else(|e| panic!("README [store]: {e}\n{block}"));
        }
        if let Some(root) = table.get("root_key") {
            root.clone().try_into::<RootKeyConfig>().unwrap_or_else(|e| panic!("README [root_key]: {e}"));
        }
        if table.contains_key("policy") || table.contains_key("auth") {
            // The policy examples compile: roles, RPC names, typed identities.
            let auth: keybroker_server::config::AuthConfig =
                table.get("auth").cloned().map(|a| a.try_into().unwrap()).unwrap_or_default();
            let policy: keybroker_server::config::PolicyConfig =
                table.get("policy").cloned().map(|p| p.try_into().unwrap()).unwrap_or_default();
            keybroker_server::security::policy::Policy::compile(&auth, &policy)
                .unwrap_or_else(|e| panic!("README policy example: {e}\n{block}"));
        }
        if table.contains_key("tls") && table.contains_key("store") {
            // A whole configuration: every section must deserialize.
            toml::Value::Table(table.clone())
                .try_into::<keybroker_server::config::Config>()
                .unwrap_or_else(|e| panic!("README configuration example: {e}\n{block}"));
        }
    }
}
