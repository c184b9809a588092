//! Observability and deployment: `/metrics` after real traffic (counters move by exactly what
//! was sent, `promtool check metrics` passes, every metric the dashboard and the alert rules use
//! exists), the separate metrics port, JSON logs with request fields, and the deploy/ files
//! (parse, `promtool check rules`, structure of the Dockerfiles and Kubernetes manifests).
//!
//! The metrics recorder is process-wide, so one test in this binary makes traffic; the others
//! only read files or run the binary in a separate process.

mod common;

use common::http::Server;
use lethe::fixtures::{PeftSpec, TempDir, TinySpec, write_peft_adapter, write_tiny_model};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ADMIN: &str = "observability-admin-key-0123456789";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One sample of the text exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Label values never contain `",` in our output (names, routes, numbers).
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label pair");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// Sum of the samples of `name` whose labels include all of `filter`.
fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && filter.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| v)
        .sum()
}

async fn scrape(s: &Server) -> (String, Vec<Sample>) {
    let r = reqwest::get(s.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    let samples = parse_exposition(&text);
    (text, samples)
}

/// promtool, from Debian's `prometheus` package (.ci/run installs it). Without it the checks
/// that need it are skipped with a message, unless LETHE_REQUIRE_PROMTOOL=1 (set by the test
/// script), so CI can never pass them vacuously.
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some("promtool");
    }
    assert!(
        std::env::var("LETHE_REQUIRE_PROMTOOL").map_or(true, |v| v != "1"),
        "promtool is required (apt-get install prometheus)"
    );
    common::announce_skip("promtool not found (apt-get install prometheus)", "LETHE_REQUIRE_PROMTOOL");
    None
}

