//! Timed calls of every component on one backend.
//!
//! Each call is run `warmup` times untimed, then `iters` times timed; every
//! timed run ends with a `download` of its output, which both finishes any
//! queued or lazily built work (wgpu, ONNX graphs) inside the timed region
//! and gives the values that are checked against the CPU backend.

use emu_core::backend::{AttnMask, Conv2dParams};
use emu_core::QuantType;
use emu_core::{Backend, Checkpoint, DType, HostTensor, Tensor};
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig, TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use emu_llm::{Llama, LlamaConfig, LlmQuant, Logits};
use emu_vision::VisionEncoder;
use std::path::Path;
use std::time::Instant;

use super::models::OpsSpec;
use super::{Component, Res, Timing, Workdir};

/// One measured call.
#[derive(Debug, Clone)]
pub struct Call {
    /// Stable name, shared with the PyTorch scripts' outputs.
    pub key: &'static str,
    /// What the call does, for the table.
    pub label: String,
    /// Milliseconds of each timed run.
    pub ms: Vec<f64>,
    /// Work per call in `unit`s (tokens, images, steps), for throughput.
    pub work: f64,
    pub unit: &'static str,
    /// Floating-point operations per call, where they are exact (single ops).
    pub flops: Option<f64>,
    /// The output of the last run.
    pub out: Vec<f32>,
}

/// Runs `f` as [`Timing`] says; returns the times and the last output.
/// Times `f`, which returns its result on the host (the download is the
/// asynchronous backends' sync point, so it stays inside the clock); the
/// conversion to f32 for the comparison is outside it (the PyTorch scripts
/// time the op alone).
pub(super) fn timed(t: Timing, mut f: impl FnMut() -> Res<HostTensor>) -> Res<(Vec<f64>, Vec<f32>)> {
    for _ in 0..t.warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(t.iters);
    let mut out = None;
    for _ in 0..t.iters {
        let t0 = Instant::now();
        out = Some(f()?);
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok((ms, out.map(|o| o.to_f32_vec()).transpose()?.unwrap_or_default()))
}

/// The benchmark inputs of a component, uploaded in `dtype`.
struct Inputs<'a, B: Backend> {
    be: &'a B,
    ckpt: Checkpoint,
    dtype: DType,
}

impl<B: Backend> Inputs<'_, B> {
    fn host(&self, key: &str) -> Res<HostTensor> {
        Ok(self.ckpt.get(key)?)
    }

    fn tensor(&self, key: &str) -> Res<Tensor<B>> {
        Ok(Tensor::from_host(self.be, &self.host(key)?)?.to_dtype(self.dtype)?)
    }
}

/// Runs every call of `component` on `be` in `dtype`.
pub fn component<B: Backend>(be: &B, component: Component, work: &Workdir, dtype: DType, t: Timing) -> Res<Vec<Call>> {
    let inputs = Inputs {
        be,
        ckpt: Checkpoint::open(work.inputs(component))?,
        dtype,
    };
    let model = work.model(component);
    match component {
        Component::Ops => ops(&inputs, &work.spec.ops, t),
        Component::Vision => vision(&inputs, &model, t),
        Component::Llm => llm(&inputs, &model, t, None),
        Component::Unet => unet(&inputs, &model, t),
        Component::Vae => vae(&inputs, &model, t),
    }
}

/// The single-op cases (the op inputs are `a`, `b`, `c` in the inputs file).
pub fn ops_cases(s: &OpsSpec) -> Vec<(&'static str, String, Vec<Vec<usize>>, f64)> {
    let (n, t, w) = (s.n, s.tokens, s.width);
    let (h, d) = (s.heads, s.head_dim);
    let (c, side) = (s.conv_channels, s.conv_side);
    let f = |x: usize| x as f64;
    vec![
        (
            "matmul",
            format!("matmul {n}x{n}x{n}"),
            vec![vec![n, n], vec![n, n]],
            2.0 * f(n).powi(3),
        ),
        (
            "linear",
            format!("linear [{t},{w}]x[{w},{w}]^T"),
            vec![vec![t, w], vec![w, w]],
            2.0 * f(t) * f(w) * f(w),
        ),
        (
            "linear_decode",
            format!("linear [1,{w}]x[{w},{w}]^T"),
            vec![vec![1, w], vec![w, w]],
            2.0 * f(w) * f(w),
        ),
        (
            "attention",
            format!("attention [1,{h},{t},{d}] causal"),
            vec![vec![1, h, t, d]; 3],
            4.0 * f(h) * f(t) * f(t) * f(d),
        ),
        (
            "conv2d",
            format!("conv2d [1,{c},{side},{side}]*[{c},{c},3,3]"),
            vec![vec![1, c, side, side], vec![c, c, 3, 3]],
            2.0 * f(c) * f(c) * 9.0 * f(side) * f(side),
        ),
        ("softmax", format!("softmax [{},{w}]", 2 * w), vec![vec![2 * w, w]], 0.0),
        (
            "layer_norm",
            format!("layer_norm [{},{w}]", 2 * w),
            vec![vec![2 * w, w]],
            0.0,
        ),
    ]
}

