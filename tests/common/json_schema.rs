//! A JSON Schema (2020-12) checker for the subset docs/events.schema.json uses:
//! `type`, `required`, `properties`, `additionalProperties: false`, `enum`,
//! `const`, `minimum`, `maximum`, `minLength`, `maxLength`, `oneOf` and local
//! `$ref`s to `#/$defs/…`. A keyword outside it makes the check fail, so the
//! schema cannot grow a rule that is silently not checked. Shared by the
//! daemon's webhook tests and the library's (`#[path]`).

use serde_json::Value;

/// Annotations that assert nothing.
const ANNOTATIONS: &[&str] = &["$schema", "$id", "$defs", "title", "description"];

/// Every violation of `schema` by `value` (empty: valid).
pub(crate) fn violations(schema: &Value, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    check(schema, schema, value, "$", &mut out);
    out
}

fn type_ok(name: &str, v: &Value) -> bool {
    match name {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => panic!("unknown type {other}"),
    }
}

fn check(root: &Value, schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    let Some(rules) = schema.as_object() else {
        out.push(format!("{at}: schema is not an object"));
        return;
    };
    for (key, rule) in rules {
        match key.as_str() {
            k if ANNOTATIONS.contains(&k) => {}
            "$ref" => {
                let name = rule
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/$defs/"))
                    .unwrap_or_else(|| panic!("unsupported $ref {rule}"));
                let target = &root["$defs"][name];
                assert!(!target.is_null(), "no $defs/{name}");
                check(root, target, v, at, out);
            }
            "type" => {
                let ok = match rule {
                    Value::String(t) => type_ok(t, v),
                    Value::Array(ts) => ts.iter().any(|t| type_ok(t.as_str().unwrap_or(""), v)),
                    _ => panic!("bad type {rule}"),
                };
                if !ok {
                    out.push(format!("{at}: {v} is not of type {rule}"));
                }
            }
            "required" => {
                for name in rule.as_array().into_iter().flatten() {
                    let name = name.as_str().unwrap_or_default();
                    if v.is_object() && v.get(name).is_none() {
                        out.push(format!("{at}: `{name}` is missing"));
                    }
                }
            }
            "properties" => {
                if let (Some(props), Some(obj)) = (rule.as_object(), v.as_object()) {
                    for (name, sub) in props {
                        if let Some(value) = obj.get(name) {
                            check(root, sub, value, &format!("{at}.{name}"), out);
                        }
                    }
                }
            }
            "additionalProperties" => {
                assert_eq!(
                    rule,
                    &Value::Bool(false),
                    "only additionalProperties: false"
                );
                let known = rules.get("properties").and_then(Value::as_object);
                if let Some(obj) = v.as_object() {
                    for name in obj.keys() {
                        if !known.is_some_and(|k| k.contains_key(name)) {
                            out.push(format!("{at}: unexpected property `{name}`"));
                        }
                    }
                }
            }
            "enum" => {
                if !rule.as_array().is_some_and(|a| a.contains(v)) {
                    out.push(format!("{at}: {v} not in {rule}"));
                }
            }
            "const" => {
                if rule != v {
                    out.push(format!("{at}: {v} is not {rule}"));
                }
            }
            "minimum" | "maximum" => {
                if let (Some(limit), Some(n)) = (rule.as_f64(), v.as_f64()) {
                    let bad = if key == "minimum" {
                        n < limit
                    } else {
                        n > limit
                    };
                    if bad {
                        out.push(format!("{at}: {n} breaks {key} {limit}"));
                    }
                }
            }
            "minLength" | "maxLength" => {
                if let (Some(limit), Some(s)) = (rule.as_u64(), v.as_str()) {
                    let len = s.chars().count() as u64;
                    let bad = if key == "minLength" {
                        len < limit
                    } else {
                        len > limit
                    };
                    if bad {
                        out.push(format!("{at}: length {len} breaks {key} {limit}"));
                    }
                }
            }
            "oneOf" => {
                let branches = rule.as_array().map(Vec::as_slice).unwrap_or_default();
                let mut passing = 0;
                let mut why = Vec::new();
                for b in branches {
                    let mut errs = Vec::new();
                    check(root, b, v, at, &mut errs);
                    if errs.is_empty() {
                        passing += 1;
                    } else {
                        why.extend(errs);
                    }
                }
                if passing != 1 {
                    let detail: Vec<&String> =
                        why.iter().filter(|e| !e.contains(" is not \"")).collect();
                    out.push(format!("{at}: matches {passing} of oneOf; {detail:?}"));
                }
            }
            other => panic!("schema keyword `{other}` is not supported by this checker"),
        }
    }
}
