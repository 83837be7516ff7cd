//! What each identity may do: named roles, each allowing a set of RPCs on
//! key-name globs, and identities mapped to roles. Deny by default. The
//! policy is decided per call (and per batch item) against the key the call
//! touches, and is swapped whole when the configuration reloads, so a
//! connection opened before a change follows the new policy at once.
//!
//! ```toml
//! [policy.roles.payments]
//! "payments-*" = ["Wrap", "Unwrap", "GenerateDataKey"]
//! [policy.roles.operators]
//! "*" = ["admin"]
//! [policy.identities]
//! "spiffe://prod/payments" = ["payments"]
//! "uid:1000" = ["payments"]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};

use super::identity::{CertificateFields, Identity, IdentityKind, Peer};
use crate::error::{ErrorCode, ServiceError, ServiceResult};

/// The RPCs a policy grants, by their API names. Batch items are authorized
/// as the single RPC (`BatchWrap` items need `Wrap` on their key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Rpc {
    Wrap,
    Unwrap,
    GenerateDataKey,
    Rewrap,
    CreateKey,
    GetKey,
    ListKeys,
    Rotate,
    SetMinDecryptionVersion,
    DisableKeyVersion,
    EnableKeyVersion,
    DestroyKeyVersion,
    UpdateKeyPolicy,
    Migrate,
    ListBackends,
    GetMigration,
    WatchMigration,
}

impl Rpc {
    /// Every RPC, in API order.
    pub const ALL: [Rpc; 17] = [
        Rpc::Wrap,
        Rpc::Unwrap,
        Rpc::GenerateDataKey,
        Rpc::Rewrap,
        Rpc::CreateKey,
        Rpc::GetKey,
        Rpc::ListKeys,
        Rpc::Rotate,
        Rpc::SetMinDecryptionVersion,
        Rpc::DisableKeyVersion,
        Rpc::EnableKeyVersion,
        Rpc::DestroyKeyVersion,
        Rpc::UpdateKeyPolicy,
        Rpc::Migrate,
        Rpc::ListBackends,
        Rpc::GetMigration,
        Rpc::WatchMigration,
    ];

    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Wrap => "Wrap",
            Rpc::Unwrap => "Unwrap",
            Rpc::GenerateDataKey => "GenerateDataKey",
            Rpc::Rewrap => "Rewrap",
            Rpc::CreateKey => "CreateKey",
            Rpc::GetKey => "GetKey",
            Rpc::ListKeys => "ListKeys",
            Rpc::Rotate => "Rotate",
            Rpc::SetMinDecryptionVersion => "SetMinDecryptionVersion",
            Rpc::DisableKeyVersion => "DisableKeyVersion",
            Rpc::EnableKeyVersion => "EnableKeyVersion",
            Rpc::DestroyKeyVersion => "DestroyKeyVersion",
            Rpc::UpdateKeyPolicy => "UpdateKeyPolicy",
            Rpc::Migrate => "Migrate",
            Rpc::ListBackends => "ListBackends",
            Rpc::GetMigration => "GetMigration",
            Rpc::WatchMigration => "WatchMigration",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// The data-plane RPCs (`KeyBroker`).
    pub fn data() -> impl Iterator<Item = Rpc> {
        Self::ALL.into_iter().filter(|r| matches!(r, Rpc::Wrap | Rpc::Unwrap | Rpc::GenerateDataKey | Rpc::Rewrap))
    }

    /// The read-only admin RPCs.
    pub fn read() -> impl Iterator<Item = Rpc> {
        [Rpc::GetKey, Rpc::ListKeys, Rpc::ListBackends, Rpc::GetMigration, Rpc::WatchMigration].into_iter()
    }

    /// The admin-plane RPCs (`KeyAdmin`).
    pub fn admin() -> impl Iterator<Item = Rpc> {
        Self::ALL.into_iter().skip(4)
    }
}

/// The names a role may grant besides single RPCs.
pub const RPC_GROUPS: &[(&str, &str)] = &[
    ("data", "Wrap, Unwrap, GenerateDataKey, Rewrap"),
    ("read", "GetKey, ListKeys, ListBackends, GetMigration, WatchMigration"),
    ("admin", "every KeyAdmin RPC"),
    ("*", "every RPC"),
];

