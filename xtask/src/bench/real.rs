//! `cargo xtask bench --size real`: single layers at Emu2's true dimensions,
//! timed through the library's own model code on every selected backend,
//! and the whole-model estimates built from them.
//!
//! The dimensions come from the upstream configs under
//! `shared/reference/` (found above the workspace, or at
//! `EMU_REFERENCE_DIR`): Emu2-Chat's `config.json` for the LLaMA-33B decoder
//! and the EVA-CLIP-E encoder, Emu2-Gen's `unet/config.json` for the UNet.
//! Each layer is written with random weights as a one-layer model folder in
//! its upstream layout, loaded, timed, and dropped before the next, so one
//! layer is resident at a time (the largest, a LLaMA-33B layer, is 2.1 GB in
//! f32; with its LM head about 3 GB).
//!
//! `--component llm,vision,unet` picks the layers (ops and vae have none
//! here). Layers and what they stand for:
//! * `LLaMA layer prefill`: a one-layer LLaMA (real widths, a 256-token
//!   vocabulary so the head is negligible) prefilling 128 prompt embeddings.
//! * `LLaMA layer decode`: the same layer decoding one token at a time after
//!   a 512-token prompt (untimed).
//! * `LM head`: the `[1, hidden] x [vocab, hidden]^T` linear of one decode step.
//! * `EVA 1 block` / `EVA 0 blocks`: the encoder (patch embedding, position
//!   embedding, pooling) with one block and with none, on one 448 px image;
//!   their difference is one block.
//! * `UNet transformer`: one `Transformer2DModel` with one transformer layer
//!   at the UNet's highest-resolution attention level (batch 2 for CFG, 64
//!   context tokens).
//! * `UNet resnet`: one `ResnetBlock2D` at the first level, on the full
//!   latent (batch 2).
//!
//! Estimates: Emu2-Chat decode s/token = layers x layer decode + LM head;
//! EVA s/image = blocks x (one block - none) + none; Emu2-Gen s/step = the
//! UNet's every transformer layer and every convolution, each scaled from
//! the measured block of its kind by its FLOPs (the measured blocks are the
//! UNet's largest-activation ones, so smaller levels are assumed to run at
//! the same FLOP rate; norms, embeddings and resampling are counted by their
//! convolution FLOPs only).

use emu_backend_cpu::CpuBackend;
use emu_backend_cuda::CudaBackend;
use emu_backend_onnx::OnnxBackend;
use emu_backend_wgpu::WgpuBackend;
use emu_core::{Backend, Checkpoint, DType, HostTensor, Tensor};
use emu_decoder::{UNet2DConditionConfig, UNetResnetBlock, UNetTransformerBlock};
use emu_llm::{Llama, LlamaConfig, Logits};
use emu_vision::VisionEncoder;
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::models::{self, LlmSpec, Params, VisionSpec};
use super::run::{timed, Call};
use super::{Component, Options, Report, Res, Row};

const PREFILL: usize = 128;
pub const DECODE_CONTEXT: usize = 512;
/// LM head of the one-layer LLaMA: small, so the layer is what is timed.
const LAYER_VOCAB: usize = 256;
const UNET_BATCH: usize = 2;
const UNET_CONTEXT: usize = 64;

/// The real dimensions, from the upstream configs.
pub struct RealSpec {
    pub llm: LlmSpec,
    pub llm_layers: usize,
    pub llm_vocab: usize,
    pub eva: VisionSpec,
    pub eva_layers: usize,
    /// Emu2-Gen's UNet config (raw, for the topology, and typed, for loading).
    pub unet_json: Value,
    pub unet_path: PathBuf,
}

/// `shared/reference` above the workspace, or `EMU_REFERENCE_DIR`.
fn reference_dir() -> Res<PathBuf> {
    if let Some(d) = std::env::var_os("EMU_REFERENCE_DIR") {
        return Ok(PathBuf::from(d));
    }
    let root = crate::workspace_root();
    root.ancestors()
        .map(|a| a.join("shared/reference"))
        .find(|d| d.join("hf-configs").is_dir())
        .ok_or_else(|| {
            format!(
                "--size real reads Emu2's configs from shared/reference (none above {}); set EMU_REFERENCE_DIR",
                root.display()
            )
            .into()
        })
}

