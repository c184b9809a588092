//! The admin API (`/admin/*`, admin key only): forget-adapters, their history and rollback,
//! tenants, keys, and the audit log.
//!
//! Every change is one commit to the state store (see [`super::control`]): checked against the
//! store's current state (not this replica's copy, which may be a moment behind another
//! replica's change), written with its audit entry in one transaction, applied on this replica,
//! and only then acknowledged. A change the store cannot take is not acknowledged (500, or 503
//! while the store is unreachable). Requests in flight keep what they started with.

use super::AppState;
use super::auth::Admin;
use super::error::ApiError;
use super::extract::{JsonBody, One, PathParams, QueryParams};
use crate::adapters::AdapterError;
use crate::adapters::registry::{AdapterInfo, check_name, info};
use crate::tenants::keys::{self, KeyRecord};
use crate::tenants::policy::check_tenant_name;
use crate::tenants::store::{AdapterRecord, State as Snapshot, unix_secs};
use crate::tenants::{DEFAULT_TENANT, TenantPolicy, TenantRecord};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;

type Resp = Result<(StatusCode, Json<Value>), ApiError>;

fn ok(v: impl Serialize) -> Resp {
    Ok((StatusCode::OK, Json(serde_json::to_value(v).map_err(|e| ApiError::Internal(e.to_string()))?)))
}

// ------------------------------------------------------------------------------- adapters

