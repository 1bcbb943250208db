//! The decoder forward from precomputed image embeddings (a vision cache),
//! `forward_checkpointed_with_image_embeds`, against the full forward of the tiny fixture:
//! same hidden states, and with LoRA the same loss and LoRA gradients as the full checkpointed
//! training forward.

use crate::support::rng_lock;
use crate::support::vlm::*;
use tch::{nn, Device, Kind, Tensor};
use vla_finetune::vlm::grad_checkpoint::Checkpointing;
use vla_finetune::vlm::lora::{inject_lora, lora_parameters, LoraConfig};
use vla_finetune::vlm::{Pooling, Qwen25VL, TrainCheckpointing, VlBatch};

fn batch() -> VlBatch {
    let (_, p) = processor(&fixtures().join("tiny_a"));
    p.collate(&[case_sample(&p, "two_images"), case_sample(&p, "one_image")]).unwrap()
}

/// Pooled-feature loss and every LoRA gradient (by name) after backward.
fn loss_and_grads(model: &mut Qwen25VL, run: &dyn Fn(&Qwen25VL) -> Tensor) -> (f64, Vec<(String, Tensor)>) {
    let mut params = lora_parameters(model);
    for (_, p) in &mut params {
        p.zero_grad();
    }
    let loss = run(model).double_value(&[]);
    (loss, params.into_iter().map(|(n, p)| (n, p.grad().copy())).collect())
}

#[test]
fn decoder_from_cached_image_embeds_equals_the_full_forward() {
    let _rng = rng_lock();
    let dir = fixtures().join("tiny_a");
    let mut model = Qwen25VL::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let batch = batch();
    let embeds = tch::no_grad(|| model.image_embeds(&batch.pixel_values, &batch.image_grid_thw, false)).unwrap();

    let full = tch::no_grad(|| model.forward(&batch, false)).unwrap();
    let (cached, _) =
        tch::no_grad(|| model.forward_checkpointed_with_image_embeds(&batch, Some(&embeds), Checkpointing::OFF, false))
            .unwrap();
    assert!(full.last_hidden_state.allclose(&cached.last_hidden_state, 1e-6, 1e-6, false));
    assert!(full.image_mask.equal(&cached.image_mask));

    // Training: LoRA (non-zero B, no dropout) on q/k/v/o, decoder layers checkpointed.
    let vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(3);
    inject_lora(&mut model, &LoraConfig { lora_dropout: 0.0, ..LoraConfig::default() }, &vs.root()).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in lora_parameters(&mut model) {
            if name.ends_with("lora_B.weight") {
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    let target = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
    let loss_of = |features: vla_finetune::vlm::VlOutput| {
        (features.pooled(Pooling::All).unwrap() - &target).square().mean(Kind::Float)
    };
    let ck = TrainCheckpointing { vision: Checkpointing::OFF, text: Checkpointing::every(1) };
    let (l_full, g_full) = loss_and_grads(&mut model, &|m| {
        let (f, pass) = m.forward_checkpointed(&batch, ck, true).unwrap();
        let loss = loss_of(f);
        loss.backward();
        pass.backward(m).unwrap();
        loss
    });
    let (l_cached, g_cached) = loss_and_grads(&mut model, &|m| {
        let (f, pass) = m.forward_checkpointed_with_image_embeds(&batch, Some(&embeds), ck.text, true).unwrap();
        let loss = loss_of(f);
        loss.backward();
        pass.backward(m).unwrap();
        loss
    });
    assert!((l_full - l_cached).abs() < 1e-7, "{l_full} vs {l_cached}");
    assert_eq!(g_full.len(), 16, "q/k/v/o A and B of 2 layers");
    for ((name, a), (_, b)) in g_full.iter().zip(&g_cached) {
        assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name} got no gradient");
        assert!(a.allclose(b, 1e-5, 1e-7, false), "{name}: gradients differ");
    }
}