fn read_json(path: &Path) -> Res<Value> {
    Ok(serde_json::from_str(
        &std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    )?)
}

fn uint(v: &Value, key: &str, file: &str) -> Res<usize> {
    Ok(v[key].as_u64().ok_or_else(|| format!("{file}: no integer `{key}`"))? as usize)
}

impl RealSpec {
    pub fn load() -> Res<Self> {
        let dir = reference_dir()?;
        let chat_file = "hf-configs/Emu2-Chat.config.json";
        let chat = read_json(&dir.join(chat_file))?;
        let hidden = uint(&chat, "hidden_size", chat_file)?;
        let heads = uint(&chat, "num_attention_heads", chat_file)?;
        let llm = LlmSpec {
            hidden,
            layers: 1,
            heads,
            kv_heads: chat["num_key_value_heads"].as_u64().map_or(heads, |v| v as usize),
            intermediate: uint(&chat, "intermediate_size", chat_file)?,
            vocab: LAYER_VOCAB,
            visual_dim: uint(&chat, "d_model", chat_file)?,
            // Sizes the position table (max_position_embeddings): the
            // decode context plus room for the timed steps.
            prompt: DECODE_CONTEXT,
            new: 256,
            regress_prompt: 1,
            regress: 1,
        };
        let v = &chat["vision_config"];
        let width = uint(v, "width", chat_file)?;
        let eva = VisionSpec {
            image: uint(v, "image_size", chat_file)?,
            patch: uint(v, "patch_size", chat_file)?,
            width,
            layers: 1,
            head_width: uint(v, "head_width", chat_file)?,
            mlp: v["intermediate_size"]
                .as_u64()
                .map(|m| m as usize)
                .or_else(|| v["mlp_ratio"].as_f64().map(|r| (r * width as f64).round() as usize))
                .ok_or_else(|| format!("{chat_file}: no vision intermediate_size"))?,
            n_query: uint(v, "n_query", chat_file)?,
            batch: 1,
        };
        let unet_path = dir.join("emu2-conf/diffusion_config/unet/config.json");
        Ok(RealSpec {
            llm,
            llm_layers: uint(&chat, "num_hidden_layers", chat_file)?,
            llm_vocab: uint(&chat, "vocab_size", chat_file)?,
            eva_layers: uint(v, "layers", chat_file)?,
            eva,
            unet_json: read_json(&unet_path)?,
            unet_path,
        })
    }
}

fn call(
    key: &'static str,
    label: String,
    (ms, out): (Vec<f64>, Vec<f32>),
    work: f64,
    unit: &'static str,
    flops: Option<f64>,
) -> Call {
    Call {
        key,
        label,
        ms,
        work,
        unit,
        flops,
        out,
    }
}

fn upload<B: Backend>(be: &B, dims: &[usize], seed: u64, std: f32, dtype: DType) -> Res<Tensor<B>> {
    let n = dims.iter().product();
    Ok(Tensor::from_host(be, &HostTensor::from_f32(dims, models::inputs(seed, n, std))?)?.to_dtype(dtype)?)
}