pub async fn list_adapters(_: Admin, State(s): State<Arc<AppState>>) -> Resp {
    let (loaded_bytes, retired_bytes) = s.adapters.bytes();
    // `retired_bytes`: replaced or unloaded generations that in-flight requests still hold.
    // `unavailable`: adapters the state names that this replica cannot load (their tenants get 503).
    ok(json!({
        "object": "list",
        "data": s.adapters.list(),
        "loaded_bytes": loaded_bytes,
        "retired_bytes": retired_bytes,
        "unavailable": s.control.unavailable(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapter {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub replace: bool,
    /// With `replace`: the generation the caller believes is current (409 if it is not).
    #[serde(default)]
    pub expected_generation: Option<String>,
}

/// Refuses a change to adapter `name` (currently at `current`) whose caller expected another
/// generation.
fn check_expected(name: &str, current: Option<&str>, expected: Option<&str>) -> Result<(), ApiError> {
    match expected {
        Some(want) if current != Some(want) => Err(ApiError::Conflict(format!(
            "adapter {name:?} is at generation {}, not the expected {want}",
            current.unwrap_or("(none: not loaded)")
        ))),
        _ => Ok(()),
    }
}

fn profile_json(a: &crate::adapters::LoadedAdapter) -> Option<Value> {
    a.profile.as_ref().and_then(|p| serde_json::to_value(p).ok())
}

pub async fn load_adapter(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    JsonBody(One(req)): JsonBody<One<LoadAdapter>>,
) -> Resp {
    check_name(&req.name).map_err(|e| ApiError::invalid(e.to_string(), Some("name".into())))?;
    // A load takes a while: run it as a task of its own, so a client that hangs up mid-load
    // (dropping this handler) cannot leave the change half done or release the admin lock early.
    tokio::spawn(apply_load(s, admin, req)).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn apply_load(s: Arc<AppState>, admin: Admin, req: LoadAdapter) -> Resp {
    let _guard = s.admin_lock.lock().await;
    // Early answers from this replica's view; the commit checks again against the store.
    let current = s.tenants.snapshot().adapters.get(&req.name).map(|r| r.generation.clone());
    if current.is_some() && !req.replace {
        return Err(AdapterError::Exists(req.name).into());
    }
    check_expected(&req.name, current.as_deref(), req.expected_generation.as_deref())?;
    // Read, validate and pack once; keep the very bytes read as this generation, before any
    // replica can hear of it.
    let started = std::time::Instant::now();
    let (control, name, path) = (s.control.clone(), req.name.clone(), req.path.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        let (a, files) = control.adapters.prepare(&name, &path)?;
        control.adapters.check_fits(&a)?;
        control.keep(&a.generation, &files)?;
        Ok::<_, AdapterError>(a)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let elapsed = started.elapsed();
    metrics::histogram!(crate::telemetry::ADAPTER_LOAD_SECONDS).record(elapsed.as_secs_f64());

    let action = if req.replace { "adapter.replace" } else { "adapter.load" };
    let intent = s.control.intent(&admin.actor, action, format!("adapter/{}", req.name), admin.request_id.clone());
    let record = AdapterRecord {
        generation: loaded.generation.clone(),
        path: req.path.clone(),
        updated_at: unix_secs(),
        updated_by: admin.actor.clone(),
    };
    let (name, replace, expected, profile) =
        (req.name.clone(), req.replace, req.expected_generation.clone(), profile_json(&loaded));
    let previous = s
        .control
        .commit(intent, vec![loaded.clone()], move |st: &mut Snapshot| {
            let previous = st.adapters.get(&name).map(|r| r.generation.clone());
            if previous.is_some() && !replace {
                return Err(AdapterError::Exists(name).into());
            }
            check_expected(&name, previous.as_deref(), expected.as_deref())?;
            st.make_current(&name, record, profile);
            Ok::<_, ApiError>(previous)
        })
        .await?;
    tracing::info!(adapter = %req.name, generation = %loaded.generation, previous = ?previous,
        ms = elapsed.as_millis() as u64, actor = %admin.actor, "adapter loaded");
    let status = if previous.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    let shown: AdapterInfo = info(&s.adapters.get(&req.name).unwrap_or(loaded));
    Ok((
        status,
        Json(json!({ "adapter": shown, "load_ms": elapsed.as_secs_f64() * 1e3, "previous_generation": previous })),
    ))
}

#[derive(Debug, Deserialize)]
pub struct UnloadQuery {
    #[serde(default)]
    pub force: bool,
    /// The generation the caller believes is current (409 if it is not).
    #[serde(default)]
    pub expected_generation: Option<String>,
}

pub async fn unload_adapter(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    PathParams(name): PathParams<String>,
    QueryParams(q): QueryParams<UnloadQuery>,
) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let intent = s.control.intent(&admin.actor, "adapter.unload", format!("adapter/{name}"), admin.request_id);
    let n = name.clone();
    let (generation, users) = s
        .control
        .commit(intent, Vec::new(), move |st: &mut Snapshot| {
            let Some(record) = st.adapters.get(&n) else {
                return Err(AdapterError::UnknownAdapter(n).into());
            };
            let generation = record.generation.clone();
            check_expected(&n, Some(&generation), q.expected_generation.as_deref())?;
            let users: Vec<String> =
                st.tenants.iter().filter(|(_, t)| t.policy.adapters.contains(&n)).map(|(t, _)| t.clone()).collect();
            if !users.is_empty() && !q.force {
                return Err(ApiError::Conflict(format!(
                    "adapter {n:?} is enabled for tenants {users:?}; disable it there first or pass ?force=true"
                )));
            }
            // Policies first (published before the unload), so no tenant is ever served
            // without it while its policy still names it.
            st.adapters.remove(&n);
            for t in st.tenants.values_mut() {
                t.policy.adapters.retain(|a| a != &n);
            }
            Ok::<_, ApiError>((generation, users))
        })
        .await?;
    tracing::info!(adapter = %name, generation = %generation, actor = %admin.actor, "adapter unloaded");
    ok(json!({ "deleted": name, "generation": generation, "disabled_for": users }))
}

/// One generation in an adapter's history, as `GET /admin/adapters/{name}/history` shows it.
#[derive(Debug, Serialize)]
struct GenerationView {
    generation: String,
    path: String,
    profile: Option<Value>,
    first_loaded_at: u64,
    loaded_by: String,
    last_current_at: u64,
    current: bool,
    /// Whether its files are kept, i.e. whether it can be rolled back to.
    kept: bool,
}

pub async fn adapter_history(_: Admin, State(s): State<Arc<AppState>>, PathParams(name): PathParams<String>) -> Resp {
    let st = s.tenants.snapshot();
    let Some(history) = st.history.get(&name) else {
        return Err(ApiError::NotFound(format!("no adapter named {name:?} was ever loaded")));
    };
    let current = st.adapters.get(&name).map(|r| r.generation.clone());
    let data: Vec<GenerationView> = history
        .iter()
        .map(|g| GenerationView {
            generation: g.generation.clone(),
            path: g.path.clone(),
            profile: g.profile.clone(),
            first_loaded_at: g.first_loaded_at,
            loaded_by: g.loaded_by.clone(),
            last_current_at: g.last_current_at,
            current: current.as_deref() == Some(g.generation.as_str()),
            kept: s.control.generations().is_some_and(|k| k.contains(&g.generation)),
        })
        .collect();
    ok(json!({ "object": "list", "name": name, "current": current, "data": data }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    pub generation: String,
    #[serde(default)]
    pub expected_generation: Option<String>,
}

pub async fn rollback_adapter(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    PathParams(name): PathParams<String>,
    JsonBody(One(req)): JsonBody<One<Rollback>>,
) -> Resp {
    tokio::spawn(apply_rollback(s, admin, name, req)).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn apply_rollback(s: Arc<AppState>, admin: Admin, name: String, req: Rollback) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let st = s.tenants.snapshot();
    let Some(target) = st.history.get(&name).and_then(|h| h.iter().find(|g| g.generation == req.generation)).cloned()
    else {
        return Err(ApiError::NotFound(format!("adapter {name:?} never had generation {:?}", req.generation)));
    };
    let current = st.adapters.get(&name).map(|r| r.generation.clone());
    check_expected(&name, current.as_deref(), req.expected_generation.as_deref())?;
    let (control, n, g, p) = (s.control.clone(), name.clone(), target.generation.clone(), target.path.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        let a = control.load_generation(&n, &g, &p)?;
        control.adapters.check_fits(&a)?;
        Ok::<_, AdapterError>(a)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| match e {
        AdapterError::NotFound(_) | AdapterError::OutsideRoot(_) => ApiError::Conflict(format!(
            "the files of generation {} of {name:?} are no longer kept, and {:?} no longer holds them: {e}",
            req.generation, target.path
        )),
        other => other.into(),
    })?;
    let intent = s.control.intent(&admin.actor, "adapter.rollback", format!("adapter/{name}"), admin.request_id);
    let record = AdapterRecord {
        generation: target.generation.clone(),
        path: target.path.clone(),
        updated_at: unix_secs(),
        updated_by: admin.actor.clone(),
    };
    let (n, expected, profile) = (name.clone(), req.expected_generation.clone(), target.profile.clone());
    let previous = s
        .control
        .commit(intent, vec![loaded.clone()], move |st: &mut Snapshot| {
            if !st.history.get(&n).is_some_and(|h| h.iter().any(|g| g.generation == record.generation)) {
                return Err(ApiError::NotFound(format!("adapter {n:?} never had generation {:?}", record.generation)));
            }
            let previous = st.adapters.get(&n).map(|r| r.generation.clone());
            check_expected(&n, previous.as_deref(), expected.as_deref())?;
            st.make_current(&n, record, profile);
            Ok::<_, ApiError>(previous)
        })
        .await?;
    tracing::info!(adapter = %name, generation = %req.generation, previous = ?previous, actor = %admin.actor, "adapter rolled back");
    let shown: AdapterInfo = info(&s.adapters.get(&name).unwrap_or(loaded));
    ok(json!({ "adapter": shown, "previous_generation": previous }))
}

// ------------------------------------------------------------------------------ audit log

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    /// Entries with a revision above this one.
    #[serde(default)]
    pub after: u64,
    #[serde(default = "default_audit_limit")]
    pub limit: usize,
}

fn default_audit_limit() -> usize {
    100
}

pub async fn audit_log(_: Admin, State(s): State<Arc<AppState>>, QueryParams(q): QueryParams<AuditQuery>) -> Resp {
    let limit = q.limit.clamp(1, 1000);
    let data = s.tenants.store().audit(q.after, limit).await?;
    let last = data.last().map(|e| e.revision);
    ok(json!({ "object": "list", "data": data, "last_revision": last, "revision": s.tenants.revision() }))
}

// -------------------------------------------------------------------------------- tenants

#[derive(Debug, Serialize)]
struct TenantView {
    name: String,
    policy: TenantPolicy,
    keys: Vec<KeyView>,
}

#[derive(Debug, Serialize)]
struct KeyView {
    id: String,
    created: u64,
}

fn view(name: &str, rec: Option<&TenantRecord>) -> TenantView {
    TenantView {
        name: name.to_string(),
        policy: rec.map(|r| r.policy.clone()).unwrap_or_default(),
        keys: rec
            .map_or(Vec::new(), |r| r.keys.iter().map(|k| KeyView { id: k.id.clone(), created: k.created }).collect()),
    }
}

pub async fn list_tenants(_: Admin, State(s): State<Arc<AppState>>) -> Resp {
    let st = s.tenants.snapshot();
    let mut data = Vec::new();
    if !st.tenants.contains_key(DEFAULT_TENANT) {
        data.push(view(DEFAULT_TENANT, None));
    }
    data.extend(st.tenants.iter().map(|(n, r)| view(n, Some(r))));
    ok(json!({ "object": "list", "data": data }))
}

pub async fn get_tenant(_: Admin, State(s): State<Arc<AppState>>, PathParams(tenant): PathParams<String>) -> Resp {
    let st = s.tenants.snapshot();
    match st.tenants.get(&tenant) {
        Some(r) => ok(view(&tenant, Some(r))),
        None if tenant == DEFAULT_TENANT => ok(view(&tenant, None)),
        None => Err(ApiError::NotFound(format!("no tenant {tenant:?}"))),
    }
}

/// The policy's adapters must exist in the state being changed.
fn check_adapters_exist(st: &Snapshot, p: &TenantPolicy) -> Result<(), ApiError> {
    match p.adapters.iter().find(|a| !st.adapters.contains_key(*a)) {
        Some(missing) => Err(ApiError::invalid(format!("adapter {missing:?} is not loaded"), Some("adapters".into()))),
        None => Ok(()),
    }
}

pub async fn put_tenant(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    PathParams(tenant): PathParams<String>,
    JsonBody(One(policy)): JsonBody<One<TenantPolicy>>,
) -> Resp {
    check_tenant_name(&tenant).map_err(|m| ApiError::invalid(m, None))?;
    policy.validate(s.config.max_gamma).map_err(|m| ApiError::invalid(m, None))?;
    let _guard = s.admin_lock.lock().await;
    let intent = s.control.intent(&admin.actor, "tenant.put", format!("tenant/{tenant}"), admin.request_id);
    let t = tenant.clone();
    let (created, shown) = s
        .control
        .commit(intent, Vec::new(), move |st: &mut Snapshot| {
            check_adapters_exist(st, &policy)?;
            let created = !st.tenants.contains_key(&t);
            st.tenants.entry(t.clone()).or_default().policy = policy;
            Ok::<_, ApiError>((created, view(&t, st.tenants.get(&t))))
        })
        .await?;
    let body = serde_json::to_value(shown).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(body)))
}

pub async fn delete_tenant(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    PathParams(tenant): PathParams<String>,
) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let intent = s.control.intent(&admin.actor, "tenant.delete", format!("tenant/{tenant}"), admin.request_id);
    let t = tenant.clone();
    s.control
        .commit(intent, Vec::new(), move |st: &mut Snapshot| match st.tenants.remove(&t) {
            Some(_) => Ok(()),
            None => Err(ApiError::NotFound(format!("no tenant {t:?}"))),
        })
        .await?;
    ok(json!({ "deleted": tenant }))
}

pub async fn create_key(admin: Admin, State(s): State<Arc<AppState>>, PathParams(tenant): PathParams<String>) -> Resp {
    check_tenant_name(&tenant).map_err(|m| ApiError::invalid(m, None))?;
    let _guard = s.admin_lock.lock().await;
    let (key, record): (String, KeyRecord) = keys::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
    let id = record.id.clone();
    let intent = s.control.intent(&admin.actor, "key.create", format!("tenant/{tenant}"), admin.request_id);
    let t = tenant.clone();
    s.control
        .commit(intent, Vec::new(), move |st: &mut Snapshot| {
            if !st.tenants.contains_key(&t) && t != DEFAULT_TENANT {
                return Err(ApiError::NotFound(format!("no tenant {t:?}: create it with PUT /admin/tenants/{t}")));
            }
            st.tenants.entry(t).or_default().keys.push(record);
            Ok(())
        })
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "tenant": tenant, "key_id": id, "api_key": key }))))
}

