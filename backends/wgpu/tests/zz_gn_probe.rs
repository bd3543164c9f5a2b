use emu_backend_cpu::CpuBackend;
use emu_backend_wgpu::WgpuBackend;
use emu_core::backend::ReduceOp;
use emu_core::{Backend, DType, HostTensor, Tensor};

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 1000) as f32) / 500.0 - 1.0 + 0.3).collect()
}

#[test]
fn probe() {
    let w = WgpuBackend::new().unwrap();
    let c = CpuBackend::new();
    for (ch, hw) in [(32usize, 256usize), (64, 256), (128, 256)] {
        let dims = [1, ch, hw, hw];
        let h = HostTensor::from_f32(&dims, data(ch * hw * hw)).unwrap();
        let xw = Tensor::from_host(&w, &h).unwrap();
        let xc = Tensor::from_host(&c, &h).unwrap();
        let n = ch * hw * hw / 32;
        let gw = xw.reshape(&[1, 32, n]).unwrap();
        let gc = xc.reshape(&[1, 32, n]).unwrap();
        let mw = Tensor::from_raw(&w, w.reduce(ReduceOp::Mean, gw.raw(), 2, true).unwrap())
            .to_f32_vec()
            .unwrap();
        let mc = Tensor::from_raw(&c, c.reduce(ReduceOp::Mean, gc.raw(), 2, true).unwrap())
            .to_f32_vec()
            .unwrap();
        let e = mw.iter().zip(&mc).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!(
            "ch {ch}: mean max abs diff {e} (cpu {:?} wgpu {:?})",
            &mc[..2],
            &mw[..2]
        );
        let yw = w.group_norm(xw.raw(), 32, None, None, 1e-6).unwrap();
        let yc = c.group_norm(xc.raw(), 32, None, None, 1e-6).unwrap();
        let yw = w.download(&yw).unwrap().to_f32_vec().unwrap();
        let yc = c.download(&yc).unwrap().to_f32_vec().unwrap();
        let e = yw.iter().zip(&yc).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("ch {ch}: group_norm max abs diff {e}");
        let _ = DType::F32;
    }
}