fn run_promtool(args: &[&str], stdin: Option<&str>) {
    let Some(tool) = promtool() else { return };
    let mut cmd = Command::new(tool);
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Metric names used in PromQL expressions, histogram suffixes removed.
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("lethe_") {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
        if boundary {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("deploy/grafana/dashboards/lethe.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for p in v["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

fn alert_rules() -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    v["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap().clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_real_traffic_and_cover_dashboards_and_alerts() {
    let dir = TempDir::new("obs").unwrap();
    let spec = TinySpec { max_positions: 256, ..Default::default() };
    let adapters = dir.path().join("adapters");
    write_peft_adapter(&adapters.join("obs-x"), &spec, &PeftSpec::default()).unwrap();
    write_peft_adapter(&adapters.join("obs-y"), &spec, &PeftSpec { seed: 3, ..Default::default() }).unwrap();
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, ADMIN).unwrap();
    let s = Server::start_in(dir, spec, move |a| {
        a.admin_key_file = Some(key_file);
        a.adapters_root = Some(adapters);
    })
    .await;
    let admin = |m: &'static str, p: &'static str, b: Option<Value>| {
        let s = &s;
        async move {
            let (status, v) = s.call(m, p, Some(ADMIN), b).await;
            assert!(status < 300, "{m} {p}: {status} {v}");
            v
        }
    };
    let (_, before) = scrape(&s).await;

    admin("POST", "/admin/adapters", Some(json!({ "name": "obs-x", "path": "obs-x" }))).await;
    admin("POST", "/admin/adapters", Some(json!({ "name": "obs-y", "path": "obs-y" }))).await;
    admin("PUT", "/admin/tenants/obs-t", Some(json!({ "adapters": ["obs-x"] }))).await;
    let kt = admin("POST", "/admin/tenants/obs-t/keys", None).await["api_key"].as_str().unwrap().to_string();
    admin("PUT", "/admin/tenants/obs-g", Some(json!({ "gamma": 2.0 }))).await;
    let kg = admin("POST", "/admin/tenants/obs-g/keys", None).await["api_key"].as_str().unwrap().to_string();

    // N = 7 requests: k = 3 guided (tenant obs-g, γ = 2, one streamed), j = 2 with adapter
    // obs-x (tenant obs-t), 2 plain (tenant obs-g asking γ = 1); and 2 rejected ones.
    let model = s.model();
    let body = |extra: Value| {
        let mut b = json!({ "model": model, "messages": [{ "role": "user", "content": "Hello there" }], "max_tokens": 6, "temperature": 0 });
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let mut generated = 0.0;
    for (key, extra) in [
        (&kg, json!({})),
        (&kg, json!({ "guidance": { "gamma": 3.0 } })),
        (&kt, json!({})),
        (&kt, json!({ "max_tokens": 4 })),
        (&kg, json!({ "guidance": { "gamma": 1.0 } })),
        (&kg, json!({ "guidance": { "gamma": 1.0 }, "max_tokens": 3 })),
    ] {
        let (status, v) = s.call("POST", "/v1/chat/completions", Some(key), Some(body(extra))).await;
        assert_eq!(status, 200, "{v}");
        generated += v["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let streamed = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&kg)
        .json(&body(json!({ "stream": true, "stream_options": { "include_usage": true } })))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_f64())
        .unwrap();
    generated += usage;
    assert_eq!(s.call("POST", "/v1/chat/completions", Some(&kg), Some(body(json!({ "model": "nope" })))).await.0, 404);
    let bad = body(json!({ "guidance": { "gamma": -1 } }));
    assert_eq!(s.call("POST", "/v1/chat/completions", Some(&kg), Some(bad)).await.0, 400);
    // A tenant past its own waiting limit (its one place is held here) is refused.
    let limits = lethe::engine::TenantLimits { max_waiting: Some(1), ..Default::default() };
    let held = s.state.engine.reserve("obs-q", &limits).unwrap();
    assert!(s.state.engine.reserve("obs-q", &limits).is_err());
    drop(held);
    admin("DELETE", "/admin/adapters/obs-y", None).await;

    // The engine updates its gauges just after it sends a request's last event, so a scrape
    // right after the last response may still count that request as running.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (text, after) = loop {
        let (text, after) = scrape(&s).await;
        if sum(&after, "lethe_num_requests_running", &[]) == 0.0 || std::time::Instant::now() > deadline {
            break (text, after);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let delta = |name: &str, filter: &[(&str, &str)]| sum(&after, name, filter) - sum(&before, name, filter);
    assert_eq!(delta("lethe_requests_total", &[("tenant", "obs-g")]), 5.0);
    assert_eq!(delta("lethe_requests_total", &[("tenant", "obs-t")]), 2.0);
    assert_eq!(delta("lethe_tenant_rejected_requests_total", &[("tenant", "obs-q"), ("limit", "tenant")]), 1.0);
    assert_eq!(sum(&after, "lethe_tenant_requests_waiting", &[("tenant", "obs-q")]), 0.0);
    assert_eq!(delta("lethe_requests_total", &[("tenant", "obs-t"), ("finished_reason", "length")]), 2.0);
    assert_eq!(delta("lethe_guided_requests_total", &[("guidance", "log")]), 3.0);
    assert_eq!(delta("lethe_guided_requests_total", &[("guidance", "none")]), 4.0);
    assert_eq!(delta("lethe_guided_requests_total", &[]), 7.0);
    assert_eq!(delta("lethe_guidance_gamma_count", &[]), 3.0);
    assert_eq!(delta("lethe_guidance_gamma_sum", &[]), 2.0 + 3.0 + 2.0);
    assert_eq!(delta("lethe_adapter_requests_total", &[("adapter", "obs-x")]), 2.0);
    assert_eq!(delta("lethe_adapter_requests_total", &[("adapter", "obs-y")]), 0.0);
    assert_eq!(delta("lethe_generation_tokens_total", &[]), generated);
    assert_eq!(delta("lethe_time_to_first_token_seconds_count", &[]), 7.0);
    assert_eq!(delta("lethe_e2e_request_latency_seconds_count", &[]), 7.0);
    let chat = [("route", "/v1/chat/completions"), ("method", "POST")];
    assert_eq!(delta("lethe_http_requests_total", &[chat[0], chat[1], ("status", "200")]), 7.0);
    assert_eq!(delta("lethe_http_requests_total", &[chat[0], ("status", "404")]), 1.0);
    assert_eq!(delta("lethe_http_requests_total", &[chat[0], ("status", "400")]), 1.0);
    assert_eq!(delta("lethe_http_requests_total", &[("route", "/admin/adapters/{name}"), ("status", "200")]), 1.0);
    assert_eq!(delta("lethe_adapter_loads_total", &[("adapter", "obs-x")]), 1.0);
    assert_eq!(delta("lethe_adapter_unloads_total", &[("adapter", "obs-y")]), 1.0);
    assert_eq!(sum(&after, "lethe_adapters_loaded", &[]), 1.0);
    assert!(sum(&after, "lethe_adapter_memory_bytes", &[("state", "loaded")]) > 0.0);
    assert_eq!(sum(&after, "lethe_ready", &[]), 1.0);
    assert_eq!(sum(&after, "lethe_num_requests_running", &[]), 0.0);
    assert!(sum(&after, "lethe_kv_cache_limit_bytes", &[]) > 0.0);
    // Labels stay bounded: no request ids, prompts or keys in any label.
    for (name, labels, _) in &after {
        for (k, v) in labels {
            assert!(
                [
                    "finished_reason",
                    "tenant",
                    "guidance",
                    "adapter",
                    "state",
                    "route",
                    "method",
                    "status",
                    "le",
                    "version",
                    "model",
                    "weights",
                    "kernels",
                    "result",
                    "limit"
                ]
                .contains(&k.as_str()),
                "{name}: unexpected label {k}={v}"
            );
            assert!(!v.contains("Hello") && !v.starts_with("lethe-"), "{name}: label {k}={v}");
        }
    }

    // The exposition is valid, and everything lethe declares is exported.
    run_promtool(&["check", "metrics"], Some(&text));
    let exported: BTreeSet<String> = after
        .iter()
        .map(|(n, _, _)| ["_bucket", "_sum", "_count"].iter().find_map(|s| n.strip_suffix(s)).unwrap_or(n).to_string())
        .collect();
    for name in lethe::telemetry::metric_names() {
        assert!(exported.contains(name), "{name} is declared but not exported after traffic");
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP line");
    }
    // Every metric the dashboard and the alerts use exists.
    let mut used = BTreeSet::new();
    for e in dashboard_exprs() {
        used.extend(metric_names_in(&e));
    }
    for r in alert_rules() {
        used.extend(metric_names_in(r["expr"].as_str().unwrap()));
    }
    assert!(used.len() >= 15, "dashboard and alerts use only {used:?}");
    for name in &used {
        assert!(exported.contains(name), "{name} is used by the dashboard or alerts but not exported");
    }

    // The separate metrics port serves the same registry, and nothing else.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, lethe::server::metrics_router(s.state.clone())).await });
    let m = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(m.status(), 200);
    assert!(m.text().await.unwrap().contains("lethe_requests_total"));
    assert_eq!(reqwest::get(format!("http://{addr}/v1/models")).await.unwrap().status(), 404);
}

#[test]
fn alert_rules_pass_promtool_and_prometheus_config_loads() {
    let rules = root().join("deploy/prometheus/alerts.yml");
    run_promtool(&["check", "rules", rules.to_str().unwrap()], None);
    let names: Vec<String> = alert_rules().iter().map(|r| r["alert"].as_str().unwrap().to_string()).collect();
    for want in ["LetheHighTimeToFirstTokenP99", "LetheQueueSaturated", "LetheHighErrorRate", "LetheNotReady"] {
        assert!(names.iter().any(|n| n == want), "missing alert {want}: {names:?}");
    }
    for r in alert_rules() {
        assert!(r["labels"]["severity"].is_string(), "{r:?}");
        assert!(r["annotations"]["summary"].is_string(), "{r:?}");
    }
    // prometheus.yml, with its rule path pointed at the repository's file.
    let tmp = TempDir::new("promcfg").unwrap();
    let cfg = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();
    let cfg = cfg.replace("/etc/prometheus/alerts.yml", rules.to_str().unwrap());
    let path = tmp.path().join("prometheus.yml");
    std::fs::write(&path, cfg).unwrap();
    run_promtool(&["check", "config", path.to_str().unwrap()], None);
}

fn yaml_docs(rel: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(all_files(&p)) } else { out.push(p) }
    }
    out
}

#[test]
fn deploy_files_parse_and_hold_together() {
    // Every YAML and JSON file under deploy/ parses.
    for f in all_files(&root().join("deploy")) {
        let rel = f.strip_prefix(root()).unwrap().to_str().unwrap().to_string();
        match f.extension().and_then(|e| e.to_str()) {
            Some("yml" | "yaml") => assert!(!yaml_docs(&rel).is_empty(), "{rel} is empty"),
            Some("json") => {
                serde_json::from_str::<Value>(&std::fs::read_to_string(&f).unwrap())
                    .unwrap_or_else(|e| panic!("{rel}: {e}"));
            }
            _ => {}
        }
    }

    // Grafana: the dashboard queries the provisioned datasource, which points at Prometheus.
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/dashboards/lethe.json")).unwrap())
            .unwrap();
    let ds = &yaml_docs("deploy/grafana/provisioning/datasources/prometheus.yml")[0]["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    for p in dash["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"].as_str(), ds["uid"].as_str(), "panel {}", p["title"]);
        assert!(!p["targets"].as_array().unwrap().is_empty(), "panel {} has no query", p["title"]);
    }
    let titles: Vec<&str> = dash["panels"].as_array().unwrap().iter().map(|p| p["title"].as_str().unwrap()).collect();
    for want in [
        "Time to first token",
        "Inter-token latency",
        "Tokens / s",
        "Running and waiting requests",
        "Guided share",
        "Guidance scale γ",
        "Requests per adapter",
        "HTTP errors by route and status",
        "KV cache",
    ] {
        assert!(titles.contains(&want), "dashboard lacks {want:?}");
    }
    let provider = &yaml_docs("deploy/grafana/provisioning/dashboards/lethe.yml")[0]["providers"][0];
    let mounted = provider["options"]["path"].as_str().unwrap();

    // docker-compose: the three services, mounting files that exist.
    let compose = &yaml_docs("deploy/docker-compose.yml")[0];
    for svc in ["lethe", "prometheus", "grafana"] {
        assert!(compose["services"][svc].is_mapping(), "compose lacks {svc}");
    }
    assert_eq!(compose["services"]["lethe"]["build"]["dockerfile"], "deploy/docker/Dockerfile");
    for svc in ["prometheus", "grafana"] {
        for v in compose["services"][svc]["volumes"].as_sequence().unwrap() {
            let v = v.as_str().unwrap();
            if let Some(local) = v.strip_prefix("./") {
                let local = local.split(':').next().unwrap();
                assert!(root().join("deploy").join(local).exists(), "compose mounts missing {local}");
            }
        }
    }
    let grafana_vols: Vec<&str> =
        compose["services"]["grafana"]["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(grafana_vols.iter().any(|v| v.ends_with(&format!(":{mounted}:ro"))), "dashboards not mounted at {mounted}");
    let prom = &yaml_docs("deploy/prometheus/prometheus.yml")[0];
    assert_eq!(prom["scrape_configs"][0]["static_configs"][0]["targets"][0], "lethe:9090");
    assert_eq!(compose["services"]["lethe"]["environment"]["LETHE_METRICS_PORT"], "9090");

    // Kubernetes: the pieces reference each other correctly.
    let kust = &yaml_docs("deploy/k8s/base/kustomization.yaml")[0];
    let mut kinds = BTreeMap::new();
    for r in kust["resources"].as_sequence().unwrap() {
        let rel = format!("deploy/k8s/base/{}", r.as_str().unwrap());
        for d in yaml_docs(&rel) {
            kinds.insert(d["kind"].as_str().unwrap().to_string(), d);
        }
    }
    for k in ["Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceMonitor"] {
        assert!(kinds.contains_key(k), "k8s base lacks a {k}");
    }
    let dep = &kinds["Deployment"];
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let env: BTreeMap<&str, &serde_yaml::Value> =
        c["env"].as_sequence().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e)).collect();
    let secret_ref = &env["LETHE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"];
    assert_eq!(secret_ref["name"], kinds["Secret"]["metadata"]["name"]);
    assert!(kinds["Secret"]["stringData"][secret_ref["key"].as_str().unwrap()].is_string());
    let vols: BTreeMap<&str, &serde_yaml::Value> =
        pod["volumes"].as_sequence().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    assert_eq!(vols["config"]["configMap"]["name"], kinds["ConfigMap"]["metadata"]["name"]);
    assert_eq!(vols["data"]["persistentVolumeClaim"]["claimName"], kinds["PersistentVolumeClaim"]["metadata"]["name"]);
    let mounts: Vec<&str> =
        c["volumeMounts"].as_sequence().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    for (var, _) in [("LETHE_STATE_DIR", ()), ("LETHE_ADAPTERS_ROOT", ())] {
        let path = env[var]["value"].as_str().unwrap();
        assert!(mounts.iter().any(|m| path.starts_with(m)), "{var}={path} is not on a mounted volume");
    }
    let svc_ports: Vec<&str> =
        kinds["Service"]["spec"]["ports"].as_sequence().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(svc_ports.contains(&kinds["ServiceMonitor"]["spec"]["endpoints"][0]["port"].as_str().unwrap()));
    assert_eq!(
        kinds["ServiceMonitor"]["spec"]["selector"]["matchLabels"], kinds["Service"]["metadata"]["labels"],
        "the ServiceMonitor must select the Service"
    );
    // The Service clients reach exposes the public listener only; the admin API and /metrics
    // are on LETHE_ADMIN_ADDR, behind the internal Service the ServiceMonitor scrapes.
    let services: BTreeMap<String, serde_yaml::Value> = yaml_docs("deploy/k8s/base/service.yaml")
        .into_iter()
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_string(), d))
        .collect();
    let ports_of = |svc: &serde_yaml::Value| -> Vec<String> {
        svc["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p["targetPort"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ports_of(&services["lethe"]), ["http"], "the public Service exposes only the OpenAI listener");
    assert_eq!(ports_of(&services["lethe-internal"]), ["admin"]);
    let container_port = |name: &str| {
        c["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == name).unwrap()["containerPort"].as_u64().unwrap()
    };
    let admin_addr = env["LETHE_ADMIN_ADDR"]["value"].as_str().unwrap();
    assert_eq!(admin_addr.rsplit(':').next().unwrap().parse::<u64>().unwrap(), container_port("admin"));
    assert_eq!(env["LETHE_PORT"]["value"].as_str().unwrap().parse::<u64>().unwrap(), container_port("http"));
    assert_eq!(
        kinds["ServiceMonitor"]["spec"]["selector"]["matchLabels"],
        services["lethe-internal"]["metadata"]["labels"]
    );
    // The ConfigMap's lethe.toml is a valid lethe configuration.
    let tmp = TempDir::new("k8scfg").unwrap();
    let toml_path = tmp.path().join("lethe.toml");
    std::fs::write(&toml_path, kinds["ConfigMap"]["data"]["lethe.toml"].as_str().unwrap()).unwrap();
    let args = lethe::config::ServeArgs { config: Some(toml_path), ..Default::default() };
    lethe::config::ServeConfig::resolve(&args).expect("the ConfigMap's lethe.toml is valid");
    // The GPU variant asks for a GPU and runs the CUDA image on cuda:0.
    let gpu = &yaml_docs("deploy/k8s/gpu/deployment-gpu.yaml")[0];
    let gc = &gpu["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(gc["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert!(gc["image"].as_str().unwrap().ends_with(":cuda"));
    assert!(gc["env"].as_sequence().unwrap().iter().any(|e| e["name"] == "LETHE_DEVICE" && e["value"] == "cuda:0"));
    // With kubectl at hand, the overlays must also render.
    if Command::new("kubectl").arg("version").arg("--client").output().is_ok_and(|o| o.status.success()) {
        for overlay in ["deploy/k8s/base", "deploy/k8s/gpu", "deploy/k8s/replicas"] {
            let out =
                Command::new("kubectl").args(["kustomize", root().join(overlay).to_str().unwrap()]).output().unwrap();
            assert!(out.status.success(), "kubectl kustomize {overlay}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// `(instruction, arguments)` of a Dockerfile, continuation lines joined, comments dropped.
fn dockerfile(rel: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || (t.starts_with('#') && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (inst, rest) = cur.split_once(' ').unwrap_or((&cur, ""));
        out.push((inst.to_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    out
}

#[test]
fn dockerfiles_are_multi_stage_non_root_and_build_what_exists() {
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    for (rel, gpu) in [("deploy/docker/Dockerfile", false), ("deploy/docker/Dockerfile.cuda", true)] {
        let ins = dockerfile(rel);
        let known = [
            "FROM",
            "ARG",
            "ENV",
            "RUN",
            "COPY",
            "WORKDIR",
            "USER",
            "EXPOSE",
            "HEALTHCHECK",
            "ENTRYPOINT",
            "CMD",
            "VOLUME",
            "LABEL",
        ];
        for (i, _) in &ins {
            assert!(known.contains(&i.as_str()), "{rel}: unknown instruction {i}");
        }
        let froms: Vec<&String> = ins.iter().filter(|(i, _)| i == "FROM").map(|(_, a)| a).collect();
        assert!(froms.len() >= 2, "{rel}: not multi-stage");
        let stages: Vec<&str> = froms.iter().filter_map(|f| f.split(" AS ").nth(1)).collect();
        assert!(stages.contains(&"build"), "{rel}: no build stage");
        // The final stage: after the last FROM.
        let last = ins.iter().rposition(|(i, _)| i == "FROM").unwrap();
        let fin = &ins[last..];
        let user = fin
            .iter()
            .find(|(i, _)| i == "USER")
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("{rel}: final stage runs as root"));
        assert!(!user.starts_with("root") && !user.starts_with('0'), "{rel}: USER {user}");
        assert!(
            fin.iter().any(|(i, a)| i == "EXPOSE" && a.split_whitespace().any(|p| p == "8080")),
            "{rel}: no EXPOSE 8080"
        );
        assert!(fin.iter().any(|(i, a)| i == "ENTRYPOINT" && a.contains("lethe")), "{rel}: no lethe entrypoint");
        assert!(fin.iter().any(|(i, a)| i == "HEALTHCHECK" && a.contains("/ready")), "{rel}: no readiness healthcheck");
        assert!(
            fin.iter().any(|(i, a)| i == "COPY" && a.starts_with("--from=build")),
            "{rel}: binary not copied from the build stage"
        );
        // Everything copied from the build context exists.
        for (_, a) in ins.iter().filter(|(i, a)| i == "COPY" && !a.starts_with("--from")) {
            let parts: Vec<&str> = a.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(root().join(src).exists(), "{rel}: COPY {src} does not exist");
            }
        }
        let build = ins.iter().find(|(i, a)| i == "RUN" && a.contains("cargo build")).map(|(_, a)| a.as_str()).unwrap();
        assert!(build.contains("--locked") && build.contains("--release"), "{rel}: {build}");
        if gpu {
            assert!(build.contains("--features cuda"), "{rel}: CUDA image without the cuda feature");
            assert!(froms.iter().all(|f| !f.contains("nvidia/cuda") || f.contains("${CUDA_VERSION}")));
            assert!(
                froms.iter().any(|f| f.contains("-runtime-")),
                "{rel}: runtime stage should use the CUDA runtime image"
            );
            assert!(cargo.contains("cuda = [\"candle-core/cuda\""), "Cargo.toml lacks the cuda feature");
        }
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"), ".dockerignore must keep target/ out of the context");
}

/// `--log-format json`: one JSON object per line; a finished request logs its id, tenant,
/// guidance and token counts.
#[test]
fn json_logs_carry_request_fields() {
    use std::io::{BufRead, BufReader};
    let tmp = TempDir::new("jsonlog").unwrap();
    let model = write_tiny_model(&tmp.path().join("m"), &TinySpec::default()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["--log-format", "json", "serve", "--port", "0", "--threads", "1"])
        .arg("--model")
        .arg(&model)
        .env("RUST_LOG", "warn,lethe=info")
        .env_remove("LETHE_ADMIN_KEY")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(m) = v["fields"]["message"].as_str()
            && let Some(rest) = m.strip_prefix("serving on ")
        {
            url = Some(rest.split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    let url = url.expect("server address logged");
    let body = json!({ "model": "x", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 3, "guidance": { "gamma": 2.0 } });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model_id = rt.block_on(async {
        let v: Value = reqwest::get(format!("{url}/v1/models")).await.unwrap().json().await.unwrap();
        v["data"][0]["id"].as_str().unwrap().to_string()
    });
    let mut body = body;
    body["model"] = json!(model_id);
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .header("x-request-id", "obs-req-42")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    let mut finished = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "request finished" {
            finished = Some(v);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let v = finished.expect("a 'request finished' line");
    assert_eq!(v["span"]["request_id"], "obs-req-42", "{v}");
    assert_eq!(v["fields"]["tenant"], "default", "{v}");
    assert_eq!(v["fields"]["gamma"], 2.0, "{v}");
    assert_eq!(v["fields"]["completion_tokens"], 3, "{v}");
    assert!(v["fields"]["ttft_ms"].as_f64().is_some(), "{v}");
    assert!(v["fields"]["uncond_prompt_tokens"].as_u64().unwrap() > 0, "{v}");
}

/// The replicated deployment (3 replicas + PostgreSQL): the pieces reference each other, the
/// variables lethe reads are lethe settings, and the autoscaler scales on metrics lethe exports.
#[test]
fn replicated_deployment_holds_together() {
    let dir = "deploy/k8s/replicas";
    let kust = &yaml_docs(&format!("{dir}/kustomization.yaml"))[0];
    let mut docs: BTreeMap<(String, String), serde_yaml::Value> = BTreeMap::new();
    for r in kust["resources"].as_sequence().unwrap() {
        let r = r.as_str().unwrap();
        if r.starts_with("..") {
            continue;
        }
        for d in yaml_docs(&format!("{dir}/{r}")) {
            docs.insert((d["kind"].as_str().unwrap().into(), d["metadata"]["name"].as_str().unwrap().into()), d);
        }
    }
    let get = |kind: &str, name: &str| {
        docs.get(&(kind.to_string(), name.to_string())).unwrap_or_else(|| panic!("{dir} lacks {kind} {name}"))
    };
    for p in kust["patches"].as_sequence().unwrap() {
        assert!(root().join(dir).join(p["path"].as_str().unwrap()).exists());
    }
    let patch = &yaml_docs(&format!("{dir}/deployment-replicas.yaml"))[0];
    assert_eq!(patch["spec"]["replicas"], 3);
    let c = &patch["spec"]["template"]["spec"]["containers"][0];
    let env: BTreeMap<&str, &serde_yaml::Value> =
        c["env"].as_sequence().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e)).collect();
    // The database URL comes from its Secret, whose placeholder password matches PostgreSQL's.
    let url_ref = &env["LETHE_STATE_STORE"]["valueFrom"]["secretKeyRef"];
    let db_secret = get("Secret", url_ref["name"].as_str().unwrap());
    let url = db_secret["stringData"][url_ref["key"].as_str().unwrap()].as_str().unwrap();
    let pg_password = get("Secret", "lethe-postgres")["stringData"]["password"].as_str().unwrap();
    assert!(
        url.starts_with("postgres://lethe:") && url.contains(&format!(":{pg_password}@lethe-postgres:5432/")),
        "{url}"
    );
    url.parse::<lethe::config::StoreUrl>().expect("a URL lethe accepts");
    let pg = get("StatefulSet", "lethe-postgres");
    assert_eq!(pg["spec"]["serviceName"], "lethe-postgres");
    get("Service", "lethe-postgres");
    // The shared adapters volume is ReadWriteMany and mounted where the base mounts data.
    let vol = &patch["spec"]["template"]["spec"]["volumes"][0];
    let pvc = get("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"].as_str().unwrap());
    assert_eq!(pvc["spec"]["accessModes"][0], "ReadWriteMany");
    assert!(env["LETHE_GENERATIONS_DIR"]["value"].as_str().unwrap().starts_with("/var/lib/lethe/adapters/"));
    // Every LETHE_* variable the overlay sets is a lethe setting.
    let help = Command::new(env!("CARGO_BIN_EXE_lethe")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in env.keys().filter(|v| v.starts_with("LETHE_") && **v != "LETHE_REPLICA_ID") {
        assert!(help.contains(&format!("env: {var}")), "{var} is not a lethe serve setting");
    }
    // Disruptions and autoscaling select lethe's pods and scale on lethe's own metrics.
    let pdb = get("PodDisruptionBudget", "lethe");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], "lethe");
    assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() < 3);
    let hpa = get("HorizontalPodAutoscaler", "lethe");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "lethe");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 3);
    let names: Vec<String> = lethe::telemetry::metric_names().map(String::from).collect();
    for m in hpa["spec"]["metrics"].as_sequence().unwrap() {
        let name = m["pods"]["metric"]["name"].as_str().unwrap();
        assert!(names.iter().any(|n| n == name), "the HPA scales on {name}, which lethe does not export");
    }
    // docker compose: three replicas on one PostgreSQL and one adapters volume.
    let compose = &yaml_docs("deploy/docker-compose.replicas.yml")[0];
    let l = &compose["services"]["lethe"];
    assert_eq!(l["deploy"]["replicas"], 3);
    assert!(l["environment"]["LETHE_STATE_STORE"].as_str().unwrap().contains("@postgres:5432/"));
    assert!(compose["services"]["postgres"].is_mapping());
}
