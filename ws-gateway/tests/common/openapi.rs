//! The OpenAPI document checked against what the server really sends: a response body must
//! match its schema (types, enums, required properties, and no property the document does not
//! name), so the hand-kept document cannot drift from the wire types unnoticed.
#![allow(dead_code, unreachable_pub)]

use serde_json::Value;

fn doc() -> Value {
    serde_json::from_str(ws_gateway::server::OPENAPI).expect("the OpenAPI document parses")
}

/// Panics, saying where, unless `value` matches the document's schema `name`.
pub fn conforms(name: &str, value: &Value) {
    let doc = doc();
    let schema = doc["components"]["schemas"][name].clone();
    assert!(schema.is_object(), "no schema {name} in the OpenAPI document");
    if let Err(e) = check(&doc, &schema, value, name) {
        panic!("{e}\nthe value: {value}");
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or_default();
        let target = &doc["components"]["schemas"][name];
        if !target.is_object() {
            return Err(format!("{at}: a reference to {r}, which the document lacks"));
        }
        return check(doc, target, v, at);
    }
    for combined in ["oneOf", "anyOf"] {
        if let Some(options) = schema[combined].as_array() {
            if options.iter().any(|o| check(doc, o, v, at).is_ok()) {
                return Ok(());
            }
            return Err(format!("{at}: matches none of its {combined} schemas"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(t, v)) {
        return Err(format!("{at}: {v} is not of type {types:?}"));
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(v)
    {
        return Err(format!("{at}: {v} is not one of {options:?}"));
    }
    match v {
        Value::Object(map) => {
            // Free-form objects (no properties named) are not checked further.
            let Some(props) = schema["properties"].as_object() else { return Ok(()) };
            for r in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(r) {
                    return Err(format!("{at}: the required property {r:?} is missing"));
                }
            }
            for (k, item) in map {
                let Some(s) = props.get(k) else {
                    if schema["additionalProperties"] == Value::Bool(true) {
                        continue;
                    }
                    return Err(format!("{at}: the property {k:?} is sent but not in the document"));
                };
                check(doc, s, item, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if schema["items"].is_object() {
                    check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
