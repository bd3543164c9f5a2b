//! Emu2-Gen's visual regression on the KV cache against the upstream
//! algorithm (the whole sequence re-run for each of the 64 embeddings),
//! computed with transformers in tools/reference/fixtures_llm.py.

mod common;

use common::{check, Fixture};
use emu_core::DType;
use emu_llm::regress_visual;

#[test]
fn sixty_four_embeddings_match_the_no_cache_reference() {
    for set in ["mha", "gqa"] {
        let f = Fixture::load(set, DType::F32);
        let out = regress_visual(
            &f.model,
            &f.tensor("visual.prompt"),
            &[],
            &f.tensor("visual.project_up"),
            &f.tensor("visual.project_down"),
            64,
        )
        .unwrap();
        assert_eq!(out.dims(), vec![1, 64, 32]);
        check(
            &format!("{set} visual regression"),
            &out.to_f32_vec().unwrap(),
            &f.f32s("visual.out"),
            DType::F32,
        );
    }
}

#[test]
fn mismatched_projections_are_rejected() {
    let f = Fixture::load("mha", DType::F32);
    let up = f.tensor("visual.project_up");
    let e = regress_visual(&f.model, &f.tensor("visual.prompt"), &[], &up, &up, 4).unwrap_err();
    assert!(e.to_string().contains("project_down"), "{e}");
}
