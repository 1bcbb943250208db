//! The node clock: ROS time from the node (`/clock` when `use_sim_time` is true, system time
//! otherwise), for every stamp a node writes and, through [`RuntimeRosClock`], for the policy
//! runtime's schedule and input staleness.

use crate::runtime::Clock;
use r2r::builtin_interfaces::msg::Time;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The node's ROS clock (r2r attaches it to the node's time source, which follows `/clock`
/// once the parameter handler sees `use_sim_time: true`).
#[derive(Clone)]
pub struct NodeClock(Arc<Mutex<r2r::Clock>>);

impl NodeClock {
    /// The clock of `node`.
    pub fn of(node: &r2r::Node) -> Self {
        Self(node.get_ros_clock())
    }

    /// Nanoseconds since the ROS epoch (0 under simulated time until `/clock` has spoken).
    pub fn now_ns(&self) -> i64 {
        let mut clock = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // rcl fails only on an uninitialised clock, which a node's clock never is.
        clock.get_now().map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    /// The current ROS time as a message stamp.
    pub fn now(&self) -> Time {
        super::convert::time_from_ns(self.now_ns())
    }
}

/// The policy runtime's [`Clock`] over the node clock. Never goes backwards (a simulation reset
/// holds it until simulated time passes the last reading), and waits in short wall-clock naps,
/// so a paused `/clock` pauses the control loop without blocking its shutdown.
pub struct RuntimeRosClock {
    clock: NodeClock,
    newest_ns: AtomicI64,
}

/// Longest wall-clock nap of [`RuntimeRosClock::sleep_until`] before it returns to its caller.
const MAX_NAP: Duration = Duration::from_millis(20);

impl RuntimeRosClock {
    /// The runtime clock over `clock`.
    pub fn new(clock: NodeClock) -> Self {
        Self { clock, newest_ns: AtomicI64::new(0) }
    }
}

impl Clock for RuntimeRosClock {
    fn now(&self) -> Duration {
        let now = self.clock.now_ns().max(0);
        let newest = self.newest_ns.fetch_max(now, Ordering::Relaxed).max(now);
        Duration::from_nanos(newest as u64)
    }

    /// Returns once `t` is reached or after at most [`MAX_NAP`] of wall time, whichever is first
    /// (callers check the time again: under simulated time the wait may be arbitrarily long).
    fn sleep_until(&self, t: Duration) {
        let now = self.now();
        if t > now {
            std::thread::sleep((t - now).min(MAX_NAP));
        }
    }
}
