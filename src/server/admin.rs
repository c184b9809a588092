//! The admin API (`/admin/*`, admin key only): forget-adapters and tenants.
//!
//! Every change is serialized by one lock, applied, persisted to the state directory, and only
//! then acknowledged; a change whose persistence fails is rolled back and reported as a 500.
//! Changes take effect for the next request immediately; requests in flight keep what they
//! started with.

use super::AppState;
use super::auth::Admin;
use super::error::ApiError;
use super::extract::{JsonBody, One, PathParams, QueryParams};
use crate::adapters::registry::{AdapterInfo, check_name};
use crate::tenants::keys::{self, KeyRecord};
use crate::tenants::policy::check_tenant_name;
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
    ok(
        json!({ "object": "list", "data": s.adapters.list(), "loaded_bytes": loaded_bytes, "retired_bytes": retired_bytes }),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapter {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub replace: bool,
}

pub async fn load_adapter(
    _: Admin,
    State(s): State<Arc<AppState>>,
    JsonBody(One(req)): JsonBody<One<LoadAdapter>>,
) -> Resp {
    check_name(&req.name).map_err(|e| ApiError::invalid(e.to_string(), Some("name".into())))?;
    // A load takes a while and is applied before it is persisted: run it as a task of its own,
    // so a client that hangs up mid-load (dropping this handler) cannot leave an adapter loaded
    // but not in the state file, or release the admin lock while the change is half done.
    tokio::spawn(apply_load(s, req)).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn apply_load(s: Arc<AppState>, req: LoadAdapter) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let previous = s.adapters.get(&req.name);
    if previous.is_some() && !req.replace {
        return Err(crate::adapters::AdapterError::Exists(req.name).into());
    }
    let reg = s.clone();
    let (name, path, replace) = (req.name.clone(), req.path.clone(), req.replace);
    let started = std::time::Instant::now();
    let loaded = tokio::task::spawn_blocking(move || reg.adapters.load(&name, &path, replace))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let elapsed = started.elapsed();
    metrics::histogram!(crate::telemetry::ADAPTER_LOAD_SECONDS).record(elapsed.as_secs_f64());
    metrics::counter!(crate::telemetry::ADAPTER_LOADS, "adapter" => req.name.clone()).increment(1);
    let persisted = s.tenants.update(|st| {
        st.adapters.insert(req.name.clone(), req.path.clone());
        Ok::<_, crate::tenants::StoreError>(())
    });
    if let Err(e) = persisted {
        // Not acknowledged: undo.
        match previous {
            Some(old) => s.adapters.restore(old),
            None => {
                let _ = s.adapters.unload(&req.name);
            }
        }
        return Err(e.into());
    }
    tracing::info!(adapter = %req.name, generation = %loaded.generation, ms = elapsed.as_millis() as u64, "adapter loaded");
    let status = if previous.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    let info: AdapterInfo = crate::adapters::registry::info(&loaded);
    Ok((status, Json(json!({ "adapter": info, "load_ms": elapsed.as_secs_f64() * 1e3 }))))
}

#[derive(Debug, Deserialize)]
pub struct ForceQuery {
    #[serde(default)]
    pub force: bool,
}

pub async fn unload_adapter(
    _: Admin,
    State(s): State<Arc<AppState>>,
    PathParams(name): PathParams<String>,
    QueryParams(q): QueryParams<ForceQuery>,
) -> Resp {
    let _guard = s.admin_lock.lock().await;
    if s.adapters.get(&name).is_none() {
        return Err(crate::adapters::AdapterError::UnknownAdapter(name).into());
    }
    let users: Vec<String> = s
        .tenants
        .snapshot()
        .tenants
        .iter()
        .filter(|(_, t)| t.policy.adapters.contains(&name))
        .map(|(n, _)| n.clone())
        .collect();
    if !users.is_empty() && !q.force {
        return Err(ApiError::Conflict(format!(
            "adapter {name:?} is enabled for tenants {users:?}; disable it there first or pass ?force=true"
        )));
    }
    // Persist first: a crash after this point must not bring the adapter back.
    s.tenants.update(|st| {
        st.adapters.remove(&name);
        for t in st.tenants.values_mut() {
            t.policy.adapters.retain(|a| a != &name);
        }
        Ok::<_, crate::tenants::StoreError>(())
    })?;
    let old = s.adapters.unload(&name)?;
    metrics::counter!(crate::telemetry::ADAPTER_UNLOADS, "adapter" => name.clone()).increment(1);
    tracing::info!(adapter = %name, generation = %old.generation, "adapter unloaded");
    ok(json!({ "deleted": name, "generation": old.generation, "disabled_for": users }))
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

fn check_policy(s: &AppState, p: &TenantPolicy) -> Result<(), ApiError> {
    p.validate(s.config.max_gamma).map_err(|m| ApiError::invalid(m, None))?;
    if let Some(missing) = p.adapters.iter().find(|a| s.adapters.get(a).is_none()) {
        return Err(ApiError::invalid(format!("adapter {missing:?} is not loaded"), Some("adapters".into())));
    }
    Ok(())
}

pub async fn put_tenant(
    _: Admin,
    State(s): State<Arc<AppState>>,
    PathParams(tenant): PathParams<String>,
    JsonBody(One(policy)): JsonBody<One<TenantPolicy>>,
) -> Resp {
    check_tenant_name(&tenant).map_err(|m| ApiError::invalid(m, None))?;
    let _guard = s.admin_lock.lock().await;
    check_policy(&s, &policy)?;
    let created = s.tenants.update(|st| {
        let created = !st.tenants.contains_key(&tenant);
        st.tenants.entry(tenant.clone()).or_default().policy = policy.clone();
        Ok::<_, crate::tenants::StoreError>(created)
    })?;
    let st = s.tenants.snapshot();
    let body =
        serde_json::to_value(view(&tenant, st.tenants.get(&tenant))).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(body)))
}

