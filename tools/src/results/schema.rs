//! Checks a results document against `schema.json` (a small JSON Schema subset, interpreted here).
//!
//! The schema file is the one a reader (or another tool) uses; this module
//! interprets the keywords it uses (`type`, `const`, `enum`, `required`,
//! `properties`, `additionalProperties`, `propertyNames`, `items`,
//! `minimum`, `maximum`, `pattern` with anchored literal/class atoms and
//! `{n}`/`+`, `$ref` into `#/$defs`), and rejects any other keyword, so a
//! constraint added to the schema is never silently skipped. Chosen over the
//! `jsonschema` crate to keep the tools' build small on a 2-core machine.

use serde_json::Value as Json;

/// The schema of `results.json`, version [`crate::results::SCHEMA_VERSION`].
pub const SCHEMA: &str = include_str!("schema.json");

/// Keywords that carry no constraint.
const ANNOTATIONS: [&str; 5] = ["$schema", "$id", "title", "description", "$defs"];

/// Every violation of `schema` by `doc`, each as `<json path>: <what>`;
/// empty when `doc` conforms.
pub fn validate(schema: &Json, doc: &Json) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, schema, doc, "$", &mut errors);
    errors
}

/// [`validate`] against [`SCHEMA`].
pub fn validate_results(doc: &Json) -> Vec<String> {
    match serde_json::from_str::<Json>(SCHEMA) {
        Ok(schema) => validate(&schema, doc),
        Err(e) => vec![format!("schema.json does not parse: {e}")],
    }
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn has_type(v: &Json, want: &str) -> bool {
    let t = type_name(v);
    t == want || (want == "number" && t == "integer")
}

fn check(root: &Json, schema: &Json, doc: &Json, path: &str, errors: &mut Vec<String>) {
    let Some(rules) = schema.as_object() else {
        errors.push(format!("{path}: schema is not an object: {schema}"));
        return;
    };
    for (keyword, arg) in rules {
        match keyword.as_str() {
            k if ANNOTATIONS.contains(&k) => {}
            "$ref" => match arg
                .as_str()
                .and_then(|r| r.strip_prefix("#/$defs/"))
                .and_then(|name| root.get("$defs")?.get(name))
            {
                Some(target) => check(root, target, doc, path, errors),
                None => errors.push(format!("{path}: unresolvable $ref {arg}")),
            },
            "type" => {
                let wants: Vec<&str> = match arg {
                    Json::String(s) => vec![s.as_str()],
                    Json::Array(a) => a.iter().filter_map(Json::as_str).collect(),
                    _ => vec![],
                };
                if !wants.iter().any(|w| has_type(doc, w)) {
                    errors.push(format!(
                        "{path}: is {} {doc}, want {}",
                        type_name(doc),
                        wants.join(" or ")
                    ));
                }
            }
            "const" if doc != arg => errors.push(format!("{path}: is {doc}, want {arg}")),
            "const" => {}
            "enum" => {
                let options = arg.as_array().map(Vec::as_slice).unwrap_or(&[]);
                if !options.contains(doc) {
                    errors.push(format!("{path}: {doc} is not one of {arg}"));
                }
            }
            "minimum" | "maximum" => {
                if let (Some(x), Some(bound)) = (doc.as_f64(), arg.as_f64()) {
                    let bad = if keyword == "minimum" {
                        x < bound
                    } else {
                        x > bound
                    };
                    if bad {
                        errors.push(format!("{path}: {x} is beyond the {keyword} {bound}"));
                    }
                }
            }
            "pattern" => {
                if let (Some(s), Some(p)) = (doc.as_str(), arg.as_str()) {
                    match matches(p, s) {
                        Ok(true) => {}
                        Ok(false) => errors.push(format!("{path}: {s:?} does not match {p}")),
                        Err(e) => errors.push(format!("{path}: pattern {p}: {e}")),
                    }
                }
            }
            "required" => {
                if let Some(obj) = doc.as_object() {
                    for name in arg
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Json::as_str)
                    {
                        if !obj.contains_key(name) {
                            errors.push(format!("{path}: required field `{name}` is missing"));
                        }
                    }
                }
            }
            "properties" => {
                if let (Some(obj), Some(props)) = (doc.as_object(), arg.as_object()) {
                    for (name, sub) in props {
                        if let Some(v) = obj.get(name) {
                            check(root, sub, v, &format!("{path}.{name}"), errors);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(obj) = doc.as_object() {
                    let known = rules.get("properties").and_then(Json::as_object);
                    for (name, v) in obj {
                        if known.is_some_and(|k| k.contains_key(name)) {
                            continue;
                        }
                        match arg {
                            Json::Bool(false) => {
                                errors.push(format!("{path}: unknown field `{name}`"))
                            }
                            Json::Bool(true) => {}
                            sub => check(root, sub, v, &format!("{path}.{name}"), errors),
                        }
                    }
                }
            }
            "propertyNames" => {
                for name in doc.as_object().into_iter().flat_map(|o| o.keys()) {
                    let key = Json::String(name.clone());
                    check(root, arg, &key, &format!("{path}.{name} (name)"), errors);
                }
            }
            "items" => {
                for (i, v) in doc.as_array().into_iter().flatten().enumerate() {
                    check(root, arg, v, &format!("{path}[{i}]"), errors);
                }
            }
            other => errors.push(format!(
                "{path}: schema keyword `{other}` is not supported by this checker"
            )),
        }
    }
}

/// One pattern atom: the characters it accepts and how many times.
struct Atom {
    chars: Vec<(char, char)>,
    min: usize,
    max: usize,
}

/// Matches `s` against an anchored pattern of literal characters and
/// `[...]` classes (with `a-z` ranges), each optionally followed by `{n}`
/// or `+`. Anything else is an error.
fn matches(pattern: &str, s: &str) -> Result<bool, String> {
    let body = pattern
        .strip_prefix('^')
        .and_then(|p| p.strip_suffix('$'))
        .ok_or("only patterns anchored with ^...$ are supported")?;
    let mut atoms: Vec<Atom> = Vec::new();
    let mut it = body.chars().peekable();
    while let Some(c) = it.next() {
        let chars = match c {
            '[' => {
                let mut set = Vec::new();
                loop {
                    match it.next() {
                        Some(']') => break,
                        Some(lo) if it.peek() == Some(&'-') => {
                            it.next();
                            let hi = it.next().ok_or("unterminated range")?;
                            set.push((lo, hi));
                        }
                        Some(ch) => set.push((ch, ch)),
                        None => return Err("unterminated [".into()),
                    }
                }
                set
            }
            '{' | '}' | '+' | '*' | '?' | '(' | ')' | '|' | '\\' | '.' => {
                return Err(format!("`{c}` is not supported here"))
            }
            lit => vec![(lit, lit)],
        };
        let (min, max) = match it.peek() {
            Some('+') => {
                it.next();
                (1, usize::MAX)
            }
            Some('{') => {
                it.next();
                let n: String = it.by_ref().take_while(|&d| d != '}').collect();
                let n = n.parse().map_err(|_| format!("bad count {{{n}}}"))?;
                (n, n)
            }
            _ => (1, 1),
        };
        atoms.push(Atom { chars, min, max });
    }
    Ok(match_atoms(&atoms, &s.chars().collect::<Vec<_>>()))
}

fn match_atoms(atoms: &[Atom], s: &[char]) -> bool {
    let Some((a, rest)) = atoms.split_first() else {
        return s.is_empty();
    };
    let accepts = |c: char| a.chars.iter().any(|&(lo, hi)| lo <= c && c <= hi);
    let run = s.iter().take_while(|&&c| accepts(c)).count();
    (a.min..=a.max.min(run))
        .rev()
        .any(|n| match_atoms(rest, &s[n..]))
}

#[cfg(test)]
mod tests {
    use super::{matches, validate, validate_results};
    use serde_json::json;

    #[test]
    fn patterns_match_what_they_say() {
        let stamp = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$";
        assert_eq!(matches(stamp, "2026-12-01T06:30:00Z"), Ok(true));
        assert_eq!(matches(stamp, "2026-12-01T06:30:0Z"), Ok(false));
        assert_eq!(matches(stamp, "2026-12-01T06:30:00Zx"), Ok(false));
        assert_eq!(matches("^[a-z0-9_.]+$", "exits.pf"), Ok(true));
        assert_eq!(matches("^[a-z0-9_.]+$", "Exits"), Ok(false));
        assert_eq!(matches("^[a-z0-9_.]+$", ""), Ok(false));
        assert!(matches("^a*$", "a").is_err());
        assert!(matches("a", "a").is_err());
    }

    #[test]
    fn the_checker_finds_each_kind_of_violation() {
        let schema = json!({
            "type": "object",
            "required": ["a", "b"],
            "additionalProperties": false,
            "properties": {
                "a": { "$ref": "#/$defs/n" },
                "b": { "enum": ["x", "y"] },
                "c": { "type": "array", "items": { "type": ["string", "null"] } },
                "m": { "type": "object", "additionalProperties": { "type": "number" },
                       "propertyNames": { "pattern": "^[a-z]+$" } }
            },
            "$defs": { "n": { "type": "integer", "minimum": 0, "maximum": 9 } }
        });
        assert!(validate(&schema, &json!({"a": 3, "b": "x"})).is_empty());
        let bad = [
            (json!({"b": "x"}), "required field `a`"),
            (json!({"a": 3, "b": "z"}), "is not one of"),
            (json!({"a": -1, "b": "x"}), "minimum"),
            (json!({"a": 10, "b": "x"}), "maximum"),
            (json!({"a": 1.5, "b": "x"}), "want integer"),
            (json!({"a": 1, "b": "x", "d": 0}), "unknown field `d`"),
            (json!({"a": 1, "b": "x", "c": [1]}), "$.c[0]"),
            (json!({"a": 1, "b": "x", "m": {"k": "v"}}), "$.m.k"),
            (json!({"a": 1, "b": "x", "m": {"K": 1}}), "does not match"),
        ];
        for (doc, want) in bad {
            let errors = validate(&schema, &doc);
            assert!(errors.iter().any(|e| e.contains(want)), "{doc}: {errors:?}");
        }
        let unknown = validate(&json!({"oneOf": []}), &json!(1));
        assert!(
            unknown[0].contains("`oneOf` is not supported"),
            "{unknown:?}"
        );
    }

    #[test]
    fn real_results_conform_and_each_broken_field_is_named() {
        use crate::results::test_data::{run_from, two_runs};
        let mut results = two_runs();
        let with_lines = include_str!("../../tests/fixtures/run-result-lines.txt");
        results.runs.push(run_from(with_lines, "fast-percpu"));
        let mut doc = serde_json::to_value(&results).unwrap();
        assert_eq!(validate_results(&doc), Vec::<String>::new());
        for dir in ["results-before", "results-after"] {
            let path = format!(
                "{}/tests/fixtures/{dir}/results.json",
                env!("CARGO_MANIFEST_DIR")
            );
            let fixture: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            assert_eq!(validate_results(&fixture), Vec::<String>::new(), "{dir}");
        }
        let w = &mut doc["runs"][2]["report"]["workloads"][0];
        w["metrics"]["exits"] = json!(-1);
        w.as_object_mut().unwrap().remove("verdict");
        doc["runs"][0]["selectors"]["smp"] = json!(65);
        doc["runs"][1]["ending"] = json!("crashed");
        let errors = validate_results(&doc);
        for want in [
            "$.runs[2].report.workloads[0].metrics.exits: -1 is beyond the minimum",
            "$.runs[2].report.workloads[0]: required field `verdict` is missing",
            "$.runs[0].selectors.smp: 65 is beyond the maximum",
            "$.runs[1].ending: \"crashed\" is not one of",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "{want}: {errors:?}"
            );
        }
        assert_eq!(errors.len(), 4, "{errors:?}");
    }

    #[test]
    fn an_empty_results_document_conforms_and_a_wrong_version_does_not() {
        let mut doc = json!({
            "schema": "umbra-results", "schema_version": 1, "command": "compare",
            "created": "2026-12-01T06:30:00Z", "runs": []
        });
        assert_eq!(validate_results(&doc), Vec::<String>::new());
        doc["schema_version"] = json!(2);
        assert_eq!(validate_results(&doc), Vec::<String>::new());
        doc["schema_version"] = json!(3);
        assert!(validate_results(&doc)[0].contains("schema_version"));
    }
}
