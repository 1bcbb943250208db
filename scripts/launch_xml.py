"""The nodes a ROS 2 launch XML file starts, as the command lines `ros2 launch` runs.

No launch/ros2cli wheel exists, so the ROS tests and the ROS demo start the package's nodes
through this interpreter of the launch files themselves (one source of truth): the subset of
launch XML the package uses (`arg`, `set_env`, `node` with `if`/`unless`, `param from`/`name`,
`remap`; substitutions `$(var)`, `$(env NAME [default])`, `$(find-pkg-share)`). Anything else is
an error, so a launch file using more cannot silently diverge from what the tests run.
"""

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import yaml

SUBST = re.compile(r"\$\(([a-z-]+)((?:\s+[^()\s]+)*)\s*\)")


@dataclass
class NodeSpec:
    """One `<node>`: executable, ROS name, parameter files, inline parameters, remaps."""

    package: str
    executable: str
    name: str
    param_files: list = field(default_factory=list)
    params: list = field(default_factory=list)
    remaps: list = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def ros_args(self, tmp_dir, extra_params=None):
        """`--ros-args ...` as launch_ros passes them: parameter files, then the inline
        parameters written to a parameter file of their own (values typed as YAML, as launch
        does), then `extra_params` (a dict; the caller's own, last so they win), then remaps."""
        argv = ["--ros-args", "-r", f"__node:={self.name}"]
        for f in self.param_files:
            argv += ["--params-file", f]
        for i, values in enumerate([dict(self.params), dict(extra_params or {})]):
            if values:
                typed = {k: (yaml.safe_load(v) if isinstance(v, str) and v != "" else v) for k, v in values.items()}
                f = os.path.join(tmp_dir, f"{self.name}_params_{i}.yaml")
                with open(f, "w") as out:
                    yaml.safe_dump({"/**": {"ros__parameters": typed}}, out)
                argv += ["--params-file", f]
        for a, b in self.remaps:
            argv += ["-r", f"{a}:={b}"]
        return argv


def _substitute(text, args, share_dirs, env):
    def one(m):
        kind, rest = m.group(1), m.group(2).split()
        if kind == "var":
            return args[rest[0]]
        if kind == "env":
            return env.get(rest[0], " ".join(rest[1:]) if len(rest) > 1 else "")
        if kind == "find-pkg-share":
            return share_dirs[rest[0]]
        raise ValueError(f"unsupported substitution $({kind})")

    # Innermost first: $(env X $(var y)) resolves $(var y) before $(env ...).
    for _ in range(8):
        new = SUBST.sub(one, text)
        if new == text:
            return new
        text = new
    raise ValueError(f"substitutions do not terminate: {text}")


def _truthy(value):
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise ValueError(f"`{value}` is not a launch boolean")


def nodes(path, launch_args=None, share_dirs=None, env=None):
    """The nodes `ros2 launch <path> k:=v ...` starts, with the environment it sets."""
    env = dict(os.environ if env is None else env)
    given = dict(launch_args or {})
    share_dirs = dict(share_dirs or {})
    args, set_env, out = {}, {}, []
    root = ET.parse(path).getroot()
    if root.tag != "launch":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <launch>")
    unknown = set(given) - {a.get("name") for a in root.iter("arg")}
    if unknown:
        raise ValueError(f"{path}: unknown launch arguments {sorted(unknown)}")
    sub = lambda t: _substitute(t, args, share_dirs, {**env, **set_env})  # noqa: E731
    for el in root:
        if el.tag == "arg":
            name = el.get("name")
            if name in given:
                args[name] = given[name]
            elif el.get("default") is not None:
                args[name] = sub(el.get("default"))
            else:
                raise ValueError(f"{path}: launch argument `{name}` is required")
        elif el.tag == "set_env":
            set_env[el.get("name")] = sub(el.get("value"))
        elif el.tag == "node":
            if el.get("if") is not None and not _truthy(sub(el.get("if"))):
                continue
            if el.get("unless") is not None and _truthy(sub(el.get("unless"))):
                continue
            spec = NodeSpec(el.get("pkg"), el.get("exec"), el.get("name") or el.get("exec"), env=dict(set_env))
            for child in el:
                if child.tag == "param" and child.get("from") is not None:
                    spec.param_files.append(sub(child.get("from")))
                elif child.tag == "param":
                    spec.params.append((child.get("name"), sub(child.get("value", ""))))
                elif child.tag == "remap":
                    spec.remaps.append((child.get("from"), child.get("to")))
                else:
                    raise ValueError(f"{path}: <{child.tag}> inside <node> is not supported here")
            out.append(spec)
        else:
            raise ValueError(f"{path}: <{el.tag}> is not supported here")
    return out