pub async fn delete_tenant(_: Admin, State(s): State<Arc<AppState>>, PathParams(tenant): PathParams<String>) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let existed = s.tenants.update(|st| Ok::<_, crate::tenants::StoreError>(st.tenants.remove(&tenant).is_some()))?;
    if !existed {
        return Err(ApiError::NotFound(format!("no tenant {tenant:?}")));
    }
    ok(json!({ "deleted": tenant }))
}

pub async fn create_key(_: Admin, State(s): State<Arc<AppState>>, PathParams(tenant): PathParams<String>) -> Resp {
    check_tenant_name(&tenant).map_err(|m| ApiError::invalid(m, None))?;
    let _guard = s.admin_lock.lock().await;
    let known = s.tenants.snapshot().tenants.contains_key(&tenant) || tenant == DEFAULT_TENANT;
    if !known {
        return Err(ApiError::NotFound(format!("no tenant {tenant:?}: create it with PUT /admin/tenants/{tenant}")));
    }
    let (key, record): (String, KeyRecord) = keys::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
    let id = record.id.clone();
    s.tenants.update(|st| {
        st.tenants.entry(tenant.clone()).or_default().keys.push(record);
        Ok::<_, crate::tenants::StoreError>(())
    })?;
    Ok((StatusCode::CREATED, Json(json!({ "tenant": tenant, "key_id": id, "api_key": key }))))
}

pub async fn delete_key(
    _: Admin,
    State(s): State<Arc<AppState>>,
    PathParams((tenant, key_id)): PathParams<(String, String)>,
) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let removed = s.tenants.update(|st| {
        let Some(t) = st.tenants.get_mut(&tenant) else { return Ok::<_, crate::tenants::StoreError>(false) };
        let before = t.keys.len();
        t.keys.retain(|k| k.id != key_id);
        Ok(t.keys.len() != before)
    })?;
    if !removed {
        return Err(ApiError::NotFound(format!("tenant {tenant:?} has no key {key_id:?}")));
    }
    ok(json!({ "deleted": key_id }))
}

pub async fn enable_adapter(
    _: Admin,
    State(s): State<Arc<AppState>>,
    PathParams((tenant, name)): PathParams<(String, String)>,
) -> Resp {
    check_tenant_name(&tenant).map_err(|m| ApiError::invalid(m, None))?;
    let _guard = s.admin_lock.lock().await;
    if s.adapters.get(&name).is_none() {
        return Err(crate::adapters::AdapterError::UnknownAdapter(name).into());
    }
    let policy = s.tenants.update(|st| {
        let t = st.tenants.entry(tenant.clone()).or_default();
        if !t.policy.adapters.contains(&name) {
            t.policy.adapters.push(name.clone());
        }
        Ok::<_, crate::tenants::StoreError>(t.policy.clone())
    })?;
    ok(json!({ "tenant": tenant, "policy": policy }))
}

pub async fn disable_adapter(
    _: Admin,
    State(s): State<Arc<AppState>>,
    PathParams((tenant, name)): PathParams<(String, String)>,
) -> Resp {
    let _guard = s.admin_lock.lock().await;
    let policy = s.tenants.update(|st| {
        let t = st.tenants.get_mut(&tenant);
        Ok::<_, crate::tenants::StoreError>(t.map(|t| {
            t.policy.adapters.retain(|a| a != &name);
            t.policy.clone()
        }))
    })?;
    match policy {
        Some(p) => ok(json!({ "tenant": tenant, "policy": p })),
        None => Err(ApiError::NotFound(format!("no tenant {tenant:?}"))),
    }
}
