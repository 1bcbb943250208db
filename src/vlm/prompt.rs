//! The tokenizer (`tokenizer.json` via the `tokenizers` crate) and the Qwen2.5-VL chat prompt of
//! one user turn holding N images then the instruction, with the default system prompt and the
//! generation prompt, image placeholders expanded to one `<|image_pad|>` per merged patch.

use std::path::Path;

use super::config::Config;
use super::error::{Result, VlmError};

/// The system prompt Qwen2.5-VL's chat template inserts when the conversation has none.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// The text Qwen2.5-VL's chat template renders for one user message with `n_images` images
/// followed by `instruction`, with `add_generation_prompt=True`.
pub fn chat_prompt(n_images: usize, instruction: &str) -> String {
    let mut s = format!("<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n");
    for _ in 0..n_images {
        s.push_str("<|vision_start|><|image_pad|><|vision_end|>");
    }
    s.push_str(instruction);
    s.push_str("<|im_end|>\n<|im_start|>assistant\n");
    s
}

/// A Qwen tokenizer checked against the model's special token ids.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// `<|image_pad|>` id.
    pub image_token_id: i64,
    /// Id used to pad batches (`<|endoftext|>`).
    pub pad_token_id: i64,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` and checks its special tokens against `config`.
    pub fn from_file(path: &Path, config: &Config) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| VlmError::Tokenizer { what: path.display().to_string(), msg: e.to_string() })?;
        let id = |tok: &str| -> Result<i64> {
            tokenizer.token_to_id(tok).map(i64::from).ok_or_else(|| VlmError::Tokenizer {
                what: path.display().to_string(),
                msg: format!("special token {tok} is missing"),
            })
        };
        for (tok, want) in [
            ("<|image_pad|>", config.image_token_id),
            ("<|vision_start|>", config.vision_start_token_id),
            ("<|vision_end|>", config.vision_end_token_id),
        ] {
            let got = id(tok)?;
            if got != want {
                return Err(VlmError::Tokenizer {
                    what: path.display().to_string(),
                    msg: format!("{tok} has id {got} but config.json says {want}"),
                });
            }
        }
        for tok in ["<|im_start|>", "<|im_end|>"] {
            id(tok)?;
        }
        let pad_token_id = id("<|endoftext|>")?;
        Ok(PromptTokenizer { tokenizer, image_token_id: config.image_token_id, pad_token_id })
    }

    /// Token ids of `text` (special tokens in the text are recognized, nothing is added).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| VlmError::Tokenizer { what: format!("text {text:?}"), msg: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Input ids of the chat prompt for `instruction` after images whose token counts (merged
    /// patches) are `image_tokens`, each placeholder expanded to that many `<|image_pad|>`.
    pub fn prompt_ids(&self, image_tokens: &[i64], instruction: &str) -> Result<Vec<i64>> {
        let ids = self.encode(&chat_prompt(image_tokens.len(), instruction))?;
        let placeholders = ids.iter().filter(|&&t| t == self.image_token_id).count();
        if placeholders != image_tokens.len() {
            return Err(VlmError::Tokenizer {
                what: format!("instruction {instruction:?}"),
                msg: format!("found {placeholders} image placeholders, expected {}", image_tokens.len()),
            });
        }
        let mut out = Vec::with_capacity(ids.len() + image_tokens.iter().sum::<i64>() as usize);
        let mut images = image_tokens.iter();
        for t in ids {
            if t == self.image_token_id {
                let n = *images.next().expect("counted above");
                out.extend(std::iter::repeat_n(t, n as usize));
            } else {
                out.push(t);
            }
        }
        Ok(out)
    }
}
