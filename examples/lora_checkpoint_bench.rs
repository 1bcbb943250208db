//! Benchmark (not a test): peak memory and time of one forward+backward through Qwen2.5-VL-3B
//! shaped decoder layers with LoRA on q/k/v/o, for (no checkpointing, checkpointing every
//! layer) x (f32, bf16 mixed precision). The layers follow Qwen2's shape (RMSNorm, GQA
//! attention with q/k/v biases, SwiGLU MLP) with random weights; rotary embedding is left out
//! (it does not change the memory picture). Peak memory is the step's rise over the memory held
//! before it: accelerator allocator peak on CUDA, process RSS high-water mark on the CPU.
//!
//! Each configuration runs in a fresh child process (the binary re-executes itself with
//! `--child PRECISION:CK`), so memory freed by one configuration and kept by the C allocator
//! cannot hide another's peak; glibc's mmap threshold is pinned so freed large blocks return
//! to the OS and the RSS high-water mark measures live memory.
//!
//! `cargo run --example lora_checkpoint_bench -- [--layers N] [--batch B] [--tokens T]
//!  [--hidden H] [--intermediate I] [--heads NH] [--kv-heads NKV] [--cuda] [--precisions f32,bf16]`

use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};
use vla_finetune::memory;
use vla_finetune::vlm::grad_checkpoint::{run_layers, Checkpointing};
use vla_finetune::vlm::linear::{Linear, VisitLinears};
use vla_finetune::vlm::lora::{inject_lora, LoraConfig};
use vla_finetune::vlm::precision::Precision;

struct Shape {
    layers: usize,
    batch: i64,
    tokens: i64,
    hidden: i64,
    intermediate: i64,
    heads: i64,
    kv_heads: i64,
}

struct Layer {
    linears: Vec<Linear>, // q k v o gate up down
    norms: [Tensor; 2],
}

struct Stack {
    layers: Vec<Layer>,
    shape: Shape,
}

impl VisitLinears for Stack {
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.layers.iter_mut().flat_map(|l| l.linears.iter_mut()).for_each(f)
    }
}

impl Stack {
    fn new(shape: Shape, device: Device) -> Self {
        let (h, i, hd) = (shape.hidden, shape.intermediate, shape.hidden / shape.heads);
        let kv = shape.kv_heads * hd;
        let layers = (0..shape.layers)
            .map(|n| {
                let spec = [
                    ("self_attn.q_proj", h, h, true),
                    ("self_attn.k_proj", kv, h, true),
                    ("self_attn.v_proj", kv, h, true),
                    ("self_attn.o_proj", h, h, false),
                    ("mlp.gate_proj", i, h, false),
                    ("mlp.up_proj", i, h, false),
                    ("mlp.down_proj", h, i, false),
                ];
                let linears = spec
                    .iter()
                    .map(|(name, out, inp, bias)| Linear {
                        path: format!("model.language_model.layers.{n}.{name}"),
                        weight: Tensor::randn([*out, *inp], (Kind::Float, device)) * 0.02,
                        bias: bias.then(|| Tensor::zeros([*out], (Kind::Float, device))),
                        adapter: None,
                    })
                    .collect();
                Layer {
                    linears,
                    norms: [Tensor::ones([h], (Kind::Float, device)), Tensor::ones([h], (Kind::Float, device))],
                }
            })
            .collect();
        Self { layers, shape }
    }

