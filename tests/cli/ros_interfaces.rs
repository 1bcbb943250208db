//! The interface files (msg/msg/*.msg, msg/srv/*.srv, msg/action/*.action) follow rosidl's naming rules and use no
//! field name that a generator emits verbatim into a language where it is a keyword (C, C++,
//! Python, Rust): `string operator` made the C++ type support fail to compile. That the nodes'
//! use of the generated types matches the files is checked by compiling them (`make ros`).

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

const C: &[&str] = &[
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum", "extern", "float",
    "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return", "short", "signed", "sizeof",
    "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "while", "bool", "true", "false",
];
const CPP: &[&str] = &[
    "alignas",
    "alignof",
    "and",
    "and_eq",
    "asm",
    "bitand",
    "bitor",
    "catch",
    "char8_t",
    "char16_t",
    "char32_t",
    "class",
    "compl",
    "concept",
    "consteval",
    "constexpr",
    "constinit",
    "const_cast",
    "co_await",
    "co_return",
    "co_yield",
    "decltype",
    "delete",
    "dynamic_cast",
    "explicit",
    "export",
    "friend",
    "mutable",
    "namespace",
    "new",
    "noexcept",
    "not",
    "not_eq",
    "nullptr",
    "operator",
    "or",
    "or_eq",
    "private",
    "protected",
    "public",
    "reinterpret_cast",
    "requires",
    "static_assert",
    "static_cast",
    "template",
    "this",
    "thread_local",
    "throw",
    "try",
    "typeid",
    "typename",
    "using",
    "virtual",
    "wchar_t",
    "xor",
    "xor_eq",
];
const PYTHON: &[&str] = &[
    "and", "as", "assert", "async", "await", "class", "def", "del", "elif", "except", "finally", "from", "global",
    "import", "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "try", "with", "yield", "none",
];
const RUST: &[&str] = &[
    "abstract", "become", "box", "crate", "dyn", "final", "fn", "impl", "let", "loop", "macro", "match", "mod", "move",
    "mut", "override", "priv", "pub", "ref", "self", "super", "trait", "type", "typeof", "unsafe", "unsized", "use",
    "where", "yield", "gen",
];

/// Field names of one section of an interface file (constants included: they are members too).
fn field_names(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let decl = l.split('=').next().unwrap();
            let mut it = decl.split_whitespace();
            it.next();
            it.next().unwrap_or_else(|| panic!("field without a name: `{l}`")).to_string()
        })
        .collect()
}

/// What is wrong with a field name, if anything: rosidl wants lowercase alphanumerics with
/// single underscores between them, starting with a letter; constants are upper case.
fn name_problem(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    for (lang, words) in [("C", C), ("C++", CPP), ("Python", PYTHON), ("Rust", RUST)] {
        if words.contains(&lower.as_str()) {
            return Some(format!("`{name}` is a {lang} keyword"));
        }
    }
    let is_constant = name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    let body_ok = |c: char| {
        if is_constant {
            c.is_ascii_uppercase() || c.is_ascii_digit()
        } else {
            c.is_ascii_lowercase() || c.is_ascii_digit()
        }
    };
    let ok = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.ends_with('_')
        && !name.contains("__")
        && name.chars().all(|c| c == '_' || body_ok(c));
    (!ok).then(|| format!("`{name}` breaks rosidl's naming rule ([a-z][a-z0-9]*(_[a-z0-9]+)*)"))
}

/// (interface, field, problem) for every bad name in the interface files under `root`.
fn problems(root: &Path) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for dir in ["msg/msg", "msg/srv", "msg/action"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            if !name.starts_with(|c: char| c.is_ascii_uppercase()) || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                out.push((name.clone(), String::new(), "interface names are CamelCase".into()));
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for section in text.split("\n---") {
                for field in field_names(section) {
                    if let Some(p) = name_problem(&field) {
                        out.push((name.clone(), field, p));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn interface_field_names_are_valid_in_every_generated_language() {
    let bad = problems(Path::new(ROOT));
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn the_check_catches_keywords_and_naming_rule_breaks() {
    for (name, lang) in
        [("operator", "C++"), ("type", "Rust"), ("lambda", "Python"), ("register", "C"), ("None", "Python")]
    {
        assert!(name_problem(name).is_some_and(|p| p.contains(lang)), "{name}: {:?}", name_problem(name));
    }
    for bad in ["Camel", "two__underscores", "trailing_", "9lives", "dash-ed"] {
        assert!(name_problem(bad).is_some_and(|p| p.contains("naming rule")), "{bad}");
    }
    for good in ["operator_name", "val_action_error", "peak_accel_bytes", "MAX_STEPS", "x2"] {
        assert_eq!(name_problem(good), None, "{good}");
    }
    let dir = tempfile::tempdir().unwrap();
    for sub in ["msg/msg", "msg/srv", "msg/action"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::write(
        dir.path().join("msg/srv/StartEpisode.srv"),
        "string instruction\nstring operator\n---\nbool started\n",
    )
    .unwrap();
    let found = problems(dir.path());
    assert_eq!(found, vec![("StartEpisode".into(), "operator".into(), "`operator` is a C++ keyword".into())]);
}
