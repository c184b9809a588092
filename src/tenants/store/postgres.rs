//! The state in PostgreSQL, shared by every replica (tokio-postgres, no TLS: see
//! docs/replicas.md).
//!
//! - The schema lives in `migrations/*.sql`, embedded in the binary and applied at start-up
//!   under an advisory lock (replicas starting together apply it once).
//! - A commit is one transaction: lock the `lethe_meta` row (`FOR UPDATE`: writers on all
//!   replicas queue here), read the current state, apply the change, write the rows that differ,
//!   append the audit entry, bump the revision, `NOTIFY lethe_state`, commit. The change is
//!   therefore always applied to the committed state, never to a replica's stale copy.
//! - Replicas follow with `LISTEN lethe_state` on a connection of their own (see
//!   [`StateStore::listen`]) plus a periodic full read.
//!
//! All connections are driven by one background thread with its own small runtime, so the
//! store works from the serving runtime, from `spawn_blocking` and from plain threads alike, and
//! so that database I/O never waits behind HTTP work.

use super::{
    AdapterRecord, AuditEntry, Change, GenerationRecord, Intent, Notice, State, StateStore, StoreError, TenantRecord,
    VERSION,
};
use crate::tenants::keys::KeyRecord;
use futures::StreamExt;
use futures::future::BoxFuture;
use std::time::Duration;
use tokio_postgres::{AsyncMessage, Client, Config, GenericClient, IsolationLevel, NoTls, Transaction};

/// The NOTIFY channel commits announce themselves on (payload `revision:unix_ms`).
const CHANNEL: &str = "lethe_state";
/// Serializes migrations between replicas starting at once (any constant; "lethe" in ASCII).
const MIGRATION_LOCK: i64 = 0x006c_6574_6865;
/// Longest wait for one store operation before it counts as unreachable.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// The migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "state", include_str!("../../../migrations/0001_state.sql"))];

pub struct PgStore {
    config: Config,
    described: String,
    runtime: tokio::runtime::Handle,
    /// The connection for reads and commits (reconnected when lost). Held for the whole of an
    /// operation: statements of two transactions must never interleave on one connection.
    client: tokio::sync::Mutex<Option<Client>>,
    _stop: std::sync::mpsc::SyncSender<()>,
}

impl PgStore {
    /// Connects to `url` (a `postgres://` URL or a key=value connection string), applies the
    /// migrations, and checks the schema. Fails with a clear error if the database cannot be
    /// reached: a replica must not start on a truth it cannot read.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let mut config: Config =
            url.parse().map_err(|e| StoreError::Database(format!("invalid state store URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(OP_TIMEOUT);
        }
        // Notice a database that vanished without closing the connection (a partition).
        config.keepalives(true).keepalives_idle(Duration::from_secs(10));
        config.application_name("lethe");
        let described = describe(&config);
        let (runtime, stop) = spawn_runtime()?;
        let store = Self { config, described, runtime, client: tokio::sync::Mutex::new(None), _stop: stop };
        futures::executor::block_on(store.migrate())
            .map_err(|e| reword(e, &format!("cannot open the state store {}", store.described)))?;
        Ok(store)
    }

    /// A new connection, driven by the store's runtime.
    async fn connect(&self) -> Result<Client, StoreError> {
        let config = self.config.clone();
        self.runtime
            .spawn(async move {
                let (client, connection) = config.connect(NoTls).await.map_err(db_err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "state store connection ended");
                    }
                });
                Ok::<_, StoreError>(client)
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    /// Runs `f` on the connection (connecting again if it was lost), alone and with a deadline;
    /// a connection that failed is dropped, so the next call reconnects.
    async fn with_client<T>(&self, f: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.connect().await?);
        }
        let client = slot.as_mut().expect("connected above");
        let deadline = {
            let _rt = self.runtime.enter();
            tokio::time::sleep(OP_TIMEOUT)
        };
        let r = tokio::select! {
            r = f(client) => r,
            _ = deadline => Err(StoreError::Unavailable(format!("no answer within {OP_TIMEOUT:?}"))),
        };
        if matches!(r, Err(StoreError::Unavailable(_))) {
            *slot = None;
        }
        r
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.with_client(async |c| {
            c.query_one("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db_err)?;
            let r = apply_migrations(c).await;
            c.query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map_err(db_err)?;
            r
        })
        .await
    }
}

impl StateStore for PgStore {
    fn describe(&self) -> String {
        self.described.clone()
    }

    fn is_persistent(&self) -> bool {
        true
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn load(&self) -> BoxFuture<'_, Result<State, StoreError>> {
        Box::pin(self.with_client(async |c| {
            // One consistent snapshot of all tables.
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(db_err)?;
            let state = read_state(&tx, false).await?;
            tx.commit().await.map_err(db_err)?;
            Ok(state)
        }))
    }

