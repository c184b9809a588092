//! The real `lethe serve` binary, killed with SIGKILL in the middle of a burst of admin changes:
//! after a restart the state equals the last acknowledged change (plus, at most, the one change
//! that was in flight), and a corrupt state file stops start-up with a clear error.

mod common;

use common::proc::Lethe;
use lethe::fixtures::{PeftSpec, TempDir, TinySpec, write_peft_adapter, write_tiny_model};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ADMIN: &str = "restart-test-admin-key-0123456789";

struct Paths {
    model: PathBuf,
    state: PathBuf,
    root: PathBuf,
}

/// Starts `lethe serve` on `p` with the admin key (see [`common::proc::spawn`]).
fn spawn(p: &Paths) -> Result<Lethe, String> {
    let path = |flag: &str, dir: &Path| [flag.to_string(), dir.display().to_string()];
    let args = [path("--model", &p.model), path("--state-dir", &p.state), path("--adapters-root", &p.root)].concat();
    common::proc::spawn(&args, &[("LETHE_ADMIN_KEY", ADMIN.to_string())])
}

async fn call(base: &str, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), reqwest::Error> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = reqwest::Client::new().request(method, format!("{base}{path}")).bearer_auth(ADMIN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

/// Tenant name → (policy, key ids), as `GET /admin/tenants` shows it.
type Tenants = BTreeMap<String, (Value, Vec<String>)>;

async fn tenants(base: &str) -> Tenants {
    let (status, v) = call(base, "GET", "/admin/tenants", None).await.unwrap();
    assert_eq!(status, 200, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let keys = t["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_string()).collect();
            (t["name"].as_str().unwrap().to_string(), (t["policy"].clone(), keys))
        })
        .collect()
}

/// The admin change number `i` of the burst.
fn change(i: usize, live: &[String]) -> (&'static str, String, Option<Value>) {
    match i % 5 {
        3 if !live.is_empty() => ("POST", format!("/admin/tenants/{}/keys", live[i % live.len()]), None),
        4 if live.len() > 2 => ("DELETE", format!("/admin/tenants/{}", live[0]), None),
        _ => {
            let adapters = if i.is_multiple_of(2) { json!(["x"]) } else { json!([]) };
            let policy = json!({ "adapters": adapters, "gamma_max": (i % 7 + 1) as f32, "gamma_min": 0.5 });
            ("PUT", format!("/admin/tenants/t{i}"), Some(policy))
        }
    }
}

fn setup(tmp: &Path) -> Paths {
    let spec = TinySpec::default();
    let model = write_tiny_model(&tmp.join("model"), &spec).unwrap();
    let root = tmp.join("adapters");
    write_peft_adapter(&root.join("x"), &spec, &PeftSpec::default()).unwrap();
    Paths { model, state: tmp.join("state"), root }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_admin_burst_keeps_the_last_acknowledged_state() {
    let tmp = TempDir::new("restart").unwrap();
    let paths = setup(tmp.path());
    let mut lethe = spawn(&paths).unwrap();
    let base = lethe.base.clone();
    let (status, v) = call(&base, "POST", "/admin/adapters", Some(json!({ "name": "x", "path": "x" }))).await.unwrap();
    assert_eq!(status, 201, "{v}");
    let generation = v["adapter"]["generation"].clone();

    // The burst: one change at a time, as an operator's script would; the model of the state
    // is updated only from acknowledged responses. The process is killed after `kill_after`
    // acknowledgements, while the next change is in flight.
    let kill_after = 40;
    let mut expected: Tenants = tenants(&base).await;
    let mut live: Vec<String> = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut pending = None;
    let pid = lethe.child.id();
    for i in 0.. {
        let (method, path, body) = change(i, &live);
        if i == kill_after {
            // SIGKILL lands while this request is being handled (or just before).
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_micros(300));
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            });
        }
        match call(&base, method, &path, body.clone()).await {
            Ok((status, v)) if status == 200 || status == 201 => {
                let tenant = path.split('/').nth(3).unwrap().to_string();
                match method {
                    "PUT" => {
                        expected.insert(tenant.clone(), (v["policy"].clone(), Vec::new()));
                        live.push(tenant);
                    }
                    "POST" => {
                        expected.get_mut(&tenant).unwrap().1.push(v["key_id"].as_str().unwrap().to_string());
                        keys.push((tenant, v["api_key"].as_str().unwrap().to_string()));
                    }
                    _ => {
                        expected.remove(&tenant);
                        live.retain(|t| t != &tenant);
                    }
                }
            }
            Ok((status, v)) => panic!("{method} {path}: {status} {v}"),
            Err(_) => {
                assert!(i >= kill_after, "request {i} failed before the kill");
                pending = Some((method, path));
                break;
            }
        }
        assert!(i < kill_after + 1000, "the server was not killed");
    }
    let status = lethe.child.wait().unwrap();
    assert!(!status.success(), "killed: {status}");

    // Restart on the same state directory.
    let lethe = spawn(&paths).unwrap();
    let restored = tenants(&lethe.base).await;
    let (pm, pp) = pending.expect("the kill interrupted a change");
    let pending_tenant = pp.split('/').nth(3).unwrap().to_string();
    for (name, rec) in &restored {
        if name != &pending_tenant {
            assert_eq!(Some(rec), expected.get(name), "tenant {name}");
        }
    }
    for name in expected.keys() {
        if name != &pending_tenant {
            assert!(restored.contains_key(name), "tenant {name} lost");
        }
    }
    // The in-flight change is either fully applied or not at all.
    let (before, after) = (expected.get(&pending_tenant), restored.get(&pending_tenant));
    let consistent = before == after
        || match pm {
            "PUT" => after.is_some_and(|a| a.1.is_empty()),
            "POST" => before.zip(after).is_some_and(|(b, a)| b.0 == a.0 && a.1.len() == b.1.len() + 1),
            _ => after.is_none(),
        };
    assert!(consistent, "pending {pm} {pp}: before {before:?}, after {after:?}");

    // Keys still authenticate, adapters come back as the same generation.
    let live_keys: Vec<_> = keys.iter().filter(|(t, _)| restored.contains_key(t)).collect();
    assert!(!live_keys.is_empty());
    for (t, k) in live_keys {
        let r = reqwest::Client::new().get(format!("{}/v1/models", lethe.base)).bearer_auth(k).send().await.unwrap();
        assert_eq!(r.status(), 200, "key of {t}");
    }
    let (_, adapters) = call(&lethe.base, "GET", "/admin/adapters", None).await.unwrap();
    assert_eq!(adapters["data"][0]["name"], "x");
    assert_eq!(adapters["data"][0]["generation"], generation);
    assert!(lethe.log.lock().unwrap().iter().any(|l| l.contains("adapter restored")));
    let mut lethe = lethe;
    lethe.child.kill().unwrap();
    lethe.child.wait().unwrap();

    // A corrupt state file stops start-up with the reason; nothing is served.
    let file = paths.state.join("state.json");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, &text[..text.len() / 2]).unwrap();
    let err = spawn(&paths).err().expect("lethe must refuse a corrupt state file");
    assert!(err.contains("state.json is corrupt"), "{err}");
    // So does an adapter whose kept files no longer hash to the saved generation: never served
    // silently as a different adapter.
    std::fs::write(&file, text).unwrap();
    let kept = paths.state.join("generations").join(generation.as_str().unwrap());
    let weights = kept.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let err = spawn(&paths).err().expect("lethe must refuse an adapter that is not its saved generation");
    assert!(err.contains("restoring adapter \"x\"") && err.contains("not to the recorded generation"), "{err}");
    // ... and a state that names an adapter which no longer loads at all.
    std::fs::remove_dir_all(&kept).unwrap();
    std::fs::remove_dir_all(paths.root.join("x")).unwrap();
    let err = spawn(&paths).err().expect("lethe must refuse to start without a persisted adapter");
    assert!(err.contains("restoring adapter \"x\""), "{err}");
}

/// Two servers on one state directory would overwrite each other's changes: the second refuses
/// to start, naming the directory, and the first keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_state_directory_refuses_to_start() {
    let tmp = TempDir::new("locked").unwrap();
    let paths = setup(tmp.path());
    let mut first = spawn(&paths).unwrap();
    let err = spawn(&paths).err().expect("a second lethe on the same --state-dir must not start");
    assert!(err.contains("in use by another lethe process"), "{err}");
    let (status, _) = call(&first.base, "GET", "/admin/tenants", None).await.unwrap();
    assert_eq!(status, 200);
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // Once the holder is gone (even killed), the directory is free again.
    let mut again = spawn(&paths).unwrap();
    again.child.kill().unwrap();
    again.child.wait().unwrap();
}
