//! Operator controls of a running policy, applied by the control loop between ticks: the safety
//! gate (no action is published until enabled; disabling stops publishing at once) and the
//! version pin (a pinned version stays active: versions announced meanwhile are prepared and
//! wait, the newest is activated on unpin). Rolling back makes the previous version active and
//! pins it.

use std::sync::mpsc;

use tokio::sync::oneshot;

use super::error::RuntimeError;

/// A request to the control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorCommand {
    /// Publish actions (true) or publish none (false).
    Enable(bool),
    /// Keep this loaded version (the active or the previous one) active; `None` follows
    /// announcements again.
    Pin(Option<String>),
    /// Make the previous version active again, and pin it.
    RollBack,
}

impl std::fmt::Display for OperatorCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Enable(true) => write!(f, "enable"),
            Self::Enable(false) => write!(f, "disable"),
            Self::Pin(Some(v)) => write!(f, "pin {v}"),
            Self::Pin(None) => write!(f, "unpin"),
            Self::RollBack => write!(f, "roll back"),
        }
    }
}

/// The loop's answer: what it did (the status message), or why it refused.
pub type OperatorReply = Result<String, RuntimeError>;

pub(crate) struct OperatorRequest {
    pub command: OperatorCommand,
    pub reply: oneshot::Sender<OperatorReply>,
}

/// Sends operator commands to the control loop (clone it for each source).
#[derive(Clone)]
pub struct Operator {
    tx: mpsc::Sender<OperatorRequest>,
}

impl Operator {
    pub(crate) fn channel() -> (Self, mpsc::Receiver<OperatorRequest>) {
        let (tx, rx) = mpsc::channel();
        (Self { tx }, rx)
    }

    /// Queues `command`; the loop answers on the returned channel before its next tick.
    pub fn send(&self, command: OperatorCommand) -> oneshot::Receiver<OperatorReply> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::SendError(req)) = self.tx.send(OperatorRequest { command, reply }) {
            let _ = req.reply.send(Err(RuntimeError::Operator {
                command: req.command.to_string(),
                reason: "the control loop has stopped".into(),
            }));
        }
        answer
    }
}
