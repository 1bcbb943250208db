//! `Qwen25VL`: the vision tower and the language model together, loaded from a Hugging Face
//! model directory or randomly initialized, and the feature API the policy uses.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::Config;
use super::error::{Result, VlmError};
use super::linear::{Linear, VisitLinears};
use super::processor::VlBatch;
use super::text::{TextContext, TextModel};
use super::vision::VisionTower;
use super::weights::{Loader, SafetensorsStore, WeightSource};

/// Qwen2.5-VL without the language-model head.
pub struct Qwen25VL {
    /// Configuration.
    pub config: Config,
    /// `model.visual`.
    pub visual: VisionTower,
    /// `model.language_model`.
    pub language_model: TextModel,
}

/// Which tokens a pooled feature averages (lower-case names in configs and deploy.json).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Every non-padding token (system prompt, image tokens, instruction), as the reference does.
    #[default]
    All,
    /// Image tokens only.
    Image,
    /// Non-padding tokens that are not image tokens.
    Text,
    /// The last non-padding token alone (it attends to every image and instruction token).
    Last,
}

impl Pooling {
    /// The names `parse` accepts, as error messages list them.
    pub const NAMES: &'static str = "all, image, text or last";

    /// `all`, `image`, `text` or `last`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "all" => Self::All,
            "image" => Self::Image,
            "text" => Self::Text,
            "last" => Self::Last,
            _ => return None,
        })
    }

    /// The name `parse` reads (as in deploy.json and the configs).
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Image => "image",
            Self::Text => "text",
            Self::Last => "last",
        }
    }
}

/// The model's output for a batch.
#[derive(Debug)]
pub struct VlOutput {
    /// Hidden states after the final norm `[batch, len, hidden]` (compute dtype).
    pub last_hidden_state: Tensor,
    /// `[batch, len]` int64, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, len]` bool, true at image tokens.
    pub image_mask: Tensor,
    /// `[batch, len]` bool, true at non-padding, non-image tokens.
    pub text_mask: Tensor,
}

impl VlOutput {
    /// Mean of the last hidden states over the selected tokens of each sample, `[batch, hidden]`
    /// in f32. Errors if a sample has no such token.
    pub fn pooled(&self, pooling: Pooling) -> Result<Tensor> {
        let mask = match pooling {
            Pooling::All => self.attention_mask.to_kind(Kind::Bool),
            Pooling::Image => self.image_mask.shallow_clone(),
            Pooling::Text => self.text_mask.shallow_clone(),
            Pooling::Last => {
                // Right-padded: the last token of a sample sits at its length - 1.
                let len = self.attention_mask.sum_dim_intlist(-1, true, Kind::Int64);
                let positions = Tensor::arange(self.attention_mask.size()[1], (Kind::Int64, len.device()));
                positions.unsqueeze(0).eq_tensor(&(len - 1))
            }
        };
        let counts = mask.sum_dim_intlist(-1, false, Kind::Float);
        if counts.min().double_value(&[]) < 1.0 {
            return Err(VlmError::Input(format!("a sample has no token to pool with {pooling:?}")));
        }
        let m = mask.to_kind(Kind::Float).unsqueeze(-1);
        let sum = (self.last_hidden_state.to_kind(Kind::Float) * m).sum_dim_intlist(1, false, Kind::Float);
        Ok(sum / counts.unsqueeze(-1))
    }
}

