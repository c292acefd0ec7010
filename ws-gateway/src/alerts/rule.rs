//! Alert rules: checked against the monitor's answer shape when the monitor is stored, then
//! evaluated on each window's answer as it streams, so a window's verdict is known the moment
//! its tokens decide it (the choice is fixed, the JSON field has its value), not when it ends.

use protocol::{AlertCondition, AlertRule, AnswerFormat, AnswerResult, NotifyTarget};
use serde_json::Value;

/// Most notification targets on one rule.
const MAX_TARGETS: usize = 8;
/// Longest confirmation span (windows).
const MAX_SPAN: u32 = 100;
/// Longest cooldown: a week.
const MAX_COOLDOWN_S: f64 = 7.0 * 86_400.0;

/// The test of a condition.
#[derive(Debug, Clone)]
enum Test {
    Equals(Value),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    Matches {
        regex: regex::Regex,
        /// Whether a match in a prefix of the text stays a match in the whole (no end anchor).
        early: bool,
    },
}

/// A checked rule, ready to evaluate.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    /// The pointer the test reads (empty: the whole answer, or the text for free answers).
    pointer: Option<String>,
    test: Test,
    /// Positive windows needed (N of M).
    pub(crate) confirm: (u32, u32),
    /// Negative windows in a row that close an incident.
    pub(crate) clear_after: u32,
    /// After a close, no new incident for this long.
    pub(crate) cooldown_ms: i64,
    /// Webhooks.
    pub(crate) notify: Vec<NotifyTarget>,
}

fn kind(answer: Option<&AnswerFormat>) -> &'static str {
    match answer {
        None => "free text",
        Some(AnswerFormat::Choice(_)) => "a choice",
        Some(AnswerFormat::Regex(_)) => "a regex answer",
        Some(AnswerFormat::JsonSchema(_)) => "a JSON schema answer",
        Some(AnswerFormat::JsonObject {}) => "a JSON object answer",
    }
}

/// Whether a JSON pointer can name something in answers of `schema` (properties and items are
/// followed; a schema that does not say what it holds allows anything).
fn schema_has(schema: &Value, pointer: &str) -> Result<(), String> {
    let mut at = schema;
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        if let Some(p) = at.get("properties").and_then(Value::as_object) {
            match p.get(&seg) {
                Some(next) => at = next,
                None => {
                    let names: Vec<&str> = p.keys().map(String::as_str).collect();
                    return Err(format!(
                        "alert.when.pointer {pointer:?}: the answer's schema has no property {seg:?} (it has {names:?})"
                    ));
                }
            }
        } else if let Some(items) = at.get("items") {
            if seg.parse::<usize>().is_err() {
                return Err(format!("alert.when.pointer {pointer:?}: {seg:?} indexes an array; use a number"));
            }
            at = items;
        } else {
            return Ok(());
        }
    }
    Ok(())
}

