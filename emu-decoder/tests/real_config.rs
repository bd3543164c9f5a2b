//! The full-size Emu2-Gen UNet and VAE built from the upstream configs
//! (read from ../shared at run time) over a shape-only backend: every
//! parameter key and shape the loaders ask for must be exactly diffusers'
//! state dict (`real_shapes.json`, from diffusers on the meta device), with
//! no weights in memory. The checkpoint is a sparse safetensors file whose
//! data is never written.

mod common;

use common::fixtures;
use emu_core::backend::{BinaryOp, Conv2dParams, ReduceOp, UnaryOp};
use emu_core::{Backend, Checkpoint, DType, Error, HostTensor, Result};
use emu_decoder::{AutoencoderKL, AutoencoderKLConfig, UNet2DConditionConfig, UNet2DConditionModel};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Records uploads (shape and dtype only); computes nothing.
#[derive(Debug, Clone, Default)]
struct ShapeBackend {
    uploaded: Arc<Mutex<usize>>,
}

fn no<T>(what: &str) -> Result<T> {
    Err(Error::Unsupported {
        backend: "shape".into(),
        what: what.into(),
    })
}

impl Backend for ShapeBackend {
    type Tensor = (Vec<usize>, DType);
    fn name(&self) -> &str {
        "shape"
    }
    fn supports(&self, _: DType) -> bool {
        true
    }
    fn dims(&self, t: &Self::Tensor) -> Vec<usize> {
        t.0.clone()
    }
    fn dtype(&self, t: &Self::Tensor) -> DType {
        t.1
    }
    fn upload(&self, host: &HostTensor) -> Result<Self::Tensor> {
        *self.uploaded.lock().unwrap() += host.numel();
        Ok((host.dims().to_vec(), host.dtype()))
    }
    fn download(&self, _: &Self::Tensor) -> Result<HostTensor> {
        no("download")
    }
    fn full(&self, dims: &[usize], _: f64, dtype: DType) -> Result<Self::Tensor> {
        Ok((dims.to_vec(), dtype))
    }
    fn cast(&self, t: &Self::Tensor, dtype: DType) -> Result<Self::Tensor> {
        Ok((t.0.clone(), dtype))
    }
    fn reshape(&self, _: &Self::Tensor, _: &[usize]) -> Result<Self::Tensor> {
        no("reshape")
    }
    fn permute(&self, _: &Self::Tensor, _: &[usize]) -> Result<Self::Tensor> {
        no("permute")
    }
    fn narrow(&self, _: &Self::Tensor, _: usize, _: usize, _: usize) -> Result<Self::Tensor> {
        no("narrow")
    }
    fn concat(&self, _: &[&Self::Tensor], _: usize) -> Result<Self::Tensor> {
        no("concat")
    }
    fn slice_set(&self, _: Self::Tensor, _: &Self::Tensor, _: usize, _: usize) -> Result<Self::Tensor> {
        no("slice_set")
    }
    fn index_select(&self, _: &Self::Tensor, _: &Self::Tensor, _: usize) -> Result<Self::Tensor> {
        no("index_select")
    }
    fn broadcast_to(&self, _: &Self::Tensor, _: &[usize]) -> Result<Self::Tensor> {
        no("broadcast_to")
    }
    fn unary(&self, _: UnaryOp, _: &Self::Tensor) -> Result<Self::Tensor> {
        no("unary")
    }
    fn binary(&self, _: BinaryOp, _: &Self::Tensor, _: &Self::Tensor) -> Result<Self::Tensor> {
        no("binary")
    }
    fn affine(&self, _: &Self::Tensor, _: f64, _: f64) -> Result<Self::Tensor> {
        no("affine")
    }
    fn reduce(&self, _: ReduceOp, _: &Self::Tensor, _: usize, _: bool) -> Result<Self::Tensor> {
        no("reduce")
    }
    fn argmax(&self, _: &Self::Tensor, _: usize) -> Result<Self::Tensor> {
        no("argmax")
    }
    fn matmul(&self, _: &Self::Tensor, _: &Self::Tensor) -> Result<Self::Tensor> {
        no("matmul")
    }
    fn conv2d(
        &self,
        _: &Self::Tensor,
        _: &Self::Tensor,
        _: Option<&Self::Tensor>,
        _: Conv2dParams,
    ) -> Result<Self::Tensor> {
        no("conv2d")
    }
    fn avg_pool2d(&self, _: &Self::Tensor, _: (usize, usize), _: (usize, usize)) -> Result<Self::Tensor> {
        no("avg_pool2d")
    }
    fn upsample_nearest2d(&self, _: &Self::Tensor, _: usize, _: usize) -> Result<Self::Tensor> {
        no("upsample_nearest2d")
    }
}

