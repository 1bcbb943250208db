//! The first step of an action chunk as a robot command, for nodes that drive a robot directly
//! (`target_output` twist or pose). Action steps are `[dx dy dz (mm), droll dpitch dyaw (deg), ...]`
//! tool motions over one step period (the dataset's action layout).

use super::types::ActionChunk;

/// Which command a node derives from a chunk's first step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetOutput {
    /// No command.
    None,
    /// Velocities (m/s, rad/s) that perform the first step over one step period.
    Twist,
    /// The first step as a relative pose (m, quaternion) in the tool frame.
    Pose,
}

impl std::str::FromStr for TargetOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "twist" => Ok(Self::Twist),
            "pose" => Ok(Self::Pose),
            other => Err(format!("target output `{other}`: expected none, twist or pose")),
        }
    }
}

/// Linear (m/s) and angular (rad/s, roll/pitch/yaw rates) velocity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Twist {
    /// m/s.
    pub linear: [f64; 3],
    /// rad/s.
    pub angular: [f64; 3],
}

/// A relative pose: translation (m) and rotation quaternion `[x y z w]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoseDelta {
    /// m.
    pub position: [f64; 3],
    /// `[x y z w]`.
    pub orientation: [f64; 4],
}

fn first_step(chunk: &ActionChunk) -> Result<[f64; 6], String> {
    if chunk.action_dim < 6 || chunk.values.len() < 6 {
        return Err(format!(
            "chunk of {} has action_dim {}; a robot command needs 6 (dx dy dz mm, droll dpitch dyaw deg)",
            chunk.version, chunk.action_dim
        ));
    }
    let mut s = [0.0; 6];
    for (d, v) in s.iter_mut().zip(&chunk.values) {
        *d = f64::from(*v);
    }
    Ok(s)
}

/// The velocity that performs the first step in one step period.
pub fn twist(chunk: &ActionChunk) -> Result<Twist, String> {
    let s = first_step(chunk)?;
    let dt = f64::from(chunk.step_period_s);
    if !(dt > 0.0 && dt.is_finite()) {
        return Err(format!("chunk of {} has step period {dt} s; expected a positive number", chunk.version));
    }
    Ok(Twist {
        linear: [s[0] / 1e3 / dt, s[1] / 1e3 / dt, s[2] / 1e3 / dt],
        angular: [s[3].to_radians() / dt, s[4].to_radians() / dt, s[5].to_radians() / dt],
    })
}

/// The first step as a relative pose (rotation from roll, pitch, yaw applied as Rz Ry Rx).
pub fn pose_delta(chunk: &ActionChunk) -> Result<PoseDelta, String> {
    let s = first_step(chunk)?;
    let (r, p, y) = (s[3].to_radians() / 2.0, s[4].to_radians() / 2.0, s[5].to_radians() / 2.0);
    let (cr, sr, cp, sp, cy, sy) = (r.cos(), r.sin(), p.cos(), p.sin(), y.cos(), y.sin());
    Ok(PoseDelta {
        position: [s[0] / 1e3, s[1] / 1e3, s[2] / 1e3],
        orientation: [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy,
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(step: [f32; 7]) -> ActionChunk {
        ActionChunk { version: "v1".into(), horizon: 1, action_dim: 7, step_period_s: 0.1, values: step.to_vec() }
    }

    #[test]
    fn twist_and_pose_of_the_first_step() {
        let t = twist(&chunk([2.0, -1.0, 0.5, 0.0, 0.0, 9.0, 1.0])).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6; // step_period_s is f32
        assert!(close(t.linear[0], 0.02) && close(t.linear[1], -0.01) && close(t.linear[2], 0.005), "{t:?}");
        assert!(close(t.angular[2], 9f64.to_radians() / 0.1) && t.angular[0] == 0.0, "{t:?}");
        // 90 degrees of yaw: quaternion (0, 0, sin 45, cos 45).
        let p = pose_delta(&chunk([1.0, 0.0, 0.0, 0.0, 0.0, 90.0, 0.0])).unwrap();
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!(
            close(p.position[0], 1e-3)
                && close(p.orientation[2], h)
                && close(p.orientation[3], h)
                && close(p.orientation[0], 0.0),
            "{p:?}"
        );
        // 90 degrees of roll: (sin 45, 0, 0, cos 45).
        let p = pose_delta(&chunk([0.0, 0.0, 0.0, 90.0, 0.0, 0.0, 0.0])).unwrap();
        assert!(close(p.orientation[0], h) && close(p.orientation[3], h), "{p:?}");
        let short = ActionChunk { action_dim: 3, values: vec![0.0; 3], ..chunk([0.0; 7]) };
        assert!(twist(&short).unwrap_err().contains("needs 6"));
        assert_eq!("pose".parse::<TargetOutput>(), Ok(TargetOutput::Pose));
        assert!("odom".parse::<TargetOutput>().unwrap_err().contains("expected none, twist or pose"));
    }
}
