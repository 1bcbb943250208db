//! Forward time and peak memory of the Qwen2.5-VL vision tower and of the full VL forward at 3B
//! shapes with random weights, for N camera views of 640x360 (synthetic frames).
//!
//! `cargo run --release --example vlm_bench -- [--views 1] [--text-layers 36] [--vision-depth 32]
//!  [--dtype f32|bf16] [--device cpu|cuda] [--iters 3]`
//!
//! With `--load-test DIR` it instead writes the random model to DIR (safetensors + config.json)
//! unless already there, and measures loading it (time, peak resident memory against the file
//! size); run it twice so the second run loads in a fresh process.
//!
//! Host peak memory is the process's peak resident set (VmHWM, reset through
//! /proc/self/clear_refs before each phase); it includes the weights.

use std::time::Instant;

use tch::{Device, Kind};
use vla_finetune::bench::shapes::config_json;
use vla_finetune::dataset::episode::RgbImage;
use vla_finetune::vlm::image_processor::ImageProcessor;
use vla_finetune::vlm::processor::{collate, VlSample};
use vla_finetune::vlm::rope::rope_index;
use vla_finetune::vlm::{Config, Qwen25VL};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad value for {name}")))
        .unwrap_or(default)
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of the whole process (all threads), from /proc/self/stat
/// (clock ticks of 1/100 s, the Linux default USER_HZ).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<f64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // Fields after the command name: state is index 0, utime 11, stime 12.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn frame(w: u32, h: u32, seed: u32) -> RgbImage {
    let data = (0..w * h * 3).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed * 97)) >> 13) as u8).collect();
    RgbImage { width: w, height: h, data }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let views: usize = arg(&args, "--views", 1);
    let text_layers: i64 = arg(&args, "--text-layers", 36);
    let depth: i64 = arg(&args, "--vision-depth", 32);
    let iters: usize = arg(&args, "--iters", 3);
    let warmup: usize = arg(&args, "--warmup", 1);
    let kind = match arg(&args, "--dtype", "bf16".to_string()).as_str() {
        "f32" => Kind::Float,
        _ => Kind::BFloat16,
    };
    let device = vla_finetune::device::parse(&arg(&args, "--device", "cpu".to_string())).unwrap();

    let mut cfg = Config::qwen2_5_vl_3b();
    cfg.text.num_hidden_layers = text_layers;
    cfg.vision.depth = depth;
    cfg.vision.fullatt_block_indexes.retain(|&i| i < depth);

    if let Some(i) = args.iter().position(|a| a == "--load-test") {
        load_test(&cfg, kind, std::path::Path::new(&args[i + 1]));
        return;
    }

    let t0 = Instant::now();
    let model = Qwen25VL::random(&cfg, kind, device).unwrap();
    let init_s = t0.elapsed().as_secs_f64();
    let weights_mb = status_kb("VmRSS:") as f64 / 1024.0;

    let proc_ = ImageProcessor::default();
    let t0 = Instant::now();
    let processed: Vec<_> = (0..views).map(|v| proc_.preprocess(&frame(640, 360, v as u32)).unwrap()).collect();
    let prep_ms = t0.elapsed().as_secs_f64() * 1e3 / views as f64;
    let grids: Vec<[i64; 3]> = processed.iter().map(|p| p.grid_thw).collect();
    let image_tokens: Vec<i64> = grids.iter().map(|g| g[0] * g[1] * g[2] / 4).collect();
    // A prompt of the reference's shape: system prompt, images, a ~20-token instruction.
    let mut ids: Vec<i64> = vec![151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198];
    for &n in &image_tokens {
        ids.push(cfg.vision_start_token_id);
        ids.extend(std::iter::repeat_n(cfg.image_token_id, n as usize));
        ids.push(cfg.vision_end_token_id);
    }
    ids.extend((0..20).map(|i| 1000 + i));
    ids.extend([151645, 198, 151644, 77091, 198]);
    let position_ids = rope_index(&ids, cfg.image_token_id, &grids, 2).unwrap();
    let pixel_values = tch::Tensor::cat(&processed.iter().map(|p| &p.pixel_values).collect::<Vec<_>>(), 0);
    let sample = VlSample { input_ids: ids, pixel_values, image_grid_thw: grids.clone(), position_ids };
    let batch = collate(&[sample], 151643).unwrap().to_device(device);
    let _g = tch::no_grad_guard();

    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let time = |f: &dyn Fn()| -> (f64, f64, f64) {
        for _ in 0..warmup {
            f();
        }
        sync();
        reset_peak();
        let t = Instant::now();
        let c = cpu_seconds();
        for _ in 0..iters {
            f();
        }
        sync();
        let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
        (ms, (cpu_seconds() - c) / iters as f64, status_kb("VmHWM:") as f64 / 1024.0)
    };
    let (vis_ms, vis_cpu, vis_peak) = time(&|| {
        let _ = model.image_embeds(&batch.pixel_values, &batch.image_grid_thw, false).unwrap();
    });
    let (full_ms, full_cpu, full_peak) = time(&|| {
        let _ = model.forward(&batch, false).unwrap();
    });
    println!(
        "views={views} frame=640x360 grid={:?} patches={} seq_len={} dtype={kind:?} device={device:?} \
         vision_depth={depth} text_layers={text_layers} threads={}",
        grids[0],
        batch.pixel_values.size()[0],
        batch.input_ids.size()[1],
        tch::get_num_threads()
    );
    println!("init_s={init_s:.1} rss_after_init_mb={weights_mb:.0} preprocess_ms_per_view={prep_ms:.1}");
    println!("vision_ms={vis_ms:.1} vision_cpu_s={vis_cpu:.1} vision_peak_rss_mb={vis_peak:.0}");
    println!("full_ms={full_ms:.1} full_cpu_s={full_cpu:.1} full_peak_rss_mb={full_peak:.0}");
}

fn load_test(cfg: &Config, kind: Kind, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    // Written once; run again to load in a fresh process.
    if !dir.join("model.safetensors").exists() {
        let model = Qwen25VL::random(cfg, kind, Device::Cpu).unwrap();
        tch::Tensor::write_safetensors(&model.named_tensors(), dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), config_json(cfg).to_string()).unwrap();
    }
    let file_mb = std::fs::metadata(dir.join("model.safetensors")).unwrap().len() as f64 / 1048576.0;
    let before = status_kb("VmRSS:") as f64 / 1024.0;
    reset_peak();
    let t0 = Instant::now();
    let model = Qwen25VL::load(dir, kind, Device::Cpu).unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    println!(
        "load_test dtype={kind:?} vision_depth={} text_layers={} file_mb={file_mb:.0} load_s={load_s:.1} \
         rss_before_mb={before:.0} peak_rss_mb={:.0} rss_after_mb={:.0} rss_anon_after_mb={:.0} tensors={}",
        cfg.vision.depth,
        cfg.text.num_hidden_layers,
        status_kb("VmHWM:") as f64 / 1024.0,
        status_kb("VmRSS:") as f64 / 1024.0,
        status_kb("RssAnon:") as f64 / 1024.0,
        model.named_tensors().len()
    );
}