/// A bf16 safetensors file with these tensors, all zero, as a sparse file.
fn sparse_safetensors(path: &Path, tensors: &BTreeMap<String, Vec<usize>>) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (k, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * 2;
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    f.set_len((8 + h.len() + offset) as u64).unwrap();
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn real_config(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/emu2-conf/diffusion_config")
        .join(name)
        .join("config.json");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

fn expected(model: &str) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(fixtures().join("real_shapes.json")).unwrap();
    let v: BTreeMap<String, BTreeMap<String, Vec<usize>>> = serde_json::from_str(&text).unwrap();
    v[model].clone()
}

/// Loads the model over a sparse checkpoint of exactly diffusers' tensors and
/// returns how many parameters the loader uploaded.
fn load_count(
    model: &str,
    load: impl Fn(&ShapeBackend, &Checkpoint) -> Result<(), emu_decoder::Error>,
) -> (usize, usize) {
    let tensors = expected(model);
    let want: usize = tensors.values().map(|s| s.iter().product::<usize>()).sum();
    let dir = TempDir(std::env::temp_dir().join(format!("emu-decoder-{model}-shapes-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    sparse_safetensors(&dir.0.join("diffusion_pytorch_model.bf16.safetensors"), &tensors);
    let ckpt = Checkpoint::open_dir(&dir.0, Some("bf16")).unwrap();
    let be = ShapeBackend::default();
    load(&be, &ckpt).unwrap();
    let got = *be.uploaded.lock().unwrap();
    (got, want)
}

/// Reads ~5 GB of zero pages (about 10 s), hence not part of the default run:
/// `cargo test -p emu-decoder --test real_config -- --ignored`.
#[test]
#[ignore = "reads 5 GB of sparse zero pages (~10 s)"]
fn the_full_size_emu2_gen_unet_asks_for_exactly_diffusers_parameters() {
    let Some(cfg_path) = real_config("unet") else { return };
    let cfg = UNet2DConditionConfig::from_file(cfg_path).unwrap();
    let (got, want) = load_count("unet", |be, ckpt| {
        UNet2DConditionModel::load(be, &ckpt.weights(), &cfg, DType::BF16).map(|_| ())
    });
    // Every key is read with its exact shape (a wrong one is an error), and
    // the element counts agree, so no tensor is left unread.
    assert_eq!(want, 2_525_520_644);
    assert_eq!(got, want);
}

#[test]
fn the_full_size_emu2_gen_vae_asks_for_exactly_diffusers_parameters() {
    let Some(cfg_path) = real_config("vae") else { return };
    let cfg = AutoencoderKLConfig::from_file(cfg_path).unwrap();
    let (got, want) = load_count("vae", |be, ckpt| {
        AutoencoderKL::load(be, &ckpt.weights(), &cfg, DType::BF16).map(|_| ())
    });
    assert_eq!(got, want);
    // The check has teeth: one resnet fewer per block leaves tensors unread.
    let mut fewer = cfg.clone();
    fewer.layers_per_block = 1;
    let (got, want) = load_count("vae", |be, ckpt| {
        AutoencoderKL::load(be, &ckpt.weights(), &fewer, DType::BF16).map(|_| ())
    });
    assert!(got < want);
}
