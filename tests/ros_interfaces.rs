//! The doc-only stand-ins (src/ros/interfaces_standin.rs) must mirror the interface files
//! (msg/msg/*.msg, msg/srv/*.srv) field by field, in order, with the types r2r generates.

use std::collections::BTreeMap;
use std::path::Path;

/// name -> ordered (field, rust type) pairs.
type Interfaces = BTreeMap<String, Vec<(String, String)>>;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Rust type r2r generates for a ROS field type.
fn rust_type(ros: &str) -> String {
    if let Some(i) = ros.find('[') {
        return format!("Vec<{}>", rust_type(&ros[..i]));
    }
    let prim = match ros {
        "bool" => "bool",
        "byte" | "char" | "uint8" => "u8",
        "int8" => "i8",
        "int16" => "i16",
        "uint16" => "u16",
        "int32" => "i32",
        "uint32" => "u32",
        "int64" => "i64",
        "uint64" => "u64",
        "float32" => "f32",
        "float64" => "f64",
        "string" | "wstring" => "String",
        other => return other.rsplit('/').next().unwrap().to_string(),
    };
    prim.to_string()
}

/// Fields of one section of an interface file (constants skipped).
fn parse_fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.contains('='))
        .map(|l| {
            let mut it = l.split_whitespace();
            let ty = it.next().unwrap();
            let name = it.next().unwrap_or_else(|| panic!("field without a name: `{l}`"));
            (name.to_string(), rust_type(ty))
        })
        .collect()
}

/// Every message and service request/response defined by the interface files.
fn from_interface_files(root: &Path) -> Interfaces {
    let mut out = Interfaces::new();
    for (dir, ext) in [("msg/msg", "msg"), ("msg/srv", "srv")] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some(ext) {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            if ext == "msg" {
                out.insert(format!("msg::{name}"), parse_fields(&text));
            } else {
                let (req, res) = text.split_once("\n---").unwrap_or_else(|| panic!("{path:?}: no ---"));
                out.insert(format!("srv::{name}::Request"), parse_fields(req));
                out.insert(format!("srv::{name}::Response"), parse_fields(res));
            }
        }
    }
    out
}

fn type_name(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(p) => {
            let seg = p.path.segments.last().unwrap();
            match &seg.arguments {
                syn::PathArguments::AngleBracketed(a) => {
                    let inner: Vec<String> = a
                        .args
                        .iter()
                        .map(|g| match g {
                            syn::GenericArgument::Type(t) => type_name(t),
                            _ => panic!("unexpected generic argument"),
                        })
                        .collect();
                    format!("{}<{}>", seg.ident, inner.join(","))
                }
                _ => seg.ident.to_string(),
            }
        }
        _ => panic!("unexpected field type in stand-in"),
    }
}

fn collect_structs(items: &[syn::Item], prefix: &str, out: &mut Interfaces) {
    for item in items {
        match item {
            syn::Item::Struct(s) => {
                if let syn::Fields::Named(f) = &s.fields {
                    let fields = f
                        .named
                        .iter()
                        .map(|f| (f.ident.as_ref().unwrap().to_string(), type_name(&f.ty)))
                        .collect();
                    out.insert(format!("{prefix}{}", s.ident), fields);
                }
            }
            syn::Item::Mod(m) => {
                if let Some((_, inner)) = &m.content {
                    collect_structs(inner, &format!("{prefix}{}::", m.ident), out);
                }
            }
            _ => {}
        }
    }
}

/// Every struct with named fields in the stand-in file, by module path.
fn from_standin(root: &Path) -> Interfaces {
    let src = std::fs::read_to_string(root.join("src/ros/interfaces_standin.rs")).unwrap();
    let file = syn::parse_file(&src).expect("stand-in file parses");
    let mut out = Interfaces::new();
    collect_structs(&file.items, "", &mut out);
    out
}

/// Differences between the interface files and the stand-ins, one line each.
fn drift(files: &Interfaces, standin: &Interfaces) -> Vec<String> {
    let mut diffs = Vec::new();
    for (name, fields) in files {
        match standin.get(name) {
            None => diffs.push(format!("{name}: in the interface files, missing from the stand-in")),
            Some(s) if s != fields => diffs.push(format!("{name}: interface files {fields:?} vs stand-in {s:?}")),
            Some(_) => {}
        }
    }
    for name in standin.keys() {
        if !files.contains_key(name) {
            diffs.push(format!("{name}: in the stand-in, not in the interface files"));
        }
    }
    diffs
}

#[test]
fn standins_mirror_interface_files() {
    let root = Path::new(ROOT);
    let files = from_interface_files(root);
    assert!(files.len() >= 14, "expected 6 messages and 4 services, found {:?}", files.keys());
    let diffs = drift(&files, &from_standin(root));
    assert!(diffs.is_empty(), "stand-ins drifted from the interface files:\n{}", diffs.join("\n"));
}

#[test]
fn a_field_changed_in_a_msg_file_is_detected() {
    let root = Path::new(ROOT);
    let standin = from_standin(root);
    let mut files = from_interface_files(root);
    files.get_mut("msg::TrainingProgress").unwrap().push(("grad_norm".into(), "f32".into()));
    assert_eq!(drift(&files, &standin).len(), 1);
    let mut files = from_interface_files(root);
    files.get_mut("srv::StartFineTune::Request").unwrap()[0].1 = "u32".into();
    assert_eq!(drift(&files, &standin).len(), 1);
}

#[test]
fn ros_types_map_like_r2r() {
    assert_eq!(rust_type("float32[]"), "Vec<f32>");
    assert_eq!(rust_type("uint8[16]"), "Vec<u8>");
    assert_eq!(rust_type("std_msgs/Header"), "Header");
    assert_eq!(rust_type("string[]"), "Vec<String>");
    assert_eq!(parse_fields("# c\nint32 A=3\nfloat64 x  # m\n"), vec![("x".to_string(), "f64".to_string())]);
}