fn ops<B: Backend>(inp: &Inputs<B>, s: &OpsSpec, t: Timing) -> Res<Vec<Call>> {
    let be = inp.be;
    let mut calls = Vec::new();
    for (key, label, dims, flops) in ops_cases(s) {
        let xs: Vec<B::Tensor> = (0..dims.len())
            .map(|i| Ok(inp.tensor(&format!("{key}.{i}"))?.into_raw()))
            .collect::<Res<_>>()?;
        let d = s.head_dim as f64;
        let (ms, out) = timed(t, || {
            let y = match key {
                "matmul" => be.matmul(&xs[0], &xs[1])?,
                "linear" | "linear_decode" => be.linear(&xs[0], &xs[1], None)?,
                "attention" => be.attention(&xs[0], &xs[1], &xs[2], &AttnMask::causal(0), 1.0 / d.sqrt())?,
                "conv2d" => be.conv2d(&xs[0], &xs[1], None, Conv2dParams::new(1, 1))?,
                "softmax" => be.softmax_last_dim(&xs[0])?,
                "layer_norm" => be.layer_norm(&xs[0], None, None, 1e-5)?,
                other => return Err(format!("no op case `{other}`").into()),
            };
            Ok(be.download(&y)?)
        })?;
        calls.push(Call {
            key,
            label,
            ms,
            work: 1.0,
            unit: "calls",
            flops: (flops > 0.0).then_some(flops),
            out,
        });
    }
    Ok(calls)
}

fn vision<B: Backend>(inp: &Inputs<B>, dir: &Path, t: Timing) -> Res<Vec<Call>> {
    let enc = VisionEncoder::from_dir(inp.be, dir, inp.dtype)?;
    let x = inp.tensor("pixels")?;
    let n_query = enc.config().vision.n_query;
    let (ms, out) = timed(t, || Ok(enc.pool(&enc.encode(&x)?, n_query)?.to_host()?))?;
    let d = x.dims();
    Ok(vec![Call {
        key: "encode",
        label: format!("EVA encode+pool {}x{}px -> {n_query} tokens", d[0], d[2]),
        ms,
        work: d[0] as f64,
        unit: "img",
        flops: None,
        out,
    }])
}

fn tokens_of(host: &HostTensor) -> Res<Vec<u32>> {
    Ok(host.to_f32_vec()?.into_iter().map(|v| v as u32).collect())
}

/// The LLM calls with its attention and MLP linears quantized to `q` at load time.
pub fn llm_quantized<B: Backend>(be: &B, work: &Workdir, dtype: DType, t: Timing, q: QuantType) -> Res<Vec<Call>> {
    let inputs = Inputs {
        be,
        ckpt: Checkpoint::open(work.inputs(Component::Llm))?,
        dtype,
    };
    llm(&inputs, &work.model(Component::Llm), t, Some(LlmQuant::new(q)))
}

