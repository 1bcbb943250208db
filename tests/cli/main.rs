//! The `vla_finetune` binary end to end: demo, experiment, bench, kill -9 and fault corpus; launch, colcon and ROS interface files.

mod bench_cli;
mod colcon_packages;
mod demo;
mod experiment;
mod gpu_session_script;
mod kill9;
mod launch_config;
mod reliability;
mod ros_interfaces;
