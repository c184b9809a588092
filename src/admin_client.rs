//! `lethe admin`: the admin API from the command line, against a server URL (any replica, or
//! the admin listener of one), so operators need not hand-write curl. Prints the server's JSON
//! answer; an error answer goes to stderr with a non-zero exit.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The server (its admin listener with --admin-addr).
    #[arg(long, env = "LETHE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A file whose first line is the admin key (else LETHE_ADMIN_KEY).
    #[arg(long)]
    pub admin_key_file: Option<PathBuf>,
    /// Who you are, for the audit log (X-Lethe-Actor).
    #[arg(long, env = "LETHE_ACTOR")]
    pub actor: Option<String>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Forget-adapters: list, load, unload, history, rollback.
    #[command(subcommand)]
    Adapters(AdapterCommand),
    /// Tenants and their policies.
    #[command(subcommand)]
    Tenants(TenantCommand),
    /// Tenant API keys.
    #[command(subcommand)]
    Keys(KeyCommand),
    /// The audit log of admin changes.
    Audit {
        /// Entries after this revision.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Entries at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// The loaded adapters and their current generations.
    List,
    /// Load a PEFT directory (a path inside the server's adapters root) as NAME.
    Load {
        /// The name tenants' policies refer to.
        name: String,
        /// The PEFT directory, relative to the server's --adapters-root.
        path: String,
        /// Replace the current generation of NAME.
        #[arg(long)]
        replace: bool,
        /// Only if NAME is currently at this generation.
        #[arg(long)]
        expected_generation: Option<String>,
    },
    /// Unload NAME (refused while a tenant enables it, unless --force).
    Unload {
        /// The adapter.
        name: String,
        /// Also disable it for the tenants that enable it.
        #[arg(long)]
        force: bool,
        /// Only if NAME is currently at this generation.
        #[arg(long)]
        expected_generation: Option<String>,
    },
    /// Every generation NAME ever had, and which can be rolled back to.
    History {
        /// The adapter.
        name: String,
    },
    /// Make an earlier generation of NAME current again, on every replica.
    Rollback {
        /// The adapter.
        name: String,
        /// The generation to bring back (see `history`).
        generation: String,
        /// Only if NAME is currently at this generation.
        #[arg(long)]
        expected_generation: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Every tenant, its policy and its key ids.
    List,
    /// One tenant's policy and key ids.
    Get {
        /// The tenant.
        tenant: String,
    },
    /// Create or replace a tenant's policy (JSON, e.g. '{"adapters": ["pii"], "gamma": 2}').
    Put {
        /// The tenant.
        tenant: String,
        /// The policy as JSON (its fields: TenantPolicy in proto/openapi.yaml).
        #[arg(long, conflicts_with = "policy_file")]
        policy: Option<String>,
        /// A file holding the policy as JSON.
        #[arg(long)]
        policy_file: Option<PathBuf>,
    },
    /// Delete a tenant (its keys stop working).
    Delete {
        /// The tenant.
        tenant: String,
    },
    /// Enable an adapter for a tenant.
    Enable {
        /// The tenant.
        tenant: String,
        /// A loaded adapter's name.
        adapter: String,
    },
    /// Disable an adapter for a tenant.
    Disable {
        /// The tenant.
        tenant: String,
        /// The adapter's name.
        adapter: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Issue a key (printed once; only its hash is stored).
    Create {
        /// The tenant the key acts for.
        tenant: String,
        /// Print only the key, for scripts: `KEY=$(lethe admin keys create acme --key-only)`.
        #[arg(long)]
        key_only: bool,
    },
    /// Revoke a key (by its id, as `tenants get` lists it).
    Revoke {
        /// The tenant.
        tenant: String,
        /// The key's id (not the key itself).
        key_id: String,
    },
}

/// What to send: method, path (with query), body.
fn request(cmd: &AdminCommand) -> anyhow::Result<(&'static str, String, Option<Value>)> {
    use AdapterCommand as A;
    use AdminCommand as C;
    use KeyCommand as K;
    use TenantCommand as T;
    let seg = |s: &str| encode(s);
    Ok(match cmd {
        C::Adapters(A::List) => ("GET", "/admin/adapters".into(), None),
        C::Adapters(A::Load { name, path, replace, expected_generation }) => (
            "POST",
            "/admin/adapters".into(),
            Some(json!({ "name": name, "path": path, "replace": replace, "expected_generation": expected_generation })),
        ),
        C::Adapters(A::Unload { name, force, expected_generation }) => {
            let mut q = format!("?force={force}");
            if let Some(g) = expected_generation {
                q.push_str(&format!("&expected_generation={}", seg(g)));
            }
            ("DELETE", format!("/admin/adapters/{}{q}", seg(name)), None)
        }
        C::Adapters(A::History { name }) => ("GET", format!("/admin/adapters/{}/history", seg(name)), None),
        C::Adapters(A::Rollback { name, generation, expected_generation }) => (
            "POST",
            format!("/admin/adapters/{}/rollback", seg(name)),
            Some(json!({ "generation": generation, "expected_generation": expected_generation })),
        ),
        C::Tenants(T::List) => ("GET", "/admin/tenants".into(), None),
        C::Tenants(T::Get { tenant }) => ("GET", format!("/admin/tenants/{}", seg(tenant)), None),
        C::Tenants(T::Put { tenant, policy, policy_file }) => {
            let text = match (policy, policy_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
                (None, None) => bail!("give the policy with --policy JSON or --policy-file FILE"),
            };
            let body: Value = serde_json::from_str(&text).context("the policy is not valid JSON")?;
            ("PUT", format!("/admin/tenants/{}", seg(tenant)), Some(body))
        }
        C::Tenants(T::Delete { tenant }) => ("DELETE", format!("/admin/tenants/{}", seg(tenant)), None),
        C::Tenants(T::Enable { tenant, adapter }) => {
            ("PUT", format!("/admin/tenants/{}/adapters/{}", seg(tenant), seg(adapter)), None)
        }
        C::Tenants(T::Disable { tenant, adapter }) => {
            ("DELETE", format!("/admin/tenants/{}/adapters/{}", seg(tenant), seg(adapter)), None)
        }
        C::Keys(K::Create { tenant, .. }) => ("POST", format!("/admin/tenants/{}/keys", seg(tenant)), None),
        C::Keys(K::Revoke { tenant, key_id }) => {
            ("DELETE", format!("/admin/tenants/{}/keys/{}", seg(tenant), seg(key_id)), None)
        }
        C::Audit { after, limit } => ("GET", format!("/admin/audit?after={after}&limit={limit}"), None),
    })
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The admin key: `--admin-key-file`, else `LETHE_ADMIN_KEY`, else `LETHE_ADMIN_KEY_FILE`.
fn key(args: &AdminArgs) -> anyhow::Result<String> {
    if let Some(f) = &args.admin_key_file {
        return first_line(f);
    }
    if let Ok(k) = std::env::var("LETHE_ADMIN_KEY")
        && !k.trim().is_empty()
    {
        return Ok(k.trim().to_string());
    }
    match std::env::var_os("LETHE_ADMIN_KEY_FILE") {
        Some(f) => first_line(std::path::Path::new(&f)),
        None => bail!("no admin key: set LETHE_ADMIN_KEY or pass --admin-key-file"),
    }
}

fn first_line(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Runs one admin command; prints the answer.
pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let key = key(&args)?;
    let (method, path, body) = request(&args.command)?;
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, answer) = runtime.block_on(async {
        let mut r = reqwest::Client::new()
            .request(reqwest::Method::from_bytes(method.as_bytes()).expect("valid method"), &url)
            .bearer_auth(&key);
        if let Some(a) = &args.actor {
            r = r.header("x-lethe-actor", a);
        }
        if let Some(b) = &body {
            r = r.json(b);
        }
        let resp = r.send().await.with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::Ok((status, serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text))))
    })?;
    if !status.is_success() {
        let message = answer["error"]["message"].as_str().map_or_else(|| answer.to_string(), String::from);
        bail!("{method} {path}: {status}: {message}");
    }
    match (&args.command, answer["api_key"].as_str()) {
        (AdminCommand::Keys(KeyCommand::Create { key_only: true, .. }), Some(key)) => println!("{key}"),
        _ => println!("{}", serde_json::to_string_pretty(&answer)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_map_to_routes() {
        let (m, p, b) = request(&AdminCommand::Adapters(AdapterCommand::Unload {
            name: "pii".into(),
            force: true,
            expected_generation: Some("ab12".into()),
        }))
        .unwrap();
        assert_eq!((m, p.as_str(), b), ("DELETE", "/admin/adapters/pii?force=true&expected_generation=ab12", None));
        let (m, p, b) = request(&AdminCommand::Tenants(TenantCommand::Put {
            tenant: "a b".into(),
            policy: Some(r#"{"gamma": 2}"#.into()),
            policy_file: None,
        }))
        .unwrap();
        assert_eq!((m, p.as_str(), b), ("PUT", "/admin/tenants/a%20b", Some(json!({ "gamma": 2 }))));
        assert!(
            request(&AdminCommand::Tenants(TenantCommand::Put { tenant: "a".into(), policy: None, policy_file: None }))
                .is_err()
        );
    }
}