    fn commit<'a>(&'a self, intent: Intent, change: Change<'a>) -> BoxFuture<'a, Result<Option<State>, StoreError>> {
        Box::pin(self.with_client(async move |c| {
            let tx = c.transaction().await.map_err(db_err)?;
            let Some(next) = commit_in(&tx, intent, change).await? else {
                return Ok(None); // dropping the transaction rolls it back
            };
            // The answer to COMMIT is the commit: an error here means "not acknowledged".
            tx.commit().await.map_err(db_err)?;
            Ok(Some(next))
        }))
    }

    fn audit(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
        Box::pin(self.with_client(async move |c| {
            let rows = c
                .query(
                    "SELECT revision, (extract(epoch FROM at) * 1000)::bigint, actor, action, target, replica, \
                     request_id, before::text, after::text FROM lethe_audit WHERE revision > $1 \
                     ORDER BY revision LIMIT $2",
                    &[&(after as i64), &(limit.min(i64::MAX as usize) as i64)],
                )
                .await
                .map_err(db_err)?;
            rows.iter()
                .map(|r| {
                    let json = |i: usize| -> Result<serde_json::Value, StoreError> {
                        serde_json::from_str(r.get::<_, &str>(i)).map_err(|e| StoreError::Database(e.to_string()))
                    };
                    Ok(AuditEntry {
                        revision: r.get::<_, i64>(0) as u64,
                        at_ms: r.get::<_, i64>(1) as u64,
                        intent: Intent {
                            actor: r.get(2),
                            action: r.get(3),
                            target: r.get(4),
                            replica: r.get(5),
                            request_id: r.get(6),
                        },
                        before: json(7)?,
                        after: json(8)?,
                    })
                })
                .collect()
        }))
    }

    fn listen(&self) -> BoxFuture<'_, Result<Option<tokio::sync::mpsc::UnboundedReceiver<Notice>>, StoreError>> {
        let config = self.config.clone();
        let task = self.runtime.spawn(async move {
            let (client, mut connection) = config.connect(NoTls).await.map_err(db_err)?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
            // Drives the connection, forwarding notifications, until it ends or nobody listens;
            // holds the client until then (dropping it would close the connection).
            tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let mut ready = Some(ready_tx);
                let client_held = async {
                    if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok()
                        && let Some(r) = ready.take()
                    {
                        let _ = r.send(());
                    }
                    std::future::pending::<()>().await;
                };
                let pump = async {
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) if n.channel() == CHANNEL => {
                                if let Some(notice) = parse_notice(n.payload())
                                    && tx.send(notice).is_err()
                                {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "state store listener connection lost");
                                break;
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = client_held => {}
                    _ = pump => {}
                    _ = tx.closed() => {}
                }
            });
            tokio::time::timeout(OP_TIMEOUT, ready_rx)
                .await
                .map_err(|_| StoreError::Unavailable("LISTEN was not answered".into()))?
                .map_err(|_| StoreError::Unavailable("the listener connection closed".into()))?;
            Ok(Some(rx))
        });
        Box::pin(async move { task.await.map_err(|e| StoreError::Unavailable(e.to_string()))? })
    }
}

/// A runtime on a thread of its own that drives the store's connections; it stops when the
/// returned sender is dropped.
fn spawn_runtime() -> Result<(tokio::runtime::Handle, std::sync::mpsc::SyncSender<()>), StoreError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Database(format!("cannot start the state store runtime: {e}")))?;
    let handle = rt.handle().clone();
    let (stop, stopped) = std::sync::mpsc::sync_channel::<()>(0);
    std::thread::Builder::new()
        .name("lethe-store".into())
        .spawn(move || {
            // Runs spawned connection tasks until the store is dropped.
            rt.block_on(async {
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = stopped.recv();
                })
                .await;
            });
            rt.shutdown_background();
        })
        .map_err(|e| StoreError::Database(format!("cannot start the state store thread: {e}")))?;
    Ok((handle, stop))
}

/// `postgres://user@host:port/db`, without the password.
fn describe(c: &Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
    format!(
        "postgres://{}@{}:{}/{}",
        c.get_user().unwrap_or(""),
        hosts.join(","),
        if ports.is_empty() { "5432".into() } else { ports.join(",") },
        c.get_dbname().unwrap_or("")
    )
}

fn parse_notice(payload: &str) -> Option<Notice> {
    let (rev, ms) = payload.split_once(':')?;
    Some(Notice { revision: rev.parse().ok()?, committed_at_ms: ms.parse().ok()? })
}

