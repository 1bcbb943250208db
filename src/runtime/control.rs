//! The control loop: one tick per period on a dedicated thread. Each tick activates a prepared
//! checkpoint if one is waiting (the swap happens between two ticks), takes an observation of the
//! latest inputs (or applies the stale-input behaviour), asks the background refresh for new VL
//! features every N ticks, runs the active model's per-tick step on the newest features it has,
//! checks the chunk (size, finiteness) and publishes it.
//!
//! Roll-back: whenever the active model fails or produces a non-finite or mis-sized chunk, the
//! previous version becomes active again within the same tick and acts on its own features; the
//! failed version is dropped. Without a previous version, nothing is published for that tick.
//!
//! Operator commands ([`super::operator`]) are applied between ticks: nothing is published while
//! the loop is disabled, and a pinned version stays active (see the module for the rules).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc::UnboundedSender, watch};

use super::clock::Clock;
use super::error::RuntimeError;
use super::hotswap::{Prepared, SwapOutcome};
use super::inputs::{InputBuffers, Snapshot, StaleInput};
use super::model::ActionModel;
use super::operator::{OperatorCommand, OperatorReply, OperatorRequest};
use super::refresh::Refresher;
use super::schedule::{TickScheduler, TickSlot};
use super::types::{ActionChunk, CheckpointMeta, IoSpec, Observation, VlFeatures};

/// The status message while the operator's gate is closed.
const DISABLED: &str = "disabled: publishing no action until enabled";

/// What to do while an input is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleBehavior {
    /// Publish nothing.
    Nothing,
    /// Re-publish the last action chunk, marked `held`.
    Hold,
}

impl std::str::FromStr for StaleBehavior {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::Nothing),
            "hold" => Ok(Self::Hold),
            other => Err(format!("stale behaviour `{other}`: expected `none` or `hold`")),
        }
    }
}

/// Timing and behaviour of the control loop.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// Tick period (1 / control rate).
    pub period: Duration,
    /// An action not ready this long after its tick's scheduled start is a missed tick
    /// (usually equal to `period`).
    pub tick_budget: Duration,
    /// Recompute VL features every N ticks (at least 1).
    pub vl_refresh_ticks: u32,
    /// Behaviour on stale input.
    pub stale_behavior: StaleBehavior,
    /// Publish actions from the start; false: none until an operator enables them.
    pub start_enabled: bool,
}

/// One published action chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionEvent {
    /// The chunk.
    pub chunk: ActionChunk,
    /// Tick index.
    pub tick: u64,
    /// True when this re-publishes the last chunk because an input is stale.
    pub held: bool,
    /// Runtime clock time the observation was taken (for held chunks: of the original).
    pub obs_taken_at: Duration,
    /// `taken_at` of the observation the VL features used by this chunk were computed from
    /// (VL features refresh every N ticks in the background, so they are older than `obs_taken_at`).
    pub vl_obs_taken_at: Duration,
    /// Runtime clock time of publication.
    pub published_at: Duration,
}

/// Something that happened in the runtime. [`PolicyStatus`] holds only the latest state; these
/// are for logs and reports (the receiver must be drained: the channel is unbounded).
#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeNotice {
    /// A checkpoint became active (between two ticks) at runtime clock time `at`.
    Activated {
        /// Its version.
        version: String,
        /// Whether it was validated on live input before activation.
        validated: bool,
        /// Runtime clock time of its announcement.
        announced_at: Duration,
        /// Runtime clock time of activation.
        at: Duration,
    },
    /// The first action of a newly activated version was published.
    FirstAction {
        /// Its version.
        version: String,
        /// From the announcement to the publication.
        latency: Duration,
    },
    /// A checkpoint was refused before activation; the running version was not touched.
    Rejected {
        /// The refused version.
        version: String,
        /// Why.
        reason: String,
    },
    /// The active version failed and was dropped.
    RolledBack {
        /// The failed version.
        from: String,
        /// The version acting now (`None`: none left).
        to: Option<String>,
        /// Why.
        reason: String,
    },
    /// The set of stale inputs changed to these (non-empty) names.
    Stale {
        /// Stale input names.
        inputs: Vec<String>,
    },
    /// Every input is fresh again.
    Fresh,
    /// VL features were refreshed in the background.
    VlRefreshed {
        /// Version whose encoder ran.
        version: String,
        /// `taken_at` of the observation it encoded.
        obs_taken_at: Duration,
        /// Time the encoder took.
        took: Duration,
    },
}