/// The LLaMA layer (prefill and decode) and the LM head.
fn llm<B: Backend>(be: &B, s: &RealSpec, dir: &Path, o: &Options) -> Res<Vec<Call>> {
    let l = &s.llm;
    let cfg = LlamaConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir.join("model.safetensors"))?;
    let model = Llama::load(be, &emu_llm::lm_weights(&ckpt)?, &cfg, o.dtype)?;
    let prompt = upload(be, &[1, PREFILL, l.hidden], 2, 1.0, o.dtype)?;
    let t = o.timing;
    let prefill = timed(t, || {
        let mut cache = model.new_cache(1, PREFILL)?;
        let out = model.forward_embeds(&prompt, &mut cache, Logits::Last)?;
        Ok(out.logits.ok_or("no logits")?.to_host()?)
    })?;
    let context = upload(be, &[1, DECODE_CONTEXT, l.hidden], 3, 1.0, o.dtype)?;
    if t.warmup + t.iters > l.new {
        return Err(format!("--size real decodes at most {} steps (warmup + iters)", l.new).into());
    }
    let mut cache = model.new_cache(1, DECODE_CONTEXT + t.warmup + t.iters)?;
    model.forward_embeds(&context, &mut cache, Logits::Last)?;
    let mut step = 0u32;
    let decode = timed(t, || {
        step += 1;
        let x = model.embed(&[(step * 7919 + 13) % LAYER_VOCAB as u32], 1)?;
        let out = model.forward_embeds(&x, &mut cache, Logits::Last)?;
        Ok(out.logits.ok_or("no logits")?.to_host()?)
    })?;
    drop(model);
    let (h, v, i) = (l.hidden as f64, s.llm_vocab as f64, l.intermediate as f64);
    let kv = (l.kv_heads * (l.hidden / l.heads)) as f64;
    let layer_macs = 2.0 * h * h + 2.0 * h * kv + 3.0 * h * i;
    let head = {
        let x = upload(be, &[1, l.hidden], 4, 1.0, o.dtype)?.into_raw();
        let w = upload(be, &[s.llm_vocab, l.hidden], 5, 1.0 / (h as f32).sqrt(), o.dtype)?.into_raw();
        timed(t, || Ok(be.download(&be.linear(&x, &w, None)?)?))?
    };
    Ok(vec![
        call(
            "layer_prefill",
            format!(
                "LLaMA layer prefill {PREFILL} tok (h {}, mlp {})",
                l.hidden, l.intermediate
            ),
            prefill,
            PREFILL as f64,
            "tok",
            Some(2.0 * PREFILL as f64 * layer_macs),
        ),
        call(
            "layer_decode",
            format!("LLaMA layer decode 1 tok after {DECODE_CONTEXT}"),
            decode,
            1.0,
            "tok",
            Some(2.0 * layer_macs),
        ),
        call(
            "lm_head",
            format!("LM head [1,{}]x[{},{}]^T", l.hidden, s.llm_vocab, l.hidden),
            head,
            1.0,
            "tok",
            Some(2.0 * h * v),
        ),
    ])
}

/// EVA with one block and with none, on one image.
fn eva<B: Backend>(be: &B, s: &RealSpec, dirs: [&Path; 2], o: &Options) -> Res<Vec<Call>> {
    let e = &s.eva;
    let pixels = upload(be, &[1, 3, e.image, e.image], 1, 1.0, o.dtype)?;
    let tokens = (e.image / e.patch).pow(2) + 1;
    let mut calls = Vec::new();
    for (dir, key, blocks) in [(dirs[0], "eva_block", 1), (dirs[1], "eva_rest", 0)] {
        let enc = VisionEncoder::from_dir(be, dir, o.dtype)?;
        let r = timed(o.timing, || {
            Ok(enc.pool(&enc.encode(&pixels)?, e.n_query)?.to_host()?)
        })?;
        calls.push(call(
            key,
            format!("EVA {blocks} block(s) {}px, {tokens} tok, w {}", e.image, e.width),
            r,
            1.0,
            "img",
            None,
        ));
    }
    Ok(calls)
}

/// The UNet's topology, as far as the FLOP count needs it.
struct UnetShape {
    channels: Vec<usize>,
    cross: Vec<bool>,
    depth: Vec<usize>,
    layers: usize,
    cross_dim: usize,
    latent: usize,
}

impl UnetShape {
    fn from_json(u: &Value) -> Res<Self> {
        let f = "unet/config.json";
        let channels: Vec<usize> = u["block_out_channels"]
            .as_array()
            .ok_or_else(|| format!("{f}: no block_out_channels"))?
            .iter()
            .filter_map(|c| c.as_u64().map(|c| c as usize))
            .collect();
        let cross = u["down_block_types"]
            .as_array()
            .ok_or_else(|| format!("{f}: no down_block_types"))?
            .iter()
            .map(|t| t.as_str() == Some("CrossAttnDownBlock2D"))
            .collect();
        let depth = match &u["transformer_layers_per_block"] {
            Value::Array(a) => a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect(),
            Value::Number(n) => vec![n.as_u64().unwrap_or(1) as usize; channels.len()],
            _ => vec![1; channels.len()],
        };
        Ok(UnetShape {
            channels,
            cross,
            depth,
            layers: uint(u, "layers_per_block", f)?,
            cross_dim: uint(u, "cross_attention_dim", f)?,
            latent: uint(u, "sample_size", f)?,
        })
    }

