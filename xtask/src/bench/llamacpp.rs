//! The llama.cpp side of the LLM rows (`--llamacpp PYTHON`): the bench's
//! random LLaMA written as a GGUF file llama.cpp loads, and
//! `tools/reference/bench_llamacpp.py`, which times it through
//! llama-cpp-python on the same inputs and thread count.
//!
//! The GGUF holds exactly the weights the Rust backends load, in llama.cpp's
//! names and layout:
//!
//! * architecture `llama` with its hyper-parameter keys, read from the
//!   model's `config.json`;
//! * a dummy vocabulary of the model's size (llama.cpp sizes the embedding
//!   and output tensors from it; the bench feeds token ids and embeddings,
//!   so no text is ever tokenized): `<unk>`, `<s>`, `</s>`, the 256 byte
//!   tokens when the vocabulary has room, then placeholders;
//! * the rows of every `q_proj`/`k_proj` permuted per head from the
//!   Hugging Face rope layout (rotating the halves `i` and `i + d/2`) to the
//!   one llama.cpp's `llama` architecture rotates (adjacent pairs `2i`,
//!   `2i + 1`), as llama.cpp's own converter does; without it the logits
//!   are those of another model;
//! * norms in f32 (ggml multiplies activations only by f32 vectors), the
//!   attention and MLP linears in the format under test (quantized with
//!   emu-core's GGUF-identical Q8_0/Q4_K, with the same Q8_0 fallback for
//!   rows Q4_K cannot split as `--quant` uses), the embedding and the LM
//!   head in the run's float format, as `--quant` keeps them.

use emu_core::{Checkpoint, DType, HostTensor, QuantTensor, QuantType};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Options, Res, Workdir};

/// A weight format llama.cpp is timed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Float(DType),
    Quant(QuantType),
}

impl Format {
    pub fn label(self) -> String {
        match self {
            Format::Float(d) => d.to_string(),
            Format::Quant(q) => q.to_string(),
        }
    }

    /// ggml's type id.
    fn ggml(self) -> Res<u32> {
        Ok(match self {
            Format::Float(DType::F32) => 0,
            Format::Float(DType::F16) => 1,
            Format::Float(DType::BF16) => 30,
            Format::Float(d) => return Err(format!("no ggml type for {d}").into()),
            Format::Quant(q) => q.ggml_type(),
        })
    }

    fn size(self, name: &str, dims: &[usize]) -> Res<usize> {
        Ok(match self {
            Format::Float(d) => dims.iter().product::<usize>() * d.size_in_bytes(),
            Format::Quant(q) => emu_core::quant::quantized_size(name, q, dims)?,
        })
    }

    fn encode(self, name: &str, dims: &[usize], v: Vec<f32>) -> Res<Vec<u8>> {
        let host = HostTensor::from_f32(dims, v)?;
        Ok(match self {
            Format::Float(DType::F32) => host.into_bytes(),
            Format::Float(d) => host.to_dtype(d)?.into_bytes(),
            Format::Quant(q) => QuantTensor::quantize(name, &host, q)?.bytes().to_vec(),
        })
    }
}

/// The formats a run times: llama.cpp's counterparts of the run's dtype
/// (f32 for f32; f16, its usual 16-bit format, and bf16 for bf16), then
/// each `--quant` format.
pub fn formats(o: &Options) -> Vec<Format> {
    let mut v = match o.dtype {
        DType::F32 => vec![Format::Float(DType::F32)],
        _ => vec![Format::Float(DType::F16), Format::Float(DType::BF16)],
    };
    v.extend(o.quant.iter().map(|&q| Format::Quant(q)));
    v
}

/// The float format of everything that is not a quantized linear.
fn rest_format(format: Format, run: DType) -> Format {
    match format {
        Format::Float(_) => format,
        Format::Quant(_) if run == DType::F32 => Format::Float(DType::F32),
        Format::Quant(_) => Format::Float(DType::F16),
    }
}

/// KV-cache type matching the run: f32 where the weights' floats are f32.
pub fn kv_type(format: Format, run: DType) -> &'static str {
    match rest_format(format, run) {
        Format::Float(DType::F32) => "f32",
        _ => "f16",
    }
}

/// One GGUF metadata value.
enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend((s.len() as u64).to_le_bytes());
    h.extend(s.as_bytes());
}