/// The policy's state, published after every tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyStatus {
    /// Whether actions are published (the operator's safety gate).
    pub enabled: bool,
    /// The version an operator pinned (empty: following announcements).
    pub pinned_version: String,
    /// Version acting now; empty before the first load.
    pub active_version: String,
    /// Version kept for roll-back; empty when none.
    pub previous_version: String,
    /// Whether the last tick published a fresh (not held) action.
    pub acting: bool,
    /// Names of inputs that are stale now.
    pub stale_inputs: Vec<String>,
    /// Control ticks so far (including skipped ones).
    pub ticks: u64,
    /// Ticks whose action was not ready by the deadline, or that were skipped.
    pub missed_ticks: u64,
    /// Duration of the last tick's work, ms.
    pub last_tick_ms: f64,
    /// Last swap, rejection, roll-back or reason for not acting, human-readable.
    pub message: String,
    /// Announcement to first published action of the last activated version, ms.
    pub hotswap_latency_ms: Option<f64>,
    /// Checkpoints activated.
    pub swaps: u64,
    /// Checkpoints rejected before activation.
    pub rejected: u64,
    /// Roll-backs to the previous version.
    pub rollbacks: u64,
    /// VL feature refreshes received.
    pub vl_refreshes: u64,
    /// Duration of the last VL refresh, ms.
    pub last_vl_refresh_ms: Option<f64>,
}

struct Slot {
    meta: CheckpointMeta,
    model: Box<dyn ActionModel>,
    features: Option<VlFeatures>,
    /// Set until the first action of this version is published.
    announced_at: Option<Duration>,
}

/// Drops a model off the control thread (freeing a large model can take a while).
fn retire(slot: Slot) {
    if let Err(e) = std::thread::Builder::new().name("vla-retire".into()).spawn(move || drop(slot)) {
        tracing::warn!("could not start a thread to drop a retired model ({e}); dropped in place");
    }
}

/// The control loop's state. Built by [`build`](super::runner::build); driven either by
/// [`ControlCore::run`] on its own thread or tick by tick with [`ControlCore::tick`].
pub struct ControlCore {
    cfg: ControlConfig,
    io: IoSpec,
    clock: Arc<dyn Clock>,
    inputs: Arc<InputBuffers>,
    active: Option<Slot>,
    previous: Option<Slot>,
    swaps: Receiver<SwapOutcome>,
    operator: Receiver<OperatorRequest>,
    /// The newest prepared version waiting while one is pinned.
    waiting: Option<Prepared>,
    refresher: Refresher,
    events: UnboundedSender<ActionEvent>,
    status_tx: watch::Sender<PolicyStatus>,
    notices: UnboundedSender<RuntimeNotice>,
    status: PolicyStatus,
    last_action: Option<ActionEvent>,
}

