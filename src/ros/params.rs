//! Declares a node's parameters (src/node_params.rs) on an r2r node: launch/command-line
//! overrides are type-checked, an unknown one is an error, missing ones get their defaults, and
//! all are served by the node's parameter services (`ros2 param list/get/set`).

use crate::node_params::{self, ParamKind};
use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use r2r::{Parameter, ParameterValue};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A node's declared parameter values by name (read them with [`ParamsExt`]).
pub type Params = Map<String, Value>;

/// The node's parameter values by name (overrides applied), as JSON values; starts the
/// parameter services on `rt`. Changes made later through them arrive on `on_change`.
pub fn declare(
    node: &mut r2r::Node,
    rt: &tokio::runtime::Runtime,
    executable: &str,
    mut on_change: impl FnMut(&str, &ParameterValue) + Send + 'static,
) -> Result<Params> {
    let specs =
        node_params::declared(executable).ok_or_else(|| anyhow!("no parameter declarations for `{executable}`"))?;
    let out = {
        let mut params = node.params.lock().map_err(|_| anyhow!("parameter table poisoned"))?;
        let unknown: Vec<&String> = params.keys().filter(|n| !specs.iter().any(|s| s.name == n.as_str())).collect();
        if !unknown.is_empty() {
            let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
            bail!("{executable}: unknown parameter(s) {unknown:?}; declared: {}", names.join(", "));
        }
        let mut out = Map::new();
        for spec in &specs {
            let value = match params.get(spec.name).map(|p| &p.value) {
                None | Some(ParameterValue::NotSet) => spec.default.clone(),
                Some(v) => to_json(spec.name, spec.kind, v)?,
            };
            let mut p = Parameter::new(from_json(spec.kind, &value));
            p.description = spec.description;
            params.insert(spec.name.to_string(), p);
            out.insert(spec.name.to_string(), value);
        }
        out
    };
    let (services, mut changes) = node.make_parameter_handler()?;
    rt.spawn(services);
    rt.spawn(async move {
        while let Some((name, value)) = changes.next().await {
            on_change(&name, &value);
        }
    });
    Ok(out)
}

fn to_json(name: &str, kind: ParamKind, v: &ParameterValue) -> Result<Value> {
    Ok(match (kind, v) {
        (ParamKind::String, ParameterValue::String(s)) => Value::from(s.clone()),
        (ParamKind::Integer, ParameterValue::Integer(i)) => Value::from(*i),
        (ParamKind::Double, ParameterValue::Double(d)) => Value::from(*d),
        (ParamKind::Double, ParameterValue::Integer(i)) => Value::from(*i as f64),
        (ParamKind::Bool, ParameterValue::Bool(b)) => Value::from(*b),
        _ => bail!("parameter `{name}`: expected {}, got {v:?}", kind.ros_name()),
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

/// A file parameter: absolute, or relative to the package's share folder when it exists there
/// (`config/streams_sim.yaml`), else relative to the working directory.
pub fn share_file(value: &str) -> PathBuf {
    let p = Path::new(value);
    if p.is_absolute() || value.is_empty() {
        return p.to_path_buf();
    }
    match share_dir().map(|d| d.join(p)) {
        Some(in_share) if in_share.exists() => in_share,
        _ => p.to_path_buf(),
    }
}

/// `<prefix>/share/vla_finetune` of the installed package: two levels above the executable's
/// folder (`<prefix>/lib/vla_finetune/<exe>`), where colcon installs it.
fn share_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?.parent()?.join("share/vla_finetune");
    dir.is_dir().then_some(dir)
}

/// Typed getters over the declared values (declare() guarantees presence and type).
pub trait ParamsExt {
    /// A string parameter.
    fn string(&self, name: &str) -> String;
    /// An integer parameter.
    fn int(&self, name: &str) -> i64;
    /// A double parameter.
    fn double(&self, name: &str) -> f64;
    /// A boolean parameter.
    fn boolean(&self, name: &str) -> bool;
}

impl ParamsExt for Params {
    fn string(&self, name: &str) -> String {
        self.get(name).and_then(Value::as_str).unwrap_or_default().to_string()
    }
    fn int(&self, name: &str) -> i64 {
        self.get(name).and_then(Value::as_i64).unwrap_or_default()
    }
    fn double(&self, name: &str) -> f64 {
        self.get(name).and_then(Value::as_f64).unwrap_or_default()
    }
    fn boolean(&self, name: &str) -> bool {
        self.get(name).and_then(Value::as_bool).unwrap_or_default()
    }
}