    /// The level of the highest-resolution attention.
    fn attention_level(&self) -> Res<usize> {
        Ok(self
            .cross
            .iter()
            .position(|&c| c)
            .ok_or("the UNet config has no cross-attention level")?)
    }

    fn side(&self, level: usize) -> usize {
        self.latent >> level
    }

    /// Multiply-adds of one transformer layer at `c` channels over `n`
    /// tokens (self-attention, cross-attention to the context, GEGLU MLP),
    /// per image.
    fn transformer_layer_macs(&self, c: usize, n: usize) -> f64 {
        let (c, n, m, d) = (c as f64, n as f64, UNET_CONTEXT as f64, self.cross_dim as f64);
        18.0 * n * c * c + 2.0 * n * n * c + 2.0 * m * d * c + 2.0 * n * m * c
    }

    /// Multiply-adds of the projections around the layers of one Transformer2DModel.
    fn transformer_wrap_macs(&self, c: usize, n: usize) -> f64 {
        2.0 * (n * c * c) as f64
    }

    fn resnet_macs(cin: usize, cout: usize, side: usize) -> f64 {
        let hw = (side * side) as f64;
        let (ci, co) = (cin as f64, cout as f64);
        9.0 * hw * ci * co + 9.0 * hw * co * co + if cin != cout { hw * ci * co } else { 0.0 }
    }

    /// Per image: (transformer-layer MACs, wrapper-projection MACs, convolution MACs) of one UNet step.
    fn step_macs(&self) -> (f64, f64, f64) {
        let ch = &self.channels;
        let n = ch.len();
        let (mut t, mut wrap, mut conv) = (0.0, 0.0, 0.0);
        let attn = |level: usize, c: usize, t: &mut f64, wrap: &mut f64| {
            let tokens = self.side(level).pow(2);
            *t += self.depth[level] as f64 * self.transformer_layer_macs(c, tokens);
            *wrap += self.transformer_wrap_macs(c, tokens);
        };
        conv += 9.0 * (self.latent * self.latent * 4 * ch[0]) as f64; // conv_in
        let mut skips = vec![ch[0]];
        let mut cin = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            for _ in 0..self.layers {
                conv += Self::resnet_macs(cin, c, self.side(i));
                cin = c;
                if self.cross[i] {
                    attn(i, c, &mut t, &mut wrap);
                }
                skips.push(c);
            }
            if i + 1 < n {
                conv += 9.0 * (self.side(i + 1).pow(2) * c * c) as f64;
                skips.push(c);
            }
        }
        let last = n - 1;
        conv += 2.0 * Self::resnet_macs(ch[last], ch[last], self.side(last));
        attn(last, ch[last], &mut t, &mut wrap);
        let mut prev = ch[last];
        for i in (0..n).rev() {
            for _ in 0..=self.layers {
                let skip = skips.pop().unwrap_or(ch[i]);
                conv += Self::resnet_macs(prev + skip, ch[i], self.side(i));
                prev = ch[i];
                if self.cross[i] {
                    attn(i, ch[i], &mut t, &mut wrap);
                }
            }
            if i > 0 {
                conv += 9.0 * (self.side(i - 1).pow(2) * ch[i] * ch[i]) as f64;
            }
        }
        conv += 9.0 * (self.latent * self.latent * ch[0] * 4) as f64; // conv_out
        (t, wrap, conv)
    }
}

