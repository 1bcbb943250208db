//! The training forward pass of [`Qwen25VL`] with gradient checkpointing of the vision blocks
//! and the decoder layers ([`super::grad_checkpoint::run_layers`] on each stack).
//!
//! Usage: `let (features, pass) = model.forward_checkpointed(&batch, ck, true)?;` build the loss
//! from `features`, call `loss.backward()`, then `pass.backward(&model)?` — afterwards every
//! trainable parameter (LoRA masters) holds the same gradient as without checkpointing.

use tch::Tensor;

use super::error::Result;
use super::grad_checkpoint::{run_layers, Checkpointing, SegmentRun};
use super::model::{Qwen25VL, VlOutput};
use super::processor::VlBatch;
use super::text::TextContext;
use super::vision::VisionContext;

/// Checkpointing of the two layer stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainCheckpointing {
    /// Vision blocks.
    pub vision: Checkpointing,
    /// Decoder layers.
    pub text: Checkpointing,
}

impl TrainCheckpointing {
    /// No checkpointing anywhere.
    pub const OFF: Self = Self { vision: Checkpointing::OFF, text: Checkpointing::OFF };

    /// Checkpoint both stacks every `every` layers.
    pub fn every(every: usize) -> Self {
        Self { vision: Checkpointing::every(every), text: Checkpointing::every(every) }
    }
}

/// What [`Qwen25VL::forward_checkpointed`] keeps for the backward pass.
pub struct CheckpointedPass {
    vision: Option<(SegmentRun, VisionContext)>,
    text: SegmentRun,
    text_ctx: TextContext,
}

impl Qwen25VL {
    /// Training forward: like [`Qwen25VL::forward`], with the vision blocks and decoder layers
    /// run as configured by `ck`. After `loss.backward()` on a loss built from the returned
    /// features, call [`CheckpointedPass::backward`] with this model to complete the gradients.
    pub fn forward_checkpointed(
        &self,
        batch: &VlBatch,
        ck: TrainCheckpointing,
        train: bool,
    ) -> Result<(VlOutput, CheckpointedPass)> {
        let vision = if batch.image_grid_thw.is_empty() {
            None
        } else {
            let v = &self.visual;
            let pixels = batch.pixel_values.to_device(self.device());
            let ctx = v.prepare(&pixels, &batch.image_grid_thw, train)?;
            let x = v.embed(&pixels, &ctx);
            let run = run_layers(&x, v.blocks.len(), ck.vision, &|i, h: &Tensor| v.forward_block(i, h, &ctx))?;
            let merged = v.merge(run.output(), &ctx);
            Some((run, ctx, merged))
        };
        let (features, mut pass) =
            self.forward_checkpointed_with_image_embeds(batch, vision.as_ref().map(|(_, _, m)| m), ck.text, train)?;
        pass.vision = vision.map(|(run, ctx, _)| (run, ctx));
        Ok((features, pass))
    }

    /// Training forward of the decoder only, from precomputed image embeddings (e.g. a vision
    /// cache; see [`Qwen25VL::forward_with_image_embeds`]), with the decoder layers run as
    /// configured by `ck`. Finish the backward pass with [`CheckpointedPass::backward`].
    pub fn forward_checkpointed_with_image_embeds(
        &self,
        batch: &VlBatch,
        image_embeds: Option<&Tensor>,
        ck: Checkpointing,
        train: bool,
    ) -> Result<(VlOutput, CheckpointedPass)> {
        let inputs = self.text_inputs(batch, image_embeds, train)?;
        let lm = &self.language_model;
        let text = {
            let ctx = &inputs.ctx;
            run_layers(&inputs.embeds, lm.layers.len(), ck, &|i, h: &Tensor| lm.forward_layer(i, h, ctx))?
        };
        let last = lm.norm.forward(text.output());
        let (features, text_ctx) = inputs.into_features_and_context(last);
        Ok((features, CheckpointedPass { vision: None, text, text_ctx }))
    }
}

impl CheckpointedPass {
    /// Completes back-propagation after the loss's `backward()`: recomputes the checkpointed
    /// decoder segments, then the vision segments, back-propagating into every parameter that
    /// requires grad. `model` must be the model that ran the forward pass.
    pub fn backward(self, model: &Qwen25VL) -> Result<()> {
        let lm = &model.language_model;
        let ctx = &self.text_ctx;
        self.text.backward(&|i, h: &Tensor| lm.forward_layer(i, h, ctx))?;
        if let Some((run, vctx)) = self.vision {
            let v = &model.visual;
            run.backward(&|i, h: &Tensor| v.forward_block(i, h, &vctx))?;
        }
        Ok(())
    }
}