fn rights_of(name: &str) -> Result<u32, String> {
    let set = |it: &mut dyn Iterator<Item = Rpc>| it.fold(0, |acc, r| acc | r.bit());
    Ok(match name {
        "data" => set(&mut Rpc::data()),
        "read" => set(&mut Rpc::read()),
        "admin" => set(&mut Rpc::admin()),
        "*" => set(&mut Rpc::ALL.into_iter()),
        batch if batch.starts_with("Batch") => {
            return Err(format!(
                "{batch:?}: batch items are authorized as the single RPC; grant {:?}",
                batch.trim_start_matches("Batch")
            ));
        }
        other => match Rpc::ALL.iter().find(|r| r.name() == other) {
            Some(rpc) => rpc.bit(),
            None => {
                let groups: Vec<&str> = RPC_GROUPS.iter().map(|(g, _)| *g).collect();
                return Err(format!(
                    "{other:?} is not an RPC (one of {}) or a group ({})",
                    Rpc::ALL.map(Rpc::name).join(", "),
                    groups.join(", ")
                ));
            }
        },
    })
}

/// `[policy]`: roles and who holds them. Reloaded with the configuration
/// file (SIGHUP, or when the file changes); a policy that does not parse
/// leaves the previous one in force.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Role name → { key-name glob → RPC names or groups (`data`, `read`,
    /// `admin`, `*`) }.
    #[serde(default)]
    pub roles: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// Identity (`spiffe://…`, `uri:…`, `dns:…`, `cn:…`,
    /// `spki-sha256:<hex>`, `uid:<n>`) → role names.
    #[serde(default)]
    pub identities: BTreeMap<String, Vec<String>>,
}

/// `[auth]`: which certificate fields name a caller, and two shorthand
/// roles: `admin_identities` hold every KeyAdmin RPC on every key,
/// `app_identities` hold Wrap, Unwrap, GenerateDataKey and Rewrap on every
/// key. Finer rights go in `[policy]`.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Identities that may call every `KeyAdmin` RPC on every key.
    #[serde(default)]
    pub admin_identities: Vec<String>,
    /// Identities that may call every `KeyBroker` RPC on every key.
    #[serde(default)]
    pub app_identities: Vec<String>,
    /// The client-certificate fields that count as identities, in order:
    /// `uri`, `dns`, `cn`, `spki-sha256`. The first present one names the
    /// caller in logs and audit events.
    #[serde(default = "default_certificate_identities")]
    pub certificate_identities: Vec<IdentityKind>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            admin_identities: Vec::new(),
            app_identities: Vec::new(),
            certificate_identities: default_certificate_identities(),
        }
    }
}

fn default_certificate_identities() -> Vec<IdentityKind> {
    vec![IdentityKind::Uri]
}

struct Rule {
    keys: KeyPattern,
    rights: u32,
}

/// A key-name glob, matched without the regex engine in its common shapes
/// (every call checks one): `*`, a plain name, a prefix followed by `*`.
enum KeyPattern {
    /// `*`: every key.
    Any,
    /// No wildcard: this name only.
    Exact(String),
    /// A plain prefix followed by `*` (which, as in `globset`, matches any
    /// sequence, separators included).
    Prefix(String),
    /// Any other glob.
    Glob(GlobMatcher),
}

impl KeyPattern {
    /// `pattern` compiled; an error names what is wrong with it.
    fn new(pattern: &str) -> Result<Self, globset::Error> {
        // Checked as a glob whatever its shape, so every pattern is
        // accepted or refused as globset would.
        let glob = Glob::new(pattern)?.compile_matcher();
        let plain = |s: &str| !s.contains(['*', '?', '[', ']', '{', '}', '\\', '!']);
        Ok(match pattern.strip_suffix('*') {
            Some("") => Self::Any,
            Some(prefix) if plain(prefix) => Self::Prefix(prefix.to_owned()),
            None if plain(pattern) => Self::Exact(pattern.to_owned()),
            _ => Self::Glob(glob),
        })
    }

    fn is_match(&self, key: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(name) => key == name,
            Self::Prefix(prefix) => key.starts_with(prefix.as_str()),
            Self::Glob(glob) => glob.is_match(key),
        }
    }
}

/// A compiled policy: per identity, the rules of every role it holds.
pub struct Policy {
    fields: CertificateFields,
    grants: HashMap<Identity, Vec<Arc<Rule>>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy").field("identities", &self.grants.len()).finish_non_exhaustive()
    }
}

