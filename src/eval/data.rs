//! Utility data: held-out general text for perplexity (16 short passages written for lethe,
//! Apache-2.0, on topics unrelated to the synthetic company) and multiple-choice questions in
//! the format of the MMLU prompts the `lm-eval` wheel ships (`scripts/fetch-mmlu.sh`).

use std::path::Path;

/// General-knowledge passages, one per paragraph.
const GENERAL_TEXT: &str = include_str!("general.txt");

/// Up to `n` passages of general text.
pub fn passages(n: usize) -> Vec<&'static str> {
    GENERAL_TEXT.split("\n\n").map(str::trim).filter(|p| !p.is_empty()).take(n).collect()
}

/// A passage split into context (its first sentence) and the text to score.
pub fn split_passage(p: &str) -> (&str, &str) {
    match p.find(". ") {
        Some(i) => (&p[..i + 1], &p[i + 1..]),
        None => (p, ""),
    }
}

/// One multiple-choice question with four options.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Question {
    pub subject: String,
    pub question: String,
    pub choices: [String; 4],
    /// 0..4 (A..D).
    pub answer: usize,
}

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

impl Question {
    /// The user message: the question, its options, and how to answer.
    pub fn prompt(&self) -> String {
        let subject = self.subject.replace('_', " ");
        let mut s = format!("The following is a multiple choice question about {subject}.\n\n{}\n", self.question);
        for (l, c) in LETTERS.iter().zip(&self.choices) {
            s.push_str(&format!("({l}) {c}\n"));
        }
        s.push_str("\nAnswer with the letter of the correct option.");
        s
    }
}

/// Reads lm-eval's `_cot_prompts.json` (subject → few-shot text of `Q: … (A) … (D) … A: … The
/// answer is (X).` blocks) and returns every question that parses, subjects in order; the
/// first question of every subject comes first, then the second of every subject, and so on, so
/// any prefix covers the subjects evenly.
pub fn load_mmlu(path: &Path) -> anyhow::Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!("cannot read {}: {e} (run scripts/fetch-mmlu.sh, or pass --mmlu 0)", path.display())
    })?;
    let subjects: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not lm-eval's MMLU prompts: {e}", path.display()))?;
    let re = regex::Regex::new(
        r"(?s)^(?P<q>.*?)\n?\(A\)(?P<a>.*?)\(B\)(?P<b>.*?)\(C\)(?P<c>.*?)\(D\)(?P<d>.*?)\nA: .*The answer is \((?P<ans>[ABCD])\)",
    )
    .expect("valid regex");
    let mut per_subject: Vec<Vec<Question>> = Vec::new();
    let mut names: Vec<&String> = subjects.keys().collect();
    names.sort();
    for subject in names {
        let Some(body) = subjects[subject].as_str() else { continue };
        let mut qs = Vec::new();
        for block in body.split("\n\nQ: ").skip(1) {
            let Some(m) = re.captures(block) else { continue };
            let t = |k: &str| m[k].trim().to_string();
            qs.push(Question {
                subject: subject.clone(),
                question: t("q"),
                choices: [t("a"), t("b"), t("c"), t("d")],
                answer: LETTERS.iter().position(|l| *l == &m["ans"]).expect("regex letter"),
            });
        }
        per_subject.push(qs);
    }
    let mut out = Vec::new();
    for round in 0.. {
        let before = out.len();
        out.extend(per_subject.iter().filter_map(|qs| qs.get(round).cloned()));
        if out.len() == before {
            break;
        }
    }
    anyhow::ensure!(!out.is_empty(), "{}: no question could be read", path.display());
    Ok(out)
}

/// The first letter A–D that stands alone in a generated answer ("(B)", "B.", "The answer is C").
pub fn answer_letter(text: &str) -> Option<usize> {
    let re = regex::Regex::new(r"(?:^|[^A-Za-z])([ABCD])(?:$|[^A-Za-z])").expect("valid regex");
    re.captures(text).and_then(|c| LETTERS.iter().position(|l| *l == &c[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passages_split_into_context_and_text() {
        let ps = passages(100);
        assert_eq!(ps.len(), 16);
        let (ctx, rest) = split_passage(ps[0]);
        assert!(ctx.ends_with('.') && rest.starts_with(' ') && rest.len() > 100);
    }

    #[test]
    fn mmlu_blocks_parse_and_interleave_subjects() {
        let dir = crate::fixtures::TempDir::new("mmlu").unwrap();
        let p = dir.path().join("m.json");
        let body = |s: &str| {
            format!(
                "The following are multiple choice questions (with answers) about {s}.\n\nQ: First {s}?\n(A) a (B) b (C) c (D) d\nA: Let's think step by step. The answer is (B).\n\nQ: Second {s}?\n(A) w (B) x (C) y (D) z\nA: Because. The answer is (D).\n\nQ: Broken?\nA: nothing"
            )
        };
        std::fs::write(&p, serde_json::json!({ "zoo": body("zoo"), "art": body("art") }).to_string()).unwrap();
        let qs = load_mmlu(&p).unwrap();
        let got: Vec<(&str, &str, usize)> =
            qs.iter().map(|q| (q.subject.as_str(), q.question.as_str(), q.answer)).collect();
        assert_eq!(
            got,
            vec![
                ("art", "First art?", 1),
                ("zoo", "First zoo?", 1),
                ("art", "Second art?", 3),
                ("zoo", "Second zoo?", 3)
            ]
        );
        assert_eq!(qs[0].choices, ["a", "b", "c", "d"].map(String::from));
        assert!(load_mmlu(&dir.path().join("missing.json")).unwrap_err().to_string().contains("fetch-mmlu"));
    }

    #[test]
    fn letters_are_read_from_answers() {
        assert_eq!(answer_letter("(B) because"), Some(1));
        assert_eq!(answer_letter("The answer is C."), Some(2));
        assert_eq!(answer_letter("D"), Some(3));
        assert_eq!(answer_letter("Apples are red"), None);
    }
}
