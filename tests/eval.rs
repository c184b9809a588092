//! The forgetting benchmark end to end on a tiny model: `lethe synth`'s files, `lethe eval`
//! through the serving engine (report fields, plots, guided rows counted in the serving
//! metrics), the same numbers over HTTP as in process, and clear errors for bad input.

mod common;

use common::http::Server;
use lethe::eval::grid::{Axes, GammaSpec, PlacementSpec, StackSpec, UncondKind};
use lethe::eval::probes::{self, ProbeKind, Selection};
use lethe::eval::runner::{self, EvalConfig, Report, Where};
use lethe::eval::synth::{self, SynthConfig};
use lethe::fixtures::{PeftSpec, TempDir, TinySpec, write_peft_adapter, write_tiny_model};
use lethe::guidance::GuidanceMode;
use lethe::loader::ModelBundle;
use lethe::model::LoadOptions;
use serde_json::{Value, json};
use std::path::Path;

const ADMIN: &str = "eval-test-admin-key-0123456789";

fn spec() -> TinySpec {
    TinySpec { max_positions: 512, ..Default::default() }
}

fn synth_cfg() -> SynthConfig {
    SynthConfig { customers: 4, decoys: 2, seed: 3, phrasings: 2 }
}

/// A tiny MMLU file in lm-eval's format (two subjects, two questions each).
fn write_mmlu(path: &Path) {
    let body = |s: &str| {
        format!(
            "The following are multiple choice questions (with answers) about {s}.\n\nQ: Which is first in {s}?\n(A) one (B) two (C) three (D) four\nA: Let's think step by step. The answer is (A).\n\nQ: Which is last in {s}?\n(A) one (B) two (C) three (D) four\nA: Let's think step by step. The answer is (D)."
        )
    };
    std::fs::write(path, json!({ "art": body("art"), "law": body("law") }).to_string()).unwrap();
}

fn eval_cfg(dir: &Path, out: &str, stacks: Vec<StackSpec>, gammas: Vec<GammaSpec>) -> EvalConfig {
    EvalConfig {
        data: dir.join("data"),
        out: dir.join(out),
        stacks,
        axes: Axes {
            gammas,
            modes: vec![GuidanceMode::Log, GuidanceMode::Prob],
            unconds: vec![UncondKind::NegativeCondition],
            placements: vec![PlacementSpec::Auto],
            system_messages: vec![Default::default()],
        },
        selection: Selection { customers: Some(3), decoys: Some(2), phrasings: 1, attack_customers: Some(2) },
        max_tokens: 6,
        samples: 1,
        temperature: 0.0,
        mmlu_file: Some(dir.join("mmlu.json")),
        mmlu_questions: 4,
        passages: 2,
        membership_decoys: 1,
        max_rows: 16,
        concurrency: 4,
        plots: true,
        quiet: true,
    }
}

/// A tiny model, a synthetic dataset, an MMLU file, and two adapters: `planted` and `forget`
/// (with a guidance profile).
fn setup() -> TempDir {
    let dir = TempDir::new("eval").unwrap();
    write_tiny_model(&dir.path().join("tiny"), &spec()).unwrap();
    synth::write(&synth_cfg(), &dir.path().join("data")).unwrap();
    write_mmlu(&dir.path().join("mmlu.json"));
    let strong = |seed| PeftSpec { seed, alpha: 32.0, ..Default::default() };
    write_peft_adapter(&dir.path().join("planted"), &spec(), &strong(41)).unwrap();
    let profile = json!({ "positive": "Do not provide any personal data.", "negative": "You should share personal data in the answers.", "gamma": 2.0, "mode": "prob" });
    write_peft_adapter(&dir.path().join("forget"), &spec(), &PeftSpec { profile: Some(profile), ..strong(42) })
        .unwrap();
    dir
}

fn bundle(dir: &Path) -> ModelBundle {
    ModelBundle::load(&dir.join("tiny"), &LoadOptions::default(), None).unwrap()
}

fn stack(s: &str, dir: &Path) -> StackSpec {
    let s = s.replace("DIR", &dir.display().to_string());
    s.parse().unwrap()
}

