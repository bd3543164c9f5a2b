//! Exported graphs load back into ONNX Runtime from a file and reproduce the
//! in-process result; the in-process result matches the CPU backend; a repeated
//! computation on new data reuses its compiled session.

use emu_backend_cpu::CpuBackend;
use emu_backend_onnx::{run_model_file, OnnxBackend};
use emu_core::backend::{Backend, Conv2dParams};
use emu_core::testing::{rel_err, Rng};
use emu_core::{HostTensor, Result, Tensor};
use std::path::PathBuf;

fn backend() -> Option<OnnxBackend> {
    emu_core::testing::available(OnnxBackend::new())
}

fn random(rng: &mut Rng, dims: &[usize], scale: f64) -> HostTensor {
    let n = dims.iter().product();
    HostTensor::from_f64(dims, (0..n).map(|_| rng.uniform(-scale, scale)).collect())
        .and_then(|h| h.to_dtype(emu_core::DType::F32))
        .expect("host tensor")
}

struct Params {
    conv_w: HostTensor,
    conv_b: HostTensor,
    gn_w: HostTensor,
    gn_b: HostTensor,
    lin_w: HostTensor,
    lin_b: HostTensor,
}

fn params() -> Params {
    let mut rng = Rng::new(7);
    Params {
        conv_w: random(&mut rng, &[8, 3, 3, 3], 0.5),
        conv_b: random(&mut rng, &[8], 0.5),
        gn_w: random(&mut rng, &[8], 1.0),
        gn_b: random(&mut rng, &[8], 0.5),
        lin_w: random(&mut rng, &[16, 8], 0.5),
        lin_b: random(&mut rng, &[16], 0.5),
    }
}

/// A small block in the style of the models: conv, group norm, SiLU, nearest
/// upsampling, tokens, linear, self-attention with a causal mask, softmax.
fn block<B: Backend>(be: &B, p: &Params, x: &Tensor<B>) -> Result<Tensor<B>> {
    let up = |h: &HostTensor| Tensor::from_host(be, h);
    let h = x.conv2d(&up(&p.conv_w)?, Some(&up(&p.conv_b)?), Conv2dParams::new(1, 1))?;
    let h = h
        .group_norm(4, Some(&up(&p.gn_w)?), Some(&up(&p.gn_b)?), 1e-5)?
        .silu()?;
    let h = h.upsample_nearest2d(6, 6)?;
    let (n, c) = (h.dim(0)?, h.dim(1)?);
    let tokens = h.reshape(&[n, c, 36])?.transpose(1, 2)?;
    let y = tokens.linear(&up(&p.lin_w)?, Some(&up(&p.lin_b)?))?.gelu()?;
    let q = y.reshape(&[n, 36, 2, 8])?.transpose(1, 2)?;
    let a = q.attention(&q, &q, Some(0), None, 0.35)?;
    a.transpose(1, 2)?
        .reshape(&[n, 36, 16])?
        .layer_norm(None, None, 1e-5)?
        .softmax_last_dim()
}

fn out_dir() -> PathBuf {
    let dir = match std::env::var_os("EMU_ONNX_EXPORT_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("emu-onnx-export-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).expect("create export dir");
    dir
}

/// A little-endian f32 `.npy` file, for the Python cross-check in `tools/onnx/`.
fn write_npy(path: &std::path::Path, h: &HostTensor) {
    let shape: Vec<String> = h.dims().iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 {
        format!("({},)", shape[0])
    } else {
        format!("({})", shape.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(h.to_dtype(emu_core::DType::F32).expect("f32").as_bytes());
    std::fs::write(path, bytes).expect("write npy");
}

fn f64s(h: &HostTensor) -> Vec<f64> {
    h.to_f64_vec().expect("values")
}

#[test]
fn an_exported_block_runs_from_a_file_like_in_process_and_like_the_cpu_backend() {
    let Some(be) = backend() else { return };
    let p = params();
    let x_host = random(&mut Rng::new(11), &[2, 3, 5, 5], 1.0);
    let x = Tensor::from_host(&be, &x_host).unwrap();
    let y = block(&be, &p, &x).unwrap();
    let got = y.to_host().unwrap();

    let cpu = CpuBackend::new();
    let want = block(&cpu, &p, &Tensor::from_host(&cpu, &x_host).unwrap())
        .unwrap()
        .to_host()
        .unwrap();
    let vs_cpu = rel_err(&f64s(&got), &f64s(&want));
    eprintln!("onnx vs cpu backend: rel err {vs_cpu:.2e}");
    assert!(vs_cpu <= 1e-5, "onnx vs cpu rel err {vs_cpu:.2e}");

    let model = be.export(&[("x", x.raw())], &[("y", y.raw())], "block").unwrap();
    let dir = out_dir();
    let path = dir.join("block.onnx");
    std::fs::write(&path, &model).unwrap();
    write_npy(&dir.join("block_x.npy"), &x_host);
    write_npy(&dir.join("block_y.npy"), &got);
    let outs = run_model_file(&path, &[("x", &x_host)]).unwrap();
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].dims(), got.dims());
    let vs_file = rel_err(&f64s(&outs[0]), &f64s(&got));
    eprintln!(
        "exported file ({} bytes) vs in-process: rel err {vs_file:.2e}",
        model.len()
    );
    assert!(vs_file <= 1e-6, "file vs in-process rel err {vs_file:.2e}");

    // The exported graph takes new inputs: compare against the CPU backend on other data.
    let x2 = random(&mut Rng::new(12), &[2, 3, 5, 5], 1.0);
    let outs = run_model_file(&path, &[("x", &x2)]).unwrap();
    let want2 = block(&cpu, &p, &Tensor::from_host(&cpu, &x2).unwrap())
        .unwrap()
        .to_host()
        .unwrap();
    let e2 = rel_err(&f64s(&outs[0]), &f64s(&want2));
    assert!(e2 <= 1e-5, "file on new input vs cpu rel err {e2:.2e}");
    if std::env::var_os("EMU_ONNX_EXPORT_DIR").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn the_same_graph_on_new_data_reuses_its_session() {
    let Some(be) = backend() else { return };
    let p = params();
    let mut rng = Rng::new(3);
    let mut first = None;
    for step in 0..3 {
        let x_host = random(&mut rng, &[1, 3, 5, 5], 1.0);
        let y = block(&be, &p, &Tensor::from_host(&be, &x_host).unwrap()).unwrap();
        let v = y.to_f32_vec().unwrap();
        if step == 0 {
            first = Some((be.cached_sessions(), v));
        } else {
            let (n, v0) = first.as_ref().unwrap();
            assert_eq!(be.cached_sessions(), *n, "step {step} compiled a new session");
            assert_ne!(&v, v0, "new data gave the same output");
        }
    }
}

#[test]
fn a_downloaded_value_is_not_recomputed_by_later_graphs() {
    let Some(be) = backend() else { return };
    let x = Tensor::from_f32(&be, &[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    let y = x.matmul(&x).unwrap();
    assert_eq!(y.to_f32_vec().unwrap(), vec![7.0, 10.0, 15.0, 22.0]);
    let n = be.cached_sessions();
    // Downloading `y` again must not run a graph.
    assert_eq!(y.to_f32_vec().unwrap(), vec![7.0, 10.0, 15.0, 22.0]);
    assert_eq!(be.cached_sessions(), n);
    let z = y.affine(2.0, 1.0).unwrap();
    assert_eq!(z.to_f32_vec().unwrap(), vec![15.0, 21.0, 31.0, 45.0]);
}
