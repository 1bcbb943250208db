//! The deployable checkpoint, shared by training (which writes it) and the runtime (which loads
//! it): `checkpoints/<version>/` with its format ([`deploy`]), its publication and verification
//! with the `latest` pointer ([`publish`]), and the identity of the base model it was trained
//! on ([`model_id`]). The other things called "checkpoint" live elsewhere: the heads file
//! (`policy::heads_file`), the resumable training state (`train::state`) and gradient
//! checkpointing (`vlm::grad_checkpoint`).

pub mod deploy;
pub mod model_id;
pub mod publish;