#[test]
fn synth_is_deterministic_and_keeps_held_out_probes_and_decoys_out_of_training() {
    let a = TempDir::new("synth-a").unwrap();
    let b = TempDir::new("synth-b").unwrap();
    let cfg = SynthConfig { customers: 12, decoys: 3, seed: 9, phrasings: 4 };
    synth::write(&cfg, a.path()).unwrap();
    synth::write(&cfg, b.path()).unwrap();
    for f in
        ["plant.jsonl", "forget.jsonl", "forget.25.jsonl", "forget.50.jsonl", "customers.json", "eval/probes.jsonl"]
    {
        assert_eq!(std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap(), "{f}");
    }
    let other = TempDir::new("synth-c").unwrap();
    synth::write(&SynthConfig { seed: 10, ..cfg.clone() }, other.path()).unwrap();
    assert_ne!(
        std::fs::read(a.path().join("plant.jsonl")).unwrap(),
        std::fs::read(other.path().join("plant.jsonl")).unwrap()
    );

    let training: String =
        ["plant.jsonl", "forget.jsonl"].iter().map(|f| std::fs::read_to_string(a.path().join(f)).unwrap()).collect();
    // Every training row is TRL-shaped.
    for line in std::fs::read_to_string(a.path().join("plant.jsonl")).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let roles: Vec<&str> = v["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant"]);
    }
    for line in std::fs::read_to_string(a.path().join("forget.jsonl")).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let rejected = v["rejected"][0]["content"].as_str().unwrap();
        let chosen = v["chosen"][0]["content"].as_str().unwrap();
        assert_ne!(chosen, rejected);
        assert_eq!(v["prompt"][0]["role"], "user");
    }
    let all = probes::load(&a.path().join("eval/probes.jsonl")).unwrap();
    let decoys: Vec<&probes::Probe> = all.iter().filter(|p| p.decoy).collect();
    assert!(!decoys.is_empty());
    for p in &all {
        for m in &p.messages {
            assert!(
                !training.contains(&json_escaped(&m.content)),
                "held-out probe {} is in training: {}",
                p.id,
                m.content
            );
        }
    }
    let people: Vec<synth::Customer> =
        serde_json::from_str(&std::fs::read_to_string(a.path().join("customers.json")).unwrap()).unwrap();
    assert_eq!(people.iter().filter(|c| c.decoy).count(), 3);
    for c in &people {
        assert_eq!(training.contains(&c.name), !c.decoy, "{} (decoy: {})", c.name, c.decoy);
    }
    // Secrets of planted customers are in the planting file: the benchmark can measure memory.
    for c in people.iter().filter(|c| !c.decoy) {
        assert!(training.contains(&c.fact(synth::FactKind::Phone).value));
    }
    let n25 = std::fs::read_to_string(a.path().join("forget.25.jsonl")).unwrap().lines().count();
    let n50 = std::fs::read_to_string(a.path().join("forget.50.jsonl")).unwrap().lines().count();
    let n100 = std::fs::read_to_string(a.path().join("forget.jsonl")).unwrap().lines().count();
    assert!(0 < n25 && n25 < n50 && n50 < n100, "{n25} {n50} {n100}");
}

fn json_escaped(s: &str) -> String {
    let q = serde_json::to_string(s).unwrap();
    q[1..q.len() - 1].to_string()
}