impl ControlCore {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: ControlConfig,
        io: IoSpec,
        clock: Arc<dyn Clock>,
        inputs: Arc<InputBuffers>,
        swaps: Receiver<SwapOutcome>,
        operator: Receiver<OperatorRequest>,
        refresher: Refresher,
        events: UnboundedSender<ActionEvent>,
        status_tx: watch::Sender<PolicyStatus>,
        notices: UnboundedSender<RuntimeNotice>,
    ) -> Self {
        let enabled = cfg.start_enabled;
        Self {
            cfg,
            io,
            clock,
            inputs,
            active: None,
            previous: None,
            swaps,
            operator,
            waiting: None,
            refresher,
            events,
            status_tx,
            notices,
            status: PolicyStatus { message: "waiting for a checkpoint".into(), enabled, ..Default::default() },
            last_action: None,
        }
    }

    /// The schedule this loop runs on, starting at the next period boundary from now.
    pub fn scheduler(&self) -> TickScheduler {
        TickScheduler::new(self.clock.now(), self.cfg.period, self.cfg.tick_budget)
    }

    /// Runs ticks on schedule until `stop` is set.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut sched = self.scheduler();
        while !stop.load(Ordering::Relaxed) {
            self.clock.sleep_until(sched.next_start());
            self.take_operator_requests();
            if self.clock.now() < sched.next_start() {
                continue;
            }
            let slot = sched.begin(self.clock.now());
            self.tick(slot);
        }
    }

    /// The status after the last tick.
    pub fn status(&self) -> &PolicyStatus {
        &self.status
    }

    /// Runs one tick (call at or after `slot.scheduled`).
    pub fn tick(&mut self, slot: TickSlot) {
        let start = self.clock.now();
        self.status.ticks = slot.index + 1;
        self.status.missed_ticks += slot.skipped;
        self.take_operator_requests();
        self.take_swap_outcomes();
        self.take_refreshes();
        let published = self.act(&slot);
        let done = self.clock.now();
        if slot.missed_at(done) {
            self.status.missed_ticks += 1;
        }
        self.status.acting = published.as_ref().is_some_and(|e| !e.held);
        self.status.last_tick_ms = done.saturating_sub(start).as_secs_f64() * 1e3;
        if let Some(mut ev) = published {
            ev.published_at = done;
            if !ev.held {
                if let Some(t) = self.active.as_mut().and_then(|a| a.announced_at.take()) {
                    let latency = done.saturating_sub(t);
                    self.status.hotswap_latency_ms = Some(latency.as_secs_f64() * 1e3);
                    self.notify(RuntimeNotice::FirstAction { version: ev.chunk.version.clone(), latency });
                }
                self.last_action = Some(ev.clone());
            }
            // No receiver (the node is shutting down) is not the loop's concern.
            let _ = self.events.send(ev);
        }
        self.status_tx.send_replace(self.status.clone());
    }

    fn notify(&self, n: RuntimeNotice) {
        // No receiver (the node is shutting down) is not the loop's concern.
        let _ = self.notices.send(n);
    }

    fn versions(&self) -> Vec<String> {
        self.active.iter().chain(&self.previous).map(|s| s.meta.version.clone()).collect()
    }

    fn update_versions(&mut self) {
        self.status.active_version = self.active.as_ref().map(|s| s.meta.version.clone()).unwrap_or_default();
        self.status.previous_version = self.previous.as_ref().map(|s| s.meta.version.clone()).unwrap_or_default();
        // A pin follows an automatic roll-back away from the pinned version.
        if self.pinned().is_some_and(|p| p != self.status.active_version) {
            self.status.pinned_version = self.status.active_version.clone();
        }
        self.refresher.retain(self.versions());
    }

    fn pinned(&self) -> Option<&str> {
        Some(self.status.pinned_version.as_str()).filter(|p| !p.is_empty())
    }

    fn take_operator_requests(&mut self) {
        let mut any = false;
        while let Ok(req) = self.operator.try_recv() {
            let reply = self.apply(&req.command);
            match &reply {
                Ok(m) => tracing::info!("operator {}: {m}", req.command),
                Err(e) => tracing::warn!("{e}"),
            }
            // A requester that stopped waiting is not the loop's concern.
            let _ = req.reply.send(reply);
            any = true;
        }
        if any {
            self.status_tx.send_replace(self.status.clone());
        }
    }

    fn apply(&mut self, command: &OperatorCommand) -> OperatorReply {
        let refuse = |reason: String| Err(RuntimeError::Operator { command: command.to_string(), reason });
        let loaded = format!("active `{}`, previous `{}`", self.status.active_version, self.status.previous_version);
        self.status.message = match command {
            OperatorCommand::Enable(on) => {
                self.status.enabled = *on;
                if *on {
                    "enabled: publishing actions".into()
                } else {
                    DISABLED.into()
                }
            }
            OperatorCommand::Pin(Some(v)) if *v == self.status.active_version => {
                self.status.pinned_version = v.clone();
                format!("pinned {v}: announced versions wait until unpinned")
            }
            OperatorCommand::Pin(Some(v)) if *v == self.status.previous_version => {
                self.swap_active_and_previous();
                self.status.pinned_version = v.clone();
                format!("pinned {v} (was previous): announced versions wait until unpinned")
            }
            OperatorCommand::Pin(Some(v)) => return refuse(format!("version `{v}` is not loaded ({loaded})")),
            OperatorCommand::Pin(None) => {
                self.status.pinned_version.clear();
                match self.waiting.take() {
                    Some(p) => {
                        self.activate(p);
                        format!("unpinned; {}", self.status.message)
                    }
                    None => "unpinned: following announcements".into(),
                }
            }
            OperatorCommand::RollBack if self.previous.is_none() => {
                return refuse(format!("no previous version to roll back to ({loaded})"))
            }
            OperatorCommand::RollBack => {
                self.swap_active_and_previous();
                self.status.pinned_version = self.status.active_version.clone();
                format!(
                    "rolled back to {} (pinned; {} kept as previous)",
                    self.status.active_version, self.status.previous_version
                )
            }
        };
        Ok(self.status.message.clone())
    }

    fn swap_active_and_previous(&mut self) {
        std::mem::swap(&mut self.active, &mut self.previous);
        if let Some(a) = self.active.as_mut() {
            a.announced_at = None;
        }
        self.status.swaps += 1;
        self.update_versions();
    }

    fn take_swap_outcomes(&mut self) {
        while let Ok(outcome) = self.swaps.try_recv() {
            match outcome {
                SwapOutcome::Ready(p) if self.pinned().is_some() => {
                    self.status.message = format!(
                        "pinned {}: {} is ready and waits until unpinned",
                        self.status.pinned_version, p.meta.version
                    );
                    tracing::info!("{}", self.status.message);
                    self.waiting = Some(*p);
                }
                SwapOutcome::Ready(p) => self.activate(*p),
                SwapOutcome::Rejected { version, reason } => {
                    self.status.rejected += 1;
                    self.status.message = format!("rejected {version}: {reason}");
                    tracing::warn!("{}", self.status.message);
                    self.notify(RuntimeNotice::Rejected { version, reason });
                }
            }
        }
    }

    fn activate(&mut self, p: Prepared) {
        let Prepared { meta, encoder, model, features, announced_at } = p;
        self.refresher.install(&meta.version, encoder);
        let validated = if features.is_some() { "validated on live input" } else { "not validated: inputs were stale" };
        self.status.message = match &self.active {
            Some(a) => format!("activated {} (previous {}; {validated})", meta.version, a.meta.version),
            None => format!("activated {} ({validated})", meta.version),
        };
        tracing::info!("{}", self.status.message);
        self.notify(RuntimeNotice::Activated {
            version: meta.version.clone(),
            validated: features.is_some(),
            announced_at,
            at: self.clock.now(),
        });
        let slot = Slot { meta, model, features, announced_at: Some(announced_at) };
        if let Some(old) = self.previous.take() {
            retire(old);
        }
        self.previous = self.active.replace(slot);
        self.status.swaps += 1;
        self.update_versions();
    }

    fn take_refreshes(&mut self) {
        for r in self.refresher.finished() {
            match r.result {
                Ok(f) => {
                    self.status.vl_refreshes += 1;
                    self.status.last_vl_refresh_ms = Some(r.took.as_secs_f64() * 1e3);
                    self.notify(RuntimeNotice::VlRefreshed {
                        version: r.version.clone(),
                        obs_taken_at: f.obs_taken_at,
                        took: r.took,
                    });
                    let slot =
                        self.active.iter_mut().chain(self.previous.iter_mut()).find(|s| s.meta.version == r.version);
                    if let Some(s) = slot {
                        if s.features.as_ref().is_none_or(|old| old.obs_taken_at <= f.obs_taken_at) {
                            s.features = Some(f);
                        }
                    }
                }
                Err(e) => {
                    self.status.message = format!("VL refresh failed, acting on older features: {e}");
                    tracing::warn!("{}", self.status.message);
                }
            }
        }
    }

    /// The event to publish this tick, if any.
    fn act(&mut self, slot: &TickSlot) -> Option<ActionEvent> {
        let obs = match self.inputs.snapshot() {
            Snapshot::Fresh(obs) => {
                if !self.status.stale_inputs.is_empty() {
                    self.status.stale_inputs.clear();
                    self.notify(RuntimeNotice::Fresh);
                }
                Arc::new(obs)
            }
            Snapshot::Stale(stale) => return self.on_stale(&stale, slot),
        };
        let Some(active) = &self.active else {
            self.status.message = "waiting for a checkpoint".into();
            return None;
        };
        let refresh_due = slot.index % u64::from(self.cfg.vl_refresh_ticks.max(1)) == 0;
        if refresh_due || active.features.is_none() {
            self.refresher.request(&active.meta.version, obs.clone());
        }
        if !self.status.enabled {
            self.status.message = DISABLED.into();
            return None;
        }
        loop {
            let active = self.active.as_mut()?;
            let Some(features) = &active.features else {
                self.status.message = format!("waiting for VL features of {}", active.meta.version);
                return None;
            };
            match run_model(active.model.as_mut(), features, &obs, &active.meta.version, &self.io) {
                Ok(chunk) => {
                    return Some(ActionEvent {
                        chunk,
                        tick: slot.index,
                        held: false,
                        obs_taken_at: obs.taken_at,
                        vl_obs_taken_at: features.obs_taken_at,
                        published_at: Duration::ZERO,
                    })
                }
                Err(reason) => self.roll_back(&reason, &obs),
            }
        }
    }

    /// Records the stale inputs; the held last action if the behaviour and the gate allow it.
    fn on_stale(&mut self, stale: &[StaleInput], slot: &TickSlot) -> Option<ActionEvent> {
        let names: Vec<String> = stale.iter().map(|s| s.name.clone()).collect();
        if names != self.status.stale_inputs {
            self.notify(RuntimeNotice::Stale { inputs: names.clone() });
            self.status.stale_inputs = names;
        }
        let list = stale.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
        let held = match (self.cfg.stale_behavior, &self.last_action) {
            (StaleBehavior::Hold, Some(last)) if self.status.enabled => {
                Some(ActionEvent { tick: slot.index, held: true, ..last.clone() })
            }
            _ => None,
        };
        self.status.message = format!(
            "stale input: {list}; {}",
            if held.is_some() { "holding the last action" } else { "publishing no action" }
        );
        held
    }

    /// Drops the active version, which failed for `reason`; the previous one (if any) becomes
    /// active and is asked for features of `obs`.
    fn roll_back(&mut self, reason: &str, obs: &Arc<Observation>) {
        let mut failed = String::new();
        if let Some(s) = self.active.take() {
            failed = s.meta.version.clone();
            retire(s);
        }
        self.notify(RuntimeNotice::RolledBack {
            from: failed.clone(),
            to: self.previous.as_ref().map(|p| p.meta.version.clone()),
            reason: reason.to_string(),
        });
        match self.previous.take() {
            Some(prev) => {
                self.status.rollbacks += 1;
                self.status.message = format!("rolled back {failed} -> {}: {reason}", prev.meta.version);
                self.refresher.request(&prev.meta.version, obs.clone());
                self.active = Some(prev);
            }
            None => {
                self.status.message = format!("dropped {failed}, no version to roll back to: {reason}");
            }
        }
        tracing::warn!("{}", self.status.message);
        self.update_versions();
    }
}

fn run_model(
    model: &mut dyn ActionModel,
    features: &VlFeatures,
    obs: &Observation,
    version: &str,
    io: &IoSpec,
) -> Result<ActionChunk, String> {
    let mut chunk = model.act_with(features, obs).map_err(|e| e.to_string())?;
    chunk.validate(version, io).map_err(|e| e.to_string())?;
    chunk.version = version.to_string();
    Ok(chunk)
}
