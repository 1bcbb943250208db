//! Every launch file and config file parses; every node a launch file starts is a cargo binary of
//! this package, and every parameter it sets (inline or from a parameter file) is one that node
//! declares (src/node_params.rs), with a value of the declared type.

use quick_xml::events::Event;
use serde_json::Value;
use std::path::{Path, PathBuf};
use vla_finetune::node_params;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A `<node>` of a launch file with the parameters it sets.
#[derive(Debug, Default)]
struct LaunchNode {
    exec: String,
    name: String,
    param_files: Vec<PathBuf>,
    inline: Vec<(String, String)>,
}

/// Resolves `$(var NAME)` to the argument's default and `$(find-pkg-share vla_finetune)` to this
/// source tree (the installed share folder holds the same launch/ and config/).
fn resolve(value: &str, args: &std::collections::BTreeMap<String, String>) -> String {
    let mut v = value.to_string();
    for _ in 0..4 {
        for (name, default) in args {
            v = v.replace(&format!("$(var {name})"), default);
        }
        v = v.replace("$(find-pkg-share vla_finetune)", ROOT);
    }
    v
}

fn attr(e: &quick_xml::events::BytesStart, key: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key.as_bytes())
        .map(|a| a.unescape_value().unwrap().into_owned())
}

fn parse_launch(path: &Path) -> Vec<LaunchNode> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut reader = quick_xml::Reader::from_str(&text);
    let mut nodes = Vec::new();
    let mut current: Option<LaunchNode> = None;
    let mut args = std::collections::BTreeMap::new();
    loop {
        match reader.read_event().unwrap_or_else(|e| panic!("{path:?}: invalid XML: {e}")) {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"arg" => {
                let name = attr(&e, "name").unwrap_or_else(|| panic!("{path:?}: <arg> without name"));
                args.insert(name, attr(&e, "default").unwrap_or_default());
            }
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"node" => {
                let node = LaunchNode {
                    exec: attr(&e, "exec").unwrap_or_else(|| panic!("{path:?}: <node> without exec")),
                    name: attr(&e, "name").unwrap_or_default(),
                    ..Default::default()
                };
                if matches!(reader.read_event(), Ok(Event::Eof)) {
                    break;
                }
                current = Some(node);
            }
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"param" => {
                let node = current.as_mut().unwrap_or_else(|| panic!("{path:?}: <param> outside <node>"));
                if let Some(from) = attr(&e, "from") {
                    node.param_files.push(PathBuf::from(resolve(&from, &args)));
                } else {
                    let name = attr(&e, "name").unwrap_or_else(|| panic!("{path:?}: <param> without name"));
                    node.inline.push((name, resolve(&attr(&e, "value").unwrap_or_default(), &args)));
                }
            }
            Event::End(e) if e.name().as_ref() == b"node" => nodes.extend(current.take()),
            Event::Eof => break,
            _ => {}
        }
    }
    nodes
}

fn files_with_ext(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn cargo_bins() -> Vec<String> {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap()).unwrap();
    manifest["bin"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_string()).collect()
}

/// Parameters a ROS parameter file sets for node `name` (`/**` or the node's own key).
fn params_from_file(path: &Path, node_name: &str) -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let doc: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: invalid YAML: {e}"));
    let mut out = Vec::new();
    for (key, section) in doc.as_object().unwrap_or_else(|| panic!("{path:?}: expected a mapping")) {
        let k = key.trim_start_matches('/');
        if k == "**" || k == node_name {
            let params =
                section["ros__parameters"].as_object().unwrap_or_else(|| panic!("{path:?}: {key}: no ros__parameters"));
            out.extend(params.iter().map(|(n, v)| (n.clone(), v.clone())));
        } else {
            panic!("{path:?}: section `{key}` matches no node started with it (expected `{node_name}` or `/**`)");
        }
    }
    out
}

/// Launch values are strings; the declared kind decides how ROS reads them.
fn launch_value(raw: &str) -> Value {
    serde_yaml::from_str(raw).unwrap_or(Value::String(raw.to_string()))
}

fn check_param(exec: &str, name: &str, value: &Value, source: &str) -> Result<(), String> {
    let declared =
        node_params::declared(exec).ok_or_else(|| format!("{source}: no parameter declarations for `{exec}`"))?;
    let spec = declared
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("{source}: `{exec}` does not declare parameter `{name}`"))?;
    // An empty launch argument stays a string; any string-typed parameter accepts it.
    let ok = spec.kind.accepts(value) || (spec.kind == node_params::ParamKind::String && value.is_null());
    if ok {
        Ok(())
    } else {
        Err(format!("{source}: `{exec}.{name}` = {value} is not a {:?}", spec.kind))
    }
}

fn check_all_launch_files() -> Vec<String> {
    let bins = cargo_bins();
    let mut errors = Vec::new();
    for launch in files_with_ext("launch", ".launch.xml") {
        let source = launch.file_name().unwrap().to_string_lossy().to_string();
        let nodes = parse_launch(&launch);
        if nodes.is_empty() {
            errors.push(format!("{source}: starts no node"));
        }
        for node in nodes {
            if !bins.contains(&node.exec) {
                errors.push(format!("{source}: executable `{}` is not a cargo binary ({bins:?})", node.exec));
            }
            for file in &node.param_files {
                for (name, value) in params_from_file(file, &node.name) {
                    errors.extend(check_param(&node.exec, &name, &value, &source).err());
                }
            }
            for (name, raw) in &node.inline {
                errors.extend(check_param(&node.exec, name, &launch_value(raw), &source).err());
                if raw.starts_with(&format!("{ROOT}/config/")) && !Path::new(raw).exists() {
                    errors.push(format!("{source}: `{}.{name}` names a missing file {raw}", node.exec));
                }
            }
        }
    }
    errors
}

#[test]
fn launch_files_start_declared_nodes_with_declared_parameters() {
    let errors = check_all_launch_files();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn both_launch_files_exist() {
    let names: Vec<String> = files_with_ext("launch", ".launch.xml")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert!(names.contains(&"collect_and_train.launch.xml".to_string()), "{names:?}");
    assert!(names.contains(&"policy.launch.xml".to_string()), "{names:?}");
}

#[test]
fn every_config_file_is_valid_yaml() {
    for path in files_with_ext("config", ".yaml") {
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Result<Value, _> = serde_yaml::from_str(&text);
        assert!(doc.is_ok(), "{path:?}: {}", doc.unwrap_err());
    }
}

#[test]
fn an_undeclared_or_mistyped_parameter_is_reported() {
    assert!(check_param("policy_node", "control_rate_hz", &Value::from(20.0), "t").is_ok());
    assert!(check_param("policy_node", "control_rate", &Value::from(20.0), "t")
        .unwrap_err()
        .contains("does not declare"));
    assert!(check_param("policy_node", "ddim_steps", &Value::from("ten"), "t").unwrap_err().contains("is not a"));
    assert!(check_param("no_such_node", "x", &Value::from(1), "t").is_err());
}
