//! Emu2-Gen's regression of visual embeddings (SPEC §4.2).

use crate::error::{Error, Result};
use crate::model::{Llama, Logits};
use emu_core::{Backend, Tensor};

/// Regresses `n` visual embeddings after a prompt that ends at `[IMG]`.
///
/// `embeds` is the prompt (`[B, T, H]`, slots already filled); `padding` its
/// left padding per sequence (empty: none). `project_down` (`[Dv, H]`) and
/// `project_up` (`[H, Dv]`) are the bias-free `nn.Linear` weights of Emu2.
/// The last hidden state (after the final norm) goes through `project_down`
/// to give embedding `k`; `project_up` of it is the input at the next
/// position. Upstream re-runs the whole sequence for every embedding; this
/// runs each new position once on the KV cache, which is the same
/// computation. Returns `[B, n, Dv]`.
pub fn regress_visual<B: Backend>(
    model: &Llama<B>,
    embeds: &Tensor<B>,
    padding: &[usize],
    project_up: &Tensor<B>,
    project_down: &Tensor<B>,
    n: usize,
) -> Result<Tensor<B>> {
    let h = model.config().hidden_size;
    let dims = embeds.dims();
    let (b, t) = match dims.as_slice() {
        [b, t, w] if *w == h && *b > 0 && *t > 0 => (*b, *t),
        _ => {
            return Err(Error::Input(format!(
                "regress_visual: prompt must be [B, T, {h}], found {dims:?}"
            )))
        }
    };
    let (dd, ud) = (project_down.dims(), project_up.dims());
    let dv = match (dd.as_slice(), ud.as_slice()) {
        ([dv, hd], [hu, du]) if *hd == h && *hu == h && dv == du => *dv,
        _ => {
            return Err(Error::Input(format!(
                "regress_visual: project_down {dd:?} / project_up {ud:?} do not fit hidden size {h}"
            )))
        }
    };
    if n == 0 {
        return Err(Error::Input("regress_visual: n must be at least 1".into()));
    }
    let down = project_down.to_dtype(model.dtype())?;
    let up = project_up.to_dtype(model.dtype())?;
    let padding = if padding.is_empty() {
        vec![0; b]
    } else {
        padding.to_vec()
    };
    let mut cache = model.new_cache_padded(&padding, t + n - 1)?;
    let out = model.forward_embeds(embeds, &mut cache, Logits::Skip)?;
    let mut last = out.hidden.narrow(1, t - 1, 1)?;
    let mut outs = Vec::with_capacity(n);
    for k in 0..n {
        let e = last.linear(&down, None)?;
        if k + 1 < n {
            let x = e.linear(&up, None)?;
            last = model.forward_embeds(&x, &mut cache, Logits::Skip)?.hidden;
        }
        outs.push(e);
    }
    let refs: Vec<&Tensor<B>> = outs.iter().collect();
    let r = Tensor::concat(&refs, 1)?;
    debug_assert_eq!(r.dims(), vec![b, n, dv]);
    Ok(r)
}
