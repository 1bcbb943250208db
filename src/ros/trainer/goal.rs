//! The trainer's `~/finetune` action: each goal starts a job, gets its throttled progress as
//! feedback, may cancel it, and ends with the job's outcome and last announced checkpoint.

use super::{start_request, Jobs, LastCheckpoint};
use crate::ros::clock::NodeClock;
use crate::ros::convert::progress_msg;
use crate::ros::interfaces::action::FineTune;
use crate::train::controller::{CancelResponse, JobController, JobOutcome, StartResponse};
use crate::train::progress::{ProgressEvent, Throttle};
use crate::train::service::{start, StartRequest};
use futures::{Stream, StreamExt};
use r2r::{ActionServerCancelRequest, ActionServerGoal, ActionServerGoalRequest};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::{self, error::RecvError};

/// Accepts each goal, starts its job and follows it on its own task; a rejected start aborts
/// the goal with the reason.
pub async fn serve_goals(
    mut goals: impl Stream<Item = ActionServerGoalRequest<FineTune::Action>> + Unpin,
    jobs: Jobs,
    last: LastCheckpoint,
    rate_hz: f64,
    clock: NodeClock,
) {
    while let Some(req) = goals.next().await {
        let r = start_request!(&req.goal);
        // Subscribed before the start: the goal gets the job's first events too.
        let events = jobs.controller.progress().subscribe();
        let started = start(&jobs.controller, &jobs.cfg, r);
        let (mut goal, cancels) = match req.accept() {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("finetune: could not accept a goal: {e}");
                if let StartResponse::Accepted { job_id } = started {
                    jobs.controller.cancel(&job_id);
                }
                continue;
            }
        };
        let job_id = match started {
            StartResponse::Accepted { job_id } => job_id,
            StartResponse::Rejected(why) => {
                let result = FineTune::Result {
                    state: "rejected".into(),
                    summary: format!("{}: {why}", why.code()),
                    ..Default::default()
                };
                if let Err(e) = goal.abort(result) {
                    tracing::error!("finetune: could not answer a rejected goal: {e}");
                }
                continue;
            }
        };
        let job = GoalJob { jobs: jobs.controller.clone(), goal, job_id, clock: clock.clone() };
        tokio::spawn(follow_goal(job, cancels, events, last.clone(), rate_hz));
    }
}

/// A goal and the job it started.
struct GoalJob {
    jobs: JobController<StartRequest>,
    goal: ActionServerGoal<FineTune::Action>,
    job_id: String,
    clock: NodeClock,
}

/// Feeds a FineTune goal the progress of its job, cancels the job on a cancel request, and
/// ends the goal with the job's outcome and last announced checkpoint.
async fn follow_goal(
    mut job: GoalJob,
    mut cancels: impl Stream<Item = ActionServerCancelRequest> + Unpin,
    mut events: broadcast::Receiver<ProgressEvent>,
    last: LastCheckpoint,
    rate_hz: f64,
) {
    let (outcome, cancel_accepted) = job.until_ended(&mut cancels, &mut events, rate_hz).await;
    job.terminal_feedback(&mut events).await;
    let checkpoint = last.lock().ok().and_then(|m| m.get(&job.job_id).cloned()).unwrap_or_default();
    job.end(outcome, cancel_accepted, checkpoint);
}

impl GoalJob {
    /// Sends throttled feedback and handles cancel requests until the job ends; its outcome,
    /// and whether a cancel request was accepted.
    async fn until_ended(
        &mut self,
        cancels: &mut (impl Stream<Item = ActionServerCancelRequest> + Unpin),
        events: &mut broadcast::Receiver<ProgressEvent>,
        rate_hz: f64,
    ) -> (Option<JobOutcome>, bool) {
        let mut throttle = Throttle::new(rate_hz);
        // Owns its handles: the goal (not `Sync`) is only borrowed between awaits.
        let ended = {
            let (jobs, id) = (self.jobs.clone(), self.job_id.clone());
            async move { jobs.wait(&id).await }
        };
        tokio::pin!(ended);
        let mut cancel_accepted = false;
        loop {
            tokio::select! {
                outcome = &mut ended => return (outcome, cancel_accepted),
                ev = events.recv() => match ev {
                    Ok(ev) if ev.job_id == self.job_id && throttle.admit(&ev, Instant::now()) => self.feedback(&ev),
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => {}
                },
                Some(cancel) = cancels.next() => {
                    match self.jobs.cancel(&self.job_id) {
                        CancelResponse::Cancelling => {
                            cancel.accept();
                            cancel_accepted = true;
                        }
                        CancelResponse::NotRunning => cancel.reject(),
                    }
                }
            }
        }
    }

    /// The controller records the end before it publishes the terminal event: waits (briefly)
    /// for that event, so that the last feedback says how the job ended.
    async fn terminal_feedback(&mut self, events: &mut broadcast::Receiver<ProgressEvent>) {
        let grace = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                _ = &mut grace => break,
                ev = events.recv() => match ev {
                    Ok(ev) if ev.job_id == self.job_id => {
                        self.feedback(&ev);
                        if ev.phase.is_terminal() {
                            break;
                        }
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                },
            }
        }
    }

    /// Ends the goal with the job's outcome and `checkpoint`, its last announced one.
    fn end(
        mut self,
        outcome: Option<JobOutcome>,
        cancel_accepted: bool,
        checkpoint: crate::ros::interfaces::msg::CheckpointInfo,
    ) {
        let job_id = self.job_id.clone();
        let result = |state: &str, summary: String| FineTune::Result {
            state: state.into(),
            job_id: job_id.clone(),
            checkpoint: checkpoint.clone(),
            summary,
        };
        let goal = &mut self.goal;
        let sent = match outcome {
            Some(JobOutcome::Completed { summary }) => goal.succeed(result("done", summary.to_string())),
            // r2r moves a goal whose cancel was accepted to `canceling` itself (and forgets its
            // handle, so only `cancel` may end it); a job cancelled through ~/cancel_finetune left
            // the goal executing: it aborts then.
            Some(JobOutcome::Cancelled { summary }) => {
                let r = result("cancelled", summary.to_string());
                if cancel_accepted {
                    goal.cancel(r)
                } else {
                    goal.abort(r)
                }
            }
            Some(JobOutcome::Failed { error }) => goal.abort(result("failed", error)),
            None => goal.abort(result("failed", "the job's outcome was lost (another job replaced it)".into())),
        };
        if let Err(e) = sent {
            tracing::error!("finetune: could not send the result of {job_id}: {e}");
        }
    }

    /// Sends `ev` as the goal's feedback, stamped by the node clock.
    fn feedback(&self, ev: &ProgressEvent) {
        let progress = progress_msg(ev, self.clock.now());
        if let Err(e) = self.goal.publish_feedback(FineTune::Feedback { progress }) {
            tracing::warn!("finetune feedback: {e}");
        }
    }
}