impl Rule {
    /// Checks a rule against the monitor's answer shape; the error says what to change.
    pub(crate) fn check(rule: &AlertRule, answer: Option<&AnswerFormat>) -> Result<Rule, String> {
        let AlertCondition { pointer, equals, gt, gte, lt, lte, matches } = &rule.when;
        let given = [equals.is_some(), gt.is_some(), gte.is_some(), lt.is_some(), lte.is_some(), matches.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err("alert.when needs exactly one test of equals, gt, gte, lt, lte or matches".into());
        }
        let test = if let Some(v) = equals {
            Test::Equals(v.clone())
        } else if let Some(x) = gt {
            Test::Gt(*x)
        } else if let Some(x) = gte {
            Test::Gte(*x)
        } else if let Some(x) = lt {
            Test::Lt(*x)
        } else if let Some(x) = lte {
            Test::Lte(*x)
        } else {
            let src = matches.as_deref().unwrap_or_default();
            let regex = regex::RegexBuilder::new(src)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("alert.when.matches is not a valid regex: {e}"))?;
            // A `$` or `\z` can stop matching when more text comes; such a rule waits for the end.
            let early = !src.contains('$') && !src.contains("\\z") && !src.contains("\\Z");
            Test::Matches { regex, early }
        };
        let is_json = matches!(answer, Some(AnswerFormat::JsonSchema(_) | AnswerFormat::JsonObject {}));
        match pointer {
            Some(p) if !is_json => {
                return Err(format!(
                    "alert.when.pointer needs a JSON answer (answer: {{\"json_schema\": ...}} or {{\"json_object\": {{}}}}); \
                     this monitor's answer is {}",
                    kind(answer)
                ));
            }
            Some(p) if !p.is_empty() && !p.starts_with('/') => {
                return Err(format!(
                    "alert.when.pointer {p:?} is not a JSON pointer: it starts with '/' (\"/person\")"
                ));
            }
            Some(p) => {
                if let Some(AnswerFormat::JsonSchema(schema)) = answer {
                    schema_has(schema, p)?;
                }
            }
            None if is_json && !matches!(test, Test::Matches { .. }) => {
                return Err(format!(
                    "alert.when on {} needs a pointer to the field it tests (\"pointer\": \"/person\")",
                    kind(answer)
                ));
            }
            None => {}
        }
        match (&test, answer) {
            (Test::Equals(_), None) => {
                return Err("alert.when.equals needs an answer shape (answer: {\"choice\": [...]}); \
                     on free text use matches"
                    .into());
            }
            (Test::Equals(v), Some(AnswerFormat::Choice(options)))
                if !v.as_str().is_some_and(|s| options.iter().any(|o| o == s)) =>
            {
                return Err(format!("alert.when.equals {v} is not one of the choices {options:?}"));
            }
            (Test::Gt(_) | Test::Gte(_) | Test::Lt(_) | Test::Lte(_), a) if !is_json => {
                return Err(format!(
                    "alert.when comparisons need a JSON answer with a number; this one is {}",
                    kind(a)
                ));
            }
            _ => {}
        }
        let (n, m) = rule.confirm.map_or((1, 1), |c| (c.windows, c.of));
        if n == 0 || n > m || m > MAX_SPAN {
            return Err(format!("alert.confirm needs 1 <= windows <= of <= {MAX_SPAN}; got {n} of {m}"));
        }
        let clear_after = rule.clear_after.unwrap_or(1);
        if clear_after == 0 || clear_after > 1000 {
            return Err("alert.clear_after must be 1 to 1000 windows".into());
        }
        let cooldown = rule.cooldown_s.unwrap_or(0.0);
        if !(0.0..=MAX_COOLDOWN_S).contains(&cooldown) {
            return Err(format!("alert.cooldown_s must be 0 to {MAX_COOLDOWN_S} seconds"));
        }
        if rule.notify.len() > MAX_TARGETS {
            return Err(format!("alert.notify takes at most {MAX_TARGETS} targets"));
        }
        for NotifyTarget::Webhook(w) in &rule.notify {
            let u = url::Url::parse(&w.url).map_err(|e| format!("alert.notify webhook url: {e}"))?;
            if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
                return Err("alert.notify webhook urls are http:// or https:// with a host".into());
            }
            if w.secret.as_deref().is_some_and(|s| s.is_empty() || s == "***") {
                return Err("alert.notify webhook secret must be the key itself (not empty, not ***)".into());
            }
        }
        Ok(Rule {
            pointer: pointer.clone().filter(|p| !p.is_empty()),
            test,
            confirm: (n, m),
            clear_after,
            cooldown_ms: (cooldown * 1000.0) as i64,
            notify: rule.notify.clone(),
        })
    }

    fn test(&self, v: &Value) -> bool {
        let num = || v.as_f64();
        match &self.test {
            Test::Equals(want) => v == want,
            Test::Gt(x) => num().is_some_and(|n| n > *x),
            Test::Gte(x) => num().is_some_and(|n| n >= *x),
            Test::Lt(x) => num().is_some_and(|n| n < *x),
            Test::Lte(x) => num().is_some_and(|n| n <= *x),
            Test::Matches { regex, .. } => match v {
                Value::String(s) => regex.is_match(s),
                other => regex.is_match(&other.to_string()),
            },
        }
    }

    /// A part of the answer was decided: the verdict, when this part decides it.
    pub(crate) fn on_decided(&self, path: &str, value: &Value) -> Option<bool> {
        let wanted = self.pointer.as_deref().unwrap_or("");
        if matches!(self.test, Test::Matches { .. }) && self.pointer.is_none() {
            // A free-text test reads the text, not values.
            return None;
        }
        if path == wanted {
            return Some(self.test(value));
        }
        // The whole answer (or an enclosing value) is decided: the field is either in it or
        // absent for good.
        if wanted.starts_with(path) && (path.is_empty() || wanted[path.len()..].starts_with('/')) {
            let rest = &wanted[path.len()..];
            return Some(value.pointer(rest).is_some_and(|v| self.test(v)));
        }
        None
    }

    /// The text so far: a positive verdict, when a text test already matches.
    pub(crate) fn on_text(&self, text: &str) -> Option<bool> {
        match &self.test {
            Test::Matches { regex, early: true } if self.pointer.is_none() => regex.is_match(text).then_some(true),
            _ => None,
        }
    }

    /// The window ended undecided: its verdict from the whole answer (`None` when the answer
    /// was cut and says nothing either way).
    pub(crate) fn at_end(&self, text: &str, answer: Option<&AnswerResult>) -> Option<bool> {
        if matches!(self.test, Test::Matches { .. }) && self.pointer.is_none() {
            return Some(self.test(&Value::from(text)));
        }
        let value = answer?.value.as_ref()?;
        Some(self.on_decided("", value).unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(v: Value) -> AlertRule {
        serde_json::from_value(v).unwrap()
    }

    fn choice() -> AnswerFormat {
        AnswerFormat::Choice(vec!["yes".into(), "no".into()])
    }

    fn schema() -> AnswerFormat {
        AnswerFormat::JsonSchema(json!({
            "type": "object",
            "properties": {"person": {"type": "boolean"}, "count": {"type": "integer"},
                           "cars": {"type": "array", "items": {"type": "object", "properties": {"color": {"type": "string"}}}}},
            "required": ["person", "count"]
        }))
    }

    #[test]
    fn rules_that_cannot_apply_to_the_answer_are_refused_with_the_reason() {
        let cases = [
            (json!({"when": {"pointer": "/person", "equals": true}}), Some(choice()), "needs a JSON answer"),
            (json!({"when": {"equals": "maybe"}}), Some(choice()), "not one of the choices"),
            (json!({"when": {"equals": "yes"}}), None, "on free text use matches"),
            (json!({"when": {"matches": "(unclosed"}}), None, "not a valid regex"),
            (json!({"when": {"pointer": "/dog", "equals": true}}), Some(schema()), "no property \"dog\""),
            (json!({"when": {"pointer": "/cars/x/color", "equals": "red"}}), Some(schema()), "use a number"),
            (json!({"when": {"equals": true}}), Some(schema()), "needs a pointer"),
            (json!({"when": {"pointer": "person", "equals": true}}), Some(schema()), "starts with '/'"),
            (json!({"when": {"gt": 1}}), Some(choice()), "comparisons need a JSON answer"),
            (json!({"when": {"pointer": "/count", "gt": 1, "lt": 5}}), Some(schema()), "exactly one test"),
            (json!({"when": {"matches": "x"}, "confirm": {"windows": 3, "of": 2}}), None, "windows <= of"),
            (json!({"when": {"matches": "x"}, "clear_after": 0}), None, "clear_after"),
            (json!({"when": {"matches": "x"}, "cooldown_s": -1}), None, "cooldown_s"),
            (json!({"when": {"matches": "x"}, "notify": [{"webhook": {"url": "ftp://h/x"}}]}), None, "http://"),
            (
                json!({"when": {"matches": "x"}, "notify": [{"webhook": {"url": "http://h/", "secret": "***"}}]}),
                None,
                "secret",
            ),
        ];
        for (r, answer, why) in cases {
            let err = Rule::check(&rule(r.clone()), answer.as_ref()).unwrap_err();
            assert!(err.contains(why), "{r}: {err}");
        }
        // Unknown fields are refused by the type itself.
        let e = serde_json::from_value::<AlertRule>(json!({"when": {"matches": "x"}, "confirmm": {}})).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        for (r, answer) in [
            (json!({"when": {"equals": "yes"}, "confirm": {"windows": 2, "of": 3}}), Some(choice())),
            (json!({"when": {"pointer": "/cars/0/color", "equals": "red"}}), Some(schema())),
            (json!({"when": {"pointer": "/count", "gte": 2}}), Some(schema())),
            (json!({"when": {"pointer": "/anything", "equals": 1}}), Some(AnswerFormat::JsonObject {})),
            (json!({"when": {"matches": "(?i)person"}}), None),
        ] {
            Rule::check(&rule(r.clone()), answer.as_ref()).unwrap_or_else(|e| panic!("{r}: {e}"));
        }
    }

    #[test]
    fn verdicts_come_from_the_part_of_the_answer_that_decides_them() {
        let c = Rule::check(&rule(json!({"when": {"equals": "yes"}})), Some(&choice())).unwrap();
        assert_eq!(c.on_decided("", &json!("yes")), Some(true));
        assert_eq!(c.on_decided("", &json!("no")), Some(false));
        assert_eq!(c.on_text("ye"), None);

        let s = Rule::check(&rule(json!({"when": {"pointer": "/count", "gt": 2}})), Some(&schema())).unwrap();
        assert_eq!(s.on_decided("/person", &json!(true)), None, "another field decides nothing");
        assert_eq!(s.on_decided("/count", &json!(3)), Some(true));
        assert_eq!(s.on_decided("/count", &json!(2)), Some(false));
        // The whole object decided without the field: negative.
        assert_eq!(s.on_decided("", &json!({"person": true})), Some(false));
        let cut = AnswerResult { complete: false, value: None };
        assert_eq!(s.at_end("{\"person\": tr", Some(&cut)), None, "a cut answer says nothing");

        let nested =
            Rule::check(&rule(json!({"when": {"pointer": "/cars/0/color", "equals": "red"}})), Some(&schema()))
                .unwrap();
        assert_eq!(nested.on_decided("/cars/0", &json!({"color": "red"})), Some(true));

        let m = Rule::check(&rule(json!({"when": {"matches": "(?i)\\bperson\\b"}})), None).unwrap();
        assert_eq!(m.on_text("A per"), None);
        assert_eq!(m.on_text("A Person walks"), Some(true), "decided as soon as the text matches");
        assert_eq!(m.at_end("an empty street", None), Some(false));
        let anchored = Rule::check(&rule(json!({"when": {"matches": "^no one$"}})), None).unwrap();
        assert_eq!(anchored.on_text("no one"), None, "an end anchor waits for the end");
        assert_eq!(anchored.at_end("no one", None), Some(true));
        assert_eq!(anchored.at_end("no one but a cat", None), Some(false));
    }
}