/// The UNet's transformer block (one layer) and resnet block.
fn unet<B: Backend>(be: &B, s: &RealSpec, dirs: [&Path; 2], o: &Options) -> Res<Vec<Call>> {
    let shape = UnetShape::from_json(&s.unet_json)?;
    let cfg = UNet2DConditionConfig::from_file(&s.unet_path)?;
    let level = shape.attention_level()?;
    let (c, side) = (shape.channels[level], shape.side(level));
    let mut calls = Vec::new();
    {
        let ckpt = Checkpoint::open_dir(dirs[0], None)?;
        let block = UNetTransformerBlock::load(be, &ckpt.weights(), &cfg, level, 1, o.dtype)?;
        let x = upload(be, &[UNET_BATCH, c, side, side], 6, 1.0, o.dtype)?;
        let ctx = upload(be, &[UNET_BATCH, UNET_CONTEXT, shape.cross_dim], 7, 1.0, o.dtype)?;
        let r = timed(o.timing, || Ok(block.forward(&x, &ctx)?.to_host()?))?;
        let n = side * side;
        let macs = shape.transformer_layer_macs(c, n) + shape.transformer_wrap_macs(c, n);
        calls.push(call(
            "unet_transformer",
            format!("UNet transformer {c}ch {side}x{side} x{UNET_BATCH}, 1 layer"),
            r,
            1.0,
            "call",
            Some(2.0 * UNET_BATCH as f64 * macs),
        ));
    }
    {
        let c0 = shape.channels[0];
        let side0 = shape.side(0);
        let ckpt = Checkpoint::open_dir(dirs[1], None)?;
        let block = UNetResnetBlock::load(be, &ckpt.weights(), &cfg, c0, c0, o.dtype)?;
        let temb = UNetResnetBlock::<B>::time_embed_dim(&cfg)?;
        let x = upload(be, &[UNET_BATCH, c0, side0, side0], 8, 1.0, o.dtype)?;
        let t = upload(be, &[UNET_BATCH, temb], 9, 1.0, o.dtype)?;
        let r = timed(o.timing, || Ok(block.forward(&x, &t)?.to_host()?))?;
        calls.push(call(
            "unet_resnet",
            format!("UNet resnet {c0}ch {side0}x{side0} x{UNET_BATCH}"),
            r,
            1.0,
            "call",
            Some(2.0 * UNET_BATCH as f64 * UnetShape::resnet_macs(c0, c0, side0)),
        ));
    }
    Ok(calls)
}

/// Writes every layer's model folder under `root`; returns the folders
/// (llm, eva one block, eva none, unet transformer, unet resnet).
fn write_layers(s: &RealSpec, root: &Path, components: &[Component]) -> Res<[PathBuf; 5]> {
    let dirs = ["llm-layer", "eva-1", "eva-0", "unet-transformer", "unet-resnet"].map(|d| root.join(d));
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    if components.contains(&Component::Llm) {
        eprintln!(
            "bench: writing a random LLaMA layer ({} MB in f32) ...",
            (4 * super::floor::decode_weight_elems(&s.llm)) >> 20
        );
        models::write_llm(&s.llm, &dirs[0])?;
    }
    if components.contains(&Component::Vision) {
        models::write_vision(&s.eva, &dirs[1])?;
        models::write_vision(
            &VisionSpec {
                layers: 0,
                ..s.eva.clone()
            },
            &dirs[2],
        )?;
    }
    if components.contains(&Component::Unet) {
        let shape = UnetShape::from_json(&s.unet_json)?;
        let level = shape.attention_level()?;
        let mut w = Params::new(23);
        w.transformer("", shape.channels[level], shape.cross_dim, 1);
        write_unprefixed(w, &dirs[3])?;
        let temb = UNetResnetBlock::<CpuBackend>::time_embed_dim(&UNet2DConditionConfig::from_file(&s.unet_path)?)?;
        let mut w = Params::new(29);
        w.resnet("", shape.channels[0], shape.channels[0], Some(temb));
        write_unprefixed(w, &dirs[4])?;
    }
    Ok(dirs)
}

/// Params written with an empty prefix have keys starting with `.`.
fn write_unprefixed(w: Params, dir: &Path) -> Res<()> {
    let mut t = models::Tensors::default();
    for (k, (dims, v)) in w.out.into_inner() {
        t.insert(k.trim_start_matches('.'), &dims, v);
    }
    t.write(&dir.join("diffusion_pytorch_model.safetensors"))
}

