"""The launch files as the tests (and the ROS demo) run them: scripts/launch_xml.py reads the
installed launch files, so what the tests start is what `ros2 launch` starts; here its reading
is checked against the files' intent, and anything it cannot read is an error."""

import os

import pytest
from conftest import LIBEXEC, SHARE

import launch_xml

SHARES = {"vla_finetune": str(SHARE)}


def read(name, args=None, env=None):
    return launch_xml.nodes(SHARE / "launch" / name, args, SHARES, env if env is not None else {})


def test_collect_and_train_starts_the_simulated_robot_only_when_asked():
    assert [n.name for n in read("collect_and_train.launch.xml")] == ["vla_collector", "vla_trainer"]
    nodes = read("collect_and_train.launch.xml", {"use_sim": "true", "base_model": "/m", "dataset_root": "/d"})
    assert [(n.executable, n.name) for n in nodes] == [("sim_robot_node", "sim_robot"), ("collector_node", "vla_collector"), ("trainer_node", "vla_trainer")]
    collector = nodes[1]
    assert collector.param_files == [f"{SHARE}/config/collector_node.yaml"]
    assert dict(collector.params) == {"use_sim_time": "false", "dataset_root": "/d", "streams_config": f"{SHARE}/config/streams_sim.yaml"}
    assert dict(nodes[2].params) == {"use_sim_time": "false", "base_model": "/m"}
    simulated = read("collect_and_train.launch.xml", {"use_sim": "true", "use_sim_time": "true"})
    assert [dict(n.params)["use_sim_time"] for n in simulated] == ["true"] * 3
    for n in nodes:
        assert (LIBEXEC / n.executable).is_file(), n.executable
        assert all(os.path.isfile(f) for f in n.param_files), n.param_files
        assert n.env == {"FASTRTPS_DEFAULT_PROFILES_FILE": f"{SHARE}/config/fastdds.xml"}


def test_policy_launch_remaps_the_announcements_relatively_and_honours_a_user_profile():
    [policy] = read("policy.launch.xml", {"base_model": "/m", "streams_config": "/s.yaml"}, {"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"})
    assert (policy.executable, policy.name) == ("policy_node", "vla_policy")
    assert policy.remaps == [("~/checkpoint_in", "vla_trainer/checkpoint")]
    assert dict(policy.params) == {"use_sim_time": "false", "base_model": "/m", "checkpoint": "", "streams_config": "/s.yaml"}
    assert policy.env == {"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"}


def test_parameter_files_are_keyed_for_any_namespace():
    import yaml

    for f in ("collector_node", "trainer_node", "policy_node", "sim_robot_node"):
        doc = yaml.safe_load((SHARE / "config" / f"{f}.yaml").read_text())
        assert list(doc) == ["/**"], f


def test_unknown_arguments_and_unsupported_elements_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown launch arguments"):
        read("policy.launch.xml", {"base_modle": "/m"})
    bad = tmp_path / "bad.launch.xml"
    bad.write_text('<launch><include file="x.launch.xml"/></launch>')
    with pytest.raises(ValueError, match="include"):
        launch_xml.nodes(bad, {}, SHARES, {})