impl Meta {
    fn put(&self, h: &mut Vec<u8>) {
        // GGUF value types: 4 u32, 5 i32, 6 f32, 8 string, 9 array.
        let array = |h: &mut Vec<u8>, elem: u32, n: usize| {
            h.extend(9u32.to_le_bytes());
            h.extend(elem.to_le_bytes());
            h.extend((n as u64).to_le_bytes());
        };
        match self {
            Meta::U32(v) => {
                h.extend(4u32.to_le_bytes());
                h.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                h.extend(6u32.to_le_bytes());
                h.extend(v.to_le_bytes());
            }
            Meta::Str(s) => {
                h.extend(8u32.to_le_bytes());
                put_str(h, s);
            }
            Meta::Strs(v) => {
                array(h, 8, v.len());
                v.iter().for_each(|s| put_str(h, s));
            }
            Meta::F32s(v) => {
                array(h, 6, v.len());
                v.iter().for_each(|x| h.extend(x.to_le_bytes()));
            }
            Meta::I32s(v) => {
                array(h, 5, v.len());
                v.iter().for_each(|x| h.extend(x.to_le_bytes()));
            }
        }
    }
}

/// The dummy vocabulary: (tokens, scores, token types).
fn dummy_vocab(n: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    // llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte.
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    if n >= 3 + 256 {
        tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
    }
    let start = tokens.len();
    tokens.extend((start..n).map(|i| format!("\u{2581}t{i}")));
    types.resize(tokens.len(), 1);
    tokens.truncate(n);
    types.truncate(n);
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    (tokens, scores, types)
}

/// Rows of a `[heads * d, in]` projection reordered per head from the
/// rotate-half rope layout to the adjacent-pair one: new row `2j + s` of a
/// head is old row `s * d/2 + j`.
fn permute_rope_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = w.len() / cols / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..d / 2 {
            for s in 0..2 {
                let (new, old) = (h * d + 2 * j + s, h * d + s * (d / 2) + j);
                out[new * cols..(new + 1) * cols].copy_from_slice(&w[old * cols..(old + 1) * cols]);
            }
        }
    }
    out
}

/// One tensor of the GGUF: its llama.cpp name, its source key, shape
/// (outermost first), format, and the heads to permute for rope.
struct Plan {
    name: String,
    key: String,
    dims: Vec<usize>,
    format: Format,
    rope_heads: Option<usize>,
}

