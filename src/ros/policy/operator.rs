//! The policy node's operator side: `~/enable` and `~/rollback`, served from the start through a
//! gate that keeps an enable asked for before the first checkpoint, and the run-time parameter
//! changes (`instruction`, `pinned_version`).

use crate::runtime::{InputBuffers, Operator, OperatorCommand, OperatorReply};
use anyhow::Result;
use futures::StreamExt;
use r2r::std_srvs::srv::{SetBool, Trigger};
use r2r::{ParameterValue, QosProfile};
use std::sync::Arc;

/// `success` and `message` of a service answering an operator command.
fn answer(reply: Result<OperatorReply, tokio::sync::oneshot::error::RecvError>) -> (bool, String) {
    match reply {
        Ok(Ok(message)) => (true, message),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, "the control loop has stopped".into()),
    }
}

/// Where the operator services send their commands: nowhere before the runtime has started
/// (no checkpoint yet; an enable is kept for the start), then its operator.
pub enum Gate {
    /// No runtime yet; the last enable / disable asked for.
    Waiting {
        /// `Some(on)` once `~/enable` was called.
        enable: Option<bool>,
    },
    /// The runtime's operator.
    Running(Operator),
}

/// The gate shared by the service tasks.
pub type SharedGate = Arc<tokio::sync::Mutex<Gate>>;

/// A closed gate: no runtime yet, no enable asked for.
pub fn waiting_gate() -> SharedGate {
    Arc::new(tokio::sync::Mutex::new(Gate::Waiting { enable: None }))
}

/// The answer to `cmd`: from the runtime once started, from the gate before.
async fn command(gate: &SharedGate, cmd: OperatorCommand) -> (bool, String) {
    let mut g = gate.lock().await;
    match &mut *g {
        Gate::Running(op) => {
            let op = op.clone();
            drop(g);
            answer(op.send(cmd).await)
        }
        Gate::Waiting { enable } => match cmd {
            OperatorCommand::Enable(on) => {
                *enable = Some(on);
                let message = if on {
                    "enabled: publishing actions once a checkpoint is loaded"
                } else {
                    "disabled: no checkpoint is loaded yet"
                };
                (true, message.into())
            }
            _ => (false, "no checkpoint is loaded yet: nothing to roll back to".into()),
        },
    }
}

/// Hands the gate to the started runtime, applying an enable asked for while waiting.
pub async fn open_gate(gate: &SharedGate, operator: Operator) {
    let mut g = gate.lock().await;
    if let Gate::Waiting { enable: Some(on) } = *g {
        let (ok, message) = answer(operator.send(OperatorCommand::Enable(on)).await);
        if ok {
            tracing::info!("{message} (asked for before the first checkpoint)");
        } else {
            tracing::error!("the enable asked for before the first checkpoint failed: {message}");
        }
    }
    *g = Gate::Running(operator);
}

/// `~/enable` (SetBool: true enables publishing, false disables it) and `~/rollback` (Trigger).
pub fn serve_operator(node: &mut r2r::Node, rt: &tokio::runtime::Runtime, gate: &SharedGate) -> Result<()> {
    let mut enable = node.create_service::<SetBool::Service>("~/enable", QosProfile::services_default())?;
    let g = gate.clone();
    rt.spawn(async move {
        while let Some(req) = enable.next().await {
            let (success, message) = command(&g, OperatorCommand::Enable(req.message.data)).await;
            if let Err(e) = req.respond(SetBool::Response { success, message }) {
                tracing::error!("enable: could not respond: {e}");
            }
        }
    });
    let mut rollback = node.create_service::<Trigger::Service>("~/rollback", QosProfile::services_default())?;
    let g = gate.clone();
    rt.spawn(async move {
        while let Some(req) = rollback.next().await {
            let (success, message) = command(&g, OperatorCommand::RollBack).await;
            if let Err(e) = req.respond(Trigger::Response { success, message }) {
                tracing::error!("rollback: could not respond: {e}");
            }
        }
    });
    Ok(())
}

/// Applies run-time parameter changes: `instruction` from the next VL refresh on,
/// `pinned_version` as a pin (empty: unpin). Others take effect at the next start.
pub async fn apply_parameter_changes(
    mut changes: tokio::sync::mpsc::UnboundedReceiver<(String, ParameterValue)>,
    inputs: Arc<InputBuffers>,
    operator: Operator,
) {
    while let Some((name, value)) = changes.recv().await {
        match (name.as_str(), value) {
            ("instruction", ParameterValue::String(s)) => {
                tracing::info!("instruction: {s}");
                inputs.set_instruction(s);
            }
            ("pinned_version", ParameterValue::String(v)) => {
                let (ok, message) = answer(operator.send(OperatorCommand::Pin((!v.is_empty()).then_some(v))).await);
                if ok {
                    tracing::info!("{message}");
                } else {
                    tracing::error!("{message} (the status's pinned_version is what holds)");
                }
            }
            ("instruction" | "pinned_version", other) => {
                tracing::error!("parameter {name}: expected a string, got {other:?}; ignored")
            }
            _ => tracing::warn!("parameter {name} takes effect at the next start of the node"),
        }
    }
}
