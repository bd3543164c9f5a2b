//! `EulerDiscreteScheduler` as in diffusers 0.42.
//!
//! The schedule is host math. diffusers builds the training betas and
//! `alphas_cumprod` as float32 torch tensors, interpolates the inference
//! sigmas with NumPy in float64, and hands them to the sampler as float32;
//! every step below rounds at the same places so that timesteps and sigmas
//! agree with diffusers bit for bit (see the `scheduler` fixtures).

use crate::error::{read_json, Error, Result};
use emu_core::{Backend, DType, Tensor};
use serde::Deserialize;
use std::path::Path;

const COMPONENT: &str = "EulerDiscreteScheduler";

/// `scheduler_config.json` of an `EulerDiscreteScheduler`. Keys that other
/// schedulers share the file format with (`clip_sample`, `skip_prk_steps`,
/// ...) are ignored, as diffusers does.
#[derive(Debug, Clone, Deserialize)]
pub struct EulerDiscreteConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "d_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    #[serde(default = "d_linear")]
    pub interpolation_type: String,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default = "d_linspace")]
    pub timestep_spacing: String,
    #[serde(default = "d_discrete")]
    pub timestep_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default = "d_zero")]
    pub final_sigmas_type: String,
}

fn d_train_steps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_linear() -> String {
    "linear".into()
}
fn d_epsilon() -> String {
    "epsilon".into()
}
fn d_linspace() -> String {
    "linspace".into()
}
fn d_discrete() -> String {
    "discrete".into()
}
fn d_zero() -> String {
    "zero".into()
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl EulerDiscreteConfig {
    /// Reads `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_json(path.as_ref())
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise (Emu2-Gen, SDXL base).
    Epsilon,
    /// The velocity `alpha * noise - sigma * x0`.
    VPrediction,
    /// The clean sample itself.
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The Euler sampler of Karras et al. over a discrete DDPM training schedule,
/// with `s_churn = 0` (the deterministic path every diffusers pipeline uses).
///
/// Usage mirrors diffusers: [`set_timesteps`](Self::set_timesteps), then per
/// step index `i`: `scale_model_input(x, i)`, run the model at
/// `timesteps()[i]`, `step(eps, i, x)`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    num_train_timesteps: usize,
    steps_offset: usize,
    spacing: TimestepSpacing,
    prediction: PredictionType,
    final_sigma_min: bool,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: a float32 step,
/// the first half counted up from `start`, the second down from `end`, each
/// value rounded once from the exact `start + i * step`.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                (s as f64 + step as f64 * i as f64) as f32
            } else {
                (e as f64 - step as f64 * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// `sqrt((1 - a) / a)` in float32, as torch evaluates it on the f32 tensor.
fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64.
fn interp_f64(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// Most training timesteps a scheduler config may declare (SDXL: 1000);
/// the schedule tables hold one entry per timestep.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

impl EulerDiscreteScheduler {
    /// Builds the training schedule, rejecting every option that this port
    /// does not implement by its config key.
    pub fn new(cfg: &EulerDiscreteConfig) -> Result<Self> {
        let unsupported =
            |field: &'static str, value: &dyn std::fmt::Debug| Error::unsupported(COMPONENT, field, value);
        if let Some(name) = &cfg.class_name {
            if name != COMPONENT {
                return Err(unsupported("_class_name", name));
            }
        }
        for (field, on) in [
            ("use_karras_sigmas", cfg.use_karras_sigmas),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
        ] {
            if on == Some(true) {
                return Err(unsupported(field, &true));
            }
        }
        if cfg.rescale_betas_zero_snr {
            return Err(unsupported("rescale_betas_zero_snr", &true));
        }
        if cfg.interpolation_type != "linear" {
            return Err(unsupported("interpolation_type", &cfg.interpolation_type));
        }
        if cfg.timestep_type != "discrete" {
            return Err(unsupported("timestep_type", &cfg.timestep_type));
        }
        let final_sigma_min = match cfg.final_sigmas_type.as_str() {
            "zero" => false,
            "sigma_min" => true,
            other => return Err(unsupported("final_sigmas_type", &other)),
        };
        let spacing = match cfg.timestep_spacing.as_str() {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => return Err(unsupported("timestep_spacing", &other)),
        };
        let prediction = match cfg.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" | "original_sample" => PredictionType::Sample,
            other => return Err(unsupported("prediction_type", &other)),
        };
        let n = cfg.num_train_timesteps;
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&n) {
            return Err(Error::invalid(format!(
                "{COMPONENT}: num_train_timesteps {n} is out of range (2 to {MAX_TRAIN_TIMESTEPS}; SDXL: 1000)"
            )));
        }
        // Betas are variances of added noise: each must lie in [0, 1).
        if cfg.trained_betas.is_none() {
            let (s, e) = (cfg.beta_start, cfg.beta_end);
            if !(s.is_finite() && e.is_finite() && 0.0 <= s && s <= e && e < 1.0) {
                return Err(Error::invalid(format!(
                    "{COMPONENT}: beta_start {s} and beta_end {e} must satisfy 0 <= beta_start <= beta_end < 1 (SDXL: 0.00085, 0.012)"
                )));
            }
        }
        let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule.as_str()) {
            (Some(b), _) => {
                if b.len() != n {
                    return Err(Error::invalid(format!(
                        "{COMPONENT}: trained_betas has {} values for {n} train timesteps",
                        b.len()
                    )));
                }
                b.iter().map(|&x| x as f32).collect()
            }
            (None, "linear") => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            (None, "scaled_linear") => torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            (None, other) => return Err(unsupported("beta_schedule", &other)),
        };
        if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(0.0..1.0).contains(*b)) {
            return Err(Error::invalid(format!(
                "{COMPONENT}: beta {i} is {b}; every beta must lie in [0, 1)"
            )));
        }
        // torch.cumprod on the CPU accumulates float32 in double.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(Self {
            num_train_timesteps: n,
            steps_offset: cfg.steps_offset,
            spacing,
            prediction,
            final_sigma_min,
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// Reads `scheduler_config.json` and builds the scheduler.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(&EulerDiscreteConfig::from_file(path)?)
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    pub fn timestep_spacing(&self) -> TimestepSpacing {
        self.spacing
    }

    /// Chooses `num_inference_steps` timesteps (diffusers' `set_timesteps`).
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        let train = self.num_train_timesteps;
        if n == 0 || n > train {
            return Err(Error::invalid(format!(
                "{COMPONENT}: {n} inference steps (must be 1..={train})"
            )));
        }
        let timesteps: Vec<f32> = match self.spacing {
            // np.linspace(0, train - 1, n) in float64, then float32, reversed.
            TimestepSpacing::Linspace => {
                let stop = (train - 1) as f64;
                let mut t: Vec<f32> = if n == 1 {
                    vec![0.0]
                } else {
                    let step = stop / (n - 1) as f64;
                    (0..n)
                        .map(|i| if i == n - 1 { stop } else { i as f64 * step } as f32)
                        .collect()
                };
                t.reverse();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + self.steps_offset as f32)
                    .collect()
            }
            // np.arange(train, 0, -train / n).round() - 1, with NumPy's arange
            // length and fill rule (the second value fixes the delta).
            TimestepSpacing::Trailing => {
                let start = train as f64;
                let delta = -(train as f64 / n as f64);
                let len = ((0.0 - start) / delta).ceil() as usize;
                let d2 = (start + delta) - start;
                (0..len)
                    .map(|i| {
                        let v = match i {
                            0 => start,
                            1 => start + delta,
                            _ => start + i as f64 * d2,
                        };
                        v.round_ties_even() as f32 - 1.0
                    })
                    .collect()
            }
        };
        let train_sigmas: Vec<f64> = self.alphas_cumprod.iter().map(|&a| sigma_of(a) as f64).collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp_f64(t as f64, &train_sigmas) as f32)
            .collect();
        sigmas.push(if self.final_sigma_min {
            sigma_of(self.alphas_cumprod[0])
        } else {
            0.0
        });
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        Ok(())
    }

    /// The model timesteps, one per step (empty before `set_timesteps`).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The noise levels, one per step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Number of denoising steps set by `set_timesteps`.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Standard deviation of the initial noise.
    pub fn init_noise_sigma(&self) -> Result<f32> {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(None, |m: Option<f32>, s| Some(m.map_or(s, |m| m.max(s))))
            .ok_or_else(|| Error::invalid(format!("{COMPONENT}: set_timesteps was not called")))?;
        Ok(match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        })
    }

    fn sigma_at(&self, step: usize) -> Result<(f32, f32)> {
        match (self.sigmas.get(step), self.sigmas.get(step + 1)) {
            (Some(&s), Some(&next)) => Ok((s, next)),
            _ => Err(Error::invalid(format!(
                "{COMPONENT}: step index {step} out of range for {} steps",
                self.num_steps()
            ))),
        }
    }

    /// The model input at step `step`: `sample / sqrt(sigma^2 + 1)`.
    pub fn scale_model_input<B: Backend>(&self, sample: &Tensor<B>, step: usize) -> Result<Tensor<B>> {
        let (sigma, _) = self.sigma_at(step)?;
        let denom = scalar_like(sample, (sigma * sigma + 1.0).sqrt())?;
        Ok(sample.div(&denom)?)
    }

    /// One Euler step from `sample` at step `step` to the next noise level.
    /// Computed in float32 like diffusers (which upcasts the sample); the
    /// result has the dtype of `model_output`.
    pub fn step<B: Backend>(&self, model_output: &Tensor<B>, step: usize, sample: &Tensor<B>) -> Result<Tensor<B>> {
        let (sigma, sigma_next) = self.sigma_at(step)?;
        let out_dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let eps = model_output.to_dtype(DType::F32)?;
        let sigma_t = scalar_like(&sample, sigma)?;
        let pred_original = match self.prediction {
            PredictionType::Epsilon => sample.sub(&eps.mul(&sigma_t)?)?,
            PredictionType::VPrediction => {
                let c_out = scalar_like(&sample, -sigma / (sigma * sigma + 1.0).sqrt())?;
                let c_skip_div = scalar_like(&sample, sigma * sigma + 1.0)?;
                eps.mul(&c_out)?.add(&sample.div(&c_skip_div)?)?
            }
            PredictionType::Sample => eps,
        };
        let derivative = sample.sub(&pred_original)?.div(&sigma_t)?;
        let dt = scalar_like(&sample, sigma_next - sigma)?;
        let prev = sample.add(&derivative.mul(&dt)?)?;
        Ok(prev.to_dtype(out_dtype)?)
    }
}