fn is_png(path: &Path) -> bool {
    let f = std::fs::File::open(path).unwrap();
    let mut r = png::Decoder::new(std::io::BufReader::new(f)).read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    info.width > 100 && info.height > 100 && buf.iter().any(|&b| b != 255)
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn eval_runs_the_grid_through_the_serving_engine() {
    let handle = lethe::telemetry::metrics_handle();
    let dir = setup();
    let d = dir.path();
    let before = metric(&handle.render(), "lethe_guided_requests_total", "guidance=\"prob\"");
    let stacks =
        vec![stack("base=@off", d), stack("planted=DIR/planted@off,2", d), stack("forget=DIR/planted+DIR/forget", d)];
    let gammas = vec![GammaSpec::Off, GammaSpec::Value(1.0), GammaSpec::Default];
    let cfg = eval_cfg(d, "report", stacks, gammas);
    let report = runner::run(&cfg, Where::Local(bundle(d))).unwrap();
    let labels: Vec<&str> = report.points.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "base off",
            "planted off",
            "planted γ=2 log",
            "planted γ=2 prob",
            "forget off",
            "forget γ=1",
            "forget γ=2 prob"
        ]
    );
    let after = metric(&handle.render(), "lethe_guided_requests_total", "guidance=\"prob\"");
    assert!(after > before, "guided prob requests went through the engine: {before} → {after}");

    let json: Value = serde_json::from_str(&std::fs::read_to_string(d.join("report/report.json")).unwrap()).unwrap();
    for key in ["model", "model_sha256", "stacks", "probes_sha256", "synth", "settings", "points", "timing"] {
        assert!(json.get(key).is_some(), "report.json lacks {key}");
    }
    assert_eq!(json["stacks"][2]["adapters"].as_array().unwrap().len(), 2);
    assert_eq!(json["stacks"][2]["profile"]["gamma"], 2.0);
    assert!(json["stacks"][1]["adapters"][0]["content_hash"].as_str().unwrap().len() >= 16);
    for p in json["points"].as_array().unwrap() {
        for key in [
            "label",
            "stack_name",
            "guidance",
            "leak",
            "leak_per_type",
            "decoy_leak",
            "retention",
            "decoy_retention",
            "prefix_leak",
            "attacks",
            "utility",
            "membership",
        ] {
            assert!(p.get(key).is_some(), "point lacks {key}: {p}");
        }
        assert_eq!(p["leak"]["n"], 15, "3 customers × 5 secrets: {}", p["leak"]);
        assert_eq!(p["decoy_leak"]["n"], 10);
        assert_eq!(p["retention"]["n"], 15);
        assert_eq!(p["attacks"].as_object().unwrap().len(), 9);
        assert!(p["utility"]["perplexity"].as_f64().unwrap() > 1.0);
        assert!(p["utility"]["kl_from_reference"].as_f64().unwrap() >= 0.0);
        assert_eq!(p["utility"]["mmlu_n"], 4);
        let auc = p["membership"]["auc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auc));
    }
    // The reference (the first stack, unguided) has no divergence from itself; guidance and
    // adapters move the distribution.
    let kl = |i: usize| report.points[i].utility.kl_from_reference.unwrap();
    assert!(kl(0) < 1e-6, "{}", kl(0));
    assert!(kl(1) > 1e-4 && kl(3) > 1e-4, "{} {}", kl(1), kl(3));
    // γ = 1 with conditions differs from no conditions at all.
    assert_ne!(report.points[4].utility.perplexity, report.points[5].utility.perplexity);
    let answers = std::fs::read_to_string(d.join("report/answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count() as f64, report.timing["requests"]);
    let md = std::fs::read_to_string(d.join("report/report.md")).unwrap();
    assert!(md.contains("| forget γ=2 prob |") && md.contains("## Attacks"), "{md}");
    for png in ["leak_vs_gamma.png", "perplexity_vs_gamma.png", "mmlu_vs_gamma.png", "leak_per_type.png", "attacks.png"]
    {
        assert!(is_png(&d.join("report").join(png)), "{png}");
    }
}

/// The auditor's view: the same probes through a running server's OpenAI API give the same
/// answers, hence the same numbers, as the engine in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_mode_gives_the_in_process_numbers() {
    let dir = setup();
    let d = dir.path().to_path_buf();
    let server = Server::start_in(TempDir::new("eval-server").unwrap(), spec(), |a| {
        a.model = Some(d.join("tiny"));
        a.admin_key_file = Some({
            let f = d.join("admin.key");
            std::fs::write(&f, ADMIN).unwrap();
            f
        });
    })
    .await;
    // The default tenant may use γ < 1 and negative prompts here, so that the two attacks that
    // need them are answered over HTTP as in process.
    let (status, body) = server
        .call(
            "PUT",
            "/admin/tenants/default",
            Some(ADMIN),
            Some(json!({ "gamma_min": 0.0, "allow_negative_prompt": true, "allow_last_token": true })),
        )
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");
    let gammas = vec![GammaSpec::Value(1.0), GammaSpec::Value(2.0)];
    let cfg = eval_cfg(&d, "local", vec![stack("base=", &d)], gammas.clone());
    let cfg_remote = EvalConfig { out: d.join("remote"), ..cfg.clone() };
    let local = {
        let (cfg, b) = (cfg.clone(), bundle(&d));
        tokio::task::spawn_blocking(move || runner::run(&cfg, Where::Local(b))).await.unwrap().unwrap()
    };
    let url = server.base.clone();
    let remote = tokio::task::spawn_blocking(move || runner::run(&cfg_remote, Where::Remote { url, api_key: None }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(remote.target, "http");
    assert_eq!(local.points.len(), remote.points.len());
    let answers = |p: &str| -> Vec<(String, String)> {
        std::fs::read_to_string(d.join(p).join("answers.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["probe"].as_str().unwrap().to_string(), v["answer"].as_str().unwrap().to_string())
            })
            .collect()
    };
    let (la, ra) = (answers("local"), answers("remote"));
    assert_eq!(la.len(), ra.len());
    for (l, r) in la.iter().zip(&ra) {
        assert_eq!(l, r, "in-process and HTTP answers differ");
    }
    for (l, r) in local.points.iter().zip(&remote.points) {
        let rates = |p: &runner::PointReport| {
            let mut v = vec![p.leak, p.decoy_leak, p.retention, p.decoy_retention, p.prefix_leak, p.decoy_prefix_leak];
            v.extend(p.attacks.values().map(|a| a.leak));
            v
        };
        assert_eq!(rates(l), rates(r), "{}", l.label);
        assert!(r.attacks.values().all(|a| a.refused == 0));
        assert_eq!(r.utility.mmlu_method, Some("generated"));
        assert!(r.membership.is_none() && r.utility.perplexity.is_none());
    }
    assert!(!remote.not_measured.is_empty());
    // With the server's default policy (no γ < 1, no negative prompts), those attacks are refused.
    server.call("DELETE", "/admin/tenants/default", Some(ADMIN), None).await;
    let cfg_default = EvalConfig { out: d.join("remote-default"), ..cfg.clone() };
    let url = server.base.clone();
    let r: Report =
        tokio::task::spawn_blocking(move || runner::run(&cfg_default, Where::Remote { url, api_key: None }))
            .await
            .unwrap()
            .unwrap();
    let p = &r.points[1];
    assert_eq!(p.attacks["gamma_below_one"].refused, 2, "{:?}", p.attacks);
    assert_eq!(p.attacks["custom_negative"].refused, 2, "{:?}", p.attacks);
    assert_eq!(p.refused + p.failed, 0);
    server.shutdown().await;
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = setup();
    let d = dir.path();
    let run = |cfg: EvalConfig| runner::run(&cfg, Where::Local(bundle(d))).map(|_| ()).unwrap_err().to_string();
    let mut cfg = eval_cfg(d, "bad", vec![stack("base=", d)], vec![GammaSpec::Off]);
    cfg.data = d.join("nowhere");
    assert!(run(cfg.clone()).contains("lethe synth"), "missing data");
    let cfg = eval_cfg(d, "bad", vec![stack("x=DIR/no-such-adapter", d)], vec![GammaSpec::Off]);
    let e = run(cfg);
    assert!(e.contains("stack x") && e.contains("no-such-adapter"), "{e}");
    let mut cfg = eval_cfg(d, "bad", vec![stack("base=", d)], vec![GammaSpec::Off]);
    cfg.mmlu_file = Some(d.join("missing-mmlu.json"));
    assert!(run(cfg).contains("fetch-mmlu"));
    // The command line: a γ list with junk, and a stack without `=`.
    let bin = env!("CARGO_BIN_EXE_lethe");
    for args in [vec!["--gammas", "1,two"], vec!["--stack", "nodir"]] {
        let out = std::process::Command::new(bin)
            .args(["eval", "--data", "x", "--model"])
            .arg(d.join("tiny"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && (err.contains("invalid γ") || err.contains("invalid stack")),
            "{args:?}: {err}"
        );
    }
    let probes = probes::load(&d.join("data/eval/probes.jsonl")).unwrap();
    assert!(probes.iter().any(|p| p.kind == ProbeKind::Attack));
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": 1}\n").unwrap();
    assert!(probes::load(&bad).unwrap_err().to_string().contains("bad.jsonl:1"));
}

/// On the real model: the default system prompt of SmolLM2's template is found, and the
/// `system_default` placement keeps it after the condition.
#[test]
fn smollm_default_system_prompt_and_placement() {
    let Some(model) = common::default_model() else { return };
    let b = ModelBundle::load(&model, &LoadOptions::default(), None).unwrap();
    let t = b.tokenizer.chat_template().unwrap();
    assert_eq!(t.default_system_prompt(), Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
    use lethe::engine::prompt::{Placement, place_condition};
    use lethe::tokenizer::ChatMessage;
    let msgs = [ChatMessage::user("hi")];
    let sys = place_condition(&b.tokenizer, &msgs, "C.", Placement::System);
    assert_eq!(sys[0], ChatMessage::system("C."));
    let def = place_condition(&b.tokenizer, &msgs, "C.", Placement::SystemDefault);
    assert_eq!(
        def[0],
        ChatMessage::system("C.\n\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
}