/// Connection trouble is retryable (`Unavailable`: 503 for admin writes); anything the server
/// answered with is not.
fn db_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        // I/O, a closed connection, a timeout.
        None => StoreError::Unavailable(e.to_string()),
        Some(d) => {
            let code = d.code().code();
            // Connection exceptions, the server shutting down or starting, too many clients.
            if code.starts_with("08") || code.starts_with("57P") || code == "53300" {
                StoreError::Unavailable(d.message().to_string())
            } else {
                StoreError::Database(d.to_string())
            }
        }
    }
}

fn reword(e: StoreError, context: &str) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{context}: {m}")),
        StoreError::Database(m) => StoreError::Database(format!("{context}: {m}")),
        other => other,
    }
}

async fn apply_migrations(c: &mut Client) -> Result<(), StoreError> {
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS lethe_schema_migrations (version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(db_err)?;
    let applied: Vec<i32> = c
        .query("SELECT version FROM lethe_schema_migrations ORDER BY version", &[])
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = applied.iter().find(|v| **v > known) {
        return Err(StoreError::Database(format!(
            "the database schema is at version {newer}, newer than this lethe knows ({known}): upgrade lethe"
        )));
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = c.transaction().await.map_err(db_err)?;
        tx.batch_execute(sql).await.map_err(db_err)?;
        tx.execute("INSERT INTO lethe_schema_migrations (version, name) VALUES ($1, $2)", &[version, name])
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(version, name, "state store migration applied");
    }
    Ok(())
}

/// Reads the whole state (inside the caller's transaction); `lock` takes the meta row for update.
async fn read_state(c: &impl GenericClient, lock: bool) -> Result<State, StoreError> {
    let meta = c
        .query_one(
            if lock {
                "SELECT revision, keyed FROM lethe_meta WHERE id = 1 FOR UPDATE"
            } else {
                "SELECT revision, keyed FROM lethe_meta WHERE id = 1"
            },
            &[],
        )
        .await
        .map_err(db_err)?;
    let mut state =
        State { version: VERSION, revision: meta.get::<_, i64>(0) as u64, keyed: meta.get(1), ..State::default() };
    let bad = |what: &str, e: serde_json::Error| StoreError::Database(format!("{what} in the database: {e}"));
    for r in c.query("SELECT name, policy::text FROM lethe_tenants", &[]).await.map_err(db_err)? {
        let policy =
            serde_json::from_str(r.get::<_, &str>(1)).map_err(|e| bad("a tenant policy lethe cannot read", e))?;
        state.tenants.insert(r.get(0), TenantRecord { policy, keys: Vec::new() });
    }
    for r in c.query("SELECT tenant, id, hash, created FROM lethe_api_keys ORDER BY seq", &[]).await.map_err(db_err)? {
        if let Some(t) = state.tenants.get_mut(r.get::<_, &str>(0)) {
            t.keys.push(KeyRecord { id: r.get(1), hash: r.get(2), created: r.get::<_, i64>(3) as u64 });
        }
    }
    for r in c
        .query("SELECT name, generation, path, updated_at, updated_by FROM lethe_adapters", &[])
        .await
        .map_err(db_err)?
    {
        let record = AdapterRecord {
            generation: r.get(1),
            path: r.get(2),
            updated_at: r.get::<_, i64>(3) as u64,
            updated_by: r.get(4),
        };
        state.adapters.insert(r.get(0), record);
    }
    for r in c
        .query(
            "SELECT name, generation, path, profile::text, first_loaded_at, loaded_by, last_current_at, \
             last_current_revision FROM lethe_adapter_generations ORDER BY seq",
            &[],
        )
        .await
        .map_err(db_err)?
    {
        let profile = match r.get::<_, Option<&str>>(3) {
            Some(p) => Some(serde_json::from_str(p).map_err(|e| bad("an adapter profile", e))?),
            None => None,
        };
        state.history.entry(r.get(0)).or_default().push(GenerationRecord {
            generation: r.get(1),
            path: r.get(2),
            profile,
            first_loaded_at: r.get::<_, i64>(4) as u64,
            loaded_by: r.get(5),
            last_current_at: r.get::<_, i64>(6) as u64,
            last_current_revision: r.get::<_, i64>(7) as u64,
        });
    }
    Ok(state)
}

/// The body of a commit transaction; `None` if the change refused itself.
async fn commit_in(c: &Transaction<'_>, intent: Intent, change: Change<'_>) -> Result<Option<State>, StoreError> {
    let current = read_state(c, true).await?;
    let mut next = current.clone();
    if !change(&mut next) {
        return Ok(None);
    }
    next.version = VERSION;
    next.revision = current.revision + 1;
    next.keyed |= next.has_keys();
    write_changes(c, &current, &next).await.map_err(db_err)?;
    let entry = AuditEntry::new(next.revision, intent, &current, &next);
    let rev = next.revision as i64;
    c.execute(
        "INSERT INTO lethe_audit (revision, actor, action, target, replica, request_id, before, after) \
         VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8::text::jsonb)",
        &[
            &rev,
            &entry.intent.actor,
            &entry.intent.action,
            &entry.intent.target,
            &entry.intent.replica,
            &entry.intent.request_id,
            &entry.before.to_string(),
            &entry.after.to_string(),
        ],
    )
    .await
    .map_err(db_err)?;
    c.execute("UPDATE lethe_meta SET revision = $1, keyed = $2 WHERE id = 1", &[&rev, &next.keyed])
        .await
        .map_err(db_err)?;
    c.execute(
        "SELECT pg_notify($1, $2 || ':' || (extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
        &[&CHANNEL, &rev.to_string()],
    )
    .await
    .map_err(db_err)?;
    Ok(Some(next))
}

/// Writes the rows of `next` that differ from `current`.
async fn write_changes(c: &Transaction<'_>, current: &State, next: &State) -> Result<(), tokio_postgres::Error> {
    // Tenants (keys follow their tenant: deleted by cascade, rewritten when they changed).
    for name in current.tenants.keys().filter(|n| !next.tenants.contains_key(*n)) {
        c.execute("DELETE FROM lethe_tenants WHERE name = $1", &[name]).await?;
    }
    for (name, t) in &next.tenants {
        let before = current.tenants.get(name);
        if before.map(|b| &b.policy) != Some(&t.policy) {
            let policy = serde_json::to_string(&t.policy).expect("policies serialize");
            c.execute(
                "INSERT INTO lethe_tenants (name, policy) VALUES ($1, $2::text::jsonb) \
                 ON CONFLICT (name) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()",
                &[name, &policy],
            )
            .await?;
        }
        let old_keys: &[KeyRecord] = before.map_or(&[], |b| &b.keys);
        for k in old_keys.iter().filter(|k| !t.keys.contains(k)) {
            c.execute("DELETE FROM lethe_api_keys WHERE id = $1", &[&k.id]).await?;
        }
        for k in t.keys.iter().filter(|k| !old_keys.contains(k)) {
            c.execute(
                "INSERT INTO lethe_api_keys (id, tenant, hash, created) VALUES ($1, $2, $3, $4)",
                &[&k.id, name, &k.hash, &(k.created as i64)],
            )
            .await?;
        }
    }
    // Adapters.
    for name in current.adapters.keys().filter(|n| !next.adapters.contains_key(*n)) {
        c.execute("DELETE FROM lethe_adapters WHERE name = $1", &[name]).await?;
    }
    for (name, a) in &next.adapters {
        if current.adapters.get(name) != Some(a) {
            c.execute(
                "INSERT INTO lethe_adapters (name, generation, path, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (name) DO UPDATE SET generation = EXCLUDED.generation, path = EXCLUDED.path, \
                 updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by",
                &[name, &a.generation, &a.path, &(a.updated_at as i64), &a.updated_by],
            )
            .await?;
        }
    }
    // History only grows (or moves `last_current_at`).
    let empty = Vec::new();
    for (name, gens) in &next.history {
        let old: &Vec<GenerationRecord> = current.history.get(name).unwrap_or(&empty);
        for g in gens.iter().filter(|g| !old.contains(g)) {
            let profile = g.profile.as_ref().map(|p| p.to_string());
            c.execute(
                "INSERT INTO lethe_adapter_generations \
                 (name, generation, path, profile, first_loaded_at, loaded_by, last_current_at, last_current_revision) \
                 VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8) \
                 ON CONFLICT (name, generation) DO UPDATE SET last_current_at = EXCLUDED.last_current_at, \
                 last_current_revision = EXCLUDED.last_current_revision",
                &[
                    name,
                    &g.generation,
                    &g.path,
                    &profile,
                    &(g.first_loaded_at as i64),
                    &g.loaded_by,
                    &(g.last_current_at as i64),
                    &(g.last_current_revision as i64),
                ],
            )
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_never_show_the_password() {
        let c: Config = "postgres://lethe:s3cret-pw@db.example:6543/lethe".parse().unwrap();
        let d = describe(&c);
        assert_eq!(d, "postgres://lethe@db.example:6543/lethe");
        let c: Config = "host=db user=lethe password=s3cret-pw dbname=x".parse().unwrap();
        assert!(!describe(&c).contains("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn notices_parse() {
        assert_eq!(parse_notice("12:1700000000123"), Some(Notice { revision: 12, committed_at_ms: 1_700_000_000_123 }));
        assert_eq!(parse_notice("x"), None);
    }
}
