//! colcon (pip-installed in the project venv) finds both ROS packages with the right build types
//! and build order, and package.xml declares exactly the interface packages the ROS code uses.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn colcon(args: &[&str]) -> String {
    let out = Command::new(format!("{ROOT}/.venv/bin/colcon"))
        .args(args)
        .args(["--base-paths", ".", "msg"])
        .current_dir(ROOT)
        // No log folder in the source tree.
        .env("COLCON_LOG_PATH", "/dev/null")
        .output()
        .expect("colcon from the project venv (make venv)");
    assert!(out.status.success(), "colcon {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn colcon_finds_both_packages_with_their_build_types() {
    let list = colcon(&["list"]);
    let rows: BTreeSet<&str> = list.lines().collect();
    // colcon-ros-cargo reports `ros.ament_cargo`, or `ament_cargo` when cargo-ament-build is absent.
    assert!(
        rows.contains("vla_finetune\t.\t(ros.ament_cargo)") || rows.contains("vla_finetune\t.\t(ament_cargo)"),
        "{list}"
    );
    assert!(rows.contains("vla_finetune_msgs\tmsg\t(ros.ament_cmake)"), "{list}");
    let order = colcon(&["list", "--topological-order", "--names-only"]);
    assert_eq!(order.lines().collect::<Vec<_>>(), ["vla_finetune_msgs", "vla_finetune"], "build order");
}

/// `<depend>` entries of a package.xml.
fn declared_depends(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let re = regex::Regex::new(r"<depend>([a-z0-9_]+)</depend>").unwrap();
    re.captures_iter(&text).map(|c| c[1].to_string()).collect()
}

/// ROS interface packages the nodes use: typed (`r2r::<pkg>::`) in src/ros and src/bin, and by
/// type name (`"<pkg>/msg/<Type>"`, raw subscriptions and publishers) in src/ros and the
/// message codecs the nodes subscribe with (src/dataset/cdr.rs).
fn used_interface_packages() -> BTreeSet<String> {
    let re = regex::Regex::new(r#"r2r::([a-z0-9_]+_msgs|builtin_interfaces)::|"([a-z0-9_]+_msgs)/msg/"#).unwrap();
    let mut used = BTreeSet::new();
    let mut stack = vec![
        Path::new(ROOT).join("src/ros"),
        Path::new(ROOT).join("src/bin"),
        Path::new(ROOT).join("src/dataset/cdr.rs"),
    ];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            used.extend(re.captures_iter(&text).map(|c| c.get(1).or(c.get(2)).unwrap().as_str().to_string()));
        }
    }
    used
}

#[test]
fn package_xml_declares_the_interface_packages_the_code_uses() {
    let declared = declared_depends(&Path::new(ROOT).join("package.xml"));
    let used = used_interface_packages();
    assert!(used.contains("vla_finetune_msgs"), "ROS code uses our interfaces: {used:?}");
    let missing: Vec<_> = used.difference(&declared).collect();
    assert!(missing.is_empty(), "used in src/ros but not declared in package.xml: {missing:?}");
    let unused: Vec<_> = declared.difference(&used).collect();
    assert!(unused.is_empty(), "declared in package.xml but not used by the ROS code: {unused:?}");
}
