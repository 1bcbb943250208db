//! Fault injection for the training loop's out-of-memory recovery: a real libtorch allocation
//! failure (an impossible host allocation, which libtorch's CPU allocator refuses with "can't
//! allocate memory") raised the n-th time a point is reached inside a training pass (the loop's
//! micro-batch forward and backward, run by [`in_pass`]) on the thread that armed it. At
//! [`Point::Forward`] and [`Point::Recompute`] it comes as tch's infallible ops deliver a
//! libtorch error there, a panic; at [`Point::Backward`] as an `Err`, as `f_backward` returns
//! one. Nothing fires unless a test arms it with [`inject`].

use std::cell::Cell;

use tch::{Device, Kind, TchError, Tensor};

/// Where in a training pass the failure is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A decoder layer (or checkpoint segment) of the forward pass.
    Forward,
    /// A checkpoint segment recomputed in the backward pass.
    Recompute,
    /// The loss's backward.
    Backward,
}

thread_local! {
    static ARMED: Cell<Option<(Point, u64)>> = const { Cell::new(None) };
    static IN_PASS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` as a training pass: the points it reaches count (also when it unwinds).
pub fn in_pass<T>(f: impl FnOnce() -> T) -> T {
    struct Leave(bool);
    impl Drop for Leave {
        fn drop(&mut self) {
            IN_PASS.with(|p| p.set(self.0));
        }
    }
    let _leave = Leave(IN_PASS.with(|p| p.replace(true)));
    f()
}

/// Whether this thread is inside [`in_pass`].
pub fn is_in_pass() -> bool {
    IN_PASS.with(Cell::get)
}

/// An armed injection; dropping it disarms the thread.
#[must_use = "the injection is disarmed when this is dropped"]
pub struct Injection(());

impl Drop for Injection {
    fn drop(&mut self) {
        ARMED.with(|a| a.set(None));
    }
}

/// Arms this thread: the `nth` (1-based) time `point` is reached in a pass, it fails once.
pub fn inject(point: Point, nth: u64) -> Injection {
    ARMED.with(|a| a.set(Some((point, nth.max(1)))));
    Injection(())
}

/// Called at a forward or recompute point: panics there, as tch's infallible ops do on a
/// libtorch error, when an injection armed for it is due.
pub fn reach(point: Point) {
    if due(point) {
        let _ = Tensor::empty(IMPOSSIBLE, (Kind::Uint8, Device::Cpu));
    }
}

/// Called before the loss's backward: the allocation error, as `f_backward` would return it,
/// when an injection armed for [`Point::Backward`] is due.
pub fn reach_backward() -> Result<(), TchError> {
    if due(Point::Backward) {
        return Tensor::f_empty(IMPOSSIBLE, (Kind::Uint8, Device::Cpu)).map(drop);
    }
    Ok(())
}

/// 2^60 bytes: beyond any address space, refused at once.
const IMPOSSIBLE: [i64; 1] = [1 << 60];

/// Counts `point` (inside a pass) against the armed injection; true when this is its n-th time (it then disarms).
fn due(point: Point) -> bool {
    if !is_in_pass() {
        return false;
    }
    ARMED.with(|a| match a.get() {
        Some((p, n)) if p == point => {
            a.set(if n > 1 { Some((p, n - 1)) } else { None });
            n == 1
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_at_the_nth_time_and_only_at_its_point() {
        let _armed = inject(Point::Backward, 2);
        assert!(reach_backward().is_ok(), "outside a pass nothing counts");
        in_pass(|| {
            reach(Point::Forward);
            assert!(reach_backward().is_ok());
            let e = reach_backward().unwrap_err().to_string();
            assert!(e.contains("can't allocate memory"), "{e}");
            assert!(reach_backward().is_ok());
        });
        let _armed = inject(Point::Recompute, 1);
        let panic = std::panic::catch_unwind(|| in_pass(|| reach(Point::Recompute))).unwrap_err();
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("can't allocate memory"), "{text}");
    }
}