/// Writes the LLaMA in `model_dir` (transformers layout, as
/// [`super::models::write_llm`] writes it) to `out` with the linears in
/// `format`; `run` is the bench's dtype (the float format of the rest).
pub fn write_gguf(model_dir: &Path, out: &Path, format: Format, run: DType) -> Res<()> {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json"))?)?;
    let int = |k: &str| -> Res<usize> {
        Ok(cfg[k]
            .as_u64()
            .ok_or_else(|| format!("config.json: no integer `{k}`"))? as usize)
    };
    let (hidden, layers, heads) = (
        int("hidden_size")?,
        int("num_hidden_layers")?,
        int("num_attention_heads")?,
    );
    let (kv_heads, inter, vocab) = (
        int("num_key_value_heads")?,
        int("intermediate_size")?,
        int("vocab_size")?,
    );
    let eps = cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32;
    let theta = cfg["rope_theta"].as_f64().unwrap_or(10000.0) as f32;
    let head_dim = hidden / heads;
    let rest = rest_format(format, run);
    let lq = emu_llm::LlmQuant::new(match format {
        Format::Quant(q) => q,
        Format::Float(_) => QuantType::Q8_0,
    });
    // The format of a linear with `inner` input features.
    let linear = |inner: usize| -> Res<Format> {
        Ok(match format {
            Format::Quant(_) => Format::Quant(lq.format_for("", inner)?),
            f => f,
        })
    };
    let f32 = Format::Float(DType::F32);
    let mut plan = vec![Plan {
        name: "token_embd.weight".into(),
        key: "model.embed_tokens.weight".into(),
        dims: vec![vocab, hidden],
        format: rest,
        rope_heads: None,
    }];
    for l in 0..layers {
        let (p, b) = (format!("model.layers.{l}"), format!("blk.{l}"));
        let mut add = |name: &str, key: &str, dims: Vec<usize>, format: Format, rope_heads: Option<usize>| {
            plan.push(Plan {
                name: format!("{b}.{name}.weight"),
                key: format!("{p}.{key}.weight"),
                dims,
                format,
                rope_heads,
            })
        };
        add("attn_norm", "input_layernorm", vec![hidden], f32, None);
        add(
            "attn_q",
            "self_attn.q_proj",
            vec![heads * head_dim, hidden],
            linear(hidden)?,
            Some(heads),
        );
        add(
            "attn_k",
            "self_attn.k_proj",
            vec![kv_heads * head_dim, hidden],
            linear(hidden)?,
            Some(kv_heads),
        );
        add(
            "attn_v",
            "self_attn.v_proj",
            vec![kv_heads * head_dim, hidden],
            linear(hidden)?,
            None,
        );
        add(
            "attn_output",
            "self_attn.o_proj",
            vec![hidden, heads * head_dim],
            linear(heads * head_dim)?,
            None,
        );
        add("ffn_norm", "post_attention_layernorm", vec![hidden], f32, None);
        add("ffn_gate", "mlp.gate_proj", vec![inter, hidden], linear(hidden)?, None);
        add("ffn_up", "mlp.up_proj", vec![inter, hidden], linear(hidden)?, None);
        add("ffn_down", "mlp.down_proj", vec![hidden, inter], linear(inter)?, None);
    }
    plan.push(Plan {
        name: "output_norm.weight".into(),
        key: "model.norm.weight".into(),
        dims: vec![hidden],
        format: f32,
        rope_heads: None,
    });
    plan.push(Plan {
        name: "output.weight".into(),
        key: "lm_head.weight".into(),
        dims: vec![vocab, hidden],
        format: rest,
        rope_heads: None,
    });

    let (tokens, scores, types) = dummy_vocab(vocab);
    let u = |v: usize| Meta::U32(v as u32);
    let meta: Vec<(&str, Meta)> = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("general.name", Meta::Str("emu-rs bench LLaMA (random weights)".into())),
        ("general.alignment", Meta::U32(ALIGN as u32)),
        ("llama.context_length", u(int("max_position_embeddings")?.max(2048))),
        ("llama.embedding_length", u(hidden)),
        ("llama.block_count", u(layers)),
        ("llama.feed_forward_length", u(inter)),
        ("llama.rope.dimension_count", u(head_dim)),
        ("llama.attention.head_count", u(heads)),
        ("llama.attention.head_count_kv", u(kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(eps)),
        ("llama.rope.freq_base", Meta::F32(theta)),
        ("llama.vocab_size", u(vocab)),
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.scores", Meta::F32s(scores)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.unknown_token_id", u(0)),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
    ];

    let mut h = Vec::new();
    h.extend(b"GGUF");
    h.extend(3u32.to_le_bytes());
    h.extend((plan.len() as u64).to_le_bytes());
    h.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut h, k);
        v.put(&mut h);
    }
    let mut sizes = Vec::with_capacity(plan.len());
    let mut offset = 0usize;
    for t in &plan {
        let n = t.format.size(&t.name, &t.dims)?;
        put_str(&mut h, &t.name);
        h.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            h.extend((*d as u64).to_le_bytes());
        }
        h.extend(t.format.ggml()?.to_le_bytes());
        h.extend((offset as u64).to_le_bytes());
        offset = (offset + n).div_ceil(ALIGN) * ALIGN;
        sizes.push(n);
    }
    h.resize(h.len().div_ceil(ALIGN) * ALIGN, 0);

    let ckpt = Checkpoint::open(model_dir.join("model.safetensors"))?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
    f.write_all(&h)?;
    for (t, n) in plan.iter().zip(sizes) {
        let mut v = ckpt.get_as(&t.key, DType::F32)?.to_f32_vec()?;
        if v.len() != t.dims.iter().product::<usize>() {
            return Err(format!("{}: {} values for shape {:?}", t.key, v.len(), t.dims).into());
        }
        if let Some(heads) = t.rope_heads {
            v = permute_rope_rows(&v, heads, t.dims[1]);
        }
        let bytes = t.format.encode(&t.name, &t.dims, v)?;
        if bytes.len() != n {
            return Err(format!("{}: {} bytes, the header says {n}", t.name, bytes.len()).into());
        }
        f.write_all(&bytes)?;
        f.write_all(&vec![0u8; n.div_ceil(ALIGN) * ALIGN - n])?;
    }
    f.flush()?;
    Ok(())
}

const ALIGN: usize = 32;

/// What one llama.cpp run measured.
pub struct LlamaCppRun {
    /// Version and threads, as the script reports them.
    pub about: String,
    /// `(key, ms of each timed run, last output)` per call.
    pub calls: Vec<(String, Vec<f64>, Vec<f32>)>,
}