pub async fn delete_key(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    PathParams((tenant, key_id)): PathParams<(String, String)>,
) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let intent = s.control.intent(&admin.actor, "key.revoke", format!("tenant/{tenant}"), admin.request_id);
    let (t, k) = (tenant.clone(), key_id.clone());
    s.control
        .commit(intent, Vec::new(), move |st: &mut Snapshot| {
            let removed = st.tenants.get_mut(&t).is_some_and(|rec| {
                let before = rec.keys.len();
                rec.keys.retain(|r| r.id != k);
                rec.keys.len() != before
            });
            if removed { Ok(()) } else { Err(ApiError::NotFound(format!("tenant {t:?} has no key {k:?}"))) }
        })
        .await?;
    ok(json!({ "deleted": key_id }))
}

pub async fn enable_adapter(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    PathParams((tenant, name)): PathParams<(String, String)>,
) -> Resp {
    check_tenant_name(&tenant).map_err(|m| ApiError::invalid(m, None))?;
    let _guard = s.admin_lock.lock().await;
    let intent = s.control.intent(&admin.actor, "tenant.enable_adapter", format!("tenant/{tenant}"), admin.request_id);
    let (t, n) = (tenant.clone(), name.clone());
    let policy = s
        .control
        .commit(intent, Vec::new(), move |st: &mut Snapshot| {
            if !st.adapters.contains_key(&n) {
                return Err(AdapterError::UnknownAdapter(n).into());
            }
            let rec = st.tenants.entry(t).or_default();
            if !rec.policy.adapters.contains(&n) {
                rec.policy.adapters.push(n);
            }
            Ok::<_, ApiError>(rec.policy.clone())
        })
        .await?;
    ok(json!({ "tenant": tenant, "policy": policy }))
}

pub async fn disable_adapter(
    admin: Admin,
    State(s): State<Arc<AppState>>,
    PathParams((tenant, name)): PathParams<(String, String)>,
) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let intent = s.control.intent(&admin.actor, "tenant.disable_adapter", format!("tenant/{tenant}"), admin.request_id);
    let (t, n) = (tenant.clone(), name.clone());
    let policy = s
        .control
        .commit(intent, Vec::new(), move |st: &mut Snapshot| match st.tenants.get_mut(&t) {
            Some(rec) => {
                rec.policy.adapters.retain(|a| a != &n);
                Ok(rec.policy.clone())
            }
            None => Err(ApiError::NotFound(format!("no tenant {t:?}"))),
        })
        .await?;
    ok(json!({ "tenant": tenant, "policy": policy }))
}
