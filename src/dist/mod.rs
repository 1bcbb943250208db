//! Data-parallel training over torch.distributed's c10d process groups (the TCPStore rendezvous
//! and the Gloo backend inside libtorch, reached through csrc/dist_shim.cpp), launched by the
//! standard `torchrun --no-python` ([`LaunchEnv`]). The training loop uses a [`Group`] to
//! all-reduce gradients and to agree on decisions; without the torchrun variables there is none
//! and nothing changes.

mod env;
mod group;

pub use env::LaunchEnv;
pub use group::{Group, ReduceOp};

/// Joins the `backend` group of this process's torchrun launch (None without one), with
/// collectives failing after `timeout`.
pub fn join_launch(
    backend: &str,
    timeout: std::time::Duration,
) -> Result<Option<(LaunchEnv, std::sync::Arc<Group>)>, DistError> {
    let Some(env) = LaunchEnv::from_env()? else { return Ok(None) };
    let group = Group::join(&env, backend, timeout)?;
    tracing::info!(rank = env.rank, world = env.world_size, "joined the {backend} process group");
    Ok(Some((env, std::sync::Arc::new(group))))
}

/// Errors of joining a group and of its collectives.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun variable is missing or malformed.
    #[error("torchrun environment: {var} {reason}")]
    Env { var: &'static str, reason: String },
    /// The process group could not be formed.
    #[error("joining the {backend} process group as rank {rank} of {world} at {addr}:{port} failed: {reason}")]
    Join { backend: String, rank: usize, world: usize, addr: String, port: u16, reason: String },
    /// A collective failed (a peer died, the timeout passed, the store went away).
    #[error("{op} on rank {rank} failed: {reason}")]
    Collective { op: &'static str, rank: usize, reason: String },
}