fn bench<B: Backend>(be: &B, label: &str, s: &RealSpec, dirs: &[PathBuf; 5], o: &Options, report: &mut Report) {
    if !be.supports(o.dtype) {
        report.notes.push(format!("{label}: skipped: no {} support", o.dtype));
        return;
    }
    let parts: [(Component, &str); 3] = [
        (Component::Llm, "llm"),
        (Component::Vision, "eva"),
        (Component::Unet, "unet"),
    ];
    for (c, name) in parts {
        if !o.components.contains(&c) {
            continue;
        }
        eprintln!("bench: {label} real {name} ...");
        let r = match c {
            Component::Llm => llm(be, s, &dirs[0], o),
            Component::Vision => eva(be, s, [&dirs[1], &dirs[2]], o),
            _ => unet(be, s, [&dirs[3], &dirs[4]], o),
        };
        match r {
            Ok(calls) => report.rows.extend(calls.into_iter().map(|call| Row {
                component: c,
                backend: label.to_string(),
                dtype: o.dtype,
                call,
                rel_err: None,
            })),
            Err(e) => report.notes.push(format!("{label} real {name}: failed: {e}")),
        }
    }
}

/// Runs every layer on every selected backend; rows are checked against the CPU backend's.
pub fn run(o: &Options, root: &Path) -> Res<(Report, RealSpec)> {
    let s = RealSpec::load()?;
    let dirs = write_layers(&s, root, &o.components)?;
    let mut report = Report::default();
    let threads = o
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    report.peak = Some(super::peak::fma_peak(threads, 10_000_000));
    // The whole decoder's floor: what one Emu2-Chat decode step reads.
    let bw = super::floor::read_bandwidth(256 << 20, threads, 5);
    let chat = LlmSpec {
        layers: s.llm_layers,
        vocab: s.llm_vocab,
        new: 1,
        ..s.llm.clone()
    };
    let base = super::floor::decode_floor(&chat, o.dtype, bw);
    report.decode_floor = Some(base);
    report
        .floors
        .push(("f32".into(), super::floor::decode_floor(&chat, DType::F32, bw)));
    report
        .floors
        .push(("f16".into(), super::floor::decode_floor(&chat, DType::F16, bw)));
    for &q in &o.quant {
        report
            .floors
            .push((q.to_string(), super::floor::quant_decode_floor(&chat, o.dtype, q, base)));
    }
    bench(&CpuBackend::new(), "cpu", &s, &dirs, o, &mut report);
    for name in o.backends.iter().filter(|b| *b != "cpu") {
        match name.as_str() {
            "wgpu" => match WgpuBackend::new() {
                Ok(be) => bench(&be, "wgpu", &s, &dirs, o, &mut report),
                Err(e) => report.notes.push(format!("wgpu: skipped: {e}")),
            },
            "onnx" => match OnnxBackend::with_threads(o.threads.unwrap_or(0)) {
                Ok(be) => bench(&be, "onnx", &s, &dirs, o, &mut report),
                Err(e) => report.notes.push(format!("onnx: skipped: {e}")),
            },
            "cuda" => match CudaBackend::new() {
                Ok(be) => bench(&be, "cuda", &s, &dirs, o, &mut report),
                Err(e) => report.notes.push(format!("cuda: skipped: {e}")),
            },
            other => return Err(format!("backend `{other}` listed but not wired").into()),
        }
    }
    if o.torch.is_some() {
        report
            .notes
            .push("torch: --size real has no PyTorch side yet; only the Rust backends ran".into());
    }
    let reference: Vec<(&'static str, Vec<f32>)> = report
        .rows
        .iter()
        .filter(|r| r.backend == "cpu")
        .map(|r| (r.call.key, r.call.out.clone()))
        .collect();
    for row in &mut report.rows {
        row.rel_err = reference
            .iter()
            .find(|(k, _)| *k == row.call.key)
            .map(|(_, cpu)| super::rel_err(&row.call.out, cpu));
    }
    Ok((report, s))
}

/// The whole-model estimates per backend.
pub fn estimate_lines(report: &Report, s: &RealSpec) -> Res<Vec<String>> {
    let shape = UnetShape::from_json(&s.unet_json)?;
    let level = shape.attention_level()?;
    let (c, side) = (shape.channels[level], shape.side(level));
    let (t_macs, wrap_macs, conv_macs) = shape.step_macs();
    let measured_t = shape.transformer_layer_macs(c, side * side) + shape.transformer_wrap_macs(c, side * side);
    let measured_r = UnetShape::resnet_macs(shape.channels[0], shape.channels[0], shape.side(0));
    let mut backends: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !backends.contains(&r.backend.as_str()) {
            backends.push(&r.backend);
        }
    }
    let mut lines = vec![format!(
        "whole-model estimates ({} threads; layer time x layer count + the rest; see xtask/src/bench/real.rs):",
        report.peak.as_ref().map_or(0, |p| p.threads)
    )];
    for b in backends {
        let ms = |key: &str| {
            report
                .rows
                .iter()
                .find(|r| r.backend == b && r.call.key == key)
                .map(|r| r.median_ms())
        };
        let mut parts = Vec::new();
        if let (Some(layer), Some(head)) = (ms("layer_decode"), ms("lm_head")) {
            let tok = s.llm_layers as f64 * layer + head;
            parts.push(format!(
                "Emu2-Chat decode {:.2} s/token ({} x {layer:.0} ms + head {head:.0} ms)",
                tok / 1e3,
                s.llm_layers
            ));
        }
        if let Some(prefill) = ms("layer_prefill") {
            parts.push(format!(
                "prefill {PREFILL} tok {:.1} s",
                (s.llm_layers as f64 * prefill + ms("lm_head").unwrap_or(0.0)) / 1e3
            ));
        }
        if let (Some(one), Some(none)) = (ms("eva_block"), ms("eva_rest")) {
            let block = (one - none).max(0.0);
            parts.push(format!(
                "EVA encode {:.1} s/image ({} x {block:.0} ms + {none:.0} ms)",
                (s.eva_layers as f64 * block + none) / 1e3,
                s.eva_layers
            ));
        }
        if let (Some(t), Some(r)) = (ms("unet_transformer"), ms("unet_resnet")) {
            let batch = UNET_BATCH as f64;
            let attn_ms = t * (t_macs + wrap_macs) * batch / (measured_t * batch);
            let conv_ms = r * conv_macs / measured_r;
            parts.push(format!(
                "Emu2-Gen UNet {:.1} s/step (CFG batch {UNET_BATCH}: transformers {:.1} s + convolutions {:.1} s, FLOP-scaled)",
                (attn_ms + conv_ms) / 1e3,
                attn_ms / 1e3,
                conv_ms / 1e3
            ));
        }
        lines.push(format!("  {b:<6} {}", parts.join("; ")));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The UNet MAC count of a one-level, one-resnet toy matches a hand count.
    #[test]
    fn unet_macs_count_every_block() {
        let s = UnetShape {
            channels: vec![4, 8],
            cross: vec![false, true],
            depth: vec![1, 1],
            layers: 1,
            cross_dim: 6,
            latent: 4,
        };
        let (t, wrap, conv) = s.step_macs();
        // Attention at level 1 (2x2 = 4 tokens, 8 ch): down 1, mid 1, up 2.
        assert_eq!(t, 4.0 * s.transformer_layer_macs(8, 4));
        assert_eq!(wrap, 4.0 * s.transformer_wrap_macs(8, 4));
        let r = UnetShape::resnet_macs;
        // Skips, in order: conv_in 4, level-0 resnet 4, downsampler 4, level-1 resnet 8.
        let expected = 9.0 * 16.0 * 16.0 // conv_in
            + r(4, 4, 4) + 9.0 * 4.0 * 16.0 // level 0 resnet, downsampler to 2x2
            + r(4, 8, 2) // level 1 resnet
            + 2.0 * r(8, 8, 2) // mid
            + r(8 + 8, 8, 2) + r(8 + 4, 8, 2) + 9.0 * 16.0 * 64.0 // up level 1, upsampler to 4x4
            + r(8 + 4, 4, 4) + r(4 + 4, 4, 4) // up level 0
            + 9.0 * 16.0 * 16.0; // conv_out
        assert_eq!(conv, expected);
    }
}