impl Policy {
    /// Compiles `[auth]` and `[policy]`; every error names the entry.
    pub fn compile(auth: &AuthConfig, policy: &PolicyConfig) -> Result<Self, String> {
        let fields = CertificateFields::new(&auth.certificate_identities)
            .map_err(|e| format!("auth.certificate_identities: {e}"))?;
        let mut roles: HashMap<&str, Vec<Arc<Rule>>> = HashMap::new();
        for (role, rules) in &policy.roles {
            let mut compiled = Vec::new();
            for (pattern, rpcs) in rules {
                let keys = KeyPattern::new(pattern)
                    .map_err(|e| format!("policy.roles.{role}: key pattern {pattern:?}: {e}"))?;
                let mut rights = 0;
                for rpc in rpcs {
                    rights |= rights_of(rpc).map_err(|e| format!("policy.roles.{role}.{pattern:?}: {e}"))?;
                }
                compiled.push(Arc::new(Rule { keys, rights }));
            }
            roles.insert(role.as_str(), compiled);
        }
        let everything = |rights: u32| Arc::new(Rule { keys: KeyPattern::Any, rights });
        let admin = everything(rights_of("admin")?);
        let app = everything(rights_of("data")?);
        let mut grants: HashMap<Identity, Vec<Arc<Rule>>> = HashMap::new();
        for (setting, list, rule) in [
            ("auth.admin_identities", &auth.admin_identities, &admin),
            ("auth.app_identities", &auth.app_identities, &app),
        ] {
            for name in list {
                let identity = Identity::parse(name).map_err(|e| format!("{setting}: {e}"))?;
                grants.entry(identity).or_default().push(rule.clone());
            }
        }
        for (name, held) in &policy.identities {
            let identity = Identity::parse(name).map_err(|e| format!("policy.identities: {e}"))?;
            for role in held {
                let rules = roles
                    .get(role.as_str())
                    .ok_or_else(|| format!("policy.identities.{name:?}: no role named {role:?} in policy.roles"))?;
                grants.entry(identity.clone()).or_default().extend(rules.iter().cloned());
            }
        }
        Ok(Self { fields, grants })
    }

    /// The certificate fields that name callers.
    pub fn certificate_fields(&self) -> &CertificateFields {
        &self.fields
    }

    fn rules<'a>(&'a self, peer: &'a Peer) -> impl Iterator<Item = &'a Rule> {
        peer.identities.iter().filter_map(|i| self.grants.get(i)).flatten().map(|r| r.as_ref())
    }

    /// Whether `peer` may call `rpc` on `key`.
    pub fn allows(&self, peer: &Peer, rpc: Rpc, key: &str) -> bool {
        let bit = rpc.bit();
        self.rules(peer).any(|r| r.rights & bit != 0 && r.keys.is_match(key))
    }

    /// Whether `peer` may call `rpc` on some key (for RPCs that name no key,
    /// and to refuse at once a caller that may call an RPC nowhere).
    pub fn allows_somewhere(&self, peer: &Peer, rpc: Rpc) -> bool {
        let bit = rpc.bit();
        self.rules(peer).any(|r| r.rights & bit != 0)
    }
}

/// The policy in force, swapped whole on reload.
pub struct Gate {
    current: ArcSwap<Policy>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate enforcing `policy`.
    pub fn new(policy: Policy) -> Self {
        Self { current: ArcSwap::from_pointee(policy) }
    }

    /// The policy in force.
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.current.load()
    }

    /// Puts `policy` in force for every call from now on.
    pub fn replace(&self, policy: Policy) {
        self.current.store(Arc::new(policy));
    }

    /// `PERMISSION_DENIED` unless `peer` may call `rpc` on `key`.
    pub fn check(&self, peer: &Peer, rpc: Rpc, key: &str) -> ServiceResult<()> {
        if self.current.load().allows(peer, rpc, key) { Ok(()) } else { Err(denied(peer, rpc, Some(key))) }
    }

    /// `PERMISSION_DENIED` unless `peer` may call `rpc` on some key.
    pub fn check_somewhere(&self, peer: &Peer, rpc: Rpc) -> ServiceResult<()> {
        if self.current.load().allows_somewhere(peer, rpc) { Ok(()) } else { Err(denied(peer, rpc, None)) }
    }
}

