//! The launch environment torchrun gives each worker (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT; TORCHELASTIC_USE_AGENT_STORE when its agent hosts the rendezvous store).

use super::DistError;

/// One worker's place in a torchrun launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank on this machine (its CUDA device).
    pub local_rank: usize,
    /// Rendezvous store host.
    pub master_addr: String,
    /// Rendezvous store port.
    pub master_port: u16,
    /// `Some(restart count)` when torchrun's agent hosts the store (every worker is a client and
    /// keys live under `/worker/attempt_<n>/`, as torch's env:// rendezvous does); `None` when
    /// rank 0 hosts it.
    pub agent_store: Option<u64>,
}

impl LaunchEnv {
    /// The launch from this process's environment; `None` without WORLD_SIZE or with a world
    /// of one (a plain single-process run).
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`LaunchEnv::from_env`] over any variable source.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let Some(world) = get("WORLD_SIZE") else { return Ok(None) };
        let world_size = parse("WORLD_SIZE", &world)?;
        if world_size <= 1 {
            return Ok(None);
        }
        let need = |var: &'static str| {
            get(var).ok_or(DistError::Env {
                var,
                reason: "is not set (expected by a torchrun launch with WORLD_SIZE > 1)".into(),
            })
        };
        let rank = parse("RANK", &need("RANK")?)?;
        if rank >= world_size {
            return Err(DistError::Env {
                var: "RANK",
                reason: format!("is {rank}, expected below WORLD_SIZE {world_size}"),
            });
        }
        let local_rank = parse("LOCAL_RANK", &get("LOCAL_RANK").unwrap_or_else(|| "0".into()))?;
        let master_addr = need("MASTER_ADDR")?;
        let port: usize = parse("MASTER_PORT", &need("MASTER_PORT")?)?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or(DistError::Env { var: "MASTER_PORT", reason: format!("is {port}, expected 1..65535") })?;
        let agent = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let agent_store = if agent {
            Some(parse("TORCHELASTIC_RESTART_COUNT", &get("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into()))?
                as u64)
        } else {
            None
        };
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port, agent_store }))
    }

    /// Whether the store host is this machine's loopback (then Gloo binds to 127.0.0.1 too, so
    /// no traffic leaves the machine).
    pub fn is_loopback(&self) -> bool {
        let a = self.master_addr.as_str();
        a == "localhost" || a == "::1" || a.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    }
}

fn parse(var: &'static str, value: &str) -> Result<usize, DistError> {
    value
        .trim()
        .parse()
        .map_err(|_| DistError::Env { var, reason: format!("is `{value}`, expected a non-negative integer") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>, DistError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LaunchEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_make_a_launch_and_their_absence_none() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let l = env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank, l.master_port, l.agent_store), (1, 2, 1, 29500, None));
        assert!(l.is_loopback());
        let a = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "0"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.agent_store, Some(2));
        assert!(!a.is_loopback());
    }

    #[test]
    fn a_bad_launch_names_the_variable() {
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT"), "{e}");
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.to_string().contains("RANK is 2"), "{e}");
        let e = env(&[("WORLD_SIZE", "two")]).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE is `two`"), "{e}");
    }
}
