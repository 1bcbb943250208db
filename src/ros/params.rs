//! Declares a node's parameters (src/node_params.rs) on an r2r node: launch/command-line
//! overrides are type-checked, missing ones get their defaults, and all are made visible through
//! the node's parameter services.

use crate::node_params::{self, ParamKind};
use anyhow::{anyhow, bail, Result};
use r2r::{Parameter, ParameterValue};
use serde_json::{Map, Value};

/// The node's parameter values by name (overrides applied), as JSON values.
pub fn declare(node: &r2r::Node, executable: &str) -> Result<Map<String, Value>> {
    let specs = node_params::declared(executable).ok_or_else(|| anyhow!("no parameter declarations for `{executable}`"))?;
    let mut params = node.params.lock().map_err(|_| anyhow!("parameter table poisoned"))?;
    let mut out = Map::new();
    for spec in &specs {
        let value = match params.get(spec.name).map(|p| &p.value) {
            None | Some(ParameterValue::NotSet) => spec.default.clone(),
            Some(v) => to_json(spec.name, spec.kind, v)?,
        };
        params.insert(spec.name.to_string(), Parameter::new(from_json(spec.kind, &value)));
        out.insert(spec.name.to_string(), value);
    }
    for name in params.keys() {
        if !specs.iter().any(|s| s.name == name) && !name.starts_with("use_sim_time") {
            tracing::warn!("{executable}: parameter `{name}` is set but not declared; ignored");
        }
    }
    Ok(out)
}

fn to_json(name: &str, kind: ParamKind, v: &ParameterValue) -> Result<Value> {
    Ok(match (kind, v) {
        (ParamKind::String, ParameterValue::String(s)) => Value::from(s.clone()),
        (ParamKind::Integer, ParameterValue::Integer(i)) => Value::from(*i),
        (ParamKind::Double, ParameterValue::Double(d)) => Value::from(*d),
        (ParamKind::Double, ParameterValue::Integer(i)) => Value::from(*i as f64),
        (ParamKind::Bool, ParameterValue::Bool(b)) => Value::from(*b),
        _ => bail!("parameter `{name}`: expected {kind:?}, got {v:?}"),
    })
}

fn from_json(kind: ParamKind, v: &Value) -> ParameterValue {
    match kind {
        ParamKind::String => ParameterValue::String(v.as_str().unwrap_or_default().to_string()),
        ParamKind::Integer => ParameterValue::Integer(v.as_i64().unwrap_or_default()),
        ParamKind::Double => ParameterValue::Double(v.as_f64().unwrap_or_default()),
        ParamKind::Bool => ParameterValue::Bool(v.as_bool().unwrap_or_default()),
    }
}

/// Typed getters over the declared values (declare() guarantees presence and type).
pub trait ParamsExt {
    /// A string parameter.
    fn string(&self, name: &str) -> String;
    /// An integer parameter.
    fn int(&self, name: &str) -> i64;
    /// A double parameter.
    fn double(&self, name: &str) -> f64;
}

impl ParamsExt for Map<String, Value> {
    fn string(&self, name: &str) -> String {
        self.get(name).and_then(Value::as_str).unwrap_or_default().to_string()
    }
    fn int(&self, name: &str) -> i64 {
        self.get(name).and_then(Value::as_i64).unwrap_or_default()
    }
    fn double(&self, name: &str) -> f64 {
        self.get(name).and_then(Value::as_f64).unwrap_or_default()
    }
}