/// The refusal: names the identity, the RPC and the key, never the roles.
pub fn denied(peer: &Peer, rpc: Rpc, key: Option<&str>) -> ServiceError {
    let on = key.map(|k| format!(" on key {k:?}")).unwrap_or_default();
    ServiceError::new(
        ErrorCode::PermissionDenied,
        format!("identity {:?} may not call {}{on}", peer.name(), rpc.name()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::identity::Transport;

    fn peer(names: &[&str]) -> Peer {
        Peer::new(names.iter().map(|n| Identity::parse(n).unwrap()).collect(), Transport::Tls)
    }

    fn policy(text: &str) -> Result<Policy, String> {
        #[derive(Deserialize)]
        struct Both {
            #[serde(default)]
            auth: Option<AuthConfig>,
            policy: PolicyConfig,
        }
        let both: Both = toml::from_str(text).map_err(|e| e.to_string())?;
        Policy::compile(&both.auth.unwrap_or_default(), &both.policy)
    }

    /// The shapes matched without the regex engine answer as globset does.
    #[test]
    fn key_patterns_match_as_their_globs_do() {
        let patterns =
            ["*", "**", "demo", "demo*", "demo-*", "de*mo", "demo?", "d[ae]mo", "{demo,prod}-*", "*-prod", "a.b*", ""];
        let keys = ["demo", "demo-1", "demox", "dama", "prod-1", "x-prod", "a.b", "a.bc", "axb", "Demo", "de/mo", ""];
        for pattern in patterns {
            let glob = Glob::new(pattern).unwrap().compile_matcher();
            let compiled = KeyPattern::new(pattern).unwrap();
            for key in keys {
                assert_eq!(compiled.is_match(key), glob.is_match(key), "{pattern:?} on {key:?}");
            }
        }
        assert!(matches!(KeyPattern::new("*"), Ok(KeyPattern::Any)));
        assert!(matches!(KeyPattern::new("demo"), Ok(KeyPattern::Exact(_))));
        assert!(matches!(KeyPattern::new("demo-*"), Ok(KeyPattern::Prefix(_))));
        assert!(matches!(KeyPattern::new("d[ae]mo"), Ok(KeyPattern::Glob(_))));
        assert!(KeyPattern::new("d[ae").is_err());
    }

    #[test]
    fn roles_grant_rpcs_on_key_globs_and_nothing_else() {
        let p = policy(
            r#"
            [policy.roles.payments]
            "payments-*" = ["Wrap", "Unwrap"]
            [policy.roles.ops]
            "*" = ["read"]
            [policy.identities]
            "spiffe://prod/pay" = ["payments"]
            "uid:1000" = ["payments", "ops"]
            "#,
        )
        .unwrap();
        let pay = peer(&["spiffe://prod/pay"]);
        assert!(p.allows(&pay, Rpc::Wrap, "payments-eu"));
        assert!(!p.allows(&pay, Rpc::Wrap, "orders"));
        assert!(!p.allows(&pay, Rpc::GenerateDataKey, "payments-eu"));
        assert!(!p.allows_somewhere(&pay, Rpc::GetKey));
        let uid = Peer::unix(1000);
        assert!(p.allows(&uid, Rpc::Unwrap, "payments-eu") && p.allows(&uid, Rpc::GetKey, "orders"));
        assert!(!p.allows(&peer(&["cn:uid:1000"]), Rpc::Wrap, "payments-eu"));
        assert!(!p.allows(&peer(&[]), Rpc::Wrap, "payments-eu"));
        let err = Gate::new(p).check(&pay, Rpc::Wrap, "orders").unwrap_err();
        assert_eq!(err.code(), ErrorCode::PermissionDenied);
        assert_eq!(err.message(), r#"identity "spiffe://prod/pay" may not call Wrap on key "orders""#);
    }

    #[test]
    fn a_bad_policy_names_the_entry() {
        let err = policy("[policy.roles.a]\n\"*\" = [\"BatchWrap\"]").unwrap_err();
        assert!(err.contains("policy.roles.a") && err.contains("grant \"Wrap\""), "{err}");
        let err = policy("[policy.roles.a]\n\"*\" = [\"Frobnicate\"]").unwrap_err();
        assert!(err.contains("\"Frobnicate\" is not an RPC"), "{err}");
        let err = policy("[policy.identities]\n\"spiffe://x/y\" = [\"nope\"]").unwrap_err();
        assert!(err.contains("no role named \"nope\""), "{err}");
        let err = policy("[policy.identities]\n\"billing\" = []").unwrap_err();
        assert!(err.contains("does not say its kind"), "{err}");
        let err = policy("[auth]\ncertificate_identities = [\"uid\"]\n[policy]").unwrap_err();
        assert!(err.contains("auth.certificate_identities"), "{err}");
    }
}