/// A one-element f32 tensor that broadcasts against `like`.
fn scalar_like<B: Backend>(like: &Tensor<B>, value: f32) -> Result<Tensor<B>> {
    let dims = vec![1usize; like.rank()];
    Ok(Tensor::from_f32(like.backend(), &dims, vec![value])?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emu2_gen_leading_schedule_matches_the_spec() {
        let cfg: EulerDiscreteConfig = serde_json::from_str(
            r#"{"beta_schedule":"scaled_linear","beta_start":0.00085,"beta_end":0.012,
                "timestep_spacing":"leading","steps_offset":1}"#,
        )
        .unwrap();
        let mut s = EulerDiscreteScheduler::new(&cfg).unwrap();
        s.set_timesteps(50).unwrap();
        assert_eq!(s.timesteps()[0], 981.0);
        assert_eq!(s.timesteps()[49], 1.0);
        assert_eq!(s.sigmas().len(), 51);
        assert_eq!(s.sigmas()[50], 0.0);
        assert!(s.init_noise_sigma().unwrap() > s.sigmas()[0]);
    }

    #[test]
    fn trained_betas_replace_the_beta_schedule() {
        let linear = EulerDiscreteConfig::default();
        let betas = torch_linspace_f32(linear.beta_start, linear.beta_end, 1000);
        let trained = EulerDiscreteConfig {
            trained_betas: Some(betas.iter().map(|&b| b as f64).collect()),
            beta_schedule: "ignored when trained_betas is set".into(),
            ..EulerDiscreteConfig::default()
        };
        let mut a = EulerDiscreteScheduler::new(&linear).unwrap();
        let mut b = EulerDiscreteScheduler::new(&trained).unwrap();
        a.set_timesteps(30).unwrap();
        b.set_timesteps(30).unwrap();
        assert_eq!(a.sigmas(), b.sigmas());
        let short = EulerDiscreteConfig {
            trained_betas: Some(vec![0.1; 10]),
            ..EulerDiscreteConfig::default()
        };
        assert!(EulerDiscreteScheduler::new(&short).is_err());
    }

    #[test]
    fn unsupported_options_are_named() {
        for (json, field) in [
            (r#"{"use_karras_sigmas":true}"#, "use_karras_sigmas"),
            (r#"{"beta_schedule":"squaredcos_cap_v2"}"#, "beta_schedule"),
            (r#"{"interpolation_type":"log_linear"}"#, "interpolation_type"),
            (r#"{"timestep_spacing":"karras"}"#, "timestep_spacing"),
            (r#"{"prediction_type":"flow"}"#, "prediction_type"),
            (r#"{"_class_name":"DDIMScheduler"}"#, "_class_name"),
        ] {
            let cfg: EulerDiscreteConfig = serde_json::from_str(json).unwrap();
            let err = EulerDiscreteScheduler::new(&cfg).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let mut s = EulerDiscreteScheduler::new(&EulerDiscreteConfig::default()).unwrap();
        assert!(s.set_timesteps(0).is_err());
        assert!(s.set_timesteps(1001).is_err());
        assert!(s.init_noise_sigma().is_err());
    }
}