fn llm<B: Backend>(inp: &Inputs<B>, dir: &Path, t: Timing, quant: Option<LlmQuant>) -> Res<Vec<Call>> {
    let cfg = LlamaConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir.join("model.safetensors"))?;
    let model = Llama::load_quantized(inp.be, &emu_llm::lm_weights(&ckpt)?, &cfg, inp.dtype, quant.as_ref())?;
    let prompt = inp.tensor("prompt")?;
    let p = prompt.dim(1)?;
    // Decode feeds a fixed token sequence rather than its own argmax, so
    // every backend (and PyTorch) computes exactly the same steps.
    let tokens = tokens_of(&inp.host("decode_tokens")?)?;
    let mut prefill_ms = Vec::new();
    let mut decode_ms = Vec::new();
    let (mut prefill_out, mut decode_out) = (Vec::new(), Vec::new());
    for i in 0..t.warmup + t.iters {
        let mut cache = model.new_cache(1, p + tokens.len())?;
        let t0 = Instant::now();
        let o = model.forward_embeds(&prompt, &mut cache, Logits::Last)?;
        prefill_out = o.logits.ok_or("no logits")?.to_f32_vec()?;
        let t1 = Instant::now();
        for &tok in &tokens {
            let o = model.forward_embeds(&model.embed(&[tok], 1)?, &mut cache, Logits::Last)?;
            // A generation loop reads every step's logits back to choose the next token.
            decode_out = o.logits.ok_or("no logits")?.to_f32_vec()?;
        }
        let t2 = Instant::now();
        if i >= t.warmup {
            prefill_ms.push((t1 - t0).as_secs_f64() * 1e3);
            decode_ms.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let rprompt = inp.tensor("regress_prompt")?;
    let up = inp.tensor("project_up")?;
    let down = inp.tensor("project_down")?;
    let n = inp.host("regress_n")?.to_f32_vec()?.first().copied().unwrap_or(1.0) as usize;
    let (rms, rout) = timed(t, || {
        Ok(emu_llm::regress_visual(&model, &rprompt, &[], &up, &down, n)?.to_host()?)
    })?;
    let call = |key, label, ms, work, unit, out| Call {
        key,
        label,
        ms,
        work,
        unit,
        flops: None,
        out,
    };
    Ok(vec![
        call(
            "prefill",
            format!("LLaMA prefill {p} tokens"),
            prefill_ms,
            p as f64,
            "tok",
            prefill_out,
        ),
        call(
            "decode",
            format!("LLaMA decode {} tokens after {p}", tokens.len()),
            decode_ms,
            tokens.len() as f64,
            "tok",
            decode_out,
        ),
        call(
            "regress",
            format!("regress {n} embeddings after {}", rprompt.dim(1)?),
            rms,
            n as f64,
            "emb",
            rout,
        ),
    ])
}

fn unet<B: Backend>(inp: &Inputs<B>, dir: &Path, t: Timing) -> Res<Vec<Call>> {
    let cfg = UNet2DConditionConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open_dir(dir, None)?;
    let unet = UNet2DConditionModel::load(inp.be, &ckpt.weights(), &cfg, inp.dtype)?;
    let sample = inp.tensor("sample")?;
    let context = inp.tensor("context")?;
    let ids = inp.host("time_ids")?.to_f32_vec()?;
    let cond = TextTimeCond {
        text_embeds: inp.tensor("text_embeds")?,
        time_ids: ids
            .chunks_exact(6)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
            .collect(),
    };
    let timestep = inp.host("timestep")?.to_f32_vec()?.first().copied().unwrap_or(500.0);
    let (ms, out) = timed(t, || {
        Ok(unet.forward(&sample, timestep, &context, Some(&cond))?.to_host()?)
    })?;
    let d = sample.dims();
    Ok(vec![Call {
        key: "step",
        label: format!(
            "UNet step batch {} (CFG), {}x{} latents, {} tokens",
            d[0],
            d[2],
            d[3],
            context.dim(1)?
        ),
        ms,
        work: 1.0,
        unit: "step",
        flops: None,
        out,
    }])
}

fn vae<B: Backend>(inp: &Inputs<B>, dir: &Path, t: Timing) -> Res<Vec<Call>> {
    let cfg = AutoencoderKLConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::open_dir(dir, None)?;
    let vae = AutoencoderKL::load(inp.be, &ckpt.weights(), &cfg, inp.dtype)?;
    let z = inp.tensor("z")?;
    let (ms, out) = timed(t, || Ok(vae.decode(&z)?.to_host()?))?;
    let f = cfg.downscale_factor();
    let d = z.dims();
    Ok(vec![Call {
        key: "decode",
        label: format!("VAE decode {}x{} latent -> {}x{}px", d[2], d[3], d[2] * f, d[3] * f),
        ms,
        work: d[0] as f64,
        unit: "img",
        flops: None,
        out,
    }])
}