impl Qwen25VL {
    /// Loads `config.json` and the safetensors weights of `dir` as `kind` (f32 or bf16) on
    /// `device`, tensor by tensor. Missing, mis-shaped or unexpected tensors are errors.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = Config::from_file(&Config::path_in(dir))?;
        let store = SafetensorsStore::open(dir)?;
        Self::build(config, Loader::new(WeightSource::Checkpoint(store), kind, device)?)
    }

    /// Random weights (normal 0.02, norms 1, biases 0) for `config`.
    pub fn random(config: &Config, kind: Kind, device: Device) -> Result<Self> {
        config.validate().map_err(VlmError::Input)?;
        Self::build(config.clone(), Loader::new(WeightSource::Random, kind, device)?)
    }

    /// A second model on the same weight storage as this one (nothing is copied; adapters are
    /// not carried over). Attach a LoRA adapter to it to run a fine-tuned version beside the
    /// unchanged base; never merge LoRA into it (merging writes into the shared weights).
    pub fn share_weights(&self) -> Result<Self> {
        let map = self.named_tensors().into_iter().map(|(n, t)| (n, t.shallow_clone())).collect();
        Self::build(self.config.clone(), Loader::new(WeightSource::Shared(map), self.kind(), self.device())?)
    }

    fn build(config: Config, mut loader: Loader) -> Result<Self> {
        let visual = VisionTower::new(&mut loader, "model.visual", &config.vision)?;
        let language_model = TextModel::new(&mut loader, "model.language_model", &config.text)?;
        let head = [config.text.vocab_size, config.text.hidden_size];
        if config.text.tie_word_embeddings {
            loader.allow_unused("lm_head.weight", &head)?;
        } else {
            loader.check_unused("lm_head.weight", &head)?;
        }
        loader.finish()?;
        Ok(Qwen25VL { config, visual, language_model })
    }

    /// Every base weight with its transformers>=4.52 name (vision tower, then language model;
    /// no `lm_head`, adapters excluded). Writing them to safetensors gives a loadable checkpoint
    /// of a tied-embedding model.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = self.visual.named_tensors();
        out.extend(self.language_model.named_tensors());
        out
    }

    /// Weight (and compute) dtype.
    pub fn kind(&self) -> Kind {
        self.language_model.embed_tokens.kind()
    }

    /// Weight device.
    pub fn device(&self) -> Device {
        self.language_model.embed_tokens.device()
    }

    /// Merged image embeddings `[image tokens, hidden]` of a batch's images.
    pub fn image_embeds(&self, pixel_values: &Tensor, grids: &[[i64; 3]], train: bool) -> Result<Tensor> {
        self.visual.forward(&pixel_values.to_device(self.device()), grids, train)
    }

    /// Full forward: vision tower, image embeddings scattered into the token embeddings, decoder.
    pub fn forward(&self, batch: &VlBatch, train: bool) -> Result<VlOutput> {
        let embeds = if batch.image_grid_thw.is_empty() {
            None
        } else {
            Some(self.image_embeds(&batch.pixel_values, &batch.image_grid_thw, train)?)
        };
        self.forward_with_image_embeds(batch, embeds.as_ref(), train)
    }

    /// Decoder forward with precomputed image embeddings (e.g. from a vision cache), in the order
    /// of the batch's image tokens.
    pub fn forward_with_image_embeds(
        &self,
        batch: &VlBatch,
        image_embeds: Option<&Tensor>,
        train: bool,
    ) -> Result<VlOutput> {
        let inputs = self.text_inputs(batch, image_embeds, train)?;
        let last_hidden_state = self.language_model.forward_embeds(&inputs.embeds, &inputs.ctx);
        Ok(inputs.into_features(last_hidden_state))
    }

    /// The decoder's input: token embeddings with the image embeddings scattered into the image
    /// token positions, the per-forward context and the token masks. Running
    /// `language_model.layers` then `language_model.norm` on `embeds` (for example segment by
    /// segment) and calling [`TextInputs::into_features`] equals [`Qwen25VL::forward_with_image_embeds`].
    pub fn text_inputs(&self, batch: &VlBatch, image_embeds: Option<&Tensor>, train: bool) -> Result<TextInputs> {
        let device = self.device();
        let attention_mask = batch.attention_mask.to_device(device);
        let size = batch.input_ids.size();
        if size.len() != 2 || attention_mask.size() != size || batch.position_ids.size() != [3, size[0], size[1]] {
            return Err(VlmError::Input(format!(
                "input_ids {:?}, attention_mask {:?} and position_ids {:?} must be [b, l], [b, l] and [3, b, l]",
                size,
                attention_mask.size(),
                batch.position_ids.size()
            )));
        }
        // Counted and checked on the batch as given (the host for a batch from the processor):
        // no device synchronisation.
        let host_image_mask =
            batch.input_ids.eq(self.config.image_token_id).logical_and(&batch.attention_mask.to_kind(Kind::Bool));
        let n_image = host_image_mask.sum(Kind::Int64).int64_value(&[]);
        let image_mask = host_image_mask.to_device(device);
        let mut embeds = self.language_model.embed(&batch.input_ids)?;
        match image_embeds {
            Some(e) => {
                let es = e.size();
                if es.len() != 2 || es[0] != n_image || es[1] != self.config.text.hidden_size {
                    return Err(VlmError::Input(format!(
                        "image features {es:?} do not match {n_image} image tokens of width {}",
                        self.config.text.hidden_size
                    )));
                }
                if n_image > 0 && e.isfinite().all().int64_value(&[]) == 0 {
                    return Err(VlmError::Input("image features contain NaN or infinite values".into()));
                }
                embeds = embeds.masked_scatter(&image_mask.unsqueeze(-1), &e.to_device(device).to_kind(embeds.kind()));
            }
            None if n_image > 0 => {
                return Err(VlmError::Input(format!("{n_image} image tokens but no image features")));
            }
            None => {}
        }
        let ctx = self.language_model.prepare(
            &batch.position_ids.to_device(device),
            &batch.attention_mask,
            embeds.kind(),
            train,
        );
        Ok(TextInputs { embeds, ctx, attention_mask, image_mask })
    }
}

/// The decoder's input for one batch (see [`Qwen25VL::text_inputs`]).
pub struct TextInputs {
    /// `[batch, len, hidden]` input embeddings.
    pub embeds: Tensor,
    /// Rotary tables and attention mask.
    pub ctx: TextContext,
    /// `[batch, len]` int64, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, len]` bool, true at image tokens.
    pub image_mask: Tensor,
}

impl TextInputs {
    /// Wraps the final-norm output of the decoder into [`VlOutput`].
    pub fn into_features(self, last_hidden_state: Tensor) -> VlOutput {
        let text_mask = self.attention_mask.to_kind(Kind::Bool).logical_and(&self.image_mask.logical_not());
        VlOutput { last_hidden_state, attention_mask: self.attention_mask, image_mask: self.image_mask, text_mask }
    }

    /// Like [`TextInputs::into_features`], also returning the per-forward context (needed to
    /// recompute checkpointed layers).
    pub fn into_features_and_context(self, last_hidden_state: Tensor) -> (VlOutput, TextContext) {
        let text_mask = self.attention_mask.to_kind(Kind::Bool).logical_and(&self.image_mask.logical_not());
        let features =
            VlOutput { last_hidden_state, attention_mask: self.attention_mask, image_mask: self.image_mask, text_mask };
        (features, self.ctx)
    }
}

impl VisitLinears for Qwen25VL {
    /// Vision tower linears (blocks in order: qkv, proj, gate, up, down; then merger fc1, fc2),
    /// then decoder linears (layers in order: q, k, v, o, gate, up, down).
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.visual.params.visit_linears_mut(f);
        self.language_model.params.visit_linears_mut(f);
    }
}