    fn layer(&self, n: usize, x: &Tensor) -> Tensor {
        let s = &self.shape;
        let l = &self.layers[n];
        let kind = x.kind();
        let hd = s.hidden / s.heads;
        let norm = |x: &Tensor, w: &Tensor| x.rms_norm([s.hidden], Some(w.to_kind(kind)), 1e-6);
        let h = norm(x, &l.norms[0]);
        let split = |t: Tensor, heads: i64| t.view([s.batch, s.tokens, heads, hd]).transpose(1, 2);
        let q = split(l.linears[0].forward_t(&h, true), s.heads);
        let k = split(l.linears[1].forward_t(&h, true), s.kv_heads);
        let v = split(l.linears[2].forward_t(&h, true), s.kv_heads);
        let a = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, true);
        let x = x + l.linears[3].forward_t(&a.transpose(1, 2).reshape([s.batch, s.tokens, s.hidden]), true);
        let h = norm(&x, &l.norms[1]);
        let m = l.linears[4].forward_t(&h, true).silu() * l.linears[5].forward_t(&h, true);
        &x + l.linears[6].forward_t(&m, true)
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn held(device: Device) -> u64 {
    match device {
        Device::Cuda(i) => memory::accelerator_memory(i).unwrap().map_or(0, |m| m.allocated),
        _ => memory::host_memory().unwrap().rss,
    }
}

fn reset(device: Device) {
    match device {
        Device::Cuda(i) => {
            tch::Cuda::synchronize(i as i64);
            memory::reset_peak_memory_stats(i).unwrap();
        }
        _ => {
            memory::reset_host_peak().unwrap();
        }
    }
}

fn peak(device: Device) -> u64 {
    match device {
        Device::Cuda(i) => {
            tch::Cuda::synchronize(i as i64);
            memory::max_memory_allocated(i).unwrap().unwrap_or(0)
        }
        _ => memory::host_memory().unwrap().peak_rss,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = if args.iter().any(|a| a == "--cuda") { Device::Cuda(0) } else { Device::Cpu };
    let shape = Shape {
        layers: arg(&args, "--layers", 2),
        batch: arg(&args, "--batch", 2),
        tokens: arg(&args, "--tokens", 2000),
        hidden: arg(&args, "--hidden", 2048),
        intermediate: arg(&args, "--intermediate", 11008),
        heads: arg(&args, "--heads", 16),
        kv_heads: arg(&args, "--kv-heads", 2),
    };
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let (precision, ck) = args[i + 1].split_once(':').expect("--child PRECISION:off|every1");
        let ck = if ck == "off" { Checkpointing::OFF } else { Checkpointing::every(1) };
        return child(shape, device, precision.parse().unwrap(), ck);
    }
    println!(
        "device {device:?}, {} layers, batch {} x {} tokens, hidden {}, intermediate {}, heads {}/{} (LoRA r 8 on q/k/v/o)",
        shape.layers, shape.batch, shape.tokens, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads
    );
    println!("| precision | checkpointing | step time (s) | peak memory over resident (MiB) |");
    println!("|---|---|---|---|");
    for precision in arg(&args, "--precisions", "f32,bf16".to_string()).split(',') {
        for ck in ["off", "every1"] {
            let out = std::process::Command::new(&args[0])
                .args(&args[1..])
                .args(["--child", &format!("{precision}:{ck}")])
                // Fixed mmap threshold: freed large blocks go back to the OS, so RSS is exact.
                .env("MALLOC_MMAP_THRESHOLD_", "131072")
                .output()
                .expect("re-executing the benchmark");
            print!("{}", String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                eprintln!("{precision}:{ck} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}

/// One configuration: build, then time and measure one forward+backward.
fn child(shape: Shape, device: Device, precision: Precision, ck: Checkpointing) {
    let (n_layers, batch, tokens, hidden) = (shape.layers, shape.batch, shape.tokens, shape.hidden);
    tch::manual_seed(0);
    let mut stack = Stack::new(shape, device);
    let vs = nn::VarStore::new(device);
    inject_lora(&mut stack, &LoraConfig::default(), &vs.root()).unwrap();
    let x32 = Tensor::randn([batch, tokens, hidden], (Kind::Float, device)) * 0.5;
    precision.apply_to_linears(&mut stack);
    let x = precision.cast_input(&x32);
    drop(x32);
    let base = held(device);
    reset(device);
    let start = Instant::now();
    let layer = |i: usize, h: &Tensor| stack.layer(i, h);
    let run = run_layers(&x, n_layers, ck, &layer).unwrap();
    let loss = run.output().to_kind(Kind::Float).square().mean(Kind::Float);
    loss.backward();
    run.backward(&layer).unwrap();
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let secs = start.elapsed().as_secs_f64();
    let rise = peak(device).saturating_sub(base) as f64 / (1u64 << 20) as f64;
    println!("| {precision:?} | {} | {secs:.2} | {rise:.0} |", if ck.enabled { "every layer" } else { "off" });
}
