//! `quant.cu`'s kernels run on the host, so their indexing and arithmetic
//! are checked on machines without a GPU: `tests/emulate/quant_harness.cpp`
//! compiles the CUDA source with the C++ compiler, runs every CUDA thread as
//! a host thread (a warp's shuffles meet at a barrier), and the results are
//! held to dequantize-then-f32-linear (matvec) and to `QuantTensor`'s own
//! dequantization bit for bit (the dense path). The GPU run of the same
//! kernels is `tests/quant.rs`. Needs a C++20 compiler (`$CXX`, else `c++`);
//! without one the test says so and skips, unless `EMU_REQUIRE_CXX=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use emu_core::testing::{host_rel_err, linear_quant_reference, uniform_host, Rng};
use emu_core::{HostTensor, QuantTensor, QuantType};

fn compile(dir: &Path) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let exe = dir.join("quant_harness");
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-I"])
        .arg(root.join("src/kernels"))
        .arg(root.join("tests/emulate/quant_harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Ok(s) => {
            assert!(s.success(), "{cxx} could not compile quant.cu's host harness");
            Some(exe)
        }
        Err(e) => {
            let msg = format!("no C++ compiler ({cxx}: {e})");
            if std::env::var("EMU_REQUIRE_CXX").is_ok_and(|v| v == "1") {
                panic!("{msg} (EMU_REQUIRE_CXX=1)");
            }
            eprintln!("skipping: {msg}");
            None
        }
    }
}

/// Random weights with an all-zero row, an outlier and a negative-only row.
fn weight(rng: &mut Rng, n: usize, k: usize, q: QuantType) -> QuantTensor {
    let mut v = uniform_host(rng, &[n, k], -1.0, 1.0).to_f32_vec().unwrap();
    v[..k].fill(0.0);
    if n > 2 {
        v[k + 3] = 40.0;
        for x in &mut v[2 * k..3 * k] {
            *x = -x.abs() - 0.5;
        }
    }
    QuantTensor::quantize("emulated.weight", &HostTensor::from_f32(&[n, k], v).unwrap(), q).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn quantized_kernels_match_the_reference_when_emulated_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = compile(dir.path()) else { return };
    let mut rng = Rng::new(51);
    for q in [QuantType::Q8_0, QuantType::Q4K] {
        // (rows, features, inputs, blocks of LQ_WARPS = 4 features): enough
        // blocks for every feature, and grids too small for them (the
        // kernels' grid-stride loop).
        for &(m, n, k, grid) in &[(1, 9, 512, 3), (3, 17, 768, 2), (8, 5, 256, 2), (2, 4, 1024, 1)] {
            let w = weight(&mut rng, n, k, q);
            let x = uniform_host(&mut rng, &[m, k], -1.0, 1.0);
            let b = uniform_host(&mut rng, &[n], -1.0, 1.0);
            let mut input = Vec::new();
            let code = if q == QuantType::Q8_0 { 0 } else { 1 };
            for v in [m, n, k, code, w.bytes().len()] {
                input.extend((v as i64).to_le_bytes());
            }
            input.extend(w.bytes());
            input.extend(x.as_bytes());
            input.extend(b.as_bytes());
            let (inp, out) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
            std::fs::write(&inp, &input).unwrap();
            let status = Command::new(&exe)
                .arg(&inp)
                .arg(&out)
                .arg(grid.to_string())
                .status()
                .unwrap();
            assert!(status.success(), "{q} {m}x{k}->{n}: harness failed ({status})");
            let got = f32s(&std::fs::read(&out).unwrap());
            assert_eq!(got.len(), m * n + n * k);
            let y = HostTensor::from_f32(&[m, n], got[..m * n].to_vec()).unwrap();
            let e = host_rel_err(&y, &linear_quant_reference(&x, &w, Some(&b)));
            assert!(e <= 1e-5, "{q} {m}x{k}->{n}: matvec rel err {e:e}");
            let dense = &got[m * n..];
            let want = w.dequantize().unwrap().to_f32_vec().unwrap();
            let same = dense.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{q} {n}x{k}: the dequantize kernel differs from QuantTensor::dequantize"
            );
        }
    }
}
