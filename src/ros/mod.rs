//! ROS 2 adapters (r2r): message <-> core type conversion and the nodes. No logic lives here.

pub mod collector;
pub mod convert;
pub mod interfaces;
pub mod params;
pub mod policy;
pub mod sim_robot;
pub mod trainer;

/// Spins the node on this thread until `stop` is set (r2r delivers messages, service calls and
/// timers to the async streams while spinning).
pub fn spin(node: &mut r2r::Node, stop: &std::sync::atomic::AtomicBool) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        node.spin_once(std::time::Duration::from_millis(5));
    }
}