/// Writes the GGUF of `format` and times it with `python`.
pub fn run(python: &Path, work: &Workdir, o: &Options, format: Format) -> Res<LlamaCppRun> {
    let c = super::Component::Llm;
    let label = format.label();
    let gguf: PathBuf = work.root.join(format!("llm-{label}.gguf"));
    write_gguf(&work.model(c), &gguf, format, o.dtype)?;
    let script = crate::workspace_root().join("tools/reference/bench_llamacpp.py");
    let io = work.io(c);
    let run_script = |plain: bool| -> Res<std::process::ExitStatus> {
        let mut cmd = Command::new(python);
        cmd.arg(&script)
            .arg(&gguf)
            .arg(&io)
            .args(["--label", &label])
            .args(["--kv", kv_type(format, o.dtype)])
            .args(["--warmup", &o.timing.warmup.to_string()])
            .args(["--iters", &o.timing.iters.to_string()]);
        if let Some(n) = o.threads {
            cmd.args(["--threads", &n.to_string()]);
        }
        if plain {
            cmd.arg("--no-extra-bufts");
        }
        Ok(cmd.status().map_err(|e| format!("running {}: {e}", python.display()))?)
    };
    let mut status = run_script(false)?;
    let mut plain = false;
    // llama.cpp repacks quantized weights for AMX where the CPU has it; on
    // some machines (seen on a VM) that path faults. Then the plain ggml
    // kernels are timed instead, and the row says so.
    #[cfg(unix)]
    if std::os::unix::process::ExitStatusExt::signal(&status).is_some() && matches!(format, Format::Quant(_)) {
        eprintln!("bench: llama.cpp/{label} crashed ({status}); again without repacked weights ...");
        status = run_script(true)?;
        plain = true;
    }
    // The GGUF is as large as the model; keep only what --keep asks for.
    if o.keep.is_none() {
        let _ = std::fs::remove_file(&gguf);
    }
    if !status.success() {
        return Err(format!("{} failed ({status})", script.display()).into());
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(io.join(format!("llamacpp_{label}.json")))?)?;
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .map_or(Vec::new(), |a| a.iter().filter_map(|x| x.as_f64()).collect())
    };
    let mut calls = Vec::new();
    for key in ["prefill", "decode"] {
        let ms = floats(&meta["ms"][key]);
        let out: Vec<f32> = floats(&meta["out"][key]).into_iter().map(|x| x as f32).collect();
        if ms.is_empty() || out.is_empty() {
            return Err(format!("llamacpp_{label}.json has no `{key}` times or output").into());
        }
        calls.push((key.to_string(), ms, out));
    }
    Ok(LlamaCppRun {
        about: format!(
            "llama-cpp-python {} on {} threads, KV cache {}{}",
            meta["llama_cpp"].as_str().unwrap_or("?"),
            meta["threads"],
            kv_type(format, o.dtype),
            if plain {
                "; its repacked (AMX) weight path crashed here, so timed with use_extra_bufts off (slower than llama.cpp can be)"
            } else {
                ""
            }
        ),
        calls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rows_go_from_halves_to_pairs() {
        // One head of dim 4, one column: rows (a0 a1 | b0 b1) -> (a0 b0 a1 b1).
        let w = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0];
        assert_eq!(
            permute_rope_rows(&w, 2, 1),
            [0.0, 2.0, 1.0, 3.0, 10.0, 12.0, 11.0, 13.0]
        );
    }

    #[test]
    fn dummy_vocab_has_the_model_size_and_unique_tokens() {
        for n in [128, 300, 16384] {
            let (t, s, ty) = dummy_vocab(n);
            assert_eq!((t.len(), s.len(), ty.len()), (n, n, n));
            let set: std::collections::BTreeSet<_> = t.iter().collect();
            assert_eq!(set.len(), n);
        }
        assert_eq!(dummy_vocab(300).0[3 + 10], "<0x0A>");
    }

    /// The GGUF is readable by emu-core's own GGUF reader, with every
    /// tensor's shape and the quantized bytes' sizes consistent.
    #[test]
    fn gguf_has_every_llama_tensor() {
        let spec = super::super::models::Spec::tiny().llm;
        let dir = std::env::temp_dir().join(format!("emu-xtask-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        super::super::models::write_llm(&spec, &dir).unwrap();
        let out = dir.join("m.gguf");
        write_gguf(&dir, &out, Format::Quant(QuantType::Q8_0), DType::F32).unwrap();
        let g = Checkpoint::open(&out);
        std::fs::remove_dir_all(&dir).unwrap();
        let g = g.unwrap();
        assert_eq!(g.len(), 3 + 9 * spec.layers);
        let info = g.info("blk.1.ffn_down.weight").unwrap();
        assert_eq!(info.dims, [spec.hidden, spec.intermediate]);
        assert_eq!(g.info("output.weight").unwrap().dims, [spec.vocab, spec.hidden]);
    }
}
